"""PLM-RR end to end: stage 1 (retriever), candidate cache, stage 2 (re-ranker), comparison.

`run_plmrr(config, workdir)` is what `python -m medcode_jax.main --config=configs/plmrr.py`
runs. Every stage goes through the one training loop (`train.train_and_evaluate`) and is
skipped when its output is complete, so the same command continues after a kill:

  W/retriever/    stage 1: PLM-CA (`config.retriever`), complete when its metrics.json exists;
                  or `config.retriever.workdir`, an existing PLM-CA run (same shards and label
                  space, checked)
  W/candidates/   top-`rerank.k_max` codes and retriever logits of every train/val/test
                  document from the best stage-1 checkpoint (`medcode_jax.candidates`); a cache
                  made by another checkpoint or for other shards is refused, saying why
  W/reranker/     stage 2: the re-ranker (`config.model.type == "plmrr"`), complete when its
                  metrics.json exists; resumes from its latest checkpoint otherwise
  W/metrics.json  stage 1 vs stage 2 on the test set, retriever recall@K and coverage
                  (val, test), the oracle ceiling, stage timings; W/tensorboard/ the same

`RerankFeeder` is PLM-RR's host side of the training loop (`train.Feeder`): it looks each
document's candidates up in the cache (training: gold codes forced in, then hard negatives;
evaluation: the pure top K), decides how many distinct descriptions a micro-batch encodes
(`steps.RerankIO.num_unique`, rounded up to `rerank.unique_multiple`) and turns the re-ranker's
candidate logits into cascade scores over all C codes.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from medcode_jax import candidates, metrics as metrics_lib, steps, train, writers

RETRIEVER_DIR = "retriever"
CACHE_DIR = "candidates"
RERANKER_DIR = "reranker"
STAGES_FILE = "stages.json"
RECALL_AT = metrics_lib.RETRIEVER_RECALL_AT
ENCODER_INITS = ("pretrained", "retriever")
SCORE_FILLS = ("cascade", "constant")
NORMALISATIONS = ("full", "candidates")


# ----------------------------------------------------------------------------- configs


def retriever_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.retriever.workdir or os.path.join(workdir, RETRIEVER_DIR)


def retriever_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Stage 1's PLM-CA config, checked to read the same shards as stage 2."""
    r = config.retriever
    if r.model.type != "plmicd" or r.model.head != "cross_attention":
        raise ValueError("config.retriever must be a PLM-CA config (model.type 'plmicd', "
                         f"head 'cross_attention'), got {r.model.type!r} / {r.model.head!r}")
    for field in ("dir", "max_length"):
        if r.data[field] != config.data[field]:
            raise ValueError(
                f"config.retriever.data.{field}={r.data[field]!r} differs from "
                f"config.data.{field}={config.data[field]!r}: both stages must read the same "
                f"shards (set --config.retriever.data.{field} too)")
    return r


def reranker_config(config: ml_collections.ConfigDict, workdir: str
                    ) -> ml_collections.ConfigDict:
    """The stage-2 config with the pipeline's paths filled in (cache, retriever run)."""
    out = copy.deepcopy(config)
    with out.unlocked():
        out.rerank.cache_dir = config.rerank.cache_dir or os.path.join(workdir, CACHE_DIR)
        out.retriever.workdir = retriever_dir(config, workdir)
    return out


def validate_rerank(config: ml_collections.ConfigDict, num_labels: int) -> None:
    r = config.rerank
    checks = ((r.encoder_init, ENCODER_INITS, "encoder_init"),
              (r.score_fill, SCORE_FILLS, "score_fill"),
              (r.loss_normalisation, NORMALISATIONS, "loss_normalisation"))
    for value, allowed, name in checks:
        if value not in allowed:
            raise ValueError(f"config.rerank.{name}={value!r}: use one of {allowed}")
    if not 1 <= r.k <= num_labels:
        raise ValueError(f"config.rerank.k={r.k} must be in [1, {num_labels}] (the label space)")
    if r.k_max < r.k:
        raise ValueError(f"config.rerank.k_max={r.k_max} must be >= config.rerank.k={r.k}")
    if r.unique_multiple < 1:
        raise ValueError(f"config.rerank.unique_multiple={r.unique_multiple} must be >= 1")
    if config.model.dca or config.model.freeze_label_queries:
        raise ValueError("config.model.dca / freeze_label_queries are PLM-CA options; the "
                         "re-ranker has no label queries")


