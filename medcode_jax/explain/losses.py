"""Explanation-aware training losses (docs/EXPLAIN.md §4) as `steps.ModelIO` subclasses.

Each IO computes one micro-batch's loss inside the train step's `value_and_grad`; the reference
is `JoakimEdin/explainable-medical-coding` `utils/loss_functions.py`:

| loss.name  | IO                    | reference                   | loss                     |
|------------|-----------------------|-----------------------------|--------------------------|
| bce        | steps.ModelIO         | binary_cross_entropy_loss   | BCE                      |
| supervised | SupervisedAttentionIO | kl_attention_loss           | BCE + l1 KL(evid ‖ attn) |
| igr        | InputGradientIO       | double_backpropagation_loss | BCE + l1 Σ_v ‖∂BCE/∂E_v‖ |
| pgd        | AdversarialIO         | advesarial_training_loss    | BCE + l2 BCE(emb+noise)  |
| tm         | TokenMaskingIO        | masking_loss                | L1(teacher) + l1 L1(mask)|

Normalisation. BCE is the sum over valid (document, code) pairs / the global batch's pairs
(`denom`), as for plain training. The extra terms are written as sums over documents divided by a
global count (`ModelIO.counts`, computed on the whole batch before the split into micro-batches),
so accumulation over micro-batches equals one big batch *exactly* for: supervised (documents with
evidence), tm (documents) and igr with `scope="document"`. The reference's igr (`scope=
"micro_batch"`) is the norm of one micro-batch's gradient, and pgd's / tm's inner optimisation
(noise, mask) runs on one micro-batch with a micro-batch-level stopping rule: those depend on the
micro-batch composition in the reference too (its `max_batch_size`); here each micro-batch's term
is weighted by its share of the global documents, which equals the reference's `loss /
accumulate_grad_batches` when every row is a real document.

Inner optimisations (pgd's noise, tm's mask) run on a parameter copy behind `stop_gradient`, in
eval mode (`deterministic=True`), in a `lax.while_loop` with the reference's early stop; their
result enters the outer loss as a constant.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from medcode_jax import steps

LOSSES = ("bce", "supervised", "igr", "tm", "pgd")
LOG_ATTENTION = ("log", "log_softmax")
KL_LENGTHS = ("reference", "padded", "document")
IGR_SCOPES = ("micro_batch", "document")
ATTACKS = ("pgd_adam",)
ADV_DISTS = ("none", "kl")
EVIDENCE_KEYS = ("evidence_codes", "evidence_mask")
# config.loss.lambda_1 < 0 means this: the reference experiments' (mdace_icd9_code) value
REFERENCE_LAMBDA_1 = {"supervised": 2.5, "igr": 1e-5, "pgd": 0.0, "tm": 1.0}
_TINY = float(jnp.finfo(jnp.float32).tiny)

Batch = steps.Batch


# ----------------------------------------------------------------------------- helpers


def _valid(mb: Batch) -> jax.Array:
    return mb["valid"].astype(jnp.float32)


def _docs(denom: jax.Array, labels: jax.Array) -> jax.Array:
    """Global valid documents from the BCE normaliser (= documents x C)."""
    return denom / labels.shape[-1]


def _pure(model: nnx.Module, *, frozen: bool = False):
    """(graphdef, state) of `model`; with `frozen`, the state behind stop_gradient. Merging
    them inside an inner transformation gives fresh Variables, so RNG counters advanced there
    never leak into the caller's trace."""
    graphdef, state = nnx.split(model)
    if frozen:
        state = jax.tree.map(jax.lax.stop_gradient, state)
    return graphdef, state


