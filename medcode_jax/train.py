"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One global batch of `train.global_batch_size` documents per optimiser step (accumulated over
micro-batches inside the jitted step), validation every `eval_every_epochs` epochs at threshold
0.5, early stopping on validation mAP, then: reload the best checkpoint, tune the threshold on
validation, evaluate test with it, write metrics.json / predictions / label space / config.
The same command on the same work directory resumes from the latest checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from data_prep import shards
from medcode_jax import checkpointing, input_pipeline, metrics as metrics_lib
from medcode_jax import sharding as shd
from medcode_jax import steps, writers
from medcode_jax.convert import hf_io
from medcode_jax.models import encoders, heads, plm_icd, reranker

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
HEADS = ("cross_attention", "laat")
MODEL_TYPES = ("plmicd", "plmrr")
THRESHOLD_FILE = "best_threshold.json"
PREDICTIONS_FILE = "predictions_test.jsonl"
DESCRIPTION_BATCH = 64  # descriptions encoded per call for the DCA query init


@dataclasses.dataclass
class Run:
    """Everything built once from the config: data, mesh, model structure, sharded state."""

    config: ml_collections.ConfigDict
    ds: shards.PreparedDataset
    mesh: jax.sharding.Mesh
    encoder_config: encoders.EncoderConfig
    graphdef: nnx.GraphDef
    state: steps.TrainState
    rest: nnx.State            # non-parameter variables (rng streams); never checkpointed
    state_shardings: steps.TrainState
    rest_shardings: Any
    abstract_state: Any        # restore target (ShapeDtypeStructs with shardings)
    tx: Any
    schedule: Any
    steps_per_epoch: int
    total_steps: int
    buckets: tuple[int, ...]
    feeder: "Feeder" = dataclasses.field(default_factory=lambda: Feeder())
    # Padding every batch needs beyond its longest note (plm_icd.reserve_tokens).
    reserve_tokens: int = 0

    def model(self, state: steps.TrainState | None = None) -> nnx.Module:
        state = self.state if state is None else state
        return nnx.merge(self.graphdef, state.params, state.frozen, self.rest)


class Feeder:
    """Host side of a `steps.ModelIO`: which batch fields go to the device (with which static
    ModelIO, i.e. which compiled step) and how eval outputs become [b, C] probabilities.

    This one is PLM-ICD / PLM-CA (fields as the input pipeline makes them); PLM-RR's
    (`pipelines.RerankFeeder`) adds the candidates from the retriever cache.
    `init_weights(model)`, when set, replaces the pretrained-encoder load of a fresh start.
    """

    init_weights = None
    # True: a batch's ModelIO and field shapes follow from its bucket alone (filler rows do), so
    # the steps can be compiled before the first batch (`precompile`).
    static_shapes = True
    # The training loss's IO (config.loss, explain/losses.make_io); evaluation stays plain.
    train_io: steps.ModelIO = steps.PLMICD_IO

    def train_inputs(self, batch: dict[str, np.ndarray], *, accum: int
                     ) -> tuple[steps.ModelIO, dict[str, np.ndarray]]:
        return self.train_io, {k: batch[k] for k in self.train_io.train_keys}

    def eval_inputs(self, batch: dict[str, np.ndarray], split: str
                    ) -> tuple[steps.ModelIO, dict[str, np.ndarray]]:
        return steps.PLMICD_IO, {k: batch[k] for k in steps.EVAL_KEYS}

    def probabilities(self, outputs: np.ndarray, host: dict[str, np.ndarray],
                      split: str) -> np.ndarray:
        """Eval-step outputs (global rows) -> probabilities [b, C]."""
        return outputs

    def train_scalars(self) -> dict[str, float]:
        """Extra train scalars since the last call (e.g. the distinct-description share)."""
        return {}