def k_max_for(config: ml_collections.ConfigDict, num_labels: int) -> int:
    return min(int(config.rerank.k_max), num_labels)


# ----------------------------------------------------------------------------- feeding


class RerankFeeder(train.Feeder):
    """PLM-RR's host side of the loop (see the module docstring)."""

    # the step's shapes depend on the candidates (distinct descriptions): not known ahead
    static_shapes = False

    def __init__(self, config: ml_collections.ConfigDict, cache: candidates.CandidateCache,
                 num_labels: int, init_weights=None):
        r = config.rerank
        self.k = int(r.k)
        self.num_labels = num_labels
        self.cache = cache
        self.unique = bool(r.unique_descriptions)
        self.multiple = int(r.unique_multiple)
        self.full = r.loss_normalisation == "full"
        self.fill = r.score_fill
        self.init_weights = init_weights
        self._encoded = 0.0   # descriptions encoded / (document, candidate) slots, since last log
        self._distinct = 0.0
        self._slots = 0.0

    def _lookup(self, split: str, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.cache.split(split).lookup(np.asarray(doc_ids, np.int64))

    def _io(self, cands: np.ndarray, accum: int) -> steps.RerankIO:
        """The static ModelIO for this global batch (identical on every process)."""
        rows_per_micro = cands.shape[0] * jax.process_count() // accum
        slots = rows_per_micro * self.k
        if not self.unique:
            self._count(slots, slots, slots)
            return steps.RerankIO(num_unique=None, full_normalisation=self.full)
        every = (np.asarray(multihost_utils.process_allgather(cands, tiled=True))
                 if jax.process_count() > 1 else cands)
        count = candidates.unique_count(every, accum)
        size = candidates.unique_bucket(count, slots_per_micro=slots, multiple=self.multiple)
        self._count(size, count, slots)
        return steps.RerankIO(num_unique=size, full_normalisation=self.full)

    def _count(self, encoded: int, distinct: int, slots: int) -> None:
        self._encoded += encoded
        self._distinct += distinct
        self._slots += slots

    def train_inputs(self, batch, *, accum):
        top_ids, top_logits = self._lookup("train", batch["doc_ids"])
        cands = candidates.select_train(top_ids, batch["labels"], self.k)
        fields = {k: batch[k] for k in steps.TRAIN_KEYS}
        fields.update(candidates=cands, candidate_scores=_scores_of(cands, top_ids, top_logits))
        return self._io(cands, accum), fields

    def eval_inputs(self, batch, split):
        top_ids, top_logits = self._lookup(split, batch["doc_ids"])
        cands = candidates.select_eval(top_ids, self.k)
        fields = {k: batch[k] for k in steps.EVAL_KEYS}
        fields.update(candidates=cands, candidate_scores=top_logits[:, :self.k])
        return self._io(cands, 1), fields

    def probabilities(self, outputs, host, split):
        top_ids, top_logits = self._lookup(split, host["doc_ids"])
        return candidates.cascade_probs(outputs, top_ids[:, :self.k], top_ids, top_logits,
                                        self.num_labels, mode=self.fill)

    def train_scalars(self) -> dict[str, float]:
        if not self._slots:
            return {}
        out = {"descriptions_encoded_fraction": self._encoded / self._slots,
               "descriptions_distinct_fraction": self._distinct / self._slots}
        self._encoded = self._distinct = self._slots = 0.0
        return out


def _scores_of(cands: np.ndarray, top_ids: np.ndarray, top_logits: np.ndarray) -> np.ndarray:
    """Retriever logits of the selected candidates; a forced gold code outside the cached list
    gets the row's lowest cached logit (a bound: its true logit is no higher)."""
    match = cands[:, :, None] == top_ids[:, None, :]                       # [b, K, K_max]
    found = match.any(axis=-1)
    picked = np.take_along_axis(top_logits, match.argmax(axis=-1), axis=1)
    return np.where(found, picked, top_logits.min(axis=1, keepdims=True)).astype(np.float32)


def rerank_feeder(config: ml_collections.ConfigDict, run: train.Run) -> RerankFeeder:
    """`train.setup`'s hook for model.type == "plmrr": open the cache (refused when stale is
    the pipeline's job; here it must exist) and prepare the encoder initialisation."""
    validate_rerank(config, run.ds.num_labels)
    path = config.rerank.cache_dir
    if not path or not os.path.isfile(os.path.join(path, candidates.META_FILE)):
        raise FileNotFoundError(
            f"config.rerank.cache_dir={path!r} holds no candidate cache: run the whole pipeline "
            f"(python -m medcode_jax.main --config=configs/plmrr.py --workdir=W), which builds "
            f"W/{CACHE_DIR}/ from the stage-1 retriever first")
    cache = candidates.open_cache(path)
    if cache.meta.get("num_labels") != run.ds.num_labels or cache.k_max < config.rerank.k:
        raise candidates.StaleCacheError(
            f"{path}: cache for {cache.meta.get('num_labels')} codes with k_max {cache.k_max}, "
            f"but the shards have {run.ds.num_labels} codes and config.rerank.k="
            f"{config.rerank.k}; delete {path} and re-run the pipeline to rebuild it")
    init = None
    if config.rerank.encoder_init == "retriever":
        init = _retriever_encoder_init(config, run)
    return RerankFeeder(config, cache, run.ds.num_labels, init_weights=init)


def _retriever_encoder_init(config: ml_collections.ConfigDict, run: train.Run):
    """Warm start: copy the best stage-1 encoder into the re-ranker's encoder."""

    def init(model: nnx.Module) -> None:
        r_cfg = retriever_config(config)
        retriever = train.load_trained(r_cfg, config.retriever.workdir)
        if retriever.encoder_config != run.encoder_config:
            raise ValueError(
                "config.rerank.encoder_init='retriever' needs the same encoder architecture in "
                f"both stages; stage 1 has {retriever.encoder_config}, stage 2 "
                f"{run.encoder_config}. Use encoder_init='pretrained'")
        source = nnx.state(retriever.model().encoder, nnx.Param)
        target = nnx.state(model.encoder, nnx.Param)
        nnx.update(model.encoder, jax.tree.map(
            lambda s, t: jax.device_put(s, t.sharding), source, target))
        logging.info("stage 2 encoder initialised from the retriever at step %d",
                     int(retriever.state.step))

    return init


# ----------------------------------------------------------------------------- stages


def _complete(run_dir: str) -> dict | None:
    """A run's metrics.json (written at the very end of train_and_evaluate), else None."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    return results if "test" in results else None


def _record_stage(workdir: str, name: str, seconds: float) -> None:
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, STAGES_FILE)
    stages = _read_json(path) or {}
    stages[name] = {"seconds": round(seconds, 1), "finished": time.time()}
    train._write_json(path, stages)


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ensure_cache(config: ml_collections.ConfigDict, workdir: str) -> candidates.CandidateCache:
    """Open W/candidates/ when it matches the best stage-1 checkpoint, build it when absent,
    refuse it (StaleCacheError) when it was made by another checkpoint or for other shards."""
    r_cfg = retriever_config(config)
    r_dir = retriever_dir(config, workdir)
    cache_dir = config.rerank.cache_dir or os.path.join(workdir, CACHE_DIR)
    run = train.load_trained(r_cfg, r_dir)
    k_max = k_max_for(config, run.ds.num_labels)
    expected = dict(k=int(config.rerank.k), num_labels=run.ds.num_labels,
                    retriever_step=int(run.state.step),
                    weights_sha256=candidates.run_weights_sha256(run),
                    shards_fingerprint=candidates.shards_fingerprint(run.ds))
    if os.path.isfile(os.path.join(cache_dir, candidates.META_FILE)):
        cache = candidates.open_cache(cache_dir)
        candidates.check_fresh(cache, **expected)
        logging.info("candidate cache: skipped, %s is complete and matches the retriever "
                     "checkpoint of step %d", cache_dir, expected["retriever_step"])
        return cache
    logging.info("candidate cache: building %s (top %d of %d codes per document, retriever "
                 "step %d)", cache_dir, k_max, run.ds.num_labels, expected["retriever_step"])
    start = time.perf_counter()
    cache = candidates.build_cache(run, cache_dir, k_max=k_max, retriever_workdir=r_dir)
    _record_stage(workdir, "candidate_cache", time.perf_counter() - start)
    return cache


def retriever_recall(cache: candidates.CandidateCache, ds, split: str, k: int
                     ) -> dict[str, float]:
    """Retriever recall@K / coverage@K of `split` for K in RECALL_AT and the run's K."""
    part = cache.split(split)
    gold = _gold_label_ids(ds, split, part.doc_ids)
    ks = sorted(set(RECALL_AT) | {k})
    return candidates.retriever_recall(part.ids, gold, ks)


def _gold_label_ids(ds, split: str, doc_ids: np.ndarray) -> list[np.ndarray]:
    """Gold label ids of `split`, in the order of `doc_ids` (the cache's sorted ids)."""
    source = ds.source(split)
    by_id = {}
    for i in range(len(source)):
        ex = source[i]
        by_id[int(ex["_id"])] = np.asarray(ex["label_ids"], np.int64)
    missing = [int(d) for d in doc_ids if int(d) not in by_id]
    if missing:
        raise candidates.StaleCacheError(
            f"the candidate cache lists {len(missing)} {split} documents the shards do not have "
            f"(e.g. _id {missing[0]}); delete the cache directory and re-run")
    return [by_id[int(d)] for d in doc_ids]


def run_plmrr(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """All stages (see the module docstring); returns W/metrics.json's content, or None when
    `train.max_steps_per_run` stopped a stage early (the same command continues)."""
    os.makedirs(workdir, exist_ok=True)
    r_cfg = retriever_config(config)
    r_dir = retriever_dir(config, workdir)
    stage2 = reranker_config(config, workdir)
    rr_dir = os.path.join(workdir, RERANKER_DIR)

    stage1 = _complete(r_dir)
    if stage1 is not None:
        logging.info("stage 1 (retriever): skipped, %s/metrics.json shows a finished run "
                     "(delete that directory to retrain it)", r_dir)
    elif config.retriever.workdir:
        raise FileNotFoundError(
            f"config.retriever.workdir={r_dir!r} has no finished PLM-CA run (no metrics.json "
            f"with test results): finish it with configs/plmca.py first, or leave "
            f"retriever.workdir empty to train stage 1 in {workdir}/{RETRIEVER_DIR}")
    else:
        logging.info("stage 1 (retriever): training PLM-CA in %s", r_dir)
        start = time.perf_counter()
        stage1 = train.train_and_evaluate(r_cfg, r_dir)
        if stage1 is None:
            return None
        _record_stage(workdir, "stage1", time.perf_counter() - start)

    cache = ensure_cache(stage2, workdir)
    ds = _open_shards(config)
    k = int(config.rerank.k)
    recall = {split: retriever_recall(cache, ds, split, k) for split in ("val", "test")}
    writer = writers.MetricWriter(workdir)
    try:
        writer.scalars(0, recall["val"], prefix="retriever_val")
        writer.flush()
        if _complete(rr_dir) is None:  # until the comparison replaces it at the end
            train._write_json(os.path.join(workdir, "metrics.json"),
                              {"scale": "fractions (not x100)", "k": k,
                               "retriever_recall": recall, "stage1": {
                                   key: stage1[key] for key in ("best_step", "threshold", "test")}})
        if jax.process_index() == 0:
            print("\nretriever on validation (before stage 2):\n" + metrics_lib.format_metrics_table(
                {"val": recall["val"]}), flush=True)

        results2 = _complete(rr_dir)
        if results2 is not None:
            logging.info("stage 2 (re-ranker): skipped, %s/metrics.json shows a finished run",
                         rr_dir)
        else:
            logging.info("stage 2 (re-ranker): training in %s (K = %d, %s encoder init)",
                         rr_dir, k, config.rerank.encoder_init)
            start = time.perf_counter()
            results2 = train.train_and_evaluate(stage2, rr_dir)
            if results2 is None:
                return None
            _record_stage(workdir, "stage2", time.perf_counter() - start)
        summary = train.strict_json(compare(stage1, results2, recall, k, _read_json(
            os.path.join(workdir, STAGES_FILE)) or {}))
        train._write_json(os.path.join(workdir, "metrics.json"), summary)
        for name in ("stage1", "stage2"):
            writer.scalars(int(summary[name]["best_step"]), summary[name]["test"],
                           prefix=f"{name}_test")
        writer.scalars(0, recall["test"], prefix="retriever_test")
        if jax.process_index() == 0:
            print("\n" + format_comparison(summary), flush=True)
        return summary
    finally:
        writer.close()


def _open_shards(config: ml_collections.ConfigDict):
    from data_prep import shards

    return shards.open_dataset(config.data.dir)


COMPARISON_KEYS = (
    "f1_micro", "f1_macro", "precision_micro", "recall_micro", "map", "precision@8",
    "precision@15", "recall@15", "precision@recall", "auc_micro", "auc_macro",
    "f1_macro_band_1-10", "f1_macro_band_11-20", "f1_macro_band_21-50",
    "f1_macro_band_51-500", "f1_macro_band_gt500", "f1_micro_diagnoses", "f1_macro_diagnoses",
    "f1_micro_procedures", "f1_macro_procedures", "never_correct_codes",
    "never_correct_diagnoses", "never_correct_procedures", "num_present_codes", "threshold")


def compare(stage1: dict, stage2: dict, recall: dict, k: int, stages: dict) -> dict:
    """W/metrics.json: both stages' test metrics, retriever recall, oracle ceiling, costs."""
    oracle = {"oracle_recall_micro": recall["test"][f"retriever_coverage@{k}"],
              "oracle_recall_per_document": recall["test"][f"retriever_recall@{k}"]}
    return {"scale": "fractions (not x100)", "k": k,
            "stage1": {"best_step": stage1["best_step"], "threshold": stage1["threshold"],
                       "test": stage1["test"]},
            "stage2": {"best_step": stage2["best_step"], "threshold": stage2["threshold"],
                       "test": stage2["test"]},
            "frequency_baseline_test": stage1.get("frequency_baseline_test"),
            "retriever_recall": recall, "oracle_test": oracle, "stages": stages}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_comparison(summary: dict) -> str:
    s1, s2 = summary["stage1"]["test"], summary["stage2"]["test"]
    table = metrics_lib.format_metrics_table(
        {"stage 1 (PLM-CA)": s1, "stage 2 (PLM-RR)": s2},
        keys=[key for key in COMPARISON_KEYS if key in s1 or key in s2])
    k = summary["k"]
    rec = summary["retriever_recall"]["test"]
    recall_line = "  ".join(f"@{key.split('@')[1]} {_pct(value)}"
                            for key, value in rec.items() if key.startswith("retriever_recall@"))
    lines = [f"test set, stage 1 vs stage 2 (x100; counts and thresholds as they are)", table,
             f"retriever recall (per document, x100): {recall_line}",
             f"oracle ceiling at K = {k}: {_pct(summary['oracle_test']['oracle_recall_micro'])}"
             f" % of test gold codes are candidates (stage-2 micro recall if the re-ranker were "
             f"perfect)"]
    costs = summary.get("stages") or {}
    if costs:
        lines.append("wall time: " + ", ".join(f"{name} {v['seconds']:.0f} s"
                                               for name, v in costs.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- other modes


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str) -> dict:
    """`--mode=eval` for PLM-RR: the best re-ranker (cascade scores) on `split`."""
    return train.evaluate_checkpoint(reranker_config(config, workdir),
                                     os.path.join(workdir, RERANKER_DIR), split)


def load(config: ml_collections.ConfigDict, workdir: str) -> tuple[train.Run, train.Run]:
    """(retriever run, re-ranker run), each holding its best checkpoint."""
    stage2 = reranker_config(config, workdir)
    retriever = train.load_trained(retriever_config(config), retriever_dir(config, workdir))
    rerank = train.load_trained(stage2, os.path.join(workdir, RERANKER_DIR))
    return retriever, rerank


def export(config: ml_collections.ConfigDict, workdir: str, export_dir: str | None = None, *,
           flavour: str = "fork", overwrite: bool = False) -> str:
    """`--mode=export` for PLM-RR: the fork's `PLMICD(attention_type="token_level")` layout
    (`export.export_plmrr_model`), checked against the JAX cascade before it is kept."""
    from medcode_jax import export as export_lib

    if jax.process_count() != 1:
        raise RuntimeError("export runs in a single process; run --mode=export without the "
                           "multi-host launcher")
    out_dir = export_dir or os.path.join(workdir, "export")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another "
                              "--export_dir")
    retriever, rerank = load(config, workdir)
    rr_dir = os.path.join(workdir, RERANKER_DIR)
    step = int(rerank.state.step)
    tokenizer_dir = os.path.join(str(rerank.ds.path), "tokenizer")
    return export_lib.export_plmrr_model(
        rerank.model(), retriever.model(), encoder_cfg=rerank.encoder_config,
        retriever_encoder_cfg=retriever.encoder_config, encoder_path=config.encoder.path,
        label_space=rerank.ds.label_space, descriptions=rerank.ds.descriptions,
        top_k=int(config.rerank.k), threshold=train.read_threshold(rr_dir, step),
        out_dir=out_dir, flavour=flavour,
        tokenizer_dir=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
        config_dict=config.to_dict(), epoch=step // max(rerank.steps_per_epoch, 1),
        icd_version=rerank.ds.metadata.get("icd_version"), overwrite=overwrite)


def predict(config: ml_collections.ConfigDict, workdir: str, input_spec: str, output: str,
            max_codes: int = 50, explain: str | None = None) -> int:
    """`--mode=predict` for PLM-RR: the retriever proposes the top K codes of each note (text
    files or shards:<split>), the re-ranker scores them; JSONL per document with the top codes
    by cascade score, each with its re-ranker and retriever probabilities and its evidence
    words (character offsets into the note, like medcode_jax.predict): the note tokens its
    description attended to most, or `explain`'s scores (medcode_jax.explain.methods; every
    method but attgrad). An empty or whitespace-only note gets an error line instead of codes.
    Returns the number of lines written."""
    from medcode_jax import input_pipeline, predict as predict_lib

    retriever, rerank = load(config, workdir)
    rr_dir = os.path.join(workdir, RERANKER_DIR)
    threshold = train.read_threshold(rr_dir, int(rerank.state.step))
    tokenizer = predict_lib._tokenizer(rerank)
    k, num_labels = int(config.rerank.k), rerank.ds.num_labels
    k_max = k_max_for(config, num_labels)
    num_codes = min(max(config.train.predictions_top_k, 1), max_codes, k)
    explain_fn = None
    if explain:
        from medcode_jax.explain import cli

        if explain == "attgrad":
            raise ValueError("--explain=attgrad is not available for PLM-RR (its attention is a "
                             "mean over description tokens and heads, not an input of its "
                             "logits); use attingrad, gradient_x_input, integrated_gradients, "
                             "occlusion, attention, attention_rollout or random")
        explain_fn = cli.compile_method(rerank, explain, tokenizer)

    @jax.jit
    def retrieve(params, frozen, rest, ids, mask):
        logits = nnx.merge(retriever.graphdef, params, frozen, rest)(ids, mask)
        values, indices = jax.lax.top_k(logits.astype(jax.numpy.float32), k_max)
        return indices, values

    @jax.jit
    def rerank_step(params, frozen, rest, ids, mask, cands, scores):
        model = nnx.merge(rerank.graphdef, params, frozen, rest)
        return model(ids, mask, cands, scores, return_attention=True)  # [B, K], [B, K, T]

    groups = predict_lib.input_groups(rerank, input_spec, tokenizer)
    count = 0
    key = jax.random.key(config.train.seed)
    with predict_lib.jsonl_output(output) as out:
        for index, group in enumerate(groups):
            if group.batch is None:  # only empty notes in this group
                if out is not None:
                    count += predict_lib.write_group(out, group, threshold, None)
                continue
            batch = group.batch
            inputs = input_pipeline.to_global(
                {f: batch[f] for f in ("input_ids", "attention_mask", "token_mask")},
                rerank.mesh)
            r, s = retriever.state, rerank.state
            top_ids, top_logits = retrieve(r.params, r.frozen, retriever.rest,
                                           inputs["input_ids"], inputs["attention_mask"])
            cands, cand_scores = top_ids[:, :k], top_logits[:, :k]
            logits, rows = rerank_step(s.params, s.frozen, rerank.rest, inputs["input_ids"],
                                       inputs["attention_mask"], cands, cand_scores)
            if explain_fn is not None:
                rows = explain_fn(dict(inputs, candidate_scores=cand_scores), cands,
                                  jax.random.fold_in(key, index))
            top_ids, top_logits, logits, rows = (train.host_rows(x) for x in
                                                 (top_ids, top_logits, logits, rows))
            probs = candidates.cascade_probs(logits, top_ids[:, :k], top_ids, top_logits,
                                             num_labels, mode=config.rerank.score_fill)
            group = predict_lib.with_documents(group, tokenizer)
            results = (top_ids, top_logits, logits, rows, probs)
            if out is not None:
                count += predict_lib.write_group(
                    out, group, threshold,
                    lambda row, doc: _rr_entries(results, row, doc, rerank, threshold,
                                                 num_codes))
    return count


def _rr_entries(results, row: int, doc, rerank: train.Run, threshold: float,
                num_codes: int) -> list[dict]:
    """The top `num_codes` candidates of one document by re-ranker score, with evidence."""
    from medcode_jax import predict as predict_lib

    top_ids, top_logits, logits, rows, probs = results
    order = np.argsort(-logits[row], kind="stable")[:num_codes]
    words = predict_lib.evidence(rows[row][order], doc, predict_lib.TOP_TOKENS)
    entries = []
    for slot, evidence in zip(order, words):
        label = int(top_ids[row, slot])
        entries.append({
            "code": rerank.ds.label_space[label],
            "description": rerank.ds.descriptions[label],
            "probability": round(float(probs[row, label]), 6),
            "above_threshold": bool(probs[row, label] > threshold),
            "retriever_probability": round(
                float(1.0 / (1.0 + np.exp(-top_logits[row, slot]))), 6),
            "retriever_rank": int(slot) + 1,
            "evidence": evidence})
    return entries
