"""`--mode=plan`: will this config fit? Per-device memory of the train step, before renting.

    python -m medcode_jax.main --mode=plan --config=configs/plmca.py:fsdp --plan_devices=8 \\
        [--plan_num_labels=7942]

Builds the training state abstractly (no weights are created or read), places it on the
config's mesh over `--plan_devices` simulated CPU devices, and compiles the real train step
(`steps.make_train_step`, the trainer's jit with its shardings and donation) ahead of time for
the worst-case batch: `train.global_batch_size` documents padded to the largest length bucket.
Then it prints, per device:

- parameters, optimiser state (Adam moments) and frozen parameters: exact, from each array's
  sharding (shard shape x dtype);
- the step's temporary buffers (activations, gradients in flight, accumulators) and its
  argument / output sizes: from XLA's `compiled.memory_analysis()` of that compiled step;
- their sum, the estimated peak.

How far to trust it: the state bytes are exact for any backend. The temporary bytes come from
the CPU compiler's buffer assignment; GPU and TPU compilers fuse and schedule differently (fused
attention kernels, different rematerialisation, no CPU-specific fp32 upcasts of bf16 math), so
read them as an estimate of the activation footprint, typically within a small factor and more
often above than below. Leave headroom (allocator fragmentation, the input pipeline's
prefetched batches, NCCL buffers are not counted); `train.remat` and a smaller
`train.micro_batch_size` are the levers when it does not fit.

Without prepared shards (`data.dir` missing) the label count comes from `--plan_num_labels`
(PLM-ICD / PLM-CA only; PLM-RR needs the shards for its description table).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_prep import shards
from medcode_jax import input_pipeline, steps, train
from medcode_jax import sharding as shd
from medcode_jax.models import encoders, heads


@dataclasses.dataclass
class _LabelSpaceOnly:
    """What `train.build_model` reads from a prepared dataset, for planning without one."""

    num_labels: int
    pad_token_id: int
    path: str = "(no shards: --plan_num_labels)"
    metadata: dict = dataclasses.field(default_factory=dict)


def _open_data(config: ml_collections.ConfigDict, enc_cfg: encoders.EncoderConfig,
               num_labels: int | None) -> Any:
    if os.path.isfile(os.path.join(config.data.dir, "metadata.json")):
        ds = shards.open_dataset(config.data.dir)
        if num_labels is not None and num_labels != ds.num_labels:
            raise ValueError(f"--plan_num_labels={num_labels} but the shards in "
                             f"{config.data.dir} have {ds.num_labels} codes; drop the flag")
        return ds
    if config.model.type == "plmrr":
        raise FileNotFoundError(
            f"--mode=plan for PLM-RR needs the prepared shards (their description table): "
            f"{config.data.dir}/metadata.json not found; prepare the data or set "
            "--config.data.dir")
    if not num_labels:
        raise ValueError(f"no prepared shards at {config.data.dir} (metadata.json): give the "
                         "label count with --plan_num_labels (e.g. 7942 for MIMIC-IV ICD-10)")
    return _LabelSpaceOnly(num_labels=num_labels, pad_token_id=enc_cfg.pad_token_id)


def _shard_bytes(abstract: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings (the largest
    shard when the split is uneven)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _batch_specs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_labels: int,
                 length: int) -> tuple[steps.ModelIO, dict[str, jax.ShapeDtypeStruct]]:
    g = config.train.global_batch_size
    sharding = shd.batch_sharding(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    batch = {"input_ids": spec((g, length), jnp.int32),
             "attention_mask": spec((g, length), jnp.int32),
             "labels": spec((g, num_labels), jnp.float32),
             "valid": spec((g,), jnp.bool_)}
    if config.model.type != "plmrr":
        return steps.PLMICD_IO, batch
    k = config.rerank.k
    batch.update(candidates=spec((g, k), jnp.int32), candidate_scores=spec((g, k), jnp.float32))
    micro = config.train.micro_batch_size
    unique = -(-micro * k // config.rerank.unique_multiple) * config.rerank.unique_multiple
    io = steps.RerankIO(num_unique=unique if config.rerank.unique_descriptions else None,
                        full_normalisation=config.rerank.loss_normalisation == "full")
    return io, batch


def plan(config: ml_collections.ConfigDict, *, num_labels: int | None = None) -> dict[str, Any]:
    """Compile the train step for `config` on the current devices; per-device byte counts."""
    mesh = shd.make_mesh(config.mesh.shape, config.mesh.axis_names)
    accum = train.validate_config(config, mesh)
    enc_cfg = encoders.read_encoder_config(config.encoder.path,
                                           num_layers=config.encoder.num_layers or None)
    ds = _open_data(config, enc_cfg, num_labels)
    t = config.train
    tx = steps.make_optimizer(b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                              clip_norm=t.clip_norm, head_lr_multiplier=t.head_lr_multiplier)
    frozen = heads.frozen_param_filter(freeze_label_queries=config.model.freeze_label_queries)
    trainable = nnx.All(nnx.Param, nnx.Not(frozen))

    def make_model() -> nnx.Module:
        return train.build_model(config, enc_cfg, ds, nnx.Rngs(params=0, dropout=1))

    def init() -> tuple[steps.TrainState, nnx.State]:
        with nnx.use_eager_sharding(False):
            _, params, frozen_params, rest = nnx.split(make_model(), trainable, nnx.Param, ...)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                frozen=frozen_params, opt_state=tx.init(params),
                                skipped=jnp.zeros((), jnp.int32)), rest

    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(make_model), trainable, nnx.Param, ...)[0]
        abstract_state, abstract_rest = nnx.eval_shape(init)
    state_sh = shd.logical_to_mesh_sharding(abstract_state, mesh, config.mesh.rules)
    rest_sh = shd.logical_to_mesh_sharding(abstract_rest, mesh, config.mesh.rules)
    state = shd.abstract_with_shardings(abstract_state, state_sh)
    rest = shd.abstract_with_shardings(abstract_rest, rest_sh)
    reserve = train.reserve_tokens(config)
    buckets = input_pipeline.bucket_chunk_counts(config.data.max_length + reserve,
                                                 config.data.chunk_size,
                                                 config.data.bucket_multiple)
    length = max(buckets) * config.data.chunk_size
    io, batch = _batch_specs(config, mesh, ds.num_labels, length)
    schedule = steps.learning_rate_schedule(t.learning_rate, 1000, 0)
    step = steps.jit_train_step(
        steps.make_train_step(graphdef, tx, schedule, accum_steps=accum, seed=t.seed,
                              skip_nonfinite=t.skip_nonfinite, mesh=mesh, io=io),
        state_sh, rest_sh, mesh)
    compiled = step.lower(state, rest, batch).compile()
    memory = compiled.memory_analysis()
    params_b = _shard_bytes(state.params)
    opt_b = _shard_bytes(state.opt_state)
    frozen_b = _shard_bytes(state.frozen)
    temp_b = int(getattr(memory, "temp_size_in_bytes", 0) or 0) if memory is not None else None
    result = {
        "devices": jax.device_count(), "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "model": config.model.type, "head": config.model.head, "dtype": t.dtype,
        "num_labels": int(ds.num_labels), "global_batch": int(t.global_batch_size),
        "micro_batch": int(t.micro_batch_size), "accumulation": int(accum),
        "tokens_per_document": int(length), "remat": bool(t.remat),
        "parameters_total": int(sum(int(np.prod(x.shape, dtype=np.int64))
                                    for x in jax.tree.leaves(state.params))),
        "per_device_bytes": {
            "parameters": params_b, "optimiser": opt_b, "frozen": frozen_b,
            "temporaries": temp_b,
            "arguments": _stat(memory, "argument_size_in_bytes"),
            "outputs": _stat(memory, "output_size_in_bytes"),
            "aliased": _stat(memory, "alias_size_in_bytes"),
            "code": _stat(memory, "generated_code_size_in_bytes"),
        },
    }
    result["per_device_bytes"]["estimated_peak"] = (
        params_b + opt_b + frozen_b + (temp_b or 0) + _shard_bytes(batch))
    return result


def _stat(memory: Any, name: str) -> int | None:
    value = getattr(memory, name, None) if memory is not None else None
    return None if value is None else int(value)


def format_plan(result: dict[str, Any]) -> str:
    def gib(b: int | None) -> str:
        if b is None:
            return "      n/a"
        return f"{b / 2**30:8.3f} GiB" if b >= 2**30 else f"{b / 2**20:8.2f} MiB"

    b = result["per_device_bytes"]
    lines = [
        f"plan: {result['model']} ({result['head']}), {result['parameters_total']:,} parameters, "
        f"{result['num_labels']} codes, {result['dtype']}, remat={result['remat']}",
        f"mesh {result['mesh']} on {result['devices']} devices; global batch "
        f"{result['global_batch']} = {result['accumulation']} x {result['micro_batch']} "
        f"documents of {result['tokens_per_document']} tokens (the largest bucket)",
        "per device:",
        f"  parameters        {gib(b['parameters'])}   (exact, from the shardings)",
        f"  optimiser state   {gib(b['optimiser'])}   (exact)",
        f"  frozen parameters {gib(b['frozen'])}   (exact)",
        f"  temporaries       {gib(b['temporaries'])}   (XLA CPU buffer assignment: estimate)",
        f"  estimated peak    {gib(b['estimated_peak'])}   (+ allocator and runtime headroom)",
    ]
    return "\n".join(lines)


def write_plan(result: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
