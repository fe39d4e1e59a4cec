"""Label-wise classification heads: LAAT (PLM-ICD) and label cross-attention (PLM-CA).

Formulas, initialisations and masking history: spec `models.md` §3. Attribute and parameter
names follow the PyTorch reference (`explainable_medical_coding/models/modules/attention.py`)
so that exported state dicts are a rename-free transpose:

======================  ==========================  =====================  ==================
ours (NNX)              shape                       reference (torch)      logical axes
======================  ==========================  =====================  ==================
LabelCrossAttention
weights_k.kernel        [D, D]                      weights_k.weight ᵀ     (embed, kv)
weights_v.kernel/bias   [D, D] / [D]                weights_v.weight ᵀ/b   (embed, kv)/(kv,)
label_representations   [C, D]                      label_representations  (labels, embed)
layernorm.scale/bias    [D]                         layernorm.weight/bias  (embed,)
output_linear.kernel    [D, 1]                      output_linear.weight ᵀ (embed, None)
output_linear.bias      [1]                         output_linear.bias     (None,)
LabelAttention (LAAT)
first_linear.kernel     [D, P]                      first_linear.weight ᵀ  (embed, mlp)
second_linear.kernel    [P, C]                      second_linear.weight ᵀ (mlp, labels)
third_linear.kernel     [D, C]                      third_linear.weight ᵀ  (embed, labels)
third_linear.bias       [C]                         third_linear.bias      (labels,)
======================  ==========================  =====================  ==================

`kv` names the output side of the key/value projections (a D×D matrix needs two distinct logical
names so the rules table can shard both sides); `mlp` names LAAT's projection size P. Model code
never names mesh axes; the sharding module maps the logical names to mesh axes.

Precision: parameters in `param_dtype`; matmuls in `dtype` (bf16 in training), so the [B, C, L]
score matrix and the attention probabilities are stored in the compute dtype (a custom VJP keeps
only the bf16 probabilities for the backward pass); the softmax itself, LayerNorm and the returned
logits are fp32 (cross-attention's LayerNorm + output projection is rematerialised, so its
backward keeps one fp32 [B, C, D] tensor; the `layernorm` module holds its parameters).
`return_attention=True` returns the attention [B, C, L] cast to fp32.

Padding (`mask_padding=True`, the default): a [B, 1, L] additive bias of a large negative value is
added to the scores (no [B, C, L] boolean is built). A document with no real token gets an
all-zero attention row, so its logits are the head's bias-only output (LAAT: `b3`; cross-attention:
`w · LayerNorm(0) + b0 = w · beta + b0`) — finite, and independent of padding length.
`mask_padding=False` reproduces the reference, whose mask was a no-op: padding is attended.

PLM-DCA helpers: `description_query_init` (mean-pooled description embeddings),
`LabelCrossAttention.init_queries_from`, `random_description_ids` (random-text ablation) and
`frozen_param_filter` (freeze the label queries in the optimiser).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta as flax_meta
from flax.nnx import filterlib

Dtype = jnp.dtype | type

# Large finite negative for masked scores. 0.7 * max (not max) so that adding a score of any
# plausible magnitude can never overflow to -inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LABEL_QUERIES = "label_representations"
REFERENCE_INIT_STD = 0.03


def _meta(*axes: str | None) -> dict:
    """Variable metadata: logical axis names (see module docstring).

    Same policy as `layers.make_param`: shard eagerly only when Flax's eager sharding is on and a
    global mesh is defined; otherwise the names are metadata only (single device, tests, and the
    jitted sharded init that places the state).
    """
    eager = nnx.using_eager_sharding() and flax_meta.global_mesh_defined()
    return {"out_sharding": tuple(axes), "eager_sharding": eager}


def _uniform_fan_in(fan_in: int) -> nnx.Initializer:
    """U(-1/√fan_in, 1/√fan_in): PyTorch's default `nn.Linear` bias init."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def _normal() -> nnx.Initializer:
    return jax.nn.initializers.normal(stddev=REFERENCE_INIT_STD)


def _mask_bias(mask: jax.Array) -> jax.Array:
    """[B, L] mask (non-zero = real token) -> [B, 1, L] fp32 additive bias."""
    return jnp.where(mask[:, None, :] != 0, 0.0, MASK_VALUE).astype(jnp.float32)


