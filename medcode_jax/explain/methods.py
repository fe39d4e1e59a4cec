"""Feature-attribution methods for PLM-ICD / PLM-CA (docs/EXPLAIN.md §2).

Every method maps a batch ``input_ids, attention_mask, token_mask [B, T]`` and the codes to
explain ``codes [B, K]`` (label ids, -1 = empty slot) to scores ``[B, K, T]`` fp32: >= 0, exactly
0 where ``token_mask`` is 0 (padding and special tokens), each row with a code summing to 1 (rows
of code -1, and rows whose raw scores are all 0, are all 0). Gradient methods are batched over
the K codes: one forward pass shared by all codes, then the K backward passes of one VJP,
``ExplainOptions.code_batch`` of them vectorised together (``jax.vmap``), the blocks in a
``lax.map`` (on CPU blocks of 1 are fastest; on accelerators larger blocks). Nothing loops over
codes in Python.

Semantics follow ``JoakimEdin/explainable-medical-coding``
(``explainability/explanation_methods.py``, "the reference"):

``attention``           The label head's attention weights of the code: LAAT's softmax weights
                        (PLM-ICD), the cross-attention softmax (PLM-CA). Reference ``laat``.
``attention_rollout``   Head-mean self-attention per layer ``A_l`` (chunk-local), ``A_l + I/2``
                        (the reference adds eye/2 and does NOT renormalise; since every row
                        then sums to 1.5 the product is 1.5^L times the standard rollout with
                        ``2/3 A + 1/3 I``, and the final row normalisation removes the factor),
                        multiplied over layers ``R = M_{L-1} ... M_0`` within each chunk (block
                        diagonal over chunks), then ``label attention @ R``.
``attgrad``             ``|d logit_c / d a_c| * a_c`` with ``a_c`` the label attention row of code
                        c (reference ``atgrad_attention``).
``attingrad``           ``a_c * ||e * d logit_c / d e||_2`` with ``e`` the embedding block's output
                        (reference ``grad_attention``, the paper's AttInGrad).
``gradient_x_input``    ``||e * d logit_c / d e||_2`` per token (captum LayerGradientXActivation
                        on the embedding block, then the L2 norm over features).
``integrated_gradients`` Straight path ``e' + a (e - e')`` from the baseline embedding ``e'`` (the
                        embedding block run on the input with every ``token_mask`` token replaced
                        by ``baseline_token_id``; special tokens and padding kept - the
                        reference's ``create_baseline_input`` keeps the first (CLS) and last (EOS)
                        token of its unpadded single document). The integral is approximated
                        with ``ig_steps`` points, Gauss-Legendre by default (captum's default
                        method, n_steps 50) or the trapezoid rule (``ig_method="trapezoid"``).
                        Like the reference (captum LayerIntegratedGradients with
                        ``multiply_by_inputs=False``) the default does NOT multiply by
                        ``e - e'``: the score is ``||integral of the gradient||_2``;
                        ``ig_multiply_by_inputs=True`` gives textbook IG ``||(e - e') * ...||_2``.
``occlusion``           ``|logit_c(x) - logit_c(x with token t replaced by baseline_token_id)|``
                        (reference ``occlusion_1``). Batched: ``occlusion_batch`` occluded copies
                        per forward; only the chunk holding t is re-encoded (chunks are encoded
                        independently, so this is exact), the head runs on the full document.
``random``              ``|N(0, 1)|`` from ``key``.

Where we differ from the reference:

* The reference explains one unpadded document at a time with an all-ones attention mask; we
  explain padded batches and give weight only to ``token_mask`` tokens, normalising each (doc,
  code) row to sum 1 over them (the reference normalises over all positions incl. CLS/EOS; its
  occlusion, kernelshap and lime divide by one L1 norm over all codes together, its atgrad and
  attingrad by per-code L1 norms - per-code sums here everywhere).
* The reference's ``laat`` / ``alti`` / rollout callables apply an extra softmax to what the
  head returns (PLM-CA returns unnormalised scores, so that softmax over tokens recovers the
  attention when scale = 1; LAAT already returns probabilities, which get softmaxed twice; the
  rollout softmaxes over the *code* axis). We always use the head's actual attention
  probabilities (mask and scale included).
* Autocast fp16 in the reference; here the model's own compute dtype (fp32 residual stream and
  fp32 gradients w.r.t. the embedding output).
* deeplift, kernelshap, lime and alti are not implemented.

The label head is evaluated for the requested K codes only (``head_for_codes``: same formulas
and parameters as ``heads.LabelAttention`` / ``heads.LabelCrossAttention``, restricted to K
rows), so cost does not grow with the label count C.

PLM-RR (``reranker.PLMRR``, not in the reference's explanation code): the codes are the
candidates to explain; the "label attention" is the re-ranker's description->note attention
averaged over real description tokens (and heads), the logit is the candidate's re-ranker score
(plus the fused retriever score when ``fuse_retriever``). Descriptions are encoded once and held
fixed; gradients flow only through the note. Every method except attgrad is supported.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medcode_jax.models import heads as heads_lib
from medcode_jax.models.heads import LabelAttention, LabelCrossAttention
from medcode_jax.models.plm_icd import (PLMICD, chunked_encode, encode_embedding_rows,
                                        reference_span)
from medcode_jax.models.reranker import PLMRR

METHODS = ("attention", "attention_rollout", "attgrad", "attingrad", "gradient_x_input",
           "integrated_gradients", "occlusion", "random")
GRADIENT_METHODS = ("attgrad", "attingrad", "gradient_x_input", "integrated_gradients")
IG_METHODS = ("gausslegendre", "trapezoid")
CODE_BATCH_ACCELERATOR = 16


@dataclasses.dataclass(frozen=True)
class ExplainOptions:
    """Settings of the attribution methods (hashable: a static argument of jitted callers).

    ig_steps:              integration points of integrated_gradients (captum's default 50).
    ig_method:             "gausslegendre" (captum's default) or "trapezoid".
    ig_batch:              path points evaluated together (vmapped) per scan step. Memory
                           grows with it (each point keeps a whole forward pass for its
                           backward passes: 10 points x 16 notes x 512 tokens of a 6-layer
                           MiniLM needed 17 GB); 1 = a gradient method's memory.
    ig_multiply_by_inputs: multiply the integrated gradient by (e - e') (textbook IG); False =
                           the reference (captum multiply_by_inputs=False).
    baseline_token_id:     token of the IG baseline and of occlusion; None = the model's pad id.
    code_batch:            backward passes vectorised together (jax.vmap), blocks run one
                           after the other (lax.map) after one shared forward pass. None = the
                           backend's default: 1 on CPU (large vmapped backward passes are
                           cache-bound there: 16 at once ran 0.8x a per-code loop, blocks of 1
                           ~2x, bench/explain_speed.py), CODE_BATCH_ACCELERATOR elsewhere.
    occlusion_batch:       occluded copies per forward pass.
    """

    ig_steps: int = 50
    ig_method: str = "gausslegendre"
    ig_batch: int = 1
    ig_multiply_by_inputs: bool = False
    baseline_token_id: int | None = None
    code_batch: int | None = None
    occlusion_batch: int = 64

    def __post_init__(self) -> None:
        if self.ig_steps < 1:
            raise ValueError(f"ExplainOptions.ig_steps must be >= 1, got {self.ig_steps}")
        if self.ig_method not in IG_METHODS:
            raise ValueError(f"ExplainOptions.ig_method must be one of {IG_METHODS}, got "
                             f"{self.ig_method!r}")
        if self.ig_method == "trapezoid" and self.ig_steps < 2:
            raise ValueError("ExplainOptions: the trapezoid rule needs ig_steps >= 2")
        for name in ("ig_batch", "occlusion_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExplainOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.code_batch is not None and self.code_batch < 1:
            raise ValueError(f"ExplainOptions.code_batch must be >= 1 or None, got "
                             f"{self.code_batch}")


def token_mask_from_ids(input_ids, attention_mask, special_ids: Sequence[int]):
    """1 on real word tokens: attention_mask != 0 and the id is not one of ``special_ids`` (pass
    every special id of the tokenizer, e.g. ``tokenizer.all_special_ids``). int32, numpy in ->
    numpy out, else jax."""
    xp = np if isinstance(input_ids, np.ndarray) else jnp
    special = xp.asarray(list(special_ids), dtype=input_ids.dtype)
    keep = (attention_mask != 0) & ~xp.isin(input_ids, special)
    return keep.astype(xp.int32)


def integration_points(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1] of the IG quadrature; the weights sum to 1."""
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (x + 1.0), 0.5 * w
    if method == "trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] *= 0.5
        return alphas, w
    raise ValueError(f"unknown IG method {method!r}; use one of {IG_METHODS}")


# --- the label head restricted to K codes -------------------------------------------------------

def _head_scores(head, hidden: jax.Array, codes: jax.Array) -> tuple[jax.Array, float]:
    """Pre-softmax label scores [B, K, T] (compute dtype) of `codes` [B, K], and the inverse
    softmax scale."""
    hidden = hidden.astype(head.dtype)
    if isinstance(head, LabelCrossAttention):
        keys = head.weights_k(hidden)  # [B, T, D]
        queries = jnp.take(head.label_representations[...], codes, axis=0).astype(head.dtype)
        return jnp.einsum("bkd,btd->bkt", queries, keys), 1.0 / head.scale
    if isinstance(head, LabelAttention):
        projected = jnp.tanh(head.first_linear(hidden))  # [B, T, P]
        w2 = jnp.take(head.second_linear.kernel[...].astype(head.dtype), codes, axis=1)
        return jnp.einsum("btp,pbk->bkt", projected, w2), 1.0
    raise TypeError(f"unsupported label head {type(head).__name__}")


def logits_from_attention(head, hidden: jax.Array, attention: jax.Array, codes: jax.Array
                          ) -> jax.Array:
    """Logits [B, K] fp32 of `codes` [B, K] given their label attention rows [B, K, T]
    (the head's pooling and output layers; each logit depends only on its own row)."""
    hidden = hidden.astype(head.dtype)
    attention = attention.astype(head.dtype)
    if isinstance(head, LabelCrossAttention):
        values = head.weights_v(hidden)
        mixed = jnp.einsum("bkt,btd->bkd", attention, values, preferred_element_type=jnp.float32)
        return heads_lib.score_pooled(mixed, head.layernorm, head.output_linear)
    if isinstance(head, LabelAttention):
        pooled = jnp.einsum("bkt,btd->bkd", attention, hidden)
        w3 = jnp.take(head.third_linear.kernel[...].astype(head.dtype), codes, axis=1)  # [D,B,K]
        logits = jnp.einsum("bkd,dbk->bk", pooled, w3, preferred_element_type=jnp.float32)
        bias = jnp.take(head.third_linear.bias[...].astype(jnp.float32), codes, axis=0)
        return logits + bias
    raise TypeError(f"unsupported label head {type(head).__name__}")


def head_for_codes(head, hidden: jax.Array, mask: jax.Array, codes: jax.Array,
                   span: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The head's (logits [B, K] fp32, attention [B, K, T] fp32) for `codes` [B, K] only
    (= the full head's outputs gathered at the codes)."""
    scores, inv_scale = _head_scores(head, hidden, codes)
    attention = heads_lib._label_softmax(scores, mask, mask_padding=head.mask_padding,
                                         inv_scale=inv_scale, span=span)
    logits = logits_from_attention(head, hidden, attention, codes)
    return logits, attention.astype(jnp.float32)


# --- helpers ------------------------------------------------------------------------------------

def _span(model, mask: jax.Array) -> jax.Array | None:
    if isinstance(model, PLMRR) or model.label_wise_attention.mask_padding:
        return None
    return reference_span(mask, model.chunk_size, model.unmasked_padding)


def _encode(model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] -> note hidden states [B, T, D] (PLMICD.encode; PLM-RR's note encoding)."""
    hidden, _ = chunked_encode(
        model.encoder, ids, mask, chunk_size=model.chunk_size, pad_token_id=model.pad_token_id,
        deterministic=True, encoder_batch_size=getattr(model, "encoder_batch_size", None),
        caller="attributions")
    return hidden


def _embed(model, ids: jax.Array) -> jax.Array:
    """[B, T] -> the embedding block's output [B, T, D] (= PLMICD.embed)."""
    batch, length = ids.shape
    emb = model.encoder.embed(ids.reshape(-1, model.chunk_size), deterministic=True)
    return emb.reshape(batch, length, emb.shape[-1])


def _hidden_from_embeddings(model, emb: jax.Array, mask: jax.Array) -> jax.Array:
    batch, length, _ = emb.shape
    c = model.chunk_size
    rows = batch * (length // c)
    hidden = encode_embedding_rows(model.encoder, emb.reshape(rows, c, emb.shape[-1]),
                                   mask.reshape(rows, c), deterministic=True,
                                   batch_size=getattr(model, "encoder_batch_size", None))
    return hidden.reshape(batch, length, hidden.shape[-1])


def _self_attentions(model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Head-mean self-attention [L, B, T/c, c, c] (= PLMICD.self_attentions)."""
    if isinstance(model, PLMICD):
        return model.self_attentions(ids, mask)
    batch, length = ids.shape
    c = model.chunk_size
    rows, n = ids.reshape(-1, c), mask.reshape(-1, c)
    x = model.encoder.embed(rows, deterministic=True)
    _, probs = model.encoder.encode_embeddings(x, rows, n, deterministic=True,
                                               return_attentions=True)
    probs = jnp.mean(probs.astype(jnp.float32), axis=2)
    return probs.reshape(probs.shape[0], batch, length // c, c, c)


Scorer = Callable[..., tuple[jax.Array, jax.Array]]


def _scorer(model, mask: jax.Array, codes: jax.Array,
            candidate_scores: jax.Array | None) -> Scorer:
    """``score(hidden [P, T, D], docs [P] | None) -> (logits [P, K], attention [P, K, T])``: the
    label head (PLMICD) or the description re-ranker (PLM-RR, codes = candidates) for the codes
    of documents ``docs`` (None: all B documents, P = B)."""

    def pick(x, docs):
        return x if docs is None else x[docs]

    if isinstance(model, PLMRR):
        desc_ids, desc_mask, slots = model.descriptions(codes)
        desc_hidden = model.encoder(desc_ids, desc_mask, deterministic=True)
        if model.fuse_retriever and candidate_scores is None:
            raise ValueError("this PLM-RR model fuses the retriever's scores: pass "
                             "candidate_scores [B, K] (batch['candidate_scores'])")

        def score_rr(hidden, docs=None):
            logits, att = model.rerank_attention(desc_hidden, desc_mask, pick(slots, docs),
                                                 hidden, pick(mask, docs), return_attention=True)
            if model.fuse_retriever:
                alpha = model.fusion_alpha[...].astype(jnp.float32)
                logits = logits + alpha * pick(candidate_scores, docs).astype(jnp.float32)
            return logits, att

        return score_rr
    head = model.label_wise_attention
    span = _span(model, mask)

    def score(hidden, docs=None):
        return head_for_codes(head, hidden, pick(mask, docs), pick(codes, docs),
                              None if span is None else pick(span, docs))

    return score


def _per_code_vjp(fn: Callable[[jax.Array], tuple[jax.Array, Any]], x: jax.Array,
                  code_batch: int | None) -> tuple[jax.Array, Any]:
    """For ``fn(x) -> (out [B, K], aux)`` whose row b depends only on x[b]: (grads [B, K, *x[1:]]
    with grads[b, k] = d out[b, k] / d x[b], aux). One forward, K vectorised backward passes."""
    out, vjp_fn, aux = jax.vjp(fn, x, has_aux=True)
    batch, k = out.shape
    if code_batch is None:
        code_batch = 1 if jax.default_backend() == "cpu" else CODE_BATCH_ACCELERATOR
    cot = jnp.broadcast_to(jnp.eye(k, dtype=out.dtype)[:, None, :], (k, batch, k))
    back = jax.vmap(lambda ct: vjp_fn(ct)[0])
    if code_batch is None or code_batch >= k:
        grads = back(cot)
    else:
        blocks = -(-k // code_batch)
        cot = jnp.pad(cot, ((0, blocks * code_batch - k), (0, 0), (0, 0)))
        grads = jax.lax.map(back, cot.reshape(blocks, code_batch, batch, k))
        grads = grads.reshape(blocks * code_batch, *grads.shape[2:])[:k]
    return jnp.moveaxis(grads, 0, 1), aux


def _finalize(raw: jax.Array, token_mask: jax.Array, codes: jax.Array) -> jax.Array:
    keep = (token_mask != 0)[:, None, :] & (codes >= 0)[:, :, None]
    raw = jnp.where(keep, jnp.abs(raw.astype(jnp.float32)), 0.0)
    total = jnp.sum(raw, axis=-1, keepdims=True)
    return raw / jnp.where(total > 0, total, 1.0)


def _baseline_id(model: PLMICD, options: ExplainOptions) -> int:
    return model.pad_token_id if options.baseline_token_id is None else options.baseline_token_id


# --- the methods (raw, unnormalised [B, K, T]) --------------------------------------------------

def _attention(model, ids, mask, token_mask, codes, options, key, cand):
    _, att = _scorer(model, mask, codes, cand)(_encode(model, ids, mask))
    return att


def _attention_rollout(model, ids, mask, token_mask, codes, options, key, cand):
    att = _attention(model, ids, mask, token_mask, codes, options, key, cand)  # [B, K, T]
    probs = _self_attentions(model, ids, mask)  # [L, B, n, c, c]
    c = model.chunk_size
    mixed = probs + 0.5 * jnp.eye(c, dtype=probs.dtype)
    rollout = mixed[0]
    for layer in range(1, mixed.shape[0]):
        rollout = jnp.einsum("bnqk,bnks->bnqs", mixed[layer], rollout)
    batch, k, length = att.shape
    out = jnp.einsum("bknq,bnqs->bkns", att.reshape(batch, k, length // c, c), rollout)
    return out.reshape(batch, k, length)


def _attgrad(model, ids, mask, token_mask, codes, options, key, cand):
    if isinstance(model, PLMRR):
        raise ValueError("attgrad is not supported for PLM-RR (its attention is a mean over "
                         "description tokens and heads, not an input of its logits)")
    head = model.label_wise_attention
    hidden = _encode(model, ids, mask)
    _, att = head_for_codes(head, hidden, mask, codes, _span(model, mask))
    # logit[b, k] depends only on att[b, k]: one backward of the sum gives every code's row.
    grad = jax.grad(lambda a: jnp.sum(logits_from_attention(head, hidden, a, codes)))(att)
    return jnp.abs(grad) * att


def _embedding_grads(model, emb, mask, codes, options, cand):
    score = _scorer(model, mask, codes, cand)
    fn = lambda e: score(_hidden_from_embeddings(model, e, mask))  # noqa: E731
    return _per_code_vjp(fn, emb, options.code_batch)  # [B, K, T, D], att [B, K, T]


def _gradient_x_input(model, ids, mask, token_mask, codes, options, key, cand):
    emb = _embed(model, ids)
    grads, _ = _embedding_grads(model, emb, mask, codes, options, cand)
    return jnp.linalg.norm(emb[:, None].astype(jnp.float32) * grads, axis=-1)


def _attingrad(model, ids, mask, token_mask, codes, options, key, cand):
    emb = _embed(model, ids)
    grads, att = _embedding_grads(model, emb, mask, codes, options, cand)
    return att * jnp.linalg.norm(emb[:, None].astype(jnp.float32) * grads, axis=-1)


def _integrated_gradients(model, ids, mask, token_mask, codes, options, key, cand):
    emb = _embed(model, ids)
    base_ids = jnp.where(token_mask != 0, _baseline_id(model, options), ids).astype(ids.dtype)
    base = _embed(model, base_ids)
    delta = emb - base
    alphas, weights = integration_points(options.ig_steps, options.ig_method)
    per = options.ig_batch
    blocks = -(-len(alphas) // per)
    fill = blocks * per - len(alphas)
    alphas = np.pad(alphas, (0, fill)).reshape(blocks, per).astype(np.float32)
    weights = np.pad(weights, (0, fill)).reshape(blocks, per).astype(np.float32)  # fill: 0

    def point(alpha, weight):
        grads, _ = _embedding_grads(model, base + alpha * delta, mask, codes, options, cand)
        return weight * grads

    def body(total, xs):
        return total + jnp.sum(jax.vmap(point)(*xs), axis=0), None

    batch, k = codes.shape
    init = jnp.zeros((batch, k, *emb.shape[1:]), jnp.float32)
    total, _ = jax.lax.scan(body, init, (jnp.asarray(alphas), jnp.asarray(weights)))
    if options.ig_multiply_by_inputs:
        total = total * delta[:, None].astype(jnp.float32)
    return jnp.linalg.norm(total, axis=-1)


def _occlusion(model, ids, mask, token_mask, codes, options, key, cand):
    score = _scorer(model, mask, codes, cand)
    hidden = _encode(model, ids, mask)
    base_logits, _ = score(hidden)  # [B, K]
    batch, length = ids.shape
    c = model.chunk_size
    chunk_ids = ids.reshape(batch, length // c, c)
    chunk_mask = mask.reshape(batch, length // c, c)
    baseline = _baseline_id(model, options)
    per = options.occlusion_batch
    total = batch * length
    blocks = -(-total // per)
    flat = jnp.minimum(jnp.arange(blocks * per, dtype=jnp.int32), total - 1).reshape(blocks, per)
    rows = jnp.arange(per)

    def block(idx):
        b, t = idx // length, idx % length
        j, o = t // c, t % c
        occluded = chunk_ids[b, j].at[rows, o].set(baseline)  # [P, c]
        h = model.encoder(occluded, chunk_mask[b, j], deterministic=True)  # [P, c, D]
        full = jax.vmap(lambda f, hc, jj: jax.lax.dynamic_update_slice(f, hc, (jj * c, 0)))(
            hidden[b], h.astype(hidden.dtype), j)
        logits, _ = score(full, b)
        return jnp.abs(base_logits[b] - logits)  # [P, K]

    out = jax.lax.map(block, flat).reshape(blocks * per, -1)[:total]
    return jnp.swapaxes(out.reshape(batch, length, -1), 1, 2)


def _random(model, ids, mask, token_mask, codes, options, key, cand):
    if key is None:
        raise ValueError("the random method needs a PRNG key (key=jax.random.key(seed))")
    return jnp.abs(jax.random.normal(key, (*codes.shape, ids.shape[1]), jnp.float32))


_IMPLS = {
    "attention": _attention,
    "attention_rollout": _attention_rollout,
    "attgrad": _attgrad,
    "attingrad": _attingrad,
    "gradient_x_input": _gradient_x_input,
    "integrated_gradients": _integrated_gradients,
    "occlusion": _occlusion,
    "random": _random,
}


def attributions(model: PLMICD | PLMRR, method: str, input_ids: jax.Array,
                 attention_mask: jax.Array, token_mask: jax.Array, codes: jax.Array, *,
                 options: ExplainOptions = ExplainOptions(), key: jax.Array | None = None,
                 candidate_scores: jax.Array | None = None) -> jax.Array:
    """Scores [B, K, T] fp32 of `method` (module docstring) for `codes` [B, K] (-1 = none).

    `model`: PLM-ICD / PLM-CA (`PLMICD`) or PLM-RR (`PLMRR`: codes are the candidates to
    explain; `candidate_scores` [B, K] needed only when it fuses the retriever's scores; every
    method but attgrad). Run deterministically; `key` is used by `random` only.
    Jit-compatible (wrap in `make_explain_fn` for state-split callers)."""
    if method not in _IMPLS:
        raise ValueError(f"unknown explanation method {method!r}; available: {METHODS}")
    if not isinstance(model, (PLMICD, PLMRR)):
        raise TypeError(f"explanations support PLMICD (PLM-ICD / PLM-CA) and PLMRR models, got "
                        f"{type(model).__name__}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape \
            or token_mask.shape != input_ids.shape:
        raise ValueError(f"attributions: input_ids {input_ids.shape}, attention_mask "
                         f"{attention_mask.shape} and token_mask {token_mask.shape} must all be "
                         "[B, T]")
    if codes.ndim != 2 or codes.shape[0] != input_ids.shape[0]:
        raise ValueError(f"attributions: codes must be [B, K] with B = {input_ids.shape[0]}, "
                         f"got {codes.shape}")
    if input_ids.shape[1] % model.chunk_size:
        raise ValueError(f"attributions: length {input_ids.shape[1]} is not a multiple of the "
                         f"chunk size {model.chunk_size}; pad the batch to whole chunks")
    codes = jnp.asarray(codes, jnp.int32)
    safe = jnp.maximum(codes, 0)
    raw = _IMPLS[method](model, input_ids, attention_mask, token_mask, safe, options, key,
                         candidate_scores)
    return _finalize(raw, token_mask, codes)


def make_explain_fn(graphdef: nnx.GraphDef, method: str,
                    options: ExplainOptions = ExplainOptions()) -> Callable[..., jax.Array]:
    """``fn(params, frozen, rest, batch, codes, key) -> [B, K, T]``, pure: the model is merged
    from its state inside (like ``predict.make_predict_step``); callers jit it with their
    shardings. ``batch`` holds ``input_ids``, ``attention_mask`` and ``token_mask`` [B, T]
    (and ``candidate_scores`` [B, K] for a PLM-RR model that fuses the retriever)."""
    if method not in _IMPLS:
        raise ValueError(f"unknown explanation method {method!r}; available: {METHODS}")

    def fn(params, frozen, rest, batch, codes, key):
        model = nnx.merge(graphdef, params, frozen, rest)
        return attributions(model, method, batch["input_ids"], batch["attention_mask"],
                            batch["token_mask"], codes, options=options, key=key,
                            candidate_scores=batch.get("candidate_scores"))

    return fn
