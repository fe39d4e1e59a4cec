"""`--mode explain`: evidence spans per code (JSONL + optional HTML) and, with `--evaluate`,
explanation quality per method (medcode_jax.explain.evaluate).

  python -m medcode_jax.main --mode=explain --config=... --workdir=RUN \
      --method=attention,integrated_gradients --input='notes/*.txt' --output=expl.jsonl \
      [--html=expl.html] [--codes=predicted|gold] [--top_spans=10]
  python -m medcode_jax.main --mode=explain --evaluate --method=all --input=shards:test ...

JSONL, one line per (document, method):
  {"doc_id", "method", "threshold", "codes": [{"code", "description", "probability",
      "above_threshold", "evidence": [{"text", "start", "end", "score"}, ...]}]}
(shards input: "token_start" / "token_end" instead of "start" / "end"); an empty text file
gets one `{"doc_id", "error": "empty note: ..."}` line. `--codes=predicted`: the codes above
the run's threshold (the most probable one if none is), at most `max_codes`; `--codes=gold`
(shards only): the document's labels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medcode_jax import input_pipeline, predict, steps, train, writers
from medcode_jax import sharding as shd
from medcode_jax.explain import evaluate as ev
from medcode_jax.explain import report

CODE_CHOICES = ("predicted", "gold")


def method_names(spec: str | Sequence[str]) -> list[str]:
    """'a,b' or 'all' -> method names, checked against methods.METHODS."""
    from medcode_jax.explain import methods

    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(methods.METHODS)
    unknown = [n for n in names if n not in methods.METHODS]
    if unknown or not names:
        raise ValueError(f"--method {spec!r}: unknown {unknown}; use 'all' or a comma-separated "
                         f"list of {', '.join(methods.METHODS)}")
    return names


def explain_options(config: ml_collections.ConfigDict, tokenizer, pad_token_id: int,
                    **overrides) -> "methods.ExplainOptions":
    """`config.explain` (+ `overrides`) as ExplainOptions; the baseline token of integrated
    gradients and occlusion is the tokenizer's mask token (its pad token when it has none)."""
    from medcode_jax.explain import methods

    baseline = tokenizer.mask_token_id
    if baseline is None:
        baseline = pad_token_id
    known = {f.name for f in dataclasses.fields(methods.ExplainOptions)}
    configured = dict(config.get("explain", {}))
    unknown = sorted(set(configured) - known)
    if unknown:
        raise ValueError(f"config.explain has unknown field(s) {unknown}; known: "
                         f"{sorted(known - {'baseline_token_id'})}")
    if configured.get("code_batch") == 0:
        configured["code_batch"] = None  # the backend's default
    wanted = {"baseline_token_id": int(baseline), **configured, **overrides}
    try:
        return methods.ExplainOptions(**{k: v for k, v in wanted.items() if k in known})
    except ValueError as e:
        raise ValueError(f"config.explain: {e}") from None


def compile_method(run: train.Run, method: str, tokenizer, **options) -> Callable:
    """Jitted `fn(inputs{input_ids, attention_mask, token_mask}, codes [B, K], key)
    -> scores [B, K, T]` bound to the run's current state."""
    from medcode_jax.explain import methods

    if method not in methods.METHODS:
        raise ValueError(f"unknown explanation method {method!r}; use one of "
                         f"{', '.join(methods.METHODS)}")
    opts = explain_options(run.config, tokenizer, run.ds.pad_token_id, **options)
    fn = methods.make_explain_fn(run.graphdef, method, opts)
    rows = shd.batch_sharding(run.mesh)
    jitted = jax.jit(fn, in_shardings=(run.state_shardings.params, run.state_shardings.frozen,
                                       run.rest_shardings, rows, rows, shd.replicated(run.mesh)),
                     out_shardings=rows)

    def call(inputs: dict[str, jax.Array], codes: jax.Array, key: jax.Array) -> jax.Array:
        return jitted(run.state.params, run.state.frozen, run.rest, inputs, codes, key)

    return call


def select_codes(probs: np.ndarray, threshold: float, k: int, *,
                 gold: np.ndarray | None = None, at_least_one: bool = True) -> np.ndarray:
    """[B, C] probabilities -> [B, k] code ids, most probable first, -1 = empty slot:
    the codes above `threshold` (the top one when none is and `at_least_one`), or the gold
    codes (`gold` [B, C] multi-hot)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    out = np.full((probs.shape[0], k), -1, np.int32)
    for b in range(probs.shape[0]):
        chosen = order[b]
        if gold is not None:
            chosen = chosen[gold[b, chosen] > 0]
        else:
            above = chosen[probs[b, chosen] > threshold]
            chosen = above if (above.size or not at_least_one) else chosen[:1]
        chosen = chosen[:k]
        out[b, :chosen.size] = chosen
    return out


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=jax.process_index() != 0)


def _global(run: train.Run, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return input_pipeline.to_global(batch, run.mesh)


def _local(x: np.ndarray) -> np.ndarray:
    """This process's rows of a global host array (every process holds all rows)."""
    n = x.shape[0] // jax.process_count()
    return x[jax.process_index() * n:(jax.process_index() + 1) * n]


