"""Loss, optimiser, learning-rate schedule and the jitted train / eval steps.

The train step receives one *global* batch of `global_batch_size` documents, reshapes it to
[accum, micro, ...] and accumulates fp32 gradients with `lax.scan`; every micro-batch's loss
is divided by the global number of (valid document, code) pairs, so 2 x 8 equals 16 x 1.
Dropout keys derive from (seed, step, micro index) only, so a resumed run is exact.

What a model consumes and how its loss is computed is a small `ModelIO` object passed to the
step builders (one training loop for every model): `ModelIO` is PLM-ICD / PLM-CA
(`model(input_ids, attention_mask)` -> logits over all C codes), `RerankIO` is the PLM-RR
re-ranker (`model(..., candidates, candidate_scores)` -> logits over K candidates, targets
gathered from the [B, C] labels). A ModelIO is a frozen dataclass: hashable, so the loop keeps
one jitted step per distinct value (e.g. per bucket of distinct descriptions).

`ModelIO.loss` is the micro-batch loss: BCE sum / `denom` by default; the explanation-aware
losses (`medcode_jax/explain/losses.py`: supervised attention, input-gradient regularisation,
adversarial noise, token masking) are ModelIO subclasses that add their terms there. Whole-batch
normalisers (`ModelIO.counts`) are computed once on the global batch before it is split, so the
accumulated loss is the one of the big batch wherever the term is a sum over documents. An IO
with `needs_teacher` gets `rest = (rest, teacher_params)` (a frozen copy of the parameters).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from medcode_jax import sharding as shd

Batch = Mapping[str, jax.Array]
TRAIN_KEYS = ("input_ids", "attention_mask", "labels", "valid")
EVAL_KEYS = ("input_ids", "attention_mask")
LOSS_KEY_SALT = 1_000_003  # the loss's random key = fold_in(micro-batch key, this); dropout
                           # streams use fold_in(micro-batch key, 0..n_streams-1)


@dataclasses.dataclass(frozen=True)
class ModelIO:
    """PLM-ICD / PLM-CA: `model(input_ids, attention_mask)` -> logits [B, C]; BCE against the
    [B, C] labels, normalised by (valid documents x C)."""

    train_keys = TRAIN_KEYS
    eval_keys = EVAL_KEYS

    def logits(self, model: nnx.Module, batch: Batch, *, deterministic: bool) -> jax.Array:
        return model(batch["input_ids"], batch["attention_mask"], deterministic=deterministic)

    def targets(self, batch: Batch) -> jax.Array:
        """Targets lined up with `logits` (same shape)."""
        return batch["labels"]

    def loss_width(self, batch: Batch) -> int:
        """Codes per document in the loss normaliser (the reference's mean over B x C)."""
        return batch["labels"].shape[-1]

    def eval_output(self, logits: jax.Array) -> jax.Array:
        """What the eval step returns: probabilities [B, C]."""
        return jax.nn.sigmoid(logits.astype(jnp.float32))

    # True: the train step's `rest` is `(rest, teacher_params)` and `loss` gets `teacher`.
    needs_teacher = False
    # Names of the scalar parts `loss` returns (logged as train `loss_<name>`).
    loss_parts = ()  # (a plain class attribute, not a dataclass field)

    def counts(self, batch: Batch) -> dict[str, jax.Array]:
        """Whole-batch normalisers (computed on the global batch, before the split into
        micro-batches) passed to every micro-batch's `loss` as `counts`."""
        return {}

    def loss(self, model: nnx.Module, mb: Batch, *, deterministic: bool, key: jax.Array,
             denom: jax.Array, counts: Mapping[str, jax.Array] | None = None,
             teacher: nnx.Module | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(micro-batch loss, named parts): the BCE sum over valid rows / `denom` (the global
        batch's valid documents x `loss_width`). `key`: for losses that draw random numbers
        (dropout is already seeded on `model`). Parts are summed over micro-batches into the
        step's metrics (none for plain BCE)."""
        logits = self.logits(model, mb, deterministic=deterministic)
        return bce_sum(logits, self.targets(mb), mb["valid"]) / denom, {}


@dataclasses.dataclass(frozen=True)
class RerankIO(ModelIO):
    """PLM-RR stage 2: the re-ranker scores K candidates per document.

    `num_unique`: distinct descriptions encoded per micro-batch (static; None = one per
    (document, candidate) slot). `full_normalisation=True` divides the candidate BCE by
    (valid documents x C), the reference's mean over the full [B, C] matrix in which
    non-candidates contribute nothing; False takes the mean over candidates only.
    The eval step returns the re-ranker's candidate logits [B, K] (the host builds the
    cascade scores over all C codes from them and the retriever cache).
    """

    num_unique: int | None = None
    full_normalisation: bool = True

    train_keys = TRAIN_KEYS + ("candidates", "candidate_scores")
    eval_keys = EVAL_KEYS + ("candidates", "candidate_scores")

    def logits(self, model: nnx.Module, batch: Batch, *, deterministic: bool) -> jax.Array:
        return model(batch["input_ids"], batch["attention_mask"], batch["candidates"],
                     batch["candidate_scores"], num_unique=self.num_unique,
                     deterministic=deterministic)

    def targets(self, batch: Batch) -> jax.Array:
        return jnp.take_along_axis(batch["labels"], batch["candidates"], axis=1)

    def loss_width(self, batch: Batch) -> int:
        if self.full_normalisation:
            return batch["labels"].shape[-1]
        return batch["candidates"].shape[-1]

    def eval_output(self, logits: jax.Array) -> jax.Array:
        return logits.astype(jnp.float32)


PLMICD_IO = ModelIO()


@flax.struct.dataclass
class TrainState:
    """Everything the optimiser loop carries (and checkpoints)."""

    step: jax.Array           # int32: optimiser steps taken, skipped ones included
    params: nnx.State         # trainable parameters (fp32)
    frozen: nnx.State         # parameters kept fixed (e.g. frozen DCA label queries); may be empty
    opt_state: optax.OptState  # Adam moments etc., mirroring `params` (same shardings)
    skipped: jax.Array        # int32: updates skipped because of non-finite gradients


def warmup_steps_for(total_steps: int, *, warmup_steps: int, warmup_fraction: float) -> int:
    """Absolute warm-up if `warmup_steps >= 0`, else `warmup_fraction` of all steps."""
    if warmup_steps >= 0:
        return min(int(warmup_steps), total_steps)
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"config.train.warmup_fraction must be in [0, 1], got {warmup_fraction}")
    return int(warmup_fraction * total_steps)


def learning_rate_schedule(peak: float, total_steps: int, warmup: int) -> optax.Schedule:
    """Linear 0 -> peak over `warmup` steps, then linear peak -> 0 at `total_steps`."""
    if total_steps < 1:
        raise ValueError(f"total optimiser steps must be >= 1, got {total_steps}")
    decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


HEAD_MODULE = "label_wise_attention"  # PLM-ICD / PLM-CA head (the reference's attribute name)


def make_optimizer(*, b1: float, b2: float, eps: float, weight_decay: float,
                   clip_norm: float, head_lr_multiplier: float = 1.0
                   ) -> optax.GradientTransformation:
    """AdamW *without* the learning rate (applied by the step from its own counter, so the
    schedule keeps moving when an update is skipped, as PyTorch's scheduler does).

    `head_lr_multiplier` != 1 scales the updates of the label head's parameters (those under
    `label_wise_attention`): the head trains at that multiple of the scheduled learning rate,
    the encoder at the rate itself (the references use one rate: 1.0)."""
    if head_lr_multiplier <= 0:
        raise ValueError(f"config.train.head_lr_multiplier must be > 0, got {head_lr_multiplier}")
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              optax.add_decayed_weights(weight_decay)]  # explicit, 0 in the recipes
    if head_lr_multiplier != 1.0:
        parts.append(optax.masked(optax.scale(head_lr_multiplier), _head_mask))
    return optax.chain(*parts)


def _head_mask(params: Any) -> Any:
    """True for the leaves under the label head (`HEAD_MODULE`)."""
    def under_head(path, _):
        return any(getattr(k, "key", getattr(k, "name", None)) == HEAD_MODULE for k in path)

    return jax.tree_util.tree_map_with_path(under_head, params)


def bce_sum(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum of fp32 BCE-with-logits over valid rows and all codes (divide by rows x C)."""
    per = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                             labels.astype(jnp.float32))
    return jnp.sum(per * valid.astype(jnp.float32)[:, None])


def bce_mean(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """The training loss: BCE with logits, mean over (valid) B x C."""
    count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0) * labels.shape[-1]
    return bce_sum(logits, labels, valid) / count


def _stream_tags(model: nnx.Module) -> list[str]:
    return sorted({node.key.tag for _, node in nnx.iter_graph(model)
                   if isinstance(node, nnx.RngStream)})


def _reseed(model: nnx.Module, key: jax.Array) -> None:
    """Point every rng stream of the model (dropout) at a key derived from `key`."""
    tags = _stream_tags(model)
    if tags:
        nnx.reseed(model, **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})


def _split_micro(x: jax.Array, accum: int, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """[G, ...] -> [accum, G/accum, ...] with micro-batch i = rows i, i+accum, ... so that every
    micro-batch stays spread over all data-parallel devices."""
    micro = x.shape[0] // accum
    x = x.reshape((micro, accum) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.BATCH_AXES)))
    return x


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, accum_steps: int, seed: int,
                    skip_nonfinite: bool, deterministic: bool = False,
                    mesh: jax.sharding.Mesh | None = None, io: ModelIO = PLMICD_IO
                    ) -> Callable[[TrainState, nnx.State, Batch], tuple[TrainState, dict]]:
    """The (un-jitted) train step `(state, rest, batch) -> (state, metrics)`.

    `rest` holds the model's non-parameter variables (rng streams, constant tables), never
    updated; with `io.needs_teacher` it is `(rest, teacher_params)`. `batch` has
    `io.train_keys`, leading dimension = the global batch (a multiple of accum_steps).
    Metrics: loss, grad_norm, lr, param_norm, skipped, nonfinite, plus `loss_<part>` for the
    named parts of `io.loss` (summed over micro-batches).
    """
    base_key = jax.random.key(seed)

    def loss_fn(params, frozen, rest, teacher_params, mb, key, denom, counts):
        # fresh Variables for the rng state: reseeding mutates them inside this trace
        model = nnx.merge(graphdef, params, frozen, jax.tree.map(lambda x: x, rest))
        if not deterministic:
            _reseed(model, key)
        teacher = None
        if teacher_params is not None:
            teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params), frozen,
                                jax.tree.map(lambda x: x, rest))
        return io.loss(model, mb, deterministic=deterministic,
                       key=jax.random.fold_in(key, LOSS_KEY_SALT), denom=denom, counts=counts,
                       teacher=teacher)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, rest: Any, batch: Batch) -> tuple[TrainState, dict]:
        global_rows = batch["input_ids"].shape[0]
        if global_rows % accum_steps:
            raise ValueError(f"global batch of {global_rows} rows does not divide into "
                             f"{accum_steps} micro-batches")
        teacher_params = None
        if io.needs_teacher:
            rest, teacher_params = rest
        denom = (jnp.maximum(jnp.sum(batch["valid"].astype(jnp.float32)), 1.0)
                 * io.loss_width(batch))
        counts = io.counts(batch)
        micro = {k: _split_micro(batch[k], accum_steps, mesh) for k in io.train_keys}
        step_key = jax.random.fold_in(base_key, state.step)

        def body(carry, xs):
            loss_acc, parts_acc, grad_acc = carry
            index, mb = xs
            (loss, parts), grads = grad_fn(state.params, state.frozen, rest, teacher_params, mb,
                                           jax.random.fold_in(step_key, index), denom, counts)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
            parts_acc = jax.tree.map(lambda a, p: a + p.astype(jnp.float32), parts_acc, parts)
            return (loss_acc + loss, parts_acc, grad_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        part_zeros = {k: jnp.zeros((), jnp.float32) for k in io.loss_parts}
        carry = (jnp.zeros((), jnp.float32), part_zeros, zeros)
        if accum_steps == 1:  # the same sums without a loop around the step
            (loss, parts, grads), _ = body(carry, (jnp.int32(0),
                                                   jax.tree.map(lambda x: x[0], micro)))
        else:
            (loss, parts, grads), _ = jax.lax.scan(body, carry, (jnp.arange(accum_steps), micro))

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lr = jnp.asarray(schedule(state.step), jnp.float32)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            params = keep(params, state.params)
            opt_state = keep(opt_state, state.opt_state)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  skipped=skipped)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "param_norm": optax.tree.norm(params), "skipped": skipped,
                   "nonfinite": (~finite).astype(jnp.int32),
                   **{f"loss_{k}": v for k, v in parts.items()}}
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, io: ModelIO = PLMICD_IO) -> Callable[..., jax.Array]:
    """`(params, frozen, rest, batch) -> io.eval_output(logits)` (PLM-ICD / PLM-CA:
    probabilities fp32 [B, C]; PLM-RR: candidate logits [B, K])."""

    def step(params: nnx.State, frozen: nnx.State, rest: nnx.State, batch: Batch) -> jax.Array:
        model = nnx.merge(graphdef, params, frozen, rest)
        return io.eval_output(io.logits(model, batch, deterministic=True))

    return step


def jit_train_step(step: Callable, state_shardings: Any, rest_shardings: Any,
                   mesh: jax.sharding.Mesh) -> Callable:
    """Shardings stated at the jit boundary; the state is donated."""
    return jax.jit(step, in_shardings=(state_shardings, rest_shardings, shd.batch_sharding(mesh)),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))


# XLA:CPU compiles forward-only programs faster to run without its YNNPACK fusions (which
# fold a whole encoder layer, its layer norms and GELU into one YNNPACK graph): the PLM-CA eval
# step of bench/whole_run.py's model (8 notes x 1,024 tokens, 4 layers x 256, C = 1,000, 2
# cores) took 1.13 s with them and 0.73 s without (PyTorch 0.63 s). Training steps keep them:
# without, the train step was slower (3.6-3.8 s against 3.2 s).
CPU_INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def inference_compiler_options(platform: str) -> dict[str, Any] | None:
    """XLA options for the forward-only programs on `platform` (None: XLA's defaults). The
    option is experimental: an XLA that no longer knows it gets the defaults and a warning."""
    if platform != "cpu":
        return None
    try:
        jax.jit(lambda x: x @ x, compiler_options=CPU_INFERENCE_OPTIONS).lower(
            jax.ShapeDtypeStruct((8, 8), jnp.float32)).compile()
    except Exception as e:  # noqa: BLE001 - any refusal means: use the defaults
        logging.warning("XLA refused %s (%s); inference compiles with the defaults",
                        CPU_INFERENCE_OPTIONS, str(e).splitlines()[0] if str(e) else type(e))
        return None
    return dict(CPU_INFERENCE_OPTIONS)


def jit_inference(fn: Callable, platform: str | None = None, **jit_kwargs) -> Callable:
    """`jax.jit` for a forward-only program, with `inference_compiler_options`."""
    platform = platform or jax.default_backend()
    return jax.jit(fn, compiler_options=inference_compiler_options(platform), **jit_kwargs)


def jit_eval_step(step: Callable, state_shardings: TrainState, rest_shardings: Any,
                  mesh: jax.sharding.Mesh) -> Callable:
    return jit_inference(step, mesh.devices.flat[0].platform,
                         in_shardings=(state_shardings.params, state_shardings.frozen,
                                       rest_shardings, shd.batch_sharding(mesh)),
                         out_shardings=shd.batch_sharding(mesh))
