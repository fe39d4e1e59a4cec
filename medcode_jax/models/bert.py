"""BERT and RoBERTa encoders (``transformers`` ``BertModel`` / ``RobertaModel`` semantics).

Post-LayerNorm transformer: learned absolute positions, token-type embedding 0 added, biases
everywhere, LayerNorm eps from the config, dropout on hidden states and attention
probabilities when ``deterministic=False``. The two families differ only in their position ids:
BERT uses ``0..c-1``; RoBERTa derives them from the non-pad tokens of each row
(``cumsum(ids != pad) * (ids != pad) + pad``).

Parameter paths (what ``medcode_jax.convert.keymaps`` maps HF keys onto)::

    embeddings.{word,position,token_type}_embeddings.embedding
    embeddings.layer_norm.{scale,bias}
    layers.{i}.attention.{query,key,value,output}.{kernel,bias}
    layers.{i}.attention_norm.{scale,bias}
    layers.{i}.mlp.{intermediate,output}.{kernel,bias}
    layers.{i}.mlp_norm.{scale,bias}
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from medcode_jax.models import layers

if TYPE_CHECKING:
    from medcode_jax.models.encoders import EncoderConfig


def bert_position_ids(input_ids: jax.Array) -> jax.Array:
    """BERT: positions ``0..c-1`` in every chunk row."""
    n, c = input_ids.shape
    return jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (n, c))


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """RoBERTa: real tokens get ``pad+1, pad+2, …`` in order, pads get ``pad`` (per row)."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class BertEmbeddings(nnx.Module):
    """word + position + token-type-0 embeddings -> LayerNorm -> dropout."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        init = layers.normal_init(cfg.initializer_range)
        d = cfg.hidden_size
        self.word_embeddings = layers.Embed(cfg.vocab_size, d, axes=("vocab", "embed"), init=init,
                                            rngs=rngs, param_dtype=param_dtype)
        self.position_embeddings = layers.Embed(cfg.max_position_embeddings, d,
                                                axes=(None, "embed"), init=init, rngs=rngs,
                                                param_dtype=param_dtype)
        self.token_type_embeddings = (
            layers.Embed(cfg.type_vocab_size, d, axes=(None, "embed"), init=init, rngs=rngs,
                         param_dtype=param_dtype) if cfg.type_vocab_size > 0 else None)
        self.layer_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, dtype=layers.RESIDUAL_DTYPE,
                                           param_dtype=param_dtype)
        self.dropout = layers.Dropout(cfg.hidden_dropout, rngs=rngs)
        self.roberta_positions = cfg.family == "roberta"
        self.pad_token_id = cfg.pad_token_id
        self.max_positions = cfg.max_position_embeddings

    def __call__(self, input_ids: jax.Array, *, deterministic: bool,
                 word_embeds: jax.Array | None = None) -> jax.Array:
        """``word_embeds`` [N, c, D], if given, replaces the word-embedding lookup (positions
        still come from ``input_ids``)."""
        if self.roberta_positions:
            positions = roberta_position_ids(input_ids, self.pad_token_id)
            needed = input_ids.shape[1] + self.pad_token_id + 1
        else:
            positions = bert_position_ids(input_ids)
            needed = input_ids.shape[1]
        if needed > self.max_positions:
            raise ValueError(
                f"chunk length {input_ids.shape[1]} needs {needed} position embeddings but the "
                f"model has max_position_embeddings={self.max_positions}; use a smaller chunk size")
        words = self.word_embeddings(input_ids) if word_embeds is None else word_embeds
        x = words + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.embedding[0]
        return self.dropout(self.layer_norm(x), deterministic=deterministic)


class BertAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v projections and an output projection."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        d = cfg.hidden_size
        kw = dict(kernel_init=layers.normal_init(cfg.initializer_range), rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype)
        self.query = layers.Dense(d, d, axes=("embed", "heads"), **kw)
        self.key = layers.Dense(d, d, axes=("embed", "heads"), **kw)
        self.value = layers.Dense(d, d, axes=("embed", "heads"), **kw)
        self.output = layers.Dense(d, d, axes=("heads", "embed"), **kw)
        self.attention_dropout = layers.Dropout(cfg.attention_dropout, rngs=rngs)
        self.num_heads = cfg.num_heads

    def __call__(self, x: jax.Array, bias: jax.Array, *, deterministic: bool,
                 return_attention: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        n, c, d = x.shape
        split = lambda t: t.reshape(n, c, self.num_heads, d // self.num_heads)  # noqa: E731
        out = layers.dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), bias,
            dropout=self.attention_dropout, deterministic=deterministic,
            return_probs=return_attention)
        if return_attention:
            out, probs = out
            return self.output(out.reshape(n, c, d)), probs
        return self.output(out.reshape(n, c, d))


class BertMLP(nnx.Module):
    """``output(act(intermediate(x)))``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        kw = dict(kernel_init=layers.normal_init(cfg.initializer_range), rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype)
        self.intermediate = layers.Dense(cfg.hidden_size, cfg.intermediate_size,
                                         axes=("embed", "mlp"), **kw)
        self.output = layers.Dense(cfg.intermediate_size, cfg.hidden_size,
                                   axes=("mlp", "embed"), **kw)
        self.act = layers.activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.act(self.intermediate(x)))