# ----------------------------------------------------------------------------- explain


def explain(config: ml_collections.ConfigDict, workdir: str, *, methods: str | Sequence[str],
            input_spec: str, output: str, html: str | None = None, codes: str = "predicted",
            top_spans: int = 10, max_codes: int | None = None) -> int:
    """Write evidence spans of `methods` for the documents of `input_spec`; returns the number
    of JSONL lines written."""
    names = method_names(methods)
    if codes not in CODE_CHOICES:
        raise ValueError(f"--codes={codes!r}: use one of {CODE_CHOICES}")
    shards_input = input_spec.startswith("shards:")
    if codes == "gold" and not shards_input:
        raise ValueError("--codes=gold needs labels: use --input=shards:<split> (text files "
                         "have none), or --codes=predicted")
    run = train.load_trained(config, workdir)
    threshold = train.read_threshold(workdir, int(run.state.step))
    tokenizer = predict._tokenizer(run)
    k = min(max_codes or config.train.predictions_top_k, run.ds.num_labels)
    prob_step = train.Evaluator(run).step(steps.PLMICD_IO)
    fns = {m: compile_method(run, m, tokenizer) for m in names}
    if shards_input:
        split = input_spec.split(":", 1)[1]
        total = int(run.ds.lengths(split).size)
        groups = (predict.TextGroup(b, [], []) for b in
                  predict.shard_batches(run, split, tokenizer))
    else:
        if jax.process_count() > 1:
            raise ValueError("explaining text files runs on one process; use shards:<split> "
                             "for multi-host runs")
        total = None
        groups = predict.text_batches(run, input_spec, tokenizer)
    main = jax.process_index() == 0
    if main:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    page = report.HtmlWriter(html, f"Evidence: {', '.join(names)}") if (html and main) else None
    key = jax.random.key(config.train.seed)
    written = 0
    try:
        with (open(tmp, "w", encoding="utf-8") if main else contextlib.nullcontext()) as out, \
                _progress(total, "explain") as bar:
            for index, group in enumerate(groups):
                per_method, probs, chosen = {}, None, None
                if group.batch is not None:
                    batch = group.batch
                    inputs = _global(run, {f: batch[f] for f in
                                           ("input_ids", "attention_mask", "token_mask")})
                    probs = train.host_rows(prob_step(
                        run.state.params, run.state.frozen, run.rest,
                        {f: inputs[f] for f in steps.EVAL_KEYS}))
                    gold = train.host_rows(batch["labels"]) if codes == "gold" else None
                    chosen = select_codes(probs, threshold, k, gold=gold)
                    codes_dev = _global(run, {"codes": _local(chosen)})["codes"]
                    for m, fn in fns.items():
                        per_method[m] = train.host_rows(
                            fn(inputs, codes_dev, jax.random.fold_in(key, index)))
                    host = {f: train.host_rows(batch[f]) if jax.process_count() > 1 else batch[f]
                            for f in ("input_ids", "attention_mask", "token_mask", "valid",
                                      "doc_ids")}
                    if not group.docs:
                        group = predict.TextGroup(
                            batch, predict.shard_documents(tokenizer, host),
                            [("doc", r) for r in np.flatnonzero(host["valid"])])
                for kind, item in group.order:
                    bar.update(1)
                    if not main:
                        continue
                    if kind == "error":
                        out.write(json.dumps(item) + "\n")
                        written += 1
                        if page:
                            page.error(item["doc_id"], item["error"])
                        continue
                    row, doc = int(item), group.docs[int(item)]
                    for m in names:
                        entries, words = _code_entries(run, doc, per_method[m][row], chosen[row],
                                                       probs[row], threshold, top_spans)
                        out.write(json.dumps({"doc_id": doc.doc_id, "method": m,
                                              "threshold": threshold, "codes": entries}) + "\n")
                        written += 1
                        if page:
                            page.document(doc, m, entries, words)
        if main:
            os.replace(tmp, output)
            if page:
                page.close()
                page = None
    finally:
        if page:
            page.abort()
        if main and os.path.exists(tmp):
            os.remove(tmp)  # failed half-way: no partial output
    return written