def _merge(graphdef, state) -> nnx.Module:
    """A module from (graphdef, state) with fresh Variables (copies), so it may be mutated (RNG
    counters) inside a nested transformation."""
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """L2 norm along `axis` with a zero (not NaN) gradient at 0 (rows never used)."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def token_groups(keys: jax.Array) -> jax.Array:
    """[N] int keys -> [N] group index in [0, N): equal keys share an index (sort-based, so
    the segment sum needs N segments, not the vocabulary size)."""
    order = jnp.argsort(keys)
    ordered = keys[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
    group_sorted = jnp.cumsum(first.astype(jnp.int32)) - 1
    return jnp.zeros_like(keys).at[order].set(group_sorted)


def table_gradient_norms(grad_words: jax.Array, input_ids: jax.Array, *,
                         per_document: bool) -> jax.Array:
    """Σ over word-embedding-table rows v of ‖Σ_{positions with id v} grad_words‖₂.

    grad_words [B, T, Dw] is the gradient w.r.t. the looked-up rows; summing it per token id is
    the gradient w.r.t. the table (rows of ids never seen are 0 and contribute 0). Returns a
    scalar (`per_document=False`: rows pooled over the whole batch) or [B] (one table gradient
    per document)."""
    g = grad_words.astype(jnp.float32)
    batch, length, width = g.shape
    if per_document:
        def one(gb, ids_b):
            summed = jax.ops.segment_sum(gb, token_groups(ids_b), num_segments=length)
            return jnp.sum(safe_norm(summed))
        return jax.vmap(one)(g, input_ids)
    flat_ids = input_ids.reshape(-1)
    summed = jax.ops.segment_sum(g.reshape(-1, width), token_groups(flat_ids),
                                 num_segments=batch * length)
    return jnp.sum(safe_norm(summed))


def bce_and_input_gradient(model: nnx.Module, mb: Batch, *, deterministic: bool,
                           per_document: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One forward through `word_embed -> embed(word_embeds=...) -> from_embeddings` with its
    gradient w.r.t. the word embeddings, differentiable again (double backpropagation).

    Returns (bce_sum over valid rows, logits [B, C], table-gradient norm term): the term is
    Σ_v ‖∂ BCE_mean / ∂E_v‖ of the micro-batch (BCE_mean = bce_sum / (valid rows x C), the
    reference) or, `per_document`, [B] with each document's Σ_v ‖∂ (BCE_b / C) / ∂E_v‖."""
    ids, mask, labels, valid = mb["input_ids"], mb["attention_mask"], mb["labels"], _valid(mb)
    graphdef, state = _pure(model)

    def forward(words):
        m = _merge(graphdef, state)
        emb = m.embed(ids, mask, deterministic=deterministic, word_embeds=words)
        logits = m.from_embeddings(emb, mask, deterministic=deterministic)
        return steps.bce_sum(logits, labels, valid), logits

    words = model.word_embed(ids)
    (total, logits), grad = jax.value_and_grad(forward, has_aux=True)(words)
    width = labels.shape[-1]
    if per_document:  # documents are independent: grad[b] is d BCE_b / d words[b]
        return total, logits, table_gradient_norms(grad / width, ids, per_document=True)
    rows = jnp.maximum(jnp.sum(valid), 1.0)
    return total, logits, table_gradient_norms(grad / (rows * width), ids, per_document=False)


