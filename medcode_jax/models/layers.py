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


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
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
                          dropout: nnx.Dropout, deterministic: bool) -> jax.Array:
    """Scaled dot-product attention over ``[N, c, heads, head_dim]`` inputs.

    Scores are accumulated in fp32, ``bias`` (broadcastable to ``[N, heads, c, c]``) is added in
    fp32 and the softmax runs in fp32; the probabilities (after dropout) are cast back to the
    compute dtype of ``v`` for the value product. Returns ``[N, c, heads, head_dim]``.
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * scale + bias, axis=-1)
    probs = dropout(probs, deterministic=deterministic).astype(v.dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", probs, v)