def _code_entries(run: train.Run, doc: report.Document, scores: np.ndarray, codes: np.ndarray,
                  probs: np.ndarray, threshold: float, top: int
                  ) -> tuple[list[dict], np.ndarray]:
    keep = np.flatnonzero(codes >= 0)
    n = len(doc.input_ids)
    s = np.asarray(scores, np.float64)[keep, :n] * doc.token_mask[None, :]
    s = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-30)
    words = report.word_scores(s, doc)
    entries = []
    for i, k in enumerate(keep):
        label = int(codes[k])
        entries.append({"code": run.ds.label_space[label],
                        "description": run.ds.descriptions[label],
                        "probability": round(float(probs[label]), 6),
                        "above_threshold": bool(probs[label] > threshold),
                        "evidence": report.spans(words[i], doc, top)})
    return entries, words


# ----------------------------------------------------------------------------- evaluate


@dataclasses.dataclass
class _Collected:
    rows: list[ev.Row]
    comprehensiveness: list[float]
    sufficiency: list[float]


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, methods: str | Sequence[str],
             split: str = "test", output: str | None = None, faithfulness: bool = True,
             faithfulness_step: int = ev.FAITHFULNESS_STEP,
             faithfulness_features: int = ev.FAITHFULNESS_FEATURES,
             max_codes: int | None = None) -> dict[str, Any]:
    """Plausibility / sparsity / distractor (and faithfulness) metrics per method on `split`
    (the attribution decision boundary tuned on "val"); writes JSON (default
    <workdir>/explanations_<split>.json), TensorBoard scalars and prints the table."""
    names = method_names(methods)
    if int(config.data.get("max_evidence_codes", 0)) <= 0:
        raise ValueError("--evaluate needs evidence in the batches: pass "
                         "--config.data.max_evidence_codes=E (> 0) with a dataset prepared "
                         "with evidence (metadata.json \"evidence\": true)")
    run = train.load_trained(config, workdir)
    threshold = train.read_threshold(workdir, int(run.state.step))
    tokenizer = predict._tokenizer(run)
    k = min(max_codes or config.train.predictions_top_k, run.ds.num_labels)
    prob_step = train.Evaluator(run).step(steps.PLMICD_IO)
    code_prob = _code_prob_step(run)
    mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None \
        else run.ds.pad_token_id
    results: dict[str, Any] = {}
    for m in names:
        fn = compile_method(run, m, tokenizer)
        val = _collect(run, tokenizer, "val", fn, prob_step, None, threshold, k, mask_id,
                       faithfulness=False)
        test = _collect(run, tokenizer, split, fn, prob_step, code_prob, threshold, k, mask_id,
                        faithfulness=faithfulness, step=faithfulness_step,
                        features=faithfulness_features)
        results[m] = ev.method_report(val.rows, test.rows, threshold)
        if faithfulness:
            results[m]["faithfulness"] = {
                "rows": len(test.comprehensiveness),
                "comprehensiveness": float(np.mean(test.comprehensiveness))
                if test.comprehensiveness else math.nan,
                "sufficiency": float(np.mean(test.sufficiency)) if test.sufficiency
                else math.nan,
                "step": faithfulness_step, "max_features": faithfulness_features}
    step = int(run.state.step)
    document = {"scale": "fractions (not x100)", "step": step, "split": split,
                "model_threshold": threshold, "methods": results}
    path = output or os.path.join(workdir, f"explanations_{split}.json")
    train._write_json(path, document)
    writer = writers.MetricWriter(workdir)
    try:
        writer.scalars(step, ev.flat_scalars(results), prefix=f"explain_{split}")
    finally:
        writer.close()
    if jax.process_index() == 0:
        print(f"\nexplanations on {split} (x100; decision boundary tuned on val)\n"
              f"{ev.format_table(results)}", flush=True)
    return document


def _code_prob_step(run: train.Run) -> Callable:
    """Jitted: (inputs{input_ids, attention_mask, code [N]}) -> probability of `code` [N]."""
    graphdef = run.graphdef

    def step(params, frozen, rest, batch):
        from flax import nnx

        model = nnx.merge(graphdef, params, frozen, rest)
        logits = model(batch["input_ids"], batch["attention_mask"], deterministic=True)
        picked = jnp.take_along_axis(logits.astype(jnp.float32), batch["code"][:, None], axis=1)
        return jax.nn.sigmoid(picked[:, 0])

    rows = shd.batch_sharding(run.mesh)
    jitted = jax.jit(step, in_shardings=(run.state_shardings.params, run.state_shardings.frozen,
                                         run.rest_shardings, rows), out_shardings=rows)
    return lambda inputs: jitted(run.state.params, run.state.frozen, run.rest, inputs)


