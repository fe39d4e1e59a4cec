"""Building blocks shared by every encoder family.

Conventions (all families):
- parameters are stored in ``param_dtype`` (fp32 by default); matmuls run in the compute
  ``dtype`` (bf16 for training, fp32 for parity tests);
- normalisation statistics and the attention softmax are always computed in fp32;
- every ``nnx.Param`` carries logical axis names in its ``out_sharding`` metadata
  (``embed, mlp, heads, kv, vocab, labels, qkv, layers`` or None); the sharding module maps them
  onto mesh axes. Model code never names mesh axes.
- kernels are ``[in, out]`` (PyTorch ``Linear.weight`` is ``[out, in]``: the key tables in
  ``medcode_jax.convert.keymaps`` transpose).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta as flax_meta

Axes = Sequence[str | None]
Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

# Additive mask value for padded keys. Added to fp32 scores, so it stays finite (a score of
# order 1 added to it rounds back to it) and a row whose keys are all padding gets a uniform,
# finite softmax instead of NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def make_param(value: jax.Array, axes: Axes) -> nnx.Param:
    """Wrap ``value`` in an ``nnx.Param`` annotated with logical axis names.

    Flax shards annotated variables eagerly at creation when eager sharding is on, which needs
    a mesh (and logical-axis rules) in context. Without a mesh (single device, tests) the names
    are kept as metadata only, for ``nnx.get_partition_spec`` and a jitted, sharded init.
    """
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match parameter shape {value.shape}")
    eager = nnx.using_eager_sharding() and flax_meta.global_mesh_defined()
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=eager)


def normal_init(stddev: float) -> Initializer:
    """Truncation-free normal initialiser (what ``transformers`` uses for BERT-like models)."""
    return nnx.initializers.normal(stddev)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel [in, out]``, computed in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = True, kernel_init: Initializer, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        self.kernel = make_param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = (make_param(jnp.zeros((out_features,), param_dtype), (axes[1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Lookup table ``[num, features]``; returns rows in the parameter dtype."""

    def __init__(self, num: int, features: int, *, axes: tuple[str | None, str | None],
                 init: Initializer, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32):
        self.embedding = make_param(init(rngs.params(), (num, features), param_dtype), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class Dropout(nnx.Dropout):
    """``nnx.Dropout`` whose keep mask costs half the random bits: each 32-bit draw of the
    threefry generator gives two 16-bit uniforms, kept when below ``round(keep · 2^16)``.

    The keep probability is exact to 2^-17 (0.9 -> 0.899994), and the masks are as random as
    ``jax.random.bernoulli``'s; threefry on the [N, heads, c, c] attention probabilities and the
    hidden states was ~10 % of the CPU train step, halved by this. The bits keep the input's
    leading axes (the halves are split along the last one), so a batch-sharded input draws its
    bits where it lives, as ``bernoulli`` does. Same interface and rng stream as ``nnx.Dropout``.
    """

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError("Dropout needs `deterministic` (True for evaluation)")
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0 or self.broadcast_dims or inputs.ndim == 0:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        elif isinstance(rngs, jax.Array):
            key = rngs
        else:
            raise TypeError(f"rngs must be Rngs, RngStream or a key, got {type(rngs)}")
        keep_prob = 1.0 - self.rate
        last = inputs.shape[-1]
        bits = jax.random.bits(key, inputs.shape[:-1] + ((last + 1) // 2,), jnp.uint32)
        halves = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :last]
        keep = halves < jnp.uint32(round(keep_prob * 65536))
        return jax.lax.select(keep, inputs / jnp.asarray(keep_prob, inputs.dtype),
                              jnp.zeros_like(inputs))


# The residual stream (norm outputs, embeddings, block sums) stays fp32 whatever the compute
# dtype, as under PyTorch autocast: LayerNorm / RMSNorm run and return fp32, every Dense casts
# its input to the compute dtype (bf16 matmuls), and adding a bf16 block output to the fp32
# stream promotes to fp32. Costs fp32 activations for the stream (as in the reference), keeps
# bf16 training numerically where the reference's autocast runs are.
RESIDUAL_DTYPE = jnp.float32


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in fp32, output cast to ``dtype``."""

    def __init__(self, features: int, *, eps: float, use_bias: bool = True,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        self.scale = make_param(jnp.ones((features,), param_dtype), ("embed",))
        self.bias = make_param(jnp.zeros((features,), param_dtype), ("embed",)) if use_bias else None
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch writes it, ``x/2 · (1 + erf(x/√2))`` (in ``x.dtype``).

    ``jax.nn.gelu(approximate=False)`` uses ``erfc``, which XLA:CPU expands into a slower,
    branchy polynomial (the GELU fusions took ~2x longer in the CPU train-step profile); the
    two agree to ~1e-6 in fp32.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation that ``transformers`` calls ``name`` (``"gelu"`` is the exact erf GELU)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r} in config.json; supported: "
                         f"{sorted(_ACTIVATIONS)}") from None


def attention_bias(attention_mask: jax.Array) -> jax.Array:
    """``[N, c]`` mask (1 = real token) -> additive fp32 bias ``[N, 1, 1, c]`` for the keys."""
    keep = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, MASK_VALUE).astype(jnp.float32)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *,
                          dropout: Dropout, deterministic: bool,
                          return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention over ``[N, c, heads, head_dim]`` inputs.

    Scores are accumulated in fp32, ``bias`` (broadcastable to ``[N, heads, c, c]``) is added in
    fp32 and the softmax runs in fp32; the probabilities (after dropout) are cast back to the
    compute dtype of ``v`` for the value product. Returns ``[N, c, heads, head_dim]``, and with
    ``return_probs`` also the fp32 probabilities ``[N, heads, c, c]`` (before dropout).
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    # Heads-major [N, heads, c, head_dim] operands: batched dots with the batch dimensions
    # leading and contiguous (3x faster forward on XLA:CPU than contracting the [N, c, heads,
    # head_dim] layout directly; the same on accelerators, where XLA picks layouts itself).
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    scores = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * scale + bias, axis=-1)
    dropped = dropout(probs, deterministic=deterministic).astype(v.dtype)
    out = jnp.swapaxes(jnp.einsum("nhqk,nhkd->nhqd", dropped, v), 1, 2)
    if return_probs:
        return out, probs
    return out


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * scale`` over the last axis (no bias), in fp32."""

    def __init__(self, features: int, *, eps: float, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32):
        self.scale = make_param(jnp.ones((features,), param_dtype), ("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class FusedDense(nnx.Module):
    """Several projections of the same input in one matmul: ``kernel [in, parts, out]``.

    ``y[..., p, :] = x @ kernel[:, p, :] + bias[p]``. Holds a fused PyTorch ``Linear`` whose
    ``[parts·out, in]`` weight stacks the parts (ModernBERT's ``Wqkv``, a GLU's ``Wi``).
    """

    def __init__(self, in_features: int, parts: int, out_features: int, *,
                 axes: tuple[str | None, str | None, str | None], use_bias: bool,
                 kernel_init: Initializer, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32):
        self.kernel = make_param(
            kernel_init(rngs.params(), (in_features, parts, out_features), param_dtype), axes)
        self.bias = (make_param(jnp.zeros((parts, out_features), param_dtype), axes[1:])
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...d,dpo->...po", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GatedMLP(nnx.Module):
    """GLU feed-forward: ``wo(drop(act(a) * g))`` with ``[a, g] = wi(x)``.

    ``wi`` is a ``FusedDense`` ``[D, 2, I]``: part 0 the activated input, part 1 the gate (the
    first and second halves of a fused PyTorch ``[2I, D]`` weight). GeGLU (ModernBERT) with
    ``activation_name="gelu"``, SwiGLU (NeoBERT) with ``"silu"``.
    """

    def __init__(self, features: int, hidden: int, *, activation_name: str, use_bias: bool,
                 kernel_init: Initializer, rngs: nnx.Rngs, dropout: float = 0.0,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        kw = dict(use_bias=use_bias, kernel_init=kernel_init, rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype)
        self.wi = FusedDense(features, 2, hidden, axes=("embed", None, "mlp"), **kw)
        self.wo = Dense(hidden, features, axes=("mlp", "embed"), **kw)
        self.act = activation(activation_name)
        self.dropout = Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        h = self.wi(x)
        gated = self.act(h[..., 0, :]) * h[..., 1, :]
        return self.wo(self.dropout(gated, deterministic=deterministic))


# --- rotary position embeddings ------------------------------------------------------------------

def rotary_angles(length: int, head_dim: int, theta: float) -> jax.Array:
    """``[length, head_dim / 2]`` fp32 angles ``p · theta^(-2j / head_dim)``, p = 0..length-1."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    inv_freq = 1.0 / (jnp.float32(theta) ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                                             / jnp.float32(head_dim)))
    return jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]


def rotate_half_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half (GPT-NeoX / ``transformers``) convention.

    ``x [N, c, heads, d]``: dimension ``j`` pairs with ``j + d/2``. Computed in fp32, returned
    in ``x.dtype``. ``angles``: ``rotary_angles(c, d, theta)``.
    """
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def interleaved_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotary embedding in the interleaved-pair (complex / LLaMA) convention.

    ``x [N, c, heads, d]``: dimensions ``2j`` and ``2j + 1`` form the pair rotated by
    ``angles[:, j]``. Computed in fp32, returned in ``x.dtype``.
    """
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# --- self-attention with padding (and optionally a local window) --------------------------------

ATTENTION_IMPLS = ("dot_product_attention", "mask")
ATTENTION_BACKENDS = (None, "xla", "cudnn")


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array, *,
                   window: int | None = None, impl: str = "dot_product_attention",
                   backend: str | None = None, dropout: Dropout,
                   deterministic: bool,
                   return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Bidirectional attention over ``[N, c, heads, head_dim]``; padded keys never attended.

    ``window``: query ``i`` attends only to keys ``j`` with ``|i - j| <= window`` (ModernBERT's
    local layers); None = global. ``impl``: ``"dot_product_attention"`` uses
    ``jax.nn.dot_product_attention`` (``backend`` is its ``implementation``: None/"xla", or
    "cudnn" on GPU, where the window, which cuDNN supports only for causal attention, is folded
    into the boolean mask); ``"mask"`` builds an explicit additive fp32 bias
    ``[N, 1, c, c]`` and runs ``dot_product_attention`` above. The two agree to rounding; the
    mask path is also used whenever attention dropout is active (training with a rate > 0).
    ``return_probs`` (explanations): always take the mask path and also return the fp32
    probabilities ``[N, heads, c, c]``.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    c = q.shape[1]
    keep = attention_mask.astype(bool)[:, None, None, :]  # [N, 1, 1, c] keys
    use_mask = impl == "mask" or (dropout.rate > 0 and not deterministic) or return_probs
    fold_window = window is not None and (use_mask or backend == "cudnn")
    if fold_window:
        pos = jnp.arange(c)
        keep = keep & (jnp.abs(pos[:, None] - pos[None, :]) <= window)[None, None]
    if use_mask:
        bias = jnp.where(keep, 0.0, MASK_VALUE).astype(jnp.float32)
        return dot_product_attention(q, k, v, bias, dropout=dropout, deterministic=deterministic,
                                     return_probs=return_probs)
    local = None if window is None or fold_window else (window, window)
    if backend == "cudnn":
        # cuDNN turns the mask into a bias that must be [N, 1, c, c] (a [N, 1, 1, c] key mask
        # is rejected: "Bias must have same seq length as QKV").
        keep = jnp.broadcast_to(keep, (keep.shape[0], 1, c, c))
    return jax.nn.dot_product_attention(q, k, v, mask=keep, local_window_size=local,
                                        implementation=backend)


def run_layers(stack: Sequence[nnx.Module], x: jax.Array, mask: jax.Array, *,
               deterministic: bool, remat: bool, return_attentions: bool = False
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``x = layer(x, mask, deterministic=...)`` through the stack, each layer rematerialised in
    the backward pass when ``remat`` (the shared loop of every encoder family).

    ``return_attentions``: every layer is called with ``return_attention=True`` (it returns
    ``(x, probs [N, heads, c, c])``, computed explicitly) and the stacked fp32 probabilities
    ``[L, N, heads, c, c]`` are returned after ``x``.
    """
    if return_attentions:
        def run_probs(layer: nnx.Module, x: jax.Array, mask: jax.Array):
            return layer(x, mask, deterministic=deterministic, return_attention=True)

        step_probs = nnx.remat(run_probs) if remat else run_probs
        probs = []
        for layer in stack:
            x, p = step_probs(layer, x, mask)
            probs.append(p.astype(jnp.float32))
        return x, jnp.stack(probs)

    def run(layer: nnx.Module, x: jax.Array, mask: jax.Array) -> jax.Array:
        return layer(x, mask, deterministic=deterministic)

    step = nnx.remat(run) if remat else run
    for layer in stack:
        x = step(layer, x, mask)
    return x