# ----------------------------------------------------------------------------- set-up


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """Cheap checks that fail before any compilation; returns the accumulation steps."""
    t = config.train
    model_type = config.model.type
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.model.type={model_type!r}: use one of {MODEL_TYPES}")
    if model_type == "plmicd" and config.model.head not in HEADS:
        raise ValueError(f"config.model.head={config.model.head!r}: use one of {HEADS}")
    if config.model.unmasked_padding not in plm_icd.UNMASKED_PADDINGS:
        raise ValueError(f"config.model.unmasked_padding={config.model.unmasked_padding!r}: use "
                         f"one of {plm_icd.UNMASKED_PADDINGS}")
    if not isinstance(t.precompile_threads, int) or t.precompile_threads < -1:
        raise ValueError(f"config.train.precompile_threads={t.precompile_threads!r}: use 0 (auto), "
                         "-1 (off) or a number of threads")
    if t.dtype not in DTYPES:
        raise ValueError(f"config.train.dtype={t.dtype!r}: use one of {sorted(DTYPES)}")
    loss_name = config.loss.name if "loss" in config else "bce"
    if loss_name != "bce" and model_type != "plmicd":
        raise ValueError(f"config.loss.name={loss_name!r} is for PLM-ICD / PLM-CA "
                         f"(config.model.type='plmicd'), not {model_type!r}: use 'bce'")
    if loss_name == "supervised" and config.data.max_evidence_codes <= 0:
        raise ValueError("config.loss.name='supervised' needs the evidence in the batches: set "
                         "config.data.max_evidence_codes > 0 (a dataset prepared with evidence)")
    if "loss" in config and config.loss.name == "tm" and config.loss.teacher != "initial":
        raise ValueError(f"config.loss.teacher={config.loss.teacher!r}: only 'initial' (a frozen "
                         "copy of the starting parameters) is implemented")
    if config.model.freeze_label_queries and not config.model.dca:
        raise ValueError("config.model.freeze_label_queries=True needs config.model.dca=True "
                         "(freezing randomly initialised label queries makes no sense)")
    if t.global_batch_size % t.micro_batch_size:
        raise ValueError(f"config.train.global_batch_size={t.global_batch_size} is not a multiple "
                         f"of config.train.micro_batch_size={t.micro_batch_size}")
    shards_n = shd.batch_devices(mesh)
    micro = fit_micro_batch(t.global_batch_size, t.micro_batch_size, shards_n,
                            jax.process_count(), mesh_shape=dict(mesh.shape))
    if micro != t.micro_batch_size:
        logging.warning(
            "config.train.micro_batch_size=%d does not split over the %d batch shards (mesh %s) "
            "x %d processes: using %d (accumulation %d x %d; the effective batch, %d, and the "
            "loss are unchanged)", t.micro_batch_size, shards_n, dict(mesh.shape),
            jax.process_count(), micro, t.global_batch_size // micro, micro, t.global_batch_size)
        t.micro_batch_size = micro
    unit = math.lcm(shards_n, jax.process_count())
    if t.eval_batch_size % unit:
        size = -(-t.eval_batch_size // unit) * unit
        logging.warning("config.train.eval_batch_size=%d rounded up to %d, a multiple of the %d "
                        "batch shards and processes", t.eval_batch_size, size, unit)
        t.eval_batch_size = size
    return t.global_batch_size // t.micro_batch_size


def fit_micro_batch(global_batch: int, micro_batch: int, batch_shards: int, processes: int = 1,
                    *, mesh_shape: dict | None = None) -> int:
    """The micro-batch to use: `micro_batch` if it splits evenly over the batch shards and the
    processes, else the smallest multiple of both that is at least `micro_batch` and divides
    `global_batch` (the SIGIR recipe's 1 x 16 on 8 devices becomes 8 x 2: one document per
    device per pass, as asked, and the same effective batch and loss).

    Raises ValueError when no such micro-batch exists (the global batch itself does not split
    over the devices)."""
    unit = math.lcm(batch_shards, processes)
    if micro_batch % unit == 0:
        return micro_batch
    for candidate in range(-(-micro_batch // unit) * unit, global_batch + 1, unit):
        if global_batch % candidate == 0:
            return candidate
    raise ValueError(
        f"config.train.global_batch_size={global_batch} cannot be split over {batch_shards} "
        f"batch shards (mesh {mesh_shape or {}}) x {processes} processes: it must be a multiple "
        f"of {unit}; change global_batch_size or config.mesh.shape")


def description_table(ds: shards.PreparedDataset, length: int, sep_token_id: int | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The prepared [C, 64] description tokens truncated to `length` tokens the way the
    tokenizer truncates (the last kept position becomes the separator when a description was
    cut), then trimmed to the longest real description (the reference pads to the longest)."""
    ids = np.asarray(ds.description_ids, np.int32)
    mask = np.asarray(ds.description_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] != ds.num_labels:
        raise shards.DatasetMismatchError(
            f"{ds.path}/descriptions.npz holds tables of shape {ids.shape} / {mask.shape}, "
            f"expected [{ds.num_labels}, L]: re-run data_prep for these shards")
    if not 2 <= length:
        raise ValueError(f"config.rerank.description_length={length} must be >= 2")
    cut = mask.sum(axis=1) > length
    ids, mask = ids[:, :length].copy(), mask[:, :length].copy()
    if cut.any() and sep_token_id is not None:
        ids[cut, length - 1] = sep_token_id
    longest = max(int(mask.sum(axis=1).max(initial=1)), 1)
    return ids[:, :longest], mask[:, :longest]


def build_model(config: ml_collections.ConfigDict, enc_cfg: encoders.EncoderConfig,
                ds: shards.PreparedDataset, rngs: nnx.Rngs) -> nnx.Module:
    """PLMICD (PLM-ICD / PLM-CA) or, with config.model.type == "plmrr", the PLM-RR re-ranker."""
    dtype = DTYPES[config.train.dtype]
    num_labels, pad_token_id = ds.num_labels, ds.pad_token_id
    encoder = encoders.build_encoder(enc_cfg, rngs=rngs, dtype=dtype, param_dtype=jnp.float32,
                                     remat=config.train.remat)
    if config.model.type == "plmrr":
        r = config.rerank
        tok = ds.metadata.get("tokenizer") or {}
        ids, mask = description_table(ds, r.description_length, tok.get("sep_token_id"))
        return reranker.create_plmrr(
            encoder, description_ids=ids, description_mask=mask,
            chunk_size=config.data.chunk_size, pad_token_id=pad_token_id,
            num_heads=r.num_heads, qk_init=r.qk_init, fuse_retriever=r.fuse_retriever,
            description_grad=r.description_grad, rngs=rngs, dtype=dtype,
            param_dtype=jnp.float32)
    return plm_icd.create_plmicd(
        encoder, num_labels=num_labels, head_type=config.model.head,
        chunk_size=config.data.chunk_size, pad_token_id=pad_token_id, scale=config.model.scale,
        mask_padding=config.model.mask_padding, unmasked_padding=config.model.unmasked_padding,
        rngs=rngs, dtype=dtype, param_dtype=jnp.float32)


def reserve_tokens(config: ml_collections.ConfigDict) -> int:
    """Padding a batch needs beyond its longest note for this config's model (1 for the
    reference-unmasked `emc` mode of PLM-ICD / PLM-CA, else 0)."""
    if config.model.type != "plmicd":
        return 0
    return plm_icd.reserve_tokens(config.model.mask_padding, config.model.unmasked_padding)


def _check_tokenizer(config: ml_collections.ConfigDict, ds: shards.PreparedDataset,
                     enc_cfg: encoders.EncoderConfig) -> None:
    tok = ds.metadata.get("tokenizer") or {}
    if tok.get("vocab_size") and tok["vocab_size"] > enc_cfg.vocab_size:
        raise shards.DatasetMismatchError(
            f"the shards' tokenizer has {tok['vocab_size']} tokens but the encoder at "
            f"{config.encoder.path} has vocab_size {enc_cfg.vocab_size}: prepare the data with "
            f"this encoder's tokenizer")
    if any(os.path.isfile(os.path.join(config.encoder.path, f)) for f in shards.TOKENIZER_FILES):
        ident = shards.tokenizer_identity(config.encoder.path)
        ds.check_compatible(tokenizer_sha256=ident["sha256"], tokenizer_name=ident["name"])


def setup(config: ml_collections.ConfigDict) -> Run:
    """Open the data, build the mesh and create the training state, born sharded."""
    mesh = shd.make_mesh(config.mesh.shape, config.mesh.axis_names)
    validate_config(config, mesh)
    ds = shards.open_dataset(config.data.dir)
    ds.check_compatible(max_length=config.data.max_length)
    enc_cfg = encoders.read_encoder_config(config.encoder.path,
                                           num_layers=config.encoder.num_layers or None)
    _check_tokenizer(config, ds, enc_cfg)
    t = config.train
    steps_per_epoch = input_pipeline.steps_per_epoch(ds, "train", t.global_batch_size)
    total_steps = steps_per_epoch * t.num_epochs
    warmup = steps.warmup_steps_for(total_steps, warmup_steps=t.warmup_steps,
                                    warmup_fraction=t.warmup_fraction)
    schedule = steps.learning_rate_schedule(t.learning_rate, total_steps, warmup)
    tx = steps.make_optimizer(b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                              clip_norm=t.clip_norm, head_lr_multiplier=t.head_lr_multiplier)
    frozen = heads.frozen_param_filter(freeze_label_queries=config.model.freeze_label_queries)
    trainable = nnx.All(nnx.Param, nnx.Not(frozen))

    def make_model() -> plm_icd.PLMICD:
        rngs = nnx.Rngs(params=t.seed, dropout=t.seed + 1)
        return build_model(config, enc_cfg, ds, rngs)

    def init() -> tuple[steps.TrainState, nnx.State]:
        _, params, frozen_params, rest = nnx.split(make_model(), trainable, nnx.Param, ...)
        state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 frozen=frozen_params, opt_state=tx.init(params),
                                 skipped=jnp.zeros((), jnp.int32))
        return state, rest

    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(make_model), trainable, nnx.Param, ...)[0]
    (state, rest), (state_sh, rest_sh), abstract = shd.create_sharded(init, mesh, config.mesh.rules)
    reserve = reserve_tokens(config)
    run = Run(config=config, ds=ds, mesh=mesh, encoder_config=enc_cfg, graphdef=graphdef,
              state=state, rest=rest, state_shardings=state_sh, rest_shardings=rest_sh,
              abstract_state=shd.abstract_with_shardings(abstract[0], state_sh), tx=tx,
              schedule=schedule, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              buckets=input_pipeline.bucket_chunk_counts(
                  config.data.max_length + reserve, config.data.chunk_size,
                  config.data.bucket_multiple),
              reserve_tokens=reserve)
    if config.model.type == "plmrr":
        from medcode_jax import pipelines  # PLM-RR's host side: candidates from the cache

        run.feeder = pipelines.rerank_feeder(config, run)
    elif "loss" in config:
        from medcode_jax.explain import losses

        run.feeder.train_io = losses.make_io(config.loss, tokenizer=ds.metadata.get("tokenizer"),
                                             vocab_size=enc_cfg.vocab_size)
    return run


def initialise_weights(run: Run) -> None:
    """Fresh start only: load the pretrained encoder and (DCA) the description queries."""
    config = run.config
    if not (config.encoder.pretrained or config.model.dca or run.feeder.init_weights):
        return
    model = run.model()
    if run.feeder.init_weights is not None:  # e.g. PLM-RR: the encoder from the retriever
        run.feeder.init_weights(model)
    elif config.encoder.pretrained:
        hf_io.load_pretrained_into(model.encoder, run.encoder_config, config.encoder.path)
    if config.model.dca:
        queries = heads.description_query_init(
            model.encoder, run.ds.description_ids, run.ds.description_mask,
            batch_size=DESCRIPTION_BATCH)
        model.label_wise_attention.init_queries_from(queries)
    frozen = heads.frozen_param_filter(freeze_label_queries=config.model.freeze_label_queries)
    _, params, frozen_params, _ = nnx.split(model, nnx.All(nnx.Param, nnx.Not(frozen)),
                                            nnx.Param, ...)
    run.state = run.state.replace(
        params=jax.device_put(params, run.state_shardings.params),
        frozen=jax.device_put(frozen_params, run.state_shardings.frozen))


def initialise_from_workdir(run: Run, workdir: str) -> None:
    """config.loss.init_workdir: the parameters of that run's best (else latest) checkpoint
    (same model and label space), optimiser and step fresh - the reference's `load_model`."""
    ckpt = checkpointing.Checkpointer(workdir, keep=run.config.checkpoint.keep, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"config.loss.init_workdir={workdir} holds no checkpoint: "
                                    "train that run first (e.g. configs/plmicd.py:bce)")
        best = ckpt.best_step() is not None
        meta = ckpt.restore_meta(best=best)
        _check_optimizer(run, meta, workdir)
        _check_resume(run, meta or {}, workdir)
        state, _, _ = ckpt.restore(run.abstract_state, best=best)
    finally:
        ckpt.close()
    run.state = run.state.replace(params=state.params, frozen=state.frozen)
    logging.info("parameters initialised from step %d of %s", int(state.step), workdir)


def initial_state(run: Run) -> None:
    """A fresh start's weights: pretrained encoder etc., or config.loss.init_workdir's."""
    initialise_weights(run)
    init_dir = run.config.loss.init_workdir if "loss" in run.config else ""
    if init_dir:
        initialise_from_workdir(run, init_dir)


def teacher_params(run: Run) -> nnx.State:
    """config.loss.teacher='initial': a copy (own buffers: the train state is donated) of the
    parameters training starts from (`initial_state`)."""
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                   out_shardings=run.state_shardings.params)
    return copy(run.state.params)


# ----------------------------------------------------------------------------- evaluation


def host_rows(x: Any) -> np.ndarray:
    """Global rows on every process (process-local numpy batches or global jax arrays)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
    """Jitted eval step + the host loop feeding a MetricAccumulator."""

    def __init__(self, run: Run):
        self.run = run
        self._steps: dict[steps.ModelIO, Any] = {}

    def step(self, io: steps.ModelIO):
        """The jitted eval step for `io` (one compiled program per distinct ModelIO)."""
        if io not in self._steps:
            run = self.run
            self._steps[io] = steps.jit_eval_step(steps.make_eval_step(run.graphdef, io),
                                                  run.state_shardings, run.rest_shardings,
                                                  run.mesh)
        return self._steps[io]

    def batches(self, split: str, *, max_evidence_codes: int = 0
                ) -> Iterator[dict[str, np.ndarray]]:
        """Eval batches of `split`; with `max_evidence_codes` > 0 they also carry the
        evidence fields (explanation evaluation)."""
        c = self.run.config
        return input_pipeline.make_eval_batches(
            self.run.ds, split, global_batch_size=c.train.eval_batch_size,
            chunk_size=c.data.chunk_size, buckets=self.run.buckets,
            process_index=jax.process_index(), process_count=jax.process_count(),
            reserve_tokens=self.run.reserve_tokens, max_evidence_codes=max_evidence_codes)

    def accumulator(self) -> metrics_lib.MetricAccumulator:
        meta = self.run.ds.metadata
        return metrics_lib.MetricAccumulator(
            self.run.ds.num_labels, label_train_counts=meta.get("train_label_counts"),
            label_systems=meta.get("label_systems"))

    def predict(self, state: steps.TrainState, split: str
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(probabilities [b, C], host batch fields) for every global batch of `split`."""
        feeder = self.run.feeder
        for batch in self.batches(split):
            io, fields = feeder.eval_inputs(batch, split)
            inputs = input_pipeline.to_global(fields, self.run.mesh)
            outputs = self.step(io)(state.params, state.frozen, self.run.rest, inputs)
            host = {k: host_rows(batch[k]) for k in ("labels", "valid", "doc_ids")}
            yield feeder.probabilities(host_rows(outputs), host, split), host

    def evaluate(self, state: steps.TrainState, split: str, *,
                 predictions: str | None = None, top_k: int = 20
                 ) -> metrics_lib.MetricAccumulator:
        """Stream `split` through the model into an accumulator (caller finalizes/closes).

        With `predictions`, process 0 also writes the top-k codes of every document (JSONL)."""
        acc = self.accumulator()
        out = open(predictions, "w", encoding="utf-8") if (
            predictions and jax.process_index() == 0) else None
        try:
            for probs, host in self.predict(state, split):
                acc.update(probs, host["labels"], host["valid"])
                if out is not None:
                    _write_predictions(out, probs, host, self.run.ds.label_space, top_k)
        finally:
            if out is not None:
                out.close()
        return acc

    def baseline(self, split: str) -> metrics_lib.MetricAccumulator:
        """The training-frequency baseline (every document scores codes by train frequency)."""
        meta = self.run.ds.metadata
        n_train = int(meta["counts"]["train"]["documents"])
        acc = self.accumulator()
        for batch in self.batches(split):
            labels, valid = host_rows(batch["labels"]), host_rows(batch["valid"])
            probs = metrics_lib.frequency_baseline_probs(meta["train_label_counts"], n_train,
                                                         labels.shape[0])
            acc.update(probs, labels, valid)
        return acc


def _write_predictions(out, probs: np.ndarray, host: dict[str, np.ndarray],
                       label_space: list[str], top_k: int) -> None:
    k = min(top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    for row in np.flatnonzero(host["valid"]):
        codes = [[label_space[j], round(float(probs[row, j]), 6)] for j in top[row]]
        out.write(json.dumps({"doc_id": int(host["doc_ids"][row]), "top_codes": codes}) + "\n")


# ----------------------------------------------------------------------------- training


def _meta(run: Run, progress: dict) -> dict:
    tok = run.ds.metadata.get("tokenizer") or {}
    return {**progress, "label_space": run.ds.label_space,
            "tokenizer_sha256": tok.get("sha256"), "tokenizer_name": tok.get("name"),
            "head_lr_multiplier": float(run.config.train.head_lr_multiplier)}


def _check_optimizer(run: Run, meta: dict | None, workdir: str) -> None:
    """The optimiser state's structure depends on train.head_lr_multiplier (1.0 or not):
    refuse a checkpoint written with the other kind before Orbax fails on the tree."""
    if "head_lr_multiplier" not in (meta or {}):
        return  # written before the field existed: let Orbax compare the trees
    saved = meta["head_lr_multiplier"]
    ours = float(run.config.train.head_lr_multiplier)
    if (saved == 1.0) != (ours == 1.0):
        raise ValueError(
            f"{workdir} was trained with config.train.head_lr_multiplier={saved}, this config "
            f"has {ours}: pass --config.train.head_lr_multiplier={saved} to load it")


def _check_resume(run: Run, meta: dict, workdir: str) -> None:
    try:
        run.ds.check_compatible(tokenizer_sha256=meta.get("tokenizer_sha256"),
                                tokenizer_name=meta.get("tokenizer_name"),
                                label_space=meta.get("label_space"))
    except shards.DatasetMismatchError as err:
        raise shards.DatasetMismatchError(
            f"cannot resume {workdir}: its checkpoint was trained on other data. {err}\n"
            f"Use a new --workdir for this dataset.") from None


def strict_json(obj: Any) -> Any:
    """A copy of `obj` that strict JSON parsers accept: NaN / inf (a metric over an empty set,
    e.g. a frequency band without codes) become null."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_json(path: str, obj: Any) -> None:
    """Process 0 writes `obj` as strict JSON (null for undefined metrics), atomically."""
    if jax.process_index() == 0:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(strict_json(obj), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)


def _config_text(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=1, sort_keys=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """Train (or resume), then evaluate the best checkpoint; returns the metrics.json content,
    or None when `train.max_steps_per_run` stopped this invocation early."""
    os.makedirs(workdir, exist_ok=True)
    run = setup(config)
    writer = writers.MetricWriter(workdir)
    writer.text("config", "```\n" + _config_text(config) + "\n```")
    _write_json(os.path.join(workdir, "config.json"), json.loads(_config_text(config)))
    _write_json(os.path.join(workdir, "label_space.json"), run.ds.label_space)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    evaluator = Evaluator(run)
    try:
        finished = _train(run, ckpt, writer, evaluator, workdir)
        if not finished:
            return None
        return _final_evaluation(run, ckpt, writer, evaluator, workdir)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()


def _train(run: Run, ckpt: checkpointing.Checkpointer, writer: writers.MetricWriter,
           evaluator: Evaluator, workdir: str) -> bool:
    """The optimiser loop; returns False when stopped by `max_steps_per_run`."""
    config, t = run.config, run.config.train
    train_iter = input_pipeline.make_train_iterator(
        run.ds, global_batch_size=t.global_batch_size, chunk_size=config.data.chunk_size,
        buckets=run.buckets, seed=t.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), reserve_tokens=run.reserve_tokens,
        max_evidence_codes=_evidence_codes(run))
    progress = {"best_metric": -math.inf, "best_step": -1, "bad_evals": 0, "stopped": False}
    train_io = run.feeder.train_io
    teacher = None
    if train_io.needs_teacher:
        # the teacher is the starting point of this run, also when resuming: rebuild it first
        initial_state(run)
        teacher = teacher_params(run)
    if ckpt.latest_step() is not None:
        meta = ckpt.restore_meta()
        _check_optimizer(run, meta, workdir)
        _check_resume(run, meta, workdir)
        run.state, data_state, meta = ckpt.restore(run.abstract_state)
        train_iter.set_state(data_state)
        progress = {k: meta[k] for k in progress}
        logging.info("resumed from step %d of %s", int(run.state.step), workdir)
    elif teacher is None:
        initial_state(run)
    accum = t.global_batch_size // t.micro_batch_size
    compiled: dict[steps.ModelIO, Any] = {}

    def train_step(io: steps.ModelIO):
        if io not in compiled:
            rest_shardings = run.rest_shardings
            if io.needs_teacher:  # rest = (rest, teacher parameters)
                rest_shardings = (run.rest_shardings, run.state_shardings.params)
            compiled[io] = steps.jit_train_step(
                steps.make_train_step(run.graphdef, run.tx, run.schedule, accum_steps=accum,
                                      seed=t.seed, skip_nonfinite=t.skip_nonfinite,
                                      mesh=run.mesh, io=io),
                run.state_shardings, rest_shardings, run.mesh)
        return compiled[io]
    step = int(run.state.step)
    if step < run.total_steps:
        precompile(run, train_step, evaluator, accum=accum, teacher=teacher,
                   epoch=step // run.steps_per_epoch)
    done_this_run = 0
    window = {"docs": 0, "tokens": 0, "time": time.perf_counter(), "steps": 0}
    logging.info("training: %d steps (%d per epoch), accumulation %d x %d", run.total_steps,
                 run.steps_per_epoch, accum, t.micro_batch_size)
    while step < run.total_steps and not progress["stopped"]:
        batch = next(train_iter)
        io, fields = run.feeder.train_inputs(batch, accum=accum)
        inputs = input_pipeline.to_global(fields, run.mesh)
        rest = (run.rest, teacher) if io.needs_teacher else run.rest
        run.state, metrics = train_step(io)(run.state, rest, inputs)
        if not t.skip_nonfinite:  # stop at the very step (one scalar fetch per step)
            _raise_if_nonfinite(step + 1, metrics)
        step += 1
        done_this_run += 1
        window["docs"] += int(np.sum(batch["valid"])) * jax.process_count()
        window["tokens"] += int(np.sum(batch["lengths"])) * jax.process_count()
        window["steps"] += 1
        if step % t.log_every_steps == 0 or step == run.total_steps:
            _log_train(writer, step, metrics, window, t.skip_nonfinite,
                       extra=run.feeder.train_scalars(),
                       progress=(run.total_steps, run.steps_per_epoch))
        epoch_end = step % run.steps_per_epoch == 0
        epoch = step // run.steps_per_epoch
        evaluate = epoch_end and (epoch % t.eval_every_epochs == 0 or step == run.total_steps)
        if evaluate:
            improved = _validate(run, evaluator, writer, step, progress)
            progress["stopped"] = patience_exhausted(progress["best_step"], epoch,
                                                     run.steps_per_epoch, t.patience)
            if progress["stopped"]:
                logging.info("early stopping at epoch %d: no better val mAP since step %d "
                             "(patience %d epochs)", epoch, progress["best_step"], t.patience)
            ckpt.save(step, run.state, data_state=train_iter.get_state(),
                      meta=_meta(run, progress), best=improved)
            window["time"] = time.perf_counter()  # don't count evaluation as step time
        elif config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
            ckpt.save(step, run.state, data_state=train_iter.get_state(),
                      meta=_meta(run, progress))
        if t.max_steps_per_run and done_this_run >= t.max_steps_per_run \
                and step < run.total_steps and not progress["stopped"]:
            ckpt.save(step, run.state, data_state=train_iter.get_state(),
                      meta=_meta(run, progress))
            logging.info("stopping after %d steps this run (train.max_steps_per_run); the same "
                         "command resumes at step %d", done_this_run, step)
            return False
    return True


MAX_AUTO_COMPILE_THREADS = 4


def compile_threads(setting: int) -> int:
    """`config.train.precompile_threads` -> threads (0 = off). Auto: the CPU cores this process
    may use, at most `MAX_AUTO_COMPILE_THREADS` (each compilation holds its own memory), except
    on GPU, where XLA autotunes kernels on the device while compiling: one program at a time
    there until concurrent autotuning has been measured."""
    if setting != 0:
        return max(setting, 0)
    if jax.default_backend() == "gpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_AUTO_COMPILE_THREADS))


def precompile(run: Run, train_step, evaluator: "Evaluator", *, accum: int, teacher: Any,
               epoch: int) -> None:
    """Compile, before the first step, the train step of every bucket shape `epoch` uses and
    the eval step of every shape of val and test, `compile_threads` programs at a time.

    Each program is traced and lowered here (Python, one at a time) with a batch of filler rows
    of its shape, and compiled on a worker thread (XLA releases the GIL) while the next one is
    lowered; the jitted functions then find their executables compiled (or loaded from the
    persistent compilation cache). Without this a first run compiles each shape when its first
    batch arrives, one after the other, in the middle of the epoch. Measured on 2 cores (4
    bucket shapes of the whole-run benchmark's train step): 45 s one after the other, 36 s two
    at a time; on a host with more cores the programs compile side by side.
    """
    threads = compile_threads(run.config.train.precompile_threads)
    if not threads or not run.feeder.static_shapes:
        return
    c, t = run.config, run.config.train
    shape = dict(chunk_size=c.data.chunk_size, buckets=run.buckets,
                 reserve_tokens=run.reserve_tokens)
    jobs = []  # (what, lower): lower() traces and lowers the program for that shape
    rows = t.global_batch_size // jax.process_count()
    for chunks in input_pipeline.train_buckets(run.ds, global_batch_size=t.global_batch_size,
                                               seed=t.seed, epoch=epoch, **shape):
        batch = input_pipeline.filler_batch(run.ds, rows, chunks, chunk_size=c.data.chunk_size,
                                            max_evidence_codes=_evidence_codes(run))
        io, fields = run.feeder.train_inputs(batch, accum=accum)
        rest = (run.rest, teacher) if io.needs_teacher else run.rest
        jobs.append((f"train step, {chunks} chunks", functools.partial(
            train_step(io).lower, run.state, rest, input_pipeline.to_global(fields, run.mesh))))
    rows = t.eval_batch_size // jax.process_count()
    eval_chunks = set()
    for split in ("val", "test"):
        eval_chunks.update(input_pipeline.eval_buckets(
            run.ds, split, global_batch_size=t.eval_batch_size, **shape))
    for chunks in sorted(eval_chunks):
        batch = input_pipeline.filler_batch(run.ds, rows, chunks, chunk_size=c.data.chunk_size)
        io, fields = run.feeder.eval_inputs(batch, "val")
        jobs.append((f"eval step, {chunks} chunks", functools.partial(
            evaluator.step(io).lower, run.state.params, run.state.frozen, run.rest,
            input_pipeline.to_global(fields, run.mesh))))
    if not jobs:
        return
    threads = min(threads, len(jobs))
    logging.info("compiling %d programs before the first step (%d at a time; "
                 "config.train.precompile_threads)", len(jobs), threads)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="compile") as pool:
        pending = {pool.submit(lower().compile): what for what, lower in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(pending), 1):
            future.result()  # a compile error surfaces here, before training starts
            logging.info("compiled %d/%d (%s) after %.1f s", done, len(jobs), pending[future],
                         time.perf_counter() - start)


def _evidence_codes(run: Run) -> int:
    """Evidence slots the training batches need: config.data.max_evidence_codes when the
    training loss reads the evidence fields, else 0."""
    needs = any(k.startswith("evidence") for k in run.feeder.train_io.train_keys)
    return int(run.config.data.max_evidence_codes) if needs else 0


def _log_train(writer: writers.MetricWriter, step: int, metrics: dict, window: dict,
               skip_nonfinite: bool, extra: dict[str, float] | None = None,
               progress: tuple[int, int] = (0, 1)) -> None:
    """Train scalars to TensorBoard / metrics.jsonl and one log line with step/total, epoch
    and an ETA from the window's step time (`progress` = (total steps, steps per epoch))."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    values.update(extra or {})
    if not skip_nonfinite:
        _raise_if_nonfinite(step, values)
    elapsed = max(time.perf_counter() - window["time"], 1e-9)
    values.update(step_time_s=elapsed / max(window["steps"], 1),
                  documents_per_s=window["docs"] / elapsed, tokens_per_s=window["tokens"] / elapsed,
                  **writers.device_memory())
    writer.scalars(step, values, prefix="train")
    total, per_epoch = progress
    eta = max(total - step, 0) * values["step_time_s"]
    logging.info("step %d/%d (epoch %.2f): loss %.5f lr %.3g grad_norm %.3f skipped %d "
                 "(%.1f docs/s, ETA %s without evaluations)", step, total,
                 step / max(per_epoch, 1), values["loss"], values["lr"], values["grad_norm"],
                 values["skipped"], values["documents_per_s"],
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400
                 else f"{eta / 3600:.0f} h")
    window.update(docs=0, tokens=0, steps=0, time=time.perf_counter())


def patience_exhausted(best_step: int, epoch: int, steps_per_epoch: int, patience: int) -> bool:
    """Early stopping: `patience` epochs (not evaluations, whatever eval_every_epochs is)
    have passed since the epoch of the best checkpoint."""
    best_epoch = -(-max(best_step, 0) // steps_per_epoch)
    return epoch - best_epoch >= patience


def _raise_if_nonfinite(step: int, metrics: dict) -> None:
    """With skip_nonfinite=False: stop with an error at the step whose update was non-finite."""
    if int(jax.device_get(metrics["nonfinite"])):
        raise FloatingPointError(
            f"non-finite loss/gradients at step {step} (loss "
            f"{float(jax.device_get(metrics['loss']))}); set config.train.skip_nonfinite=True to "
            f"skip such updates, or lower the learning rate")


def _validate(run: Run, evaluator: Evaluator, writer: writers.MetricWriter, step: int,
              progress: dict) -> bool:
    """Validation at 0.5; updates best / patience counters; True when the best improved."""
    with evaluator.evaluate(run.state, "val") as acc:
        results = acc.finalize(0.5)
    writer.scalars(step, results, prefix="val")
    writer.flush()
    score = float(results["map"])
    logging.info("step %d: val mAP %.4f micro-F1 %.4f", step, score, results["f1_micro"])
    improved = score > progress["best_metric"]
    if improved:
        progress.update(best_metric=score, best_step=step, bad_evals=0)
    else:
        progress["bad_evals"] += 1
    return improved


def restore_best(run: Run, ckpt: checkpointing.Checkpointer) -> None:
    """Load the best (else the latest) checkpoint into `run`, refusing other data."""
    best = ckpt.best_step() is not None
    _check_optimizer(run, ckpt.restore_meta(best=best), str(ckpt.latest.directory))
    run.state, _, meta = ckpt.restore(run.abstract_state, best=best)
    _check_resume(run, meta, str(ckpt.latest.directory))


def load_trained(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """A `Run` for `config` holding the best (else latest) checkpoint of `workdir`: what eval,
    predict and export start from."""
    run = setup(config)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    try:
        restore_best(run, ckpt)
    finally:
        ckpt.close()
    return run


def read_threshold(workdir: str, step: int, default: float = 0.5) -> float:
    """The threshold tuned for the checkpoint at `step`; `default` when none was tuned yet or
    the file belongs to another checkpoint (a stale threshold is never paired silently)."""
    path = os.path.join(workdir, THRESHOLD_FILE)
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if int(saved.get("step", -1)) != int(step):
        logging.warning("%s was tuned for the checkpoint of step %s, not the restored step %d: "
                        "using threshold %.2f (re-run the training command to tune it again)",
                        path, saved.get("step"), step, default)
        return default
    return float(saved["threshold"])


def _final_evaluation(run: Run, ckpt: checkpointing.Checkpointer, writer: writers.MetricWriter,
                      evaluator: Evaluator, workdir: str) -> dict:
    ckpt.wait()
    restore_best(run, ckpt)
    step = int(run.state.step)
    with evaluator.evaluate(run.state, "val") as acc:
        threshold, _ = acc.tune_threshold()
        val = acc.finalize(threshold)
    _write_json(os.path.join(workdir, THRESHOLD_FILE),
                {"threshold": threshold, "step": step, "selected_on": "val micro-F1"})
    with evaluator.evaluate(run.state, "test", predictions=os.path.join(workdir, PREDICTIONS_FILE),
                            top_k=run.config.train.predictions_top_k) as acc:
        test = acc.finalize(threshold)
    with evaluator.baseline("val") as acc:
        base_threshold, _ = acc.tune_threshold()
    with evaluator.baseline("test") as acc:
        baseline = acc.finalize(base_threshold)
    results = {"scale": "fractions (not x100)", "best_step": step, "threshold": threshold,
               "val": val, "test": test, "frequency_baseline_test": baseline,
               "frequency_baseline_threshold": base_threshold}
    _write_json(os.path.join(workdir, "metrics.json"), results)
    writer.scalars(step, test, prefix="test")
    writer.scalars(step, {"threshold": threshold}, prefix="test")
    if jax.process_index() == 0:
        table = metrics_lib.format_metrics_table(
            {"val": val, "test": test, "freq. baseline": baseline})
        print(f"\nbest checkpoint: step {step}, threshold {threshold:.4f} (tuned on val)\n"
              f"{table}\n(x100; counts and threshold as they are)", flush=True)
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str) -> dict:
    """`--mode eval`: the best checkpoint on `split` at the tuned threshold (0.5 if untuned);
    writes metrics_<split>.json and prints the table."""
    run = load_trained(config, workdir)
    threshold = read_threshold(workdir, int(run.state.step))
    with Evaluator(run).evaluate(run.state, split) as acc:
        results = acc.finalize(threshold)
    _write_json(os.path.join(workdir, f"metrics_{split}.json"),
                {"scale": "fractions (not x100)", "step": int(run.state.step),
                 "threshold": threshold, split: results})
    if jax.process_index() == 0:
        print(metrics_lib.format_metrics_table({split: results}), flush=True)
    return results