def evidence_kl(attention: jax.Array, labels: jax.Array, evidence_codes: jax.Array,
                evidence_mask: jax.Array, *, log_attention: str = "log",
                length: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The reference's per-document `kl_divergence(attention[targets], one_hot_evidence)`.

    attention [B, C, T] (the head's softmax weights), labels [B, C], evidence_codes [B, E]
    (-1 = empty), evidence_mask [B, E, T]. For each target code with evidence the evidence row
    is L1-normalised (p) and KL(p ‖ q) = Σ_t p_t (log p_t - log q_t) taken where p_t > 0; torch's
    `kl_div(reduction="mean")` divides by the element count [number of targets x T], targets
    without evidence counting with KL 0. `log_attention`: "log" = log q of the head's weights
    (the reference's `log_softmax` of the cross-attention *scores* it returns, for scale 1);
    "log_softmax" = log_softmax over the weights themselves (what the reference computes when
    its head returns weights, i.e. LAAT). `length`: the sequence length in torch's "mean"
    (scalar or [B]; default the attention's T).

    Returns (kl [B], has_evidence [B] bool)."""
    codes = jnp.maximum(evidence_codes, 0)
    rows = jnp.take_along_axis(attention.astype(jnp.float32), codes[:, :, None], axis=1)
    is_target = jnp.take_along_axis(labels, codes, axis=1) > 0
    ev = evidence_mask.astype(jnp.float32)
    count = jnp.sum(ev, axis=-1)
    use = (evidence_codes >= 0) & is_target & (count > 0)  # [B, E]
    p = ev / jnp.maximum(count, 1e-12)[..., None]  # torch normalize(p=1, eps=1e-12)
    if log_attention == "log":
        log_q = jnp.log(jnp.maximum(rows, _TINY))
    elif log_attention == "log_softmax":
        log_q = jax.nn.log_softmax(rows, axis=-1)
    else:
        raise ValueError(f"log_attention={log_attention!r}: use one of {LOG_ATTENTION}")
    pos = p > 0
    point = jnp.where(pos, p * (jnp.log(jnp.where(pos, p, 1.0)) - log_q), 0.0)
    per_code = jnp.sum(point, axis=-1) * use  # [B, E]
    targets = jnp.maximum(jnp.sum((labels > 0).astype(jnp.float32), axis=-1), 1.0)
    if length is None:
        length = attention.shape[-1]
    kl = jnp.sum(per_code, axis=-1) / (targets * length)
    return kl, jnp.any(use, axis=-1)


def has_evidence(batch: Batch) -> jax.Array:
    """[B] bool: the document has >= 1 target code with >= 1 evidence token."""
    codes = batch["evidence_codes"]
    target = jnp.take_along_axis(batch["labels"], jnp.maximum(codes, 0), axis=1) > 0
    return jnp.any((codes >= 0) & target & jnp.any(batch["evidence_mask"] != 0, axis=-1),
                   axis=-1)


def _adamw(lr: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.AdamW's defaults (betas 0.9 / 0.999, eps 1e-8) with `weight_decay`."""
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def _minimise(loss_fn, x0: jax.Array, tx: optax.GradientTransformation, *, max_iter: int,
              tolerance: float) -> tuple[jax.Array, jax.Array]:
    """The reference's inner loop: at most `max_iter` optimiser steps on x; at each one the
    loss is compared with the one two steps earlier and, when within ±tolerance (relative),
    that step is still taken and the loop ends. Returns (x, steps taken)."""
    inf = jnp.asarray(jnp.inf, jnp.float32)

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_iter) & ~done

    def body(carry):
        i, x, opt_state, prev, prev_prev, _ = carry
        loss, grad = jax.value_and_grad(loss_fn)(x)
        loss = loss.astype(jnp.float32)
        done = (loss > (1 - tolerance) * prev_prev) & (loss < (1 + tolerance) * prev_prev)
        updates, opt_state = tx.update(grad, opt_state, x)
        return i + 1, optax.apply_updates(x, updates), opt_state, loss, prev, done

    init = (jnp.zeros((), jnp.int32), x0, tx.init(x0), inf, inf, jnp.zeros((), bool))
    i, x, _, _, _, _ = jax.lax.while_loop(cond, body, init)
    return x, i


# ----------------------------------------------------------------------------- the IOs


@dataclasses.dataclass(frozen=True)
class SupervisedAttentionIO(steps.ModelIO):
    """BCE + lambda_1 x mean over documents with evidence of KL(evidence ‖ label attention)
    (`kl_attention_loss`, lambda_1 = 2.5). Needs `evidence_codes` / `evidence_mask`
    (config.data.max_evidence_codes > 0). The KL average runs over the *global* batch's
    documents with evidence; the KL's "mean" divides by (targets x `kl_length`): exact under
    accumulation with "padded" or "document", with "reference" (the reference's padded length
    of its batch) when every micro-batch has the same longest note (the MDACE recipe has no
    accumulation for this loss: micro = global = 16)."""

    lambda_1: float = 2.5
    log_attention: str = "log"
    kl_length: str = "reference"

    train_keys = steps.TRAIN_KEYS + EVIDENCE_KEYS

    def kl_lengths(self, mask: jax.Array, chunk_size: int) -> jax.Array:
        """The T of the KL's "mean": "reference" = the reference's padded batch length (its
        `split_input_into_chunks`: longest note of the micro-batch + c - longest mod c);
        "padded" = our batch's padded length (one per global batch: exact under accumulation);
        "document" = that rule applied to each document's own length (independent of batching)."""
        lengths = jnp.sum((mask != 0).astype(jnp.int32), axis=-1)
        if self.kl_length == "padded":
            return jnp.asarray(mask.shape[-1], jnp.float32)
        if self.kl_length == "document":
            return ((lengths // chunk_size + 1) * chunk_size).astype(jnp.float32)
        if self.kl_length == "reference":
            return ((jnp.max(lengths) // chunk_size + 1) * chunk_size).astype(jnp.float32)
        raise ValueError(f"kl_length={self.kl_length!r}: use one of {KL_LENGTHS}")
    loss_parts = ("bce", "attention_kl")

    def counts(self, batch):
        docs = jnp.sum((has_evidence(batch) & (batch["valid"] != 0)).astype(jnp.float32))
        return {"evidence_docs": jnp.maximum(docs, 1.0)}

    def loss(self, model, mb, *, deterministic, key, denom, counts=None, teacher=None):
        if self.lambda_1 == 0:
            bce = super().loss(model, mb, deterministic=deterministic, key=key, denom=denom)[0]
            return bce, {"bce": bce, "attention_kl": jnp.zeros((), jnp.float32)}
        logits, attention = model(mb["input_ids"], mb["attention_mask"],
                                  deterministic=deterministic, return_attention=True)
        bce = steps.bce_sum(logits, mb["labels"], mb["valid"]) / denom
        kl, _ = evidence_kl(attention, mb["labels"], mb["evidence_codes"], mb["evidence_mask"],
                            log_attention=self.log_attention,
                            length=self.kl_lengths(mb["attention_mask"], model.chunk_size))
        term = self.lambda_1 * jnp.sum(kl * _valid(mb)) / counts["evidence_docs"]
        return bce + term, {"bce": bce, "attention_kl": term}


@dataclasses.dataclass(frozen=True)
class InputGradientIO(steps.ModelIO):
    """BCE + lambda_1 x Σ_v ‖∂BCE/∂E_v‖₂ over the rows v of the word-embedding table
    (`double_backpropagation_loss`; the reference differentiates w.r.t. `model.parameters()[0]`,
    the word-embedding table). Double backpropagation: the inner gradient comes from the same
    forward pass (same dropout) and is differentiated again by the train step.

    `scope="micro_batch"`: the reference — one gradient of the micro-batch's mean BCE, its row
    norms summed, weighted by the micro-batch's share of the documents (= / accumulation).
    `scope="document"`: one table gradient per document (of BCE_b / C), norms summed and averaged
    over the global batch's documents — independent of the micro-batch size (exact under
    accumulation and over device counts); equals the reference when its micro-batch is one
    document, and is >= it otherwise (triangle inequality)."""

    lambda_1: float = 1e-5
    scope: str = "micro_batch"

    loss_parts = ("bce", "input_gradient")

    def loss(self, model, mb, *, deterministic, key, denom, counts=None, teacher=None):
        if self.lambda_1 == 0:
            bce = super().loss(model, mb, deterministic=deterministic, key=key, denom=denom)[0]
            return bce, {"bce": bce, "input_gradient": jnp.zeros((), jnp.float32)}
        term = igr_term(model, mb, deterministic=deterministic, denom=denom, scope=self.scope,
                        lambda_1=self.lambda_1)
        bce, penalty = term
        return bce + penalty, {"bce": bce, "input_gradient": penalty}


def igr_term(model, mb, *, deterministic, denom, scope, lambda_1):
    """(BCE sum / denom, lambda_1 x the normalised table-gradient penalty) of one micro-batch."""
    if scope not in IGR_SCOPES:
        raise ValueError(f"igr scope={scope!r}: use one of {IGR_SCOPES}")
    per_document = scope == "document"
    total, _, norms = bce_and_input_gradient(model, mb, deterministic=deterministic,
                                             per_document=per_document)
    valid = _valid(mb)
    docs = _docs(denom, mb["labels"])
    if per_document:
        penalty = jnp.sum(norms * valid) / docs
    else:
        penalty = norms * jnp.maximum(jnp.sum(valid), 1.0) / docs
    return total / denom, lambda_1 * penalty


@dataclasses.dataclass(frozen=True)
class AdversarialIO(steps.ModelIO):
    """BCE + lambda_2 x BCE(model on embeddings + adversarial noise) (+ lambda_1 x igr), the
    reference's `advesarial_training_loss` with `plm_icd_pgd.yaml` (pgd_adam, epsilon 1e-5,
    alpha 0.1, lambda_1 0, lambda_2 0.5, adv_dist none).

    The attack (`pgd_adam`): noise = tanh(delta) x epsilon on the embedding block's output
    (`model.embed`), delta ~ U(-epsilon, epsilon), AdamW(lr=alpha, weight decay 0.01) steps that
    maximise the micro-batch's mean BCE, at most `max_iter` (100) with the reference's stop
    (loss within ±0.5 % of the one two steps earlier), on frozen parameters in eval mode. The
    outer loss uses the noise as a constant. |noise| < epsilon elementwise."""

    epsilon: float = 1e-5
    alpha: float = 0.1
    lambda_1: float = 0.0
    lambda_2: float = 0.5
    attack: str = "pgd_adam"
    adv_dist: str = "none"
    max_iter: int = 100
    tolerance: float = 0.005
    weight_decay: float = 0.01
    igr_scope: str = "micro_batch"

    loss_parts = ("bce", "adversarial", "input_gradient")

    def noise(self, model: nnx.Module, mb: Batch, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(noise [B, T, D] fp32, attack steps taken) for this micro-batch."""
        if self.attack not in ATTACKS:
            raise ValueError(f"attack={self.attack!r}: use one of {ATTACKS}")
        ids, mask, labels, valid = (mb["input_ids"], mb["attention_mask"], mb["labels"],
                                    mb["valid"])
        graphdef, state = _pure(model, frozen=True)
        frozen = _merge(graphdef, state)
        emb = jax.lax.stop_gradient(
            frozen.embed(ids, mask, deterministic=True).astype(jnp.float32))
        rows = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0) * labels.shape[-1]
        eps = self.epsilon

        def negative_bce(delta):
            m = _merge(graphdef, state)
            logits = m.from_embeddings(emb + jnp.tanh(delta) * eps, mask, deterministic=True)
            return -steps.bce_sum(logits, labels, valid) / rows

        delta0 = jax.random.uniform(key, emb.shape, jnp.float32, -eps, eps)
        delta, taken = _minimise(negative_bce, delta0, _adamw(self.alpha, self.weight_decay),
                                 max_iter=self.max_iter, tolerance=self.tolerance)
        return jax.lax.stop_gradient(jnp.tanh(delta) * eps), taken

    def loss(self, model, mb, *, deterministic, key, denom, counts=None, teacher=None):
        zero = jnp.zeros((), jnp.float32)
        if self.lambda_1 > 0:
            bce, igr = igr_term(model, mb, deterministic=deterministic, denom=denom,
                                scope=self.igr_scope, lambda_1=self.lambda_1)
            logits = None
        else:
            logits = self.logits(model, mb, deterministic=deterministic)
            bce, igr = steps.bce_sum(logits, mb["labels"], mb["valid"]) / denom, zero
        if self.lambda_2 == 0:
            return bce + igr, {"bce": bce, "adversarial": zero, "input_gradient": igr}
        noise, _ = self.noise(model, mb, key)
        ids, mask = mb["input_ids"], mb["attention_mask"]
        emb = model.embed(ids, mask, deterministic=deterministic)
        adv_logits = model.from_embeddings((emb.astype(jnp.float32) + noise).astype(emb.dtype),
                                           mask, deterministic=deterministic)
        if self.adv_dist == "none":
            adv = steps.bce_sum(adv_logits, mb["labels"], mb["valid"]) / denom
        elif self.adv_dist == "kl":
            if logits is None:
                logits = self.logits(model, mb, deterministic=deterministic)
            adv = symmetric_kl(logits, adv_logits, _valid(mb)) / _docs(denom, mb["labels"])
        else:
            raise ValueError(f"adv_dist={self.adv_dist!r}: use one of {ADV_DISTS}")
        adv = self.lambda_2 * adv
        return bce + igr + adv, {"bce": bce, "adversarial": adv, "input_gradient": igr}


def symmetric_kl(logits: jax.Array, adv_logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Σ over valid documents of KL(softmax(clean)‖softmax(adv)) + KL(softmax(adv)‖softmax(clean))
    over the code axis, each with the other side held constant (the reference's `adv_dist="kl"`,
    `norm="softmax"`; divide by the documents for its `batchmean`)."""
    a, b = logits.astype(jnp.float32), adv_logits.astype(jnp.float32)

    def kl(log_q, p_logits):
        p = jax.nn.softmax(jax.lax.stop_gradient(p_logits), axis=-1)
        log_p = jax.nn.log_softmax(jax.lax.stop_gradient(p_logits), axis=-1)
        return jnp.sum(p * (log_p - log_q), axis=-1)

    per = kl(jax.nn.log_softmax(b, axis=-1), a) + kl(jax.nn.log_softmax(a, axis=-1), b)
    return jnp.sum(per * valid)


@dataclasses.dataclass(frozen=True)
class TokenMaskingIO(steps.ModelIO):
    """The reference's `masking_loss` (`plm_icd_tm.yaml`: lambda_1 1, diet_constant 0.01, lr 0.1,
    rounding_schedule false, distillation true).

    1. A per-token mask m (init 2) is optimised on frozen parameters in eval mode: AdamW(lr,
       weight decay 0.01) on ‖sigmoid(m)‖₁ / (B x T) + diet_constant x ‖σ(f(x_m)) - σ(f(x))‖₁ / B
       with x_m = emb(x) x sigmoid(m) + emb(baseline) x (1 - sigmoid(m)), at most `max_iter`
       (20) steps, stopping when the loss is within ±3 % of the one two steps earlier.
    2. round(sigmoid(m) + rounding_constant) keeps a token or replaces it by
       `baseline_token_id`; position 0 gets `cls_token_id`, [SEP] and padding tokens (and every
       position outside the attention mask) keep their ids.
    3. distillation: ‖σ(student) - σ(teacher)‖₁ / B + lambda_1 x ‖stop(σ(student)) -
       σ(student on masked ids)‖₁ / B, teacher = the frozen initial parameters (train.py);
       without: BCE + lambda_1 x BCE on the masked ids. Sums run over the micro-batch's valid
       documents, divided by the global batch's documents (exact under accumulation)."""

    lambda_1: float = 1.0
    diet_constant: float = 0.01
    mask_lr: float = 0.1
    max_iter: int = 20
    tolerance: float = 0.03
    weight_decay: float = 0.01
    rounding_constant: float = 0.0
    distillation: bool = True
    baseline_token_id: int = 0
    cls_token_id: int = 0
    sep_token_id: int = 2
    pad_token_id: int = 1

    loss_parts = ("model", "masked")

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return self.distillation

    def baseline_ids(self, input_ids: jax.Array) -> jax.Array:
        """The reference's `create_baseline_input(..., cls=eos=baseline)`: all baseline."""
        return jnp.full_like(input_ids, self.baseline_token_id)

    def token_mask(self, model: nnx.Module, mb: Batch, baseline_emb: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
        """(sigmoid(mask) [B, T] after the inner optimisation, steps taken)."""
        ids, mask, valid = mb["input_ids"], mb["attention_mask"], _valid(mb)
        graphdef, state = _pure(model, frozen=True)
        frozen = _merge(graphdef, state)
        emb = jax.lax.stop_gradient(frozen.embed(ids, mask, deterministic=True)
                                    .astype(jnp.float32))
        base = jax.lax.stop_gradient(baseline_emb.astype(jnp.float32))
        y0 = jax.lax.stop_gradient(jax.nn.sigmoid(
            frozen.from_embeddings(emb.astype(baseline_emb.dtype), mask, deterministic=True)))
        rows = jnp.maximum(jnp.sum(valid), 1.0)
        tokens = rows * ids.shape[1]

        def objective(m):
            s = jax.nn.sigmoid(m)
            x = emb * s[..., None] + base * (1 - s[..., None])
            mm = _merge(graphdef, state)
            y = jax.nn.sigmoid(mm.from_embeddings(x.astype(baseline_emb.dtype), mask,
                                                  deterministic=True))
            sparsity = jnp.sum(jnp.abs(s) * valid[:, None]) / tokens
            change = jnp.sum(jnp.abs(y - y0) * valid[:, None]) / rows
            return sparsity + self.diet_constant * change

        m0 = jnp.full(ids.shape, 2.0, jnp.float32)
        m, taken = _minimise(objective, m0, _adamw(self.mask_lr, self.weight_decay),
                             max_iter=self.max_iter, tolerance=self.tolerance)
        return jax.lax.stop_gradient(jax.nn.sigmoid(m)), taken

    def masked_ids(self, input_ids: jax.Array, attention_mask: jax.Array,
                   soft_mask: jax.Array) -> jax.Array:
        """Rounded mask -> input ids with dropped tokens replaced by the baseline token;
        [CLS] (position 0), [SEP], padding and positions outside the attention mask kept."""
        keep = jnp.round(soft_mask + self.rounding_constant) > 0.5
        out = jnp.where(keep, input_ids, self.baseline_token_id)
        out = out.at[:, 0].set(self.cls_token_id)
        special = ((input_ids == self.sep_token_id) | (input_ids == self.pad_token_id)
                   | (attention_mask == 0))
        return jnp.where(special, input_ids, out).astype(input_ids.dtype)

    def loss(self, model, mb, *, deterministic, key, denom, counts=None, teacher=None):
        ids, mask, labels, valid = (mb["input_ids"], mb["attention_mask"], mb["labels"],
                                    _valid(mb))
        docs = _docs(denom, labels)
        student = self.logits(model, mb, deterministic=deterministic)
        zero = jnp.zeros((), jnp.float32)
        if self.distillation:
            if teacher is None:
                raise ValueError("TokenMaskingIO(distillation=True) needs the teacher model "
                                 "(the train step's rest = (rest, teacher_params))")
            t_probs = jax.lax.stop_gradient(jax.nn.sigmoid(
                teacher(ids, mask, deterministic=True).astype(jnp.float32)))
            s_probs = jax.nn.sigmoid(student.astype(jnp.float32))
            model_loss = jnp.sum(jnp.abs(s_probs - t_probs) * valid[:, None]) / docs
        else:
            model_loss = steps.bce_sum(student, labels, mb["valid"]) / denom
        if self.lambda_1 == 0:
            return model_loss, {"model": model_loss, "masked": zero}
        # the reference embeds the baseline with the training model (dropout on), detached
        baseline_emb = jax.lax.stop_gradient(
            model.embed(self.baseline_ids(ids), mask, deterministic=deterministic))
        soft, _ = self.token_mask(model, mb, baseline_emb)
        masked = self.masked_ids(ids, mask, soft)
        masked_logits = model(masked, mask, deterministic=deterministic)
        if self.distillation:
            m_probs = jax.nn.sigmoid(masked_logits.astype(jnp.float32))
            masked_loss = jnp.sum(jnp.abs(jax.lax.stop_gradient(s_probs) - m_probs)
                                  * valid[:, None]) / docs
        else:
            masked_loss = steps.bce_sum(masked_logits, labels, mb["valid"]) / denom
        masked_loss = self.lambda_1 * masked_loss
        return model_loss + masked_loss, {"model": model_loss, "masked": masked_loss}


# ----------------------------------------------------------------------------- factory


def make_io(loss: Any, *, tokenizer: Mapping[str, Any] | None = None,
            vocab_size: int | None = None) -> steps.ModelIO:
    """The ModelIO for `config.loss` (`name` in LOSSES). `tokenizer`: the prepared dataset's
    tokenizer metadata (cls/sep/pad ids, for tm); `vocab_size`: the encoder's (checks tm's
    baseline token)."""
    name = loss.name
    if name not in LOSSES:
        raise ValueError(f"config.loss.name={name!r}: use one of {LOSSES}")
    if name == "bce":
        return steps.PLMICD_IO
    lambda_1 = float(loss.lambda_1)
    if lambda_1 < 0:
        lambda_1 = REFERENCE_LAMBDA_1[name]
    if name == "supervised":
        if loss.log_attention not in LOG_ATTENTION:
            raise ValueError(f"config.loss.log_attention={loss.log_attention!r}: use one of "
                             f"{LOG_ATTENTION}")
        if loss.kl_length not in KL_LENGTHS:
            raise ValueError(f"config.loss.kl_length={loss.kl_length!r}: use one of {KL_LENGTHS}")
        return SupervisedAttentionIO(lambda_1=lambda_1,
                                     log_attention=loss.log_attention, kl_length=loss.kl_length)
    if name == "igr":
        if loss.igr_scope not in IGR_SCOPES:
            raise ValueError(f"config.loss.igr_scope={loss.igr_scope!r}: use one of {IGR_SCOPES}")
        return InputGradientIO(lambda_1=lambda_1, scope=loss.igr_scope)
    if name == "pgd":
        if loss.attack not in ATTACKS:
            raise ValueError(f"config.loss.attack={loss.attack!r}: only {ATTACKS} is implemented")
        if loss.adv_dist not in ADV_DISTS:
            raise ValueError(f"config.loss.adv_dist={loss.adv_dist!r}: use one of {ADV_DISTS}")
        return AdversarialIO(epsilon=float(loss.epsilon), alpha=float(loss.alpha),
                             lambda_1=lambda_1, lambda_2=float(loss.lambda_2),
                             attack=loss.attack, adv_dist=loss.adv_dist,
                             max_iter=int(loss.max_iter), tolerance=float(loss.tolerance),
                             weight_decay=float(loss.inner_weight_decay),
                             igr_scope=loss.igr_scope)
    tok = dict(tokenizer or {})
    missing = [k for k in ("cls_token_id", "sep_token_id", "pad_token_id") if tok.get(k) is None]
    if missing:
        raise ValueError(f"config.loss.name='tm' needs the tokenizer's {missing} in the prepared "
                         "dataset's metadata.json ('tokenizer'): re-run data_prep with the "
                         "tokenizer folder")
    baseline = int(loss.baseline_token_id)
    if baseline < 0:
        baseline = int(tok["pad_token_id"])
    if vocab_size is not None and not 0 <= baseline < vocab_size:
        raise ValueError(f"config.loss.baseline_token_id={baseline} is outside the encoder's "
                         f"vocabulary of {vocab_size} tokens: set it to a token of this "
                         "tokenizer (e.g. its mask token), or -1 for the pad token")
    return TokenMaskingIO(lambda_1=lambda_1, diet_constant=float(loss.diet_constant),
                          mask_lr=float(loss.mask_lr), max_iter=int(loss.mask_max_iter),
                          tolerance=float(loss.mask_tolerance),
                          weight_decay=float(loss.inner_weight_decay),
                          rounding_constant=float(loss.rounding_constant),
                          distillation=bool(loss.distillation), baseline_token_id=baseline,
                          cls_token_id=int(tok["cls_token_id"]),
                          sep_token_id=int(tok["sep_token_id"]),
                          pad_token_id=int(tok["pad_token_id"]))
