"""PLM-RR stage 2: a trainable encoder + token-level description→note cross-attention re-ranker.

Spec `plmrr.md` §1. For each document b and candidate code k (description token ids E_k, L
tokens, encoded by the *same* trainable encoder as the note), with note states H [T, D]:

    q = E Wq,  k = H Wk,  v = H Wv                       (no biases)
    A[l, t] = softmax_t(q_l · k_t / √(D/h)), note padding masked        -> [K, L, T] per doc
    p = (1/n_k) Σ_l m[k, l] (A v)[l]      (mean over the n_k real description tokens)
    r_k = w · LayerNorm(p) + b            (one w [D] and one scalar b for all codes)

Computed in the equivalent reduce-first form: Ā[b, k, t] = Σ_l m[k, l] A[b, k, l, t] / n_k,
p = Ā v, so the [B, K, L, T] attention is contracted to [B, K, T] before it meets the values
(the [B, K, L, D] context of the reference is never built). Identical math: the reference's
masking of description padding rows and zeroing of their context both reduce to m[k, l] = 0.

Multi-head option (`num_heads=h > 1`, not in the reference): q, k, v are split into h heads of
D/h features, scores scaled by 1/√(D/h), p is the concatenation of the per-head pooled contexts
(head i -> features i·D/h ... (i+1)·D/h − 1), and the returned attention is averaged over heads.
h = 1 is exactly the reference (scale 1/√D).

======================  ===========  ======================================  ==================
ours (NNX)              shape        reference (torch)                       logical axes
======================  ===========  ======================================  ==================
PLMRR.encoder           —            roberta_encoder                         (encoder's own)
rerank_attention =      —            _dynamic_token_attention
  DescriptionCrossAttention
q_proj.kernel           [D, D]       _dynamic_token_attention.q_proj.weight ᵀ (embed, kv)
k_proj.kernel           [D, D]       _dynamic_token_attention.k_proj.weight ᵀ (embed, kv)
v_proj.kernel           [D, D]       _dynamic_token_attention.v_proj.weight ᵀ (embed, kv)
layernorm.scale/bias    [D]          _dynamic_token_attention.layernorm.{weight,bias}  (embed,)
output_linear.kernel    [D, 1]       _dynamic_token_attention.output_linear.weight ᵀ (embed, None)
output_linear.bias      [1]          _dynamic_token_attention.output_linear.bias (None,)
description_ids/_mask   [C, L]       _dynamic_token_attention.description_input_ids /
                                     description_attention_mask (buffers)   (labels, None)
fusion_alpha            []           — (ours, `fuse_retriever` only)        ()
======================  ===========  ======================================  ==================

`description_ids` / `description_mask` are `DescriptionTable` variables (not `nnx.Param`): data,
never trained; `nnx.split(model, nnx.Param, ...)` puts them in the non-parameter part.

Precision: parameters in `param_dtype` (fp32); the projections and the score matmul run in
`dtype` (bf16 in training), so the [B, K, L, T] scores and attention probabilities are stored in
the compute dtype (`heads._softmax`: fp32 softmax, only the compute-dtype probabilities are kept
for the backward pass). The reduction over description tokens accumulates in fp32 (Ā is fp32),
p = Ā v is an fp32 matmul (L times cheaper than the score matmul), LayerNorm and the returned
scores are fp32 (rematerialised, `heads._layernorm_logits`).

Padding: note padding gets the additive `MASK_VALUE` bias; a document without any real token has
an all-zero attention, so p = 0 and its scores are w · β + b (finite; the reference would attend
uniformly to padding). A description without any real token also gives p = 0 (the reference
divides by zero).

Descriptions (PLMRR): `num_unique=None` encodes one description per (document, candidate) slot
(B·K rows, like the reference); `num_unique=U` encodes the U distinct candidate codes once and
every slot reads its row (same values and gradients; the caller guarantees U ≥ the number of
distinct codes in the batch — a smaller U silently gives wrong scores).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medcode_jax.models.heads import (
    Dtype,
    _mask_bias,
    _meta,
    _normal,
    _softmax,
    layernorm_scorer,
    score_pooled,
)
from medcode_jax.models.plm_icd import chunked_encode, encoder_hidden_size


class DescriptionTable(nnx.Variable):
    """A [C, L] pre-tokenised description table (ids or mask): data on device, not a parameter."""


QK_INITS = ("normal", "identity")


def _identity(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class DescriptionCrossAttention(nnx.Module):
    """Token-level description→note cross-attention re-ranker head (reference name:
    `_dynamic_token_attention`, class `DynamicTokenLevelCrossAttention`). Module docstring."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int = 1,
        qk_init: str = "normal",
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        """`qk_init`: "normal" (the reference: N(0, 0.03)) or "identity" (q_proj = k_proj = I,
        so at initialisation a description token attends to the note tokens whose encodings it
        resembles — a warm start that skips the uniform-attention plateau; not the reference)."""
        if qk_init not in QK_INITS:
            raise ValueError(f"DescriptionCrossAttention: qk_init={qk_init!r}, use one of "
                             f"{QK_INITS}.")
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"DescriptionCrossAttention: num_heads={num_heads} must be >= 1 and divide "
                f"hidden_size={hidden_size}."
            )
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.dtype = dtype
        self.param_dtype = param_dtype
        d = hidden_size

        def projection(init: str = "normal") -> nnx.Linear:
            kernel_init = _normal() if init == "normal" else _identity
            return nnx.Linear(
                d, d, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, kernel_metadata=_meta("embed", "kv"), rngs=rngs,
            )

        self.q_proj = projection(qk_init)
        self.k_proj = projection(qk_init)
        self.v_proj = projection()
        self.layernorm, self.output_linear = layernorm_scorer(d, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        desc_hidden: jax.Array,
        desc_mask: jax.Array,
        slots: jax.Array,
        note_hidden: jax.Array,
        note_mask: jax.Array,
        *,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """desc_hidden [U, L, D], desc_mask [U, L], slots [B, K] (row of desc_hidden of each
        (document, candidate)), note_hidden [B, T, D], note_mask [B, T] -> scores [B, K] fp32
        (, attention [B, K, T] fp32: mean over real description tokens, averaged over heads)."""
        d, h = self.hidden_size, self.num_heads
        dh = d // h
        self._check(desc_hidden, desc_mask, slots, note_hidden, note_mask)
        batch, length = note_mask.shape
        k_slots = slots.shape[1]
        slots = slots.astype(jnp.int32)

        queries = self.q_proj(desc_hidden.astype(self.dtype))  # [U, L, D]
        keys = self.k_proj(note_hidden.astype(self.dtype))  # [B, T, D]
        values = self.v_proj(note_hidden.astype(self.dtype))  # [B, T, D]
        q = queries[slots]  # [B, K, L, D]
        q = q.reshape(*q.shape[:3], h, dh)
        keys = keys.reshape(batch, length, h, dh)
        scores = jnp.einsum("bklhe,bthe->bhklt", q, keys)  # [B, h, K, L, T], compute dtype

        bias = _mask_bias(note_mask)[:, :, None, None, :]  # [B, 1, 1, 1, T]
        keep = jnp.any(note_mask != 0, axis=-1).astype(jnp.float32)[:, None, None, None, None]
        attention = _softmax(scores, bias, keep, 1.0 / math.sqrt(dh))

        # Reduce over description tokens first: Ā = Σ_l m A / n (fp32 accumulation).
        m = desc_mask[slots] != 0  # [B, K, L]
        count = jnp.maximum(jnp.sum(m, axis=-1), 1).astype(jnp.float32)  # [B, K]
        pooled_attention = jnp.einsum(
            "bhklt,bkl->bhkt", attention, m.astype(attention.dtype),
            preferred_element_type=jnp.float32,
        ) / count[:, None, :, None]  # [B, h, K, T] fp32
        v = values.astype(jnp.float32).reshape(batch, length, h, dh)
        pooled = jnp.einsum("bhkt,bthe->bkhe", pooled_attention, v).reshape(batch, k_slots, d)

        logits = score_pooled(pooled, self.layernorm, self.output_linear)
        if return_attention:
            return logits, jnp.mean(pooled_attention, axis=1)
        return logits

    def _check(self, desc_hidden, desc_mask, slots, note_hidden, note_mask) -> None:
        name, d = "DescriptionCrossAttention", self.hidden_size
        if desc_hidden.ndim != 3 or desc_hidden.shape[-1] != d:
            raise ValueError(f"{name}: desc_hidden must be [U, L, {d}], got {desc_hidden.shape}; "
                             "check that hidden_size matches the encoder's.")
        if desc_mask.shape != desc_hidden.shape[:2]:
            raise ValueError(f"{name}: desc_mask must be [U, L] = {desc_hidden.shape[:2]}, got "
                             f"{desc_mask.shape}.")
        if note_hidden.ndim != 3 or note_hidden.shape[-1] != d:
            raise ValueError(f"{name}: note_hidden must be [B, T, {d}], got {note_hidden.shape}; "
                             "check that hidden_size matches the encoder's.")
        if note_mask.shape != note_hidden.shape[:2]:
            raise ValueError(f"{name}: note_mask must be [B, T] = {note_hidden.shape[:2]}, got "
                             f"{note_mask.shape}.")
        if slots.ndim != 2 or slots.shape[0] != note_hidden.shape[0]:
            raise ValueError(f"{name}: slots must be [B, K] with B = {note_hidden.shape[0]}, got "
                             f"{slots.shape}.")


class PLMRR(nnx.Module):
    """Chunked trainable encoder + description re-ranker -> candidate logits [B, K] (fp32).

    The retriever is not part of this module: candidates [B, K] (code ids) and their retriever
    logits come with the batch (the candidate cache).
    """

    def __init__(
        self,
        encoder: nnx.Module,
        reranker: DescriptionCrossAttention,
        *,
        description_ids: np.ndarray,
        description_mask: np.ndarray,
        chunk_size: int,
        pad_token_id: int,
        fuse_retriever: bool = False,
        description_grad: bool = True,
        rngs: nnx.Rngs,
    ):
        del rngs  # fusion_alpha is initialised to 0; kept for a uniform constructor signature
        ids = np.asarray(description_ids)
        mask = np.asarray(description_mask)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] < 1:
            raise ValueError(
                "PLMRR: description_ids and description_mask must both be [C, L] with C >= 1, "
                f"got {ids.shape} and {mask.shape} (see descriptions.npz in the prepared dataset)."
            )
        if chunk_size < 1:
            raise ValueError(f"PLMRR: chunk_size must be >= 1, got {chunk_size}.")
        self.encoder = encoder
        self.rerank_attention = reranker
        self.description_ids = DescriptionTable(
            jnp.asarray(ids, jnp.int32), **_meta("labels", None))
        self.description_mask = DescriptionTable(
            jnp.asarray(mask, jnp.int32), **_meta("labels", None))
        self.num_labels = int(ids.shape[0])
        self.chunk_size = chunk_size
        self.pad_token_id = pad_token_id
        self.fuse_retriever = fuse_retriever
        self.description_grad = description_grad
        if fuse_retriever:
            self.fusion_alpha = nnx.Param(jnp.zeros((), reranker.param_dtype), **_meta())

    def descriptions(
        self, candidates: jax.Array, *, num_unique: int | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """candidates [B, K] -> (ids [U, L], mask [U, L], slots [B, K]) to encode and gather.

        `num_unique=None`: U = B·K, slot (b, k) is row b·K + k. `num_unique=U`: the U smallest
        distinct codes (sorted; filler entries beyond the distinct count read code C − 1's
        description and are never referenced by a slot).
        """
        if candidates.ndim != 2:
            raise ValueError(f"PLMRR: candidates must be [B, K], got shape {candidates.shape}.")
        batch, k = candidates.shape
        flat = candidates.reshape(-1).astype(jnp.int32)
        if num_unique is None:
            rows = flat
            slots = jnp.arange(batch * k, dtype=jnp.int32).reshape(batch, k)
        else:
            if num_unique < 1:
                raise ValueError(f"PLMRR: num_unique must be >= 1 or None, got {num_unique}.")
            c = self.num_labels
            uniq = jnp.unique(flat, size=num_unique, fill_value=c)
            rows = jnp.minimum(uniq, c - 1)
            slots = jnp.searchsorted(uniq, candidates.astype(jnp.int32)).astype(jnp.int32)
        return self.description_ids[...][rows], self.description_mask[...][rows], slots

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        candidates: jax.Array,
        candidate_scores: jax.Array,
        *,
        num_unique: int | None = None,
        deterministic: bool = True,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Note [B, T], candidates [B, K] code ids, candidate_scores [B, K] retriever logits ->
        logits [B, K] fp32 (, attention [B, K, T] fp32)."""
        if candidates.ndim != 2 or candidates.shape[0] != input_ids.shape[0]:
            raise ValueError(f"PLMRR: candidates must be [B, K] with B = {input_ids.shape[0]}, "
                             f"got {candidates.shape}.")
        if candidate_scores.shape != candidates.shape:
            raise ValueError(f"PLMRR: candidate_scores {candidate_scores.shape} must match "
                             f"candidates {candidates.shape}.")
        hidden, mask = chunked_encode(
            self.encoder, input_ids, attention_mask, chunk_size=self.chunk_size,
            pad_token_id=self.pad_token_id, deterministic=deterministic, caller="PLMRR",
        )
        desc_ids, desc_mask, slots = self.descriptions(candidates, num_unique=num_unique)
        desc_hidden = self.encoder(desc_ids, desc_mask, deterministic=deterministic)
        if not self.description_grad:
            desc_hidden = jax.lax.stop_gradient(desc_hidden)
        out = self.rerank_attention(
            desc_hidden, desc_mask, slots, hidden, mask, return_attention=return_attention)
        logits, attention = out if return_attention else (out, None)
        if self.fuse_retriever:
            alpha = self.fusion_alpha[...].astype(jnp.float32)
            logits = logits + alpha * candidate_scores.astype(jnp.float32)
        if return_attention:
            return logits, attention
        return logits


def create_plmrr(
    encoder: nnx.Module,
    *,
    description_ids: np.ndarray,
    description_mask: np.ndarray,
    chunk_size: int,
    pad_token_id: int,
    num_heads: int = 1,
    qk_init: str = "normal",
    fuse_retriever: bool = False,
    description_grad: bool = True,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> PLMRR:
    """PLM-RR re-ranker around `encoder` (width read from the encoder's output)."""
    hidden_size = encoder_hidden_size(encoder, chunk_size)
    head = DescriptionCrossAttention(
        hidden_size, num_heads=num_heads, qk_init=qk_init, rngs=rngs, dtype=dtype,
        param_dtype=param_dtype)
    return PLMRR(
        encoder, head, description_ids=description_ids, description_mask=description_mask,
        chunk_size=chunk_size, pad_token_id=pad_token_id, fuse_retriever=fuse_retriever,
        description_grad=description_grad, rngs=rngs,
    )
