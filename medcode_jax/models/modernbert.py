"""ModernBERT encoder (``transformers`` ``ModernBertModel`` semantics).

Pre-norm transformer without position embeddings: token embedding -> LayerNorm (-> dropout);
per layer ``x += attn(attn_norm(x)); x += mlp(mlp_norm(x))`` (layer 0's ``attn_norm`` is the
identity); final LayerNorm. Attention uses rotary embeddings (rotate-half convention, fp32)
with theta ``global_rope_theta`` on global layers and ``local_rope_theta`` on local layers; a
local layer lets query ``i`` attend only to keys with ``|i - j| <= local_attention // 2``.
Positions are ``0..c-1`` in every chunk row. The MLP is GeGLU. Biases and the LayerNorm bias
exist only when ``attention_bias`` / ``mlp_bias`` / ``norm_bias`` are set in ``config.json``.

``EncoderConfig.options`` (parsed from ``config.json`` unless noted):
    layer_types        tuple of "full_attention" | "sliding_attention", one per checkpoint layer
    global_rope_theta, local_rope_theta, local_attention
    attention_bias, mlp_bias, norm_bias, embedding_dropout
    attention_impl     "dot_product_attention" (default) | "mask"   (not from config.json)
    attention_backend  None | "xla" | "cudnn"  (jax.nn.dot_product_attention implementation)

Parameter paths (what ``medcode_jax.convert.keymaps.MODERNBERT`` maps HF keys onto)::

    embeddings.tok_embeddings.embedding, embeddings.norm.{scale,bias}
    layers.{i}.attn_norm.{scale,bias}            (i >= 1)
    layers.{i}.attn.qkv.{kernel [D, 3, D], bias} layers.{i}.attn.out.{kernel,bias}
    layers.{i}.mlp_norm.{scale,bias}
    layers.{i}.mlp.wi.{kernel [D, 2, I], bias}   layers.{i}.mlp.wo.{kernel,bias}
    final_norm.{scale,bias}
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

GLOBAL, LOCAL = "full_attention", "sliding_attention"
DEFAULT_THETA = {GLOBAL: 160_000.0, LOCAL: 10_000.0}
# Runtime settings (not in config.json) and their defaults.
RUNTIME_OPTIONS = {"attention_impl": "dot_product_attention", "attention_backend": None}


class ModernBertEmbeddings(nnx.Module):
    """``drop(norm(tok_embeddings(ids)))``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        self.tok_embeddings = layers.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                                           init=layers.normal_init(cfg.initializer_range),
                                           rngs=rngs, param_dtype=param_dtype)
        self.norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                     use_bias=cfg.options["norm_bias"],
                                     dtype=layers.RESIDUAL_DTYPE,
                                     param_dtype=param_dtype)
        self.dropout = layers.Dropout(cfg.options["embedding_dropout"], rngs=rngs)

    def __call__(self, input_ids: jax.Array, *, deterministic: bool,
                 word_embeds: jax.Array | None = None) -> jax.Array:
        words = self.tok_embeddings(input_ids) if word_embeds is None else word_embeds
        x = self.norm(words)
        return self.dropout(x, deterministic=deterministic)