def _label_softmax(
    scores: jax.Array, mask: jax.Array, *, mask_padding: bool, inv_scale: float = 1.0,
    span: jax.Array | None = None,
) -> jax.Array:
    """Softmax over the last (token) axis of [B, C, L] scores, masking padding if asked.

    Computed in fp32, returned (and kept for the backward pass) in the scores' compute dtype;
    rows of documents without any real token are all zero when masking. Unmasked, the softmax
    runs over every position, or over the positions where `span` [B, L] is non-zero (the
    padded length the reference's batch would have had, `plm_icd.reference_span`).
    """
    batch, _, length = scores.shape
    if mask_padding:
        bias = _mask_bias(mask)
        keep = jnp.any(mask != 0, axis=-1).astype(jnp.float32)[:, None, None]
    elif span is not None:
        bias = _mask_bias(span)
        keep = jnp.ones((batch, 1, 1), jnp.float32)
    else:
        bias = jnp.zeros((batch, 1, length), jnp.float32)
        keep = jnp.ones((batch, 1, 1), jnp.float32)
    return _softmax(scores, bias, keep, inv_scale)


def _softmax_forward(
    scores: jax.Array, bias: jax.Array, keep: jax.Array, inv_scale: float
) -> jax.Array:
    probs = jax.nn.softmax(scores.astype(jnp.float32) * inv_scale + bias, axis=-1) * keep
    return probs.astype(scores.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax(scores: jax.Array, bias: jax.Array, keep: jax.Array, inv_scale: float) -> jax.Array:
    """`keep * softmax(scores * inv_scale + bias)` whose only residual is the output itself in
    the compute dtype (plain autodiff would also keep an fp32 copy of the [B, C, L] matrix)."""
    return _softmax_forward(scores, bias, keep, inv_scale)


def _softmax_fwd(
    scores: jax.Array, bias: jax.Array, keep: jax.Array, inv_scale: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    probs = _softmax_forward(scores, bias, keep, inv_scale)
    return probs, (probs, bias, keep)


def _softmax_bwd(
    inv_scale: float, residuals: tuple[jax.Array, jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    probs, bias, keep = residuals
    p = probs.astype(jnp.float32)
    gp = grad.astype(jnp.float32) * p
    d_scores = (gp - p * jnp.sum(gp, axis=-1, keepdims=True)) * inv_scale
    # bias and keep come from the integer mask: zero cotangents.
    return d_scores.astype(probs.dtype), jnp.zeros_like(bias), jnp.zeros_like(keep)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.checkpoint, static_argnums=(5,))
def _layernorm_logits(
    mixed: jax.Array, gamma: jax.Array, beta: jax.Array, w: jax.Array, b: jax.Array, eps: float
) -> jax.Array:
    """logit[b, c] = w · LayerNorm(mixed[b, c]) + b, all fp32.

    The LayerNorm parameters are the `layernorm` module's; the computation is rematerialised so
    the backward pass keeps only `mixed` ([B, C, D] fp32), not every LayerNorm intermediate.
    """
    mean = jnp.mean(mixed, axis=-1, keepdims=True)
    centred = mixed - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(var + eps) * gamma + beta
    return jnp.einsum("bcd,d->bc", normed, w) + b


def layernorm_scorer(hidden_size: int, *, param_dtype: Dtype, rngs: nnx.Rngs
                     ) -> tuple[nnx.LayerNorm, nnx.Linear]:
    """The `layernorm` (eps 1e-5, fp32) and the one shared `output_linear` (D -> 1, N(0, 0.03)
    weight, U(±1/√D) bias) that turn a pooled [.., D] vector into a logit: PLM-CA's head and
    PLM-RR's re-ranker (reference names), evaluated by `_layernorm_logits`."""
    d = hidden_size
    layernorm = nnx.LayerNorm(
        d, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
        scale_metadata=_meta("embed"), bias_metadata=_meta("embed"), rngs=rngs,
    )
    output_linear = nnx.Linear(
        d, 1, dtype=jnp.float32, param_dtype=param_dtype,
        kernel_init=_normal(), bias_init=_uniform_fan_in(d),
        kernel_metadata=_meta("embed", None), bias_metadata=_meta(None), rngs=rngs,
    )
    return layernorm, output_linear


def score_pooled(pooled: jax.Array, layernorm: nnx.LayerNorm, output_linear: nnx.Linear
                 ) -> jax.Array:
    """logits = output_linear(layernorm(pooled)) in fp32 for the modules of `layernorm_scorer`
    (`_layernorm_logits`, rematerialised)."""
    return _layernorm_logits(
        pooled,
        layernorm.scale[...].astype(jnp.float32),
        layernorm.bias[...].astype(jnp.float32),
        output_linear.kernel[...][:, 0].astype(jnp.float32),
        output_linear.bias[...].astype(jnp.float32),
        layernorm.epsilon,
    )


def _check_inputs(name: str, hidden: jax.Array, mask: jax.Array, hidden_size: int) -> None:
    if hidden.ndim != 3 or hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"{name}: hidden states must be [B, L, {hidden_size}], got shape {hidden.shape}; "
            "check that the head's hidden_size matches the encoder's."
        )
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"{name}: attention mask must be [B, L] = {hidden.shape[:2]}, got {mask.shape}."
        )


class LabelCrossAttention(nnx.Module):
    """PLM-CA label-wise cross-attention head (spec models.md §3).

    K = H Wk, V = H Wv + bv, A = softmax(Q Kᵀ / scale) over tokens, Y = LayerNorm(A V),
    logit[b, c] = w · Y[b, c] + b0 (one w and one b0 shared by all codes).
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        *,
        scale: float = 1.0,
        mask_padding: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        if scale <= 0:
            raise ValueError(f"LabelCrossAttention: scale must be > 0, got {scale}.")
        self.hidden_size = hidden_size
        self.num_labels = num_labels
        self.scale = float(scale)
        self.mask_padding = mask_padding
        self.dtype = dtype
        self.param_dtype = param_dtype
        d = hidden_size
        self.weights_k = nnx.Linear(
            d, d, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_normal(), kernel_metadata=_meta("embed", "kv"), rngs=rngs,
        )
        self.weights_v = nnx.Linear(
            d, d, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_normal(), bias_init=_uniform_fan_in(d),
            kernel_metadata=_meta("embed", "kv"), bias_metadata=_meta("kv"), rngs=rngs,
        )
        self.label_representations = nnx.Param(
            _normal()(rngs.params(), (num_labels, d), param_dtype), **_meta("labels", "embed")
        )
        self.layernorm, self.output_linear = layernorm_scorer(d, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, hidden: jax.Array, mask: jax.Array, *, return_attention: bool = False,
        span: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """hidden [B, L, D], mask [B, L] -> logits [B, C] fp32 (, attention [B, C, L] fp32).

        `span` [B, L] (unmasked mode only): the positions the reference's padded batch has."""
        _check_inputs("LabelCrossAttention", hidden, mask, self.hidden_size)
        hidden = hidden.astype(self.dtype)
        keys = self.weights_k(hidden)  # [B, L, D]
        values = self.weights_v(hidden)  # [B, L, D]
        queries = self.label_representations[...].astype(self.dtype)  # [C, D]
        scores = jnp.einsum("cd,bld->bcl", queries, keys)  # [B, C, L], compute dtype
        attention = _label_softmax(
            scores, mask, mask_padding=self.mask_padding, inv_scale=1.0 / self.scale, span=span
        )
        mixed = jnp.einsum(
            "bcl,bld->bcd", attention, values, preferred_element_type=jnp.float32
        )
        logits = score_pooled(mixed, self.layernorm, self.output_linear)
        if return_attention:
            return logits, attention.astype(jnp.float32)
        return logits

    def init_queries_from(self, embeddings: jax.Array | np.ndarray) -> None:
        """PLM-DCA: set the label queries Q to `embeddings` [C, D] (e.g. description_query_init).

        Keeps the existing parameter's dtype and, for a placed array, its sharding.
        """
        expected = (self.num_labels, self.hidden_size)
        if tuple(embeddings.shape) != expected:
            raise ValueError(
                f"init_queries_from: embeddings must be [num_labels, hidden_size] = {expected}, "
                f"got {tuple(embeddings.shape)}; compute them with the same label space and "
                "encoder as the model."
            )
        current = self.label_representations[...]
        value = jnp.asarray(embeddings, dtype=current.dtype)
        if isinstance(current, jax.Array):
            value = jax.device_put(value, current.sharding)
        self.label_representations[...] = value


class LabelAttention(nnx.Module):
    """LAAT label-wise attention head of PLM-ICD (spec models.md §3).

    Z = tanh(H W1), A = softmax(Z W2) over tokens, M = Aᵀ H,
    logit[b, c] = Σ_d W3[c, d] M[b, c, d] + b3[c].
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        *,
        projection_size: int | None = None,
        mask_padding: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        p = hidden_size if projection_size is None else projection_size
        self.hidden_size = hidden_size
        self.num_labels = num_labels
        self.projection_size = p
        self.mask_padding = mask_padding
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.first_linear = nnx.Linear(
            hidden_size, p, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_normal(), kernel_metadata=_meta("embed", "mlp"), rngs=rngs,
        )
        self.second_linear = nnx.Linear(
            p, num_labels, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_normal(), kernel_metadata=_meta("mlp", "labels"), rngs=rngs,
        )
        self.third_linear = nnx.Linear(
            hidden_size, num_labels, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_normal(), bias_init=_uniform_fan_in(hidden_size),
            kernel_metadata=_meta("embed", "labels"), bias_metadata=_meta("labels"), rngs=rngs,
        )

    def __call__(
        self, hidden: jax.Array, mask: jax.Array, *, return_attention: bool = False,
        span: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """hidden [B, L, D], mask [B, L] -> logits [B, C] fp32 (, attention [B, C, L] fp32).

        `span` [B, L] (unmasked mode only): the positions the reference's padded batch has."""
        _check_inputs("LabelAttention", hidden, mask, self.hidden_size)
        hidden = hidden.astype(self.dtype)
        projected = jnp.tanh(self.first_linear(hidden))  # [B, L, P]
        w2 = self.second_linear.kernel[...].astype(self.dtype)  # [P, C]
        scores = jnp.einsum("blp,pc->bcl", projected, w2)  # [B, C, L], compute dtype
        attention = _label_softmax(scores, mask, mask_padding=self.mask_padding, span=span)
        pooled = jnp.einsum("bcl,bld->bcd", attention, hidden)  # [B, C, D]
        w3 = self.third_linear.kernel[...].astype(self.dtype)  # [D, C]
        logits = jnp.einsum("bcd,dc->bc", pooled, w3, preferred_element_type=jnp.float32)
        logits = logits + self.third_linear.bias[...].astype(jnp.float32)
        if return_attention:
            return logits, attention.astype(jnp.float32)
        return logits


def frozen_param_filter(*, freeze_label_queries: bool) -> filterlib.Filter:
    """nnx filter of the parameters the optimiser must not update.

    With `freeze_label_queries` (PLM-DCA option) it selects every `label_representations`
    parameter, at any depth of the model; otherwise nothing. Trainer usage::

        frozen = frozen_param_filter(freeze_label_queries=cfg.freeze_label_queries)
        nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param, nnx.Not(frozen)))
    """
    if not freeze_label_queries:
        return nnx.Nothing
    return nnx.All(nnx.Param, nnx.PathContains(LABEL_QUERIES))


def description_query_init(
    encoder: nnx.Module,
    description_ids: np.ndarray | jax.Array,
    description_mask: np.ndarray | jax.Array,
    *,
    batch_size: int,
) -> jax.Array:
    """PLM-DCA query init: mean over real tokens of the encoder's last hidden state.

    `description_ids` / `description_mask` [C, L] (the prepared `descriptions.npz`); the encoder
    runs in eval mode (deterministic) and is not modified. Descriptions are encoded `batch_size`
    at a time with one jitted function (the last batch is padded with empty rows, so only one
    shape is compiled). Returns fp32 [C, D]; a description without any real token gets zeros.
    """
    ids = np.asarray(description_ids)
    mask = np.asarray(description_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(
            "description_query_init: description_ids and description_mask must both be [C, L], "
            f"got {ids.shape} and {mask.shape} (see descriptions.npz in the prepared dataset)."
        )
    if batch_size < 1:
        raise ValueError(f"description_query_init: batch_size must be >= 1, got {batch_size}.")
    num = ids.shape[0]
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def pooled(state: nnx.State, ids_b: jax.Array, mask_b: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        hidden = model(ids_b, mask_b, deterministic=True).astype(jnp.float32)
        weights = (mask_b != 0).astype(jnp.float32)[..., None]
        total = jnp.sum(hidden * weights, axis=1)
        return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

    outputs = []
    for start in range(0, num, batch_size):
        ids_b = ids[start : start + batch_size]
        mask_b = mask[start : start + batch_size]
        rows = ids_b.shape[0]
        if rows < batch_size:
            fill = ((0, batch_size - rows), (0, 0))
            ids_b = np.pad(ids_b, fill)
            mask_b = np.pad(mask_b, fill)
        out = pooled(state, jnp.asarray(ids_b, jnp.int32), jnp.asarray(mask_b, jnp.int32))
        outputs.append(out[:rows])
    return jnp.concatenate(outputs, axis=0)


def random_description_ids(
    description_ids: np.ndarray,
    description_mask: np.ndarray,
    *,
    vocab_size: int,
    special_ids: Sequence[int],
    seed: int,
) -> np.ndarray:
    """PLM-DCA ablation: random text with the same lengths as the descriptions.

    Every real position (mask != 0) whose id is not one of `special_ids` (pass the tokenizer's
    pad/cls/sep/unk/mask ids) gets a token drawn uniformly from the non-special vocabulary;
    special tokens and padding stay where they are, so the mask is unchanged.
    """
    ids = np.asarray(description_ids)
    mask = np.asarray(description_mask)
    if ids.shape != mask.shape:
        raise ValueError(
            f"random_description_ids: ids {ids.shape} and mask {mask.shape} differ in shape."
        )
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    if allowed.size == 0:
        raise ValueError(
            f"random_description_ids: no non-special token ids in a vocabulary of {vocab_size}."
        )
    replace = (mask != 0) & ~np.isin(ids, list(special_ids))
    rng = np.random.default_rng(seed)
    random_ids = allowed[rng.integers(0, allowed.size, size=ids.shape)]
    return np.where(replace, random_ids, ids).astype(ids.dtype)
