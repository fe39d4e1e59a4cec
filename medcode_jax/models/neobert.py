"""NeoBERT encoder (``chandar-lab/NeoBERT``; not in ``transformers``, spec models.md §2).

Pre-norm transformer with RMSNorm (weight only), no biases, no dropout and no position
embeddings: token embedding; per layer ``x += attn(attention_norm(x));
x += mlp(ffn_norm(x))``; final RMSNorm. Attention projects ``qkv`` with one fused kernel whose
output is laid out per head (``[q_h, k_h, v_h]`` for each head h) and applies rotary embeddings
in the interleaved-pair (complex, LLaMA) convention, theta 10,000, positions ``0..c-1`` in every
chunk row. The MLP is SwiGLU: ``w3(silu(w1 x) * (w2 x))`` with ``w12 = [w1; w2]``.

The hidden size of the MLP is not ``config.json``'s ``intermediate_size`` but
``ffn_hidden_size(intermediate_size)`` (2/3 of it rounded up to a multiple of 8: 3072 -> 2048),
as in the hub code; ``EncoderConfig.intermediate_size`` holds the actual size.

``EncoderConfig.options`` (runtime settings, not in ``config.json``): ``attention_impl``
("dot_product_attention" | "mask"), ``attention_backend`` (None | "xla" | "cudnn").

Parameter paths (``medcode_jax.convert.keymaps.NEOBERT``)::

    tok_embeddings.embedding
    layers.{i}.attention_norm.scale  layers.{i}.attn.qkv.kernel [D, 3D]  layers.{i}.attn.out.kernel
    layers.{i}.mlp_norm.scale        layers.{i}.mlp.wi.kernel [D, 2, F]  layers.{i}.mlp.wo.kernel
    final_norm.scale
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx
from jax import numpy as jnp

from medcode_jax.models import layers

if TYPE_CHECKING:
    from medcode_jax.models.encoders import EncoderConfig

ROPE_THETA = 10_000.0
RUNTIME_OPTIONS = {"attention_impl": "dot_product_attention", "attention_backend": None}


def ffn_hidden_size(intermediate_size: int, multiple_of: int = 8) -> int:
    """SwiGLU hidden size for ``config.json``'s ``intermediate_size`` (the hub's rule)."""
    hidden = int(2 * intermediate_size / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class NeoBertAttention(nnx.Module):
    """Self-attention: fused per-head qkv ``[D, 3D]``, interleaved rotary, output ``wo``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        d = cfg.hidden_size
        kw = dict(use_bias=False, kernel_init=layers.normal_init(cfg.initializer_range),
                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # Output columns are grouped by head ([q_h, k_h, v_h] per head): sharding them over
        # "heads" keeps whole heads on a device.
        self.qkv = layers.Dense(d, 3 * d, axes=("embed", "heads"), **kw)
        self.out = layers.Dense(d, d, axes=("heads", "embed"), **kw)
        self.dropout = layers.Dropout(0.0, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.impl = cfg.options.get("attention_impl", RUNTIME_OPTIONS["attention_impl"])
        self.backend = cfg.options.get("attention_backend", RUNTIME_OPTIONS["attention_backend"])

    def __call__(self, x: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool, return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        n, c, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(x).reshape(n, c, self.num_heads, 3, head_dim)
        angles = layers.rotary_angles(c, head_dim, ROPE_THETA)
        q = layers.interleaved_rope(qkv[..., 0, :], angles)
        k = layers.interleaved_rope(qkv[..., 1, :], angles)
        out = layers.self_attention(q, k, qkv[..., 2, :], attention_mask, impl=self.impl,
                                    backend=self.backend, dropout=self.dropout,
                                    deterministic=deterministic, return_probs=return_attention)
        if return_attention:
            out, probs = out
            return self.out(out.reshape(n, c, d)), probs
        return self.out(out.reshape(n, c, d))


class NeoBertLayer(nnx.Module):
    """Pre-RMSNorm block with a SwiGLU MLP."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        norm = dict(eps=cfg.layer_norm_eps, dtype=layers.RESIDUAL_DTYPE, param_dtype=param_dtype)
        self.attention_norm = layers.RMSNorm(cfg.hidden_size, **norm)
        self.attn = NeoBertAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp_norm = layers.RMSNorm(cfg.hidden_size, **norm)
        self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, activation_name="silu",
                                   use_bias=False,
                                   kernel_init=layers.normal_init(cfg.initializer_range),
                                   rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool, return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        a = self.attn(self.attention_norm(x), attention_mask, deterministic=deterministic,
                      return_attention=return_attention)
        if return_attention:
            a, probs = a
        x = x + a
        x = x + self.mlp(self.mlp_norm(x), deterministic=deterministic)
        return (x, probs) if return_attention else x


class NeoBertEncoder(nnx.Module):
    """The whole encoder: ``(input_ids [N, c], attention_mask [N, c]) -> hidden [N, c, D]``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: bool = False):
        self.tok_embeddings = layers.Embed(cfg.vocab_size, cfg.hidden_size,
                                           axes=("vocab", "embed"),
                                           init=layers.normal_init(cfg.initializer_range),
                                           rngs=rngs, param_dtype=param_dtype)
        self.layers = nnx.List([NeoBertLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.final_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                         dtype=layers.RESIDUAL_DTYPE, param_dtype=param_dtype)
        self.max_length = cfg.max_position_embeddings
        self.dtype = dtype
        self.remat = remat

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool = True) -> jax.Array:
        x = self.embed(input_ids, deterministic=deterministic)
        return self.encode_embeddings(x, input_ids, attention_mask, deterministic=deterministic)

    def _check_length(self, length: int) -> None:
        if length > self.max_length:
            raise ValueError(f"chunk length {length} exceeds the model's max_length "
                             f"{self.max_length} (config.json); use a smaller chunk size")

    def word_embed(self, input_ids: jax.Array) -> jax.Array:
        """Raw token-embedding table lookup ``[N, c] -> [N, c, D]``."""
        return self.tok_embeddings(input_ids)

    def embed(self, input_ids: jax.Array, *, deterministic: bool = True,
              word_embeds: jax.Array | None = None) -> jax.Array:
        """The embedding block's output ``[N, c, D]``: the token embedding in the residual
        dtype (NeoBERT has no embedding norm or dropout); ``word_embeds`` replaces the lookup."""
        del deterministic
        self._check_length(input_ids.shape[1])
        words = self.tok_embeddings(input_ids) if word_embeds is None else word_embeds
        return words.astype(layers.RESIDUAL_DTYPE)

    def encode_embeddings(self, x: jax.Array, input_ids: jax.Array | None,
                          attention_mask: jax.Array, *, deterministic: bool = True,
                          return_attentions: bool = False
                          ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Layers + final RMSNorm on ``x [N, c, D]`` -> hidden ``[N, c, D]`` (and, with
        ``return_attentions``, fp32 probabilities ``[L, N, H, c, c]``). ``input_ids`` is not
        needed by this family (may be None)."""
        del input_ids
        self._check_length(x.shape[1])
        out = layers.run_layers(self.layers, x, attention_mask, deterministic=deterministic,
                                remat=self.remat, return_attentions=return_attentions)
        if return_attentions:
            return self.final_norm(out[0]), out[1]
        return self.final_norm(out)


# --- config.json <-> EncoderConfig fields -------------------------------------------------------

def parse_hf_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """EncoderConfig keyword arguments from the hub's NeoBERT ``config.json``."""
    for key, want in (("hidden_act", "swiglu"), ("rms_norm", True), ("rope", True)):
        if key in hf and (hf[key].lower() if isinstance(hf[key], str) else hf[key]) != want:
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported (NeoBERT "
                             f"checkpoints use {want!r})")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=ffn_hidden_size(hf["intermediate_size"]),
        pad_token_id=hf.get("pad_token_id", 0),
        max_position_embeddings=hf.get("max_length", 1024),
        layer_norm_eps=hf.get("norm_eps", 1e-6), hidden_act="silu", hidden_dropout=0.0,
        attention_dropout=0.0, type_vocab_size=0,
        initializer_range=hf.get("embedding_init_range", 0.02),
        options=dict(RUNTIME_OPTIONS),
    )


def hf_config_fields(cfg: EncoderConfig) -> dict[str, Any]:
    """The ``config.json`` fields EncoderConfig owns (inverse of ``parse_hf_config``).

    ``intermediate_size`` is the source config's value when it maps to the model's MLP size,
    else ``3F / 2`` (which maps back to F).
    """
    source = cfg.hf_config.get("intermediate_size")
    if source is None or ffn_hidden_size(source) != cfg.intermediate_size:
        source = 3 * cfg.intermediate_size // 2
        if ffn_hidden_size(source) != cfg.intermediate_size:
            raise ValueError(f"MLP size {cfg.intermediate_size} cannot be written as a NeoBERT "
                             "intermediate_size (it must be a multiple of 8)")
    out = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=source, pad_token_id=cfg.pad_token_id,
        max_length=cfg.max_position_embeddings, norm_eps=cfg.layer_norm_eps,
        embedding_init_range=cfg.initializer_range,
    )
    if "dim_head" in cfg.hf_config:
        out["dim_head"] = cfg.hidden_size // cfg.num_heads
    if "auto_map" in cfg.hf_config:  # the hub code's classes (copy its model.py next to it)
        out["auto_map"] = dict(cfg.hf_config["auto_map"])
    return out