class ModernBertAttention(nnx.Module):
    """Fused-QKV self-attention with rotary embeddings, global or local (windowed)."""

    def __init__(self, cfg: EncoderConfig, layer_type: str, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype, param_dtype: jnp.dtype):
        d, opts = cfg.hidden_size, cfg.options
        kw = dict(use_bias=opts["attention_bias"],
                  kernel_init=layers.normal_init(cfg.initializer_range), rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype)
        self.qkv = layers.FusedDense(d, 3, d, axes=("embed", "qkv", "heads"), **kw)
        self.out = layers.Dense(d, d, axes=("heads", "embed"), **kw)
        self.dropout = layers.Dropout(cfg.attention_dropout, rngs=rngs)  # probabilities and output
        self.num_heads = cfg.num_heads
        self.theta = opts["global_rope_theta"] if layer_type == GLOBAL else opts["local_rope_theta"]
        self.window = None if layer_type == GLOBAL else opts["local_attention"] // 2
        self.impl = opts.get("attention_impl", RUNTIME_OPTIONS["attention_impl"])
        self.backend = opts.get("attention_backend", RUNTIME_OPTIONS["attention_backend"])

    def __call__(self, x: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool, return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        n, c, d = x.shape
        qkv = self.qkv(x).reshape(n, c, 3, self.num_heads, d // self.num_heads)
        angles = layers.rotary_angles(c, d // self.num_heads, self.theta)
        q = layers.rotate_half_rope(qkv[:, :, 0], angles)
        k = layers.rotate_half_rope(qkv[:, :, 1], angles)
        out = layers.self_attention(q, k, qkv[:, :, 2], attention_mask, window=self.window,
                                    impl=self.impl, backend=self.backend, dropout=self.dropout,
                                    deterministic=deterministic, return_probs=return_attention)
        if return_attention:
            out, probs = out
            return self.dropout(self.out(out.reshape(n, c, d)), deterministic=deterministic), probs
        return self.dropout(self.out(out.reshape(n, c, d)), deterministic=deterministic)


class ModernBertLayer(nnx.Module):
    """Pre-norm block; ``attn_norm`` is None (identity) in layer 0."""

    def __init__(self, cfg: EncoderConfig, index: int, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        norm = dict(eps=cfg.layer_norm_eps, use_bias=cfg.options["norm_bias"],
                    dtype=layers.RESIDUAL_DTYPE, param_dtype=param_dtype)
        self.attn_norm = layers.LayerNorm(cfg.hidden_size, **norm) if index > 0 else None
        self.attn = ModernBertAttention(cfg, cfg.options["layer_types"][index], rngs=rngs,
                                        dtype=dtype, param_dtype=param_dtype)
        self.mlp_norm = layers.LayerNorm(cfg.hidden_size, **norm)
        self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size,
                                   activation_name=cfg.hidden_act,
                                   use_bias=cfg.options["mlp_bias"],
                                   kernel_init=layers.normal_init(cfg.initializer_range),
                                   rngs=rngs, dropout=cfg.hidden_dropout, dtype=dtype,
                                   param_dtype=param_dtype)

    def __call__(self, x: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool, return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        h = self.attn_norm(x) if self.attn_norm is not None else x
        a = self.attn(h, attention_mask, deterministic=deterministic,
                      return_attention=return_attention)
        if return_attention:
            a, probs = a
        x = x + a
        x = x + self.mlp(self.mlp_norm(x), deterministic=deterministic)
        return (x, probs) if return_attention else x


class ModernBertEncoder(nnx.Module):
    """The whole encoder: ``(input_ids [N, c], attention_mask [N, c]) -> hidden [N, c, D]``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: bool = False):
        self.embeddings = ModernBertEmbeddings(cfg, rngs=rngs, dtype=dtype,
                                               param_dtype=param_dtype)
        self.layers = nnx.List([ModernBertLayer(cfg, i, rngs=rngs, dtype=dtype,
                                                param_dtype=param_dtype)
                                for i in range(cfg.num_layers)])
        self.final_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                           use_bias=cfg.options["norm_bias"],
                                           dtype=layers.RESIDUAL_DTYPE,
                                           param_dtype=param_dtype)
        self.remat = remat

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool = True) -> jax.Array:
        x = self.embed(input_ids, deterministic=deterministic)
        return self.encode_embeddings(x, input_ids, attention_mask, deterministic=deterministic)

    def word_embed(self, input_ids: jax.Array) -> jax.Array:
        """Raw token-embedding table lookup ``[N, c] -> [N, c, D]``."""
        return self.embeddings.tok_embeddings(input_ids)

    def embed(self, input_ids: jax.Array, *, deterministic: bool = True,
              word_embeds: jax.Array | None = None) -> jax.Array:
        """The embedding block's output ``[N, c, D]`` (token embedding -> LN -> dropout);
        ``word_embeds`` replaces the token lookup."""
        return self.embeddings(input_ids, deterministic=deterministic, word_embeds=word_embeds)

    def encode_embeddings(self, x: jax.Array, input_ids: jax.Array | None,
                          attention_mask: jax.Array, *, deterministic: bool = True,
                          return_attentions: bool = False
                          ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Layers + final norm on ``x [N, c, D]`` -> hidden ``[N, c, D]`` (and, with
        ``return_attentions``, fp32 probabilities ``[L, N, H, c, c]``, local layers' window
        included). ``input_ids`` is not needed by this family (may be None)."""
        del input_ids
        out = layers.run_layers(self.layers, x, attention_mask, deterministic=deterministic,
                                remat=self.remat, return_attentions=return_attentions)
        if return_attentions:
            return self.final_norm(out[0]), out[1]
        return self.final_norm(out)


# --- config.json <-> EncoderConfig fields -------------------------------------------------------

def _rope_theta(hf: Mapping[str, Any], layer_type: str, flat_key: str) -> float:
    """Theta of ``layer_type`` from ``rope_parameters`` (transformers 5) or the flat field."""
    params = (hf.get("rope_parameters") or {}).get(layer_type)
    if params is not None:
        kind = params.get("rope_type", "default")
        if kind != "default":
            raise ValueError(f"config.json rope_parameters[{layer_type!r}].rope_type={kind!r} is "
                             "not supported (only 'default')")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if hf.get("rope_scaling"):
        raise ValueError(f"config.json rope_scaling={hf['rope_scaling']!r} is not supported")
    return float(hf.get(flat_key, DEFAULT_THETA[layer_type]))


def _layer_types(hf: Mapping[str, Any]) -> tuple[str, ...]:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        every = hf.get("global_attn_every_n_layers", 3)
        return tuple(GLOBAL if i % every == 0 else LOCAL for i in range(n))
    types = tuple(types)
    if len(types) != n or not set(types) <= {GLOBAL, LOCAL}:
        raise ValueError(f"config.json layer_types must list {n} entries of {GLOBAL!r} / "
                         f"{LOCAL!r}, got {list(types)}")
    return types


def parse_hf_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """EncoderConfig keyword arguments from a ModernBERT ``config.json`` (either form)."""
    local_attention = int(hf.get("local_attention", 128))
    if local_attention < 2 or local_attention % 2:
        raise ValueError(f"config.json local_attention={local_attention} must be an even number "
                         ">= 2 (the total window; each side gets half)")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], pad_token_id=hf.get("pad_token_id", 0),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        layer_norm_eps=hf.get("norm_eps", 1e-5),
        hidden_act=hf.get("hidden_activation", "gelu"),
        hidden_dropout=float(hf.get("mlp_dropout", 0.0)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        type_vocab_size=0, initializer_range=hf.get("initializer_range", 0.02),
        options=dict(
            layer_types=_layer_types(hf),
            global_rope_theta=_rope_theta(hf, GLOBAL, "global_rope_theta"),
            local_rope_theta=_rope_theta(hf, LOCAL, "local_rope_theta"),
            local_attention=local_attention,
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            norm_bias=bool(hf.get("norm_bias", False)),
            embedding_dropout=float(hf.get("embedding_dropout", 0.0)),
            **RUNTIME_OPTIONS,
        ),
    )


def hf_config_fields(cfg: EncoderConfig) -> dict[str, Any]:
    """The ``config.json`` fields EncoderConfig owns, in the transformers 5 form.

    The older flat rope fields are rewritten too when the source config had them, so both forms
    in the file agree.
    """
    opts = cfg.options
    out = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, pad_token_id=cfg.pad_token_id,
        max_position_embeddings=cfg.max_position_embeddings, norm_eps=cfg.layer_norm_eps,
        hidden_activation=cfg.hidden_act, mlp_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, initializer_range=cfg.initializer_range,
        layer_types=list(opts["layer_types"][:cfg.num_layers]),
        rope_parameters={GLOBAL: {"rope_theta": opts["global_rope_theta"], "rope_type": "default"},
                         LOCAL: {"rope_theta": opts["local_rope_theta"], "rope_type": "default"}},
        local_attention=opts["local_attention"], attention_bias=opts["attention_bias"],
        mlp_bias=opts["mlp_bias"], norm_bias=opts["norm_bias"],
        embedding_dropout=opts["embedding_dropout"],
    )
    for key, layer_type in (("global_rope_theta", GLOBAL), ("local_rope_theta", LOCAL)):
        if key in cfg.hf_config:
            out[key] = out["rope_parameters"][layer_type]["rope_theta"]
    return out