class BertLayer(nnx.Module):
    """Post-LN block: ``x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x)))``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        self.attention = BertAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attention_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                               dtype=layers.RESIDUAL_DTYPE, param_dtype=param_dtype)
        self.mlp = BertMLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                         dtype=layers.RESIDUAL_DTYPE, param_dtype=param_dtype)
        self.dropout = layers.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, *, deterministic: bool,
                 return_attention: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        a = self.attention(x, bias, deterministic=deterministic, return_attention=return_attention)
        if return_attention:
            a, probs = a
        x = self.attention_norm(x + self.dropout(a, deterministic=deterministic))
        m = self.mlp(x)
        x = self.mlp_norm(x + self.dropout(m, deterministic=deterministic))
        return (x, probs) if return_attention else x


class BertEncoder(nnx.Module):
    """The whole encoder: ``(input_ids [N, c], attention_mask [N, c]) -> hidden [N, c, D]``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: bool = False):
        self.embeddings = BertEmbeddings(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.remat = remat

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool = True) -> jax.Array:
        x = self.embed(input_ids, deterministic=deterministic)
        return self.encode_embeddings(x, input_ids, attention_mask, deterministic=deterministic)

    def word_embed(self, input_ids: jax.Array) -> jax.Array:
        """Raw word-embedding table lookup ``[N, c] -> [N, c, D]``."""
        return self.embeddings.word_embeddings(input_ids)

    def embed(self, input_ids: jax.Array, *, deterministic: bool = True,
              word_embeds: jax.Array | None = None) -> jax.Array:
        """The embedding block's output ``[N, c, D]`` (word + position + type -> LN -> dropout);
        ``word_embeds`` replaces the word lookup (positions still come from ``input_ids``)."""
        return self.embeddings(input_ids, deterministic=deterministic, word_embeds=word_embeds)

    def encode_embeddings(self, x: jax.Array, input_ids: jax.Array | None,
                          attention_mask: jax.Array, *, deterministic: bool = True,
                          return_attentions: bool = False
                          ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The layers on the embedding output ``x [N, c, D]`` -> hidden ``[N, c, D]`` (and, with
        ``return_attentions``, the fp32 self-attention probabilities ``[L, N, H, c, c]``).
        ``input_ids`` is not needed by this family (may be None)."""
        del input_ids
        bias = layers.attention_bias(attention_mask)
        return layers.run_layers(self.layers, x, bias, deterministic=deterministic,
                                 remat=self.remat, return_attentions=return_attentions)


# --- config.json <-> EncoderConfig fields -------------------------------------------------------

def parse_hf_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """EncoderConfig keyword arguments from a BERT / RoBERTa ``config.json`` dict."""
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r} is not supported (only 'absolute')")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], pad_token_id=hf.get("pad_token_id", 0),
        max_position_embeddings=hf["max_position_embeddings"],
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        type_vocab_size=hf.get("type_vocab_size", 2),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def hf_config_fields(cfg: EncoderConfig) -> dict[str, Any]:
    """The ``config.json`` fields that EncoderConfig owns (inverse of ``parse_hf_config``)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, pad_token_id=cfg.pad_token_id,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.initializer_range, position_embedding_type="absolute",
    )