def _collect(run: train.Run, tokenizer, split: str, fn: Callable, prob_step, code_prob,
             threshold: float, k: int, mask_id: int, *, faithfulness: bool,
             step: int = ev.FAITHFULNESS_STEP, features: int = ev.FAITHFULNESS_FEATURES
             ) -> _Collected:
    got = _Collected([], [], [])
    key = jax.random.key(run.config.train.seed)
    with _progress(int(run.ds.lengths(split).size), f"explain {split}") as bar:
        for index, batch in enumerate(predict.shard_batches(run, split, tokenizer)):
            missing = [f for f in ("evidence_codes", "evidence_mask") if f not in batch]
            if missing:
                raise ValueError(f"the {split} batches carry no {missing}: the dataset at "
                                 f"{run.ds.path} must be prepared with evidence and "
                                 f"config.data.max_evidence_codes > 0")
            inputs = _global(run, {f: batch[f] for f in
                                   ("input_ids", "attention_mask", "token_mask")})
            probs = train.host_rows(prob_step(run.state.params, run.state.frozen, run.rest,
                                              {f: inputs[f] for f in steps.EVAL_KEYS}))
            host = {f: train.host_rows(batch[f]) for f in
                    ("input_ids", "attention_mask", "token_mask", "valid", "doc_ids",
                     "evidence_codes", "evidence_mask")}
            distractor = (train.host_rows(batch["distractor_mask"])
                          if "distractor_mask" in batch else None)
            codes = _global(run, {"c": batch["evidence_codes"].astype(np.int32)})["c"]
            bkey = jax.random.fold_in(key, index)
            scores = train.host_rows(fn(inputs, codes, bkey))
            got.rows += ev.batch_rows(scores, host["evidence_codes"], host["token_mask"], probs,
                                      host["valid"], host["doc_ids"],
                                      evidence_mask=host["evidence_mask"],
                                      distractor_mask=distractor)
            if faithfulness:
                chosen = select_codes(probs, threshold, k, at_least_one=False)
                dev = _global(run, {"c": _local(chosen)})["c"]
                pred_scores = train.host_rows(fn(inputs, dev, jax.random.fold_in(bkey, 1)))
                comp, suff = _faithfulness(run, tokenizer, code_prob, host, probs, chosen,
                                           pred_scores, mask_id, step, features)
                got.comprehensiveness += comp
                got.sufficiency += suff
            bar.update(int(host["valid"].sum()))
    return got


def _faithfulness(run: train.Run, tokenizer, code_prob, host, probs, chosen, scores,
                  mask_id: int, step: int, features: int) -> tuple[list[float], list[float]]:
    """Comprehensiveness / sufficiency of every (document, predicted code) of one batch."""
    size = run.config.train.eval_batch_size
    width = host["input_ids"].shape[1]
    docs = predict.shard_documents(tokenizer, host)
    inputs, targets, slots = [], [], []  # perturbed rows; (row, kind, code slot)
    jobs = []
    for b in np.flatnonzero(host["valid"]):
        doc = docs[b]
        for j in np.flatnonzero(chosen[b] >= 0):
            code = int(chosen[b, j])
            n = len(doc.input_ids)
            words = ev.word_attributions(scores[b, j, :n] * doc.token_mask, doc.word_of_token,
                                         doc.num_words)
            job = {"p": float(probs[b, code]), "comp": [], "suff": []}
            jobs.append(job)
            for kind, descending in (("comp", True), ("suff", False)):
                for removed in ev.perturbation_word_sets(words, descending=descending,
                                                         step=step, max_features=features):
                    if removed.size == 0:
                        job[kind].append(job["p"])  # nothing masked: the unperturbed input
                        continue
                    ids = host["input_ids"][b].copy()
                    ids[:n][np.isin(doc.word_of_token, removed)] = mask_id
                    job[kind].append(None)
                    inputs.append((ids, host["attention_mask"][b]))
                    targets.append(code)
                    slots.append((job, kind, len(job[kind]) - 1))
    for start in range(0, len(inputs), size):
        part = inputs[start:start + size]
        ids = np.full((size, width), run.ds.pad_token_id, np.int32)
        mask = np.zeros((size, width), np.int32)
        code = np.zeros(size, np.int32)
        for i, (x, msk) in enumerate(part):
            ids[i], mask[i], code[i] = x, msk, targets[start + i]
        out = train.host_rows(code_prob(_global(run, {"input_ids": _local(ids),
                                                      "attention_mask": _local(mask),
                                                      "code": _local(code)})))
        for i in range(len(part)):
            job, kind, pos = slots[start + i]
            job[kind][pos] = float(out[i])
    comp = [ev.comprehensiveness(j["p"], np.array(j["comp"])) for j in jobs]
    suff = [ev.sufficiency(j["p"], np.array(j["suff"])) for j in jobs]
    return comp, suff
