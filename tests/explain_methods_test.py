"""Model hooks (embed / from_embeddings / self_attentions) and explanation methods.

Tiny random models (2 layers x 32 hidden, chunk 8), no network. Reference semantics:
medcode_jax/explain/methods.py docstring.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medcode_jax.explain import methods
from medcode_jax.explain.methods import ExplainOptions
from medcode_jax.models.encoders import EncoderConfig, build_encoder
from medcode_jax.models.plm_icd import create_plmicd

C = 8  # chunk size
VOCAB = 50
PAD, CLS, SEP = 1, 0, 2
LABELS = 6
LENGTHS = (20, 11)
WIDTH = 24  # 3 chunks
OPTS = ExplainOptions(ig_steps=4, ig_batch=2, occlusion_batch=16)


def encoder_config(family: str) -> EncoderConfig:
    if family in ("bert", "roberta"):
        return EncoderConfig(family=family, vocab_size=VOCAB, hidden_size=32, num_layers=2,
                             num_heads=4, intermediate_size=64, pad_token_id=PAD,
                             max_position_embeddings=64, layer_norm_eps=1e-5,
                             type_vocab_size=1, hidden_dropout=0.1, attention_dropout=0.1)
    if family == "modernbert":
        return EncoderConfig.from_hf_config(dict(
            model_type="modernbert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=48, local_attention=4,
            global_attn_every_n_layers=2, global_rope_theta=1000.0,
            max_position_embeddings=64, pad_token_id=PAD))
    if family == "neobert":
        return EncoderConfig.from_hf_config(dict(
            model_type="neobert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=72, vocab_size=VOCAB, max_length=64, pad_token_id=PAD,
            norm_eps=1e-5))
    raise ValueError(family)


def perturb(model, seed=0, scale=0.05):
    """Noise on every parameter (LayerNorm biases etc. are 0/1 at init)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


@functools.lru_cache(maxsize=None)
def make_model(family="bert", head="laat", mask_padding=True):
    enc = build_encoder(encoder_config(family), rngs=nnx.Rngs(0))
    model = create_plmicd(enc, num_labels=LABELS, head_type=head, chunk_size=C,
                          pad_token_id=PAD, mask_padding=mask_padding, rngs=nnx.Rngs(1))
    return perturb(model, seed=3, scale=0.3)


def make_batch(width=WIDTH, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (len(lengths), width)).astype(np.int32)
    mask = (np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, PAD)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = CLS, SEP
    token_mask = methods.token_mask_from_ids(ids, mask, (PAD, CLS, SEP))
    return ids, mask, token_mask


CODES = np.array([[0, 3, 5], [2, -1, 4]], np.int32)


@functools.lru_cache(maxsize=None)
def jitted(graphdef, method, options):
    """One jitted explain fn per (model, method, options): tests share compilations."""
    return jax.jit(methods.make_explain_fn(graphdef, method, options))


def explain(model, method, ids, mask, token_mask, codes=CODES, options=OPTS, seed=0):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    frozen = nnx.State({})
    fn = jitted(graphdef, method, options)
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                 token_mask=jnp.asarray(token_mask))
    return np.asarray(fn(params, frozen, rest, batch, jnp.asarray(codes), jax.random.key(seed)))


def normalise(raw, token_mask, codes):
    raw = np.where((token_mask[:, None, :] != 0) & (codes[:, :, None] >= 0), np.abs(raw), 0.0)
    total = raw.sum(-1, keepdims=True)
    return raw / np.where(total > 0, total, 1.0)


# --- hooks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert", "neobert"])
def test_embed_from_embeddings_equals_call(family):
    model = make_model(family)
    ids, mask, _ = make_batch()
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    @nnx.jit
    def run(model, ids, mask):
        ref, ref_att = model(ids, mask, return_attention=True)
        emb = model.embed(ids, mask)
        out, att = model.from_embeddings(emb, mask, return_attention=True)
        emb_w = model.embed(ids, mask, word_embeds=model.word_embed(ids))
        probs = model.self_attentions(ids, mask)
        return ref, ref_att, out, att, emb, emb_w, probs

    ref, ref_att, out, att, emb, emb_w, probs = run(model, ids, mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(att, ref_att, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb_w, emb, rtol=1e-6, atol=1e-6)
    assert emb.shape == (2, WIDTH, 32)
    assert probs.shape == (2, 2, WIDTH // C, C, C)
    probs = np.asarray(probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    chunk_mask = np.asarray(mask).reshape(2, WIDTH // C, C)
    # real queries never attend to padded keys (nor, in ModernBERT's local layer 1, to keys
    # outside the window +-2)
    real_query = (chunk_mask[:, :, :, None] != 0)[None]
    keys_masked = np.broadcast_to(chunk_mask[None, :, :, None, :] == 0, probs.shape)
    assert np.abs(probs[keys_masked & real_query]).max() < 1e-6
    if family == "modernbert":
        far = np.abs(np.arange(C)[:, None] - np.arange(C)[None, :]) > 2
        local = probs[1][np.broadcast_to(far[None, None] & real_query[0], probs.shape[1:])]
        assert np.abs(local).max() < 1e-6


def test_return_attentions_hidden_unchanged_and_encoder_batch_size():
    model = make_model("bert")
    ids, mask, _ = make_batch()
    rows = ids.reshape(-1, C), mask.reshape(-1, C)
    enc = model.encoder
    x = enc.embed(jnp.asarray(rows[0]))
    plain = enc.encode_embeddings(x, None, jnp.asarray(rows[1]))
    hidden, probs = enc.encode_embeddings(x, None, jnp.asarray(rows[1]), return_attentions=True)
    np.testing.assert_allclose(hidden, plain, rtol=1e-5, atol=1e-5)
    assert probs.shape == (2, 6, 4, C, C) and probs.dtype == jnp.float32
    # the lax.scan path of from_embeddings agrees with the plain one
    scanned = create_plmicd(enc, num_labels=LABELS, head_type="laat", chunk_size=C,
                            pad_token_id=PAD, encoder_batch_size=4, rngs=nnx.Rngs(1))
    scanned.label_wise_attention = model.label_wise_attention
    emb = model.embed(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(scanned.from_embeddings(emb, jnp.asarray(mask)),
                               model(jnp.asarray(ids), jnp.asarray(mask)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head,mask_padding", [("laat", True), ("cross_attention", True),
                                                ("cross_attention", False)])
def test_head_for_codes_matches_full_head(head, mask_padding):
    model = make_model("bert", head, mask_padding)
    ids, mask, _ = make_batch()
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    logits, att = model(ids, mask, return_attention=True)
    hidden, _ = model.encode(ids, mask)
    codes = jnp.maximum(jnp.asarray(CODES), 0)
    span = methods._span(model, mask)
    got_logits, got_att = methods.head_for_codes(model.label_wise_attention, hidden, mask,
                                                 codes, span)
    np.testing.assert_allclose(got_logits, np.take_along_axis(np.asarray(logits), codes, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_att, np.take_along_axis(np.asarray(att), codes[:, :, None], 1),
                               rtol=1e-5, atol=1e-6)


# --- methods ------------------------------------------------------------------------------------

def per_code_grads(model, mask):
    """grad(emb, codes [B]) -> d logit[b, codes[b]] / d emb[b] for every b, one code per doc
    per call (documents are independent); one compilation."""
    def total(emb, codes):
        logits = model.from_embeddings(emb, mask)
        return jnp.sum(jnp.take_along_axis(logits, codes[:, None], axis=1))

    return jax.jit(jax.grad(total))


def test_attention_equals_head_attention():
    model = make_model("bert", "cross_attention")
    ids, mask, tm = make_batch()
    _, att = model(jnp.asarray(ids), jnp.asarray(mask), return_attention=True)
    rows = np.take_along_axis(np.asarray(att), np.maximum(CODES, 0)[:, :, None], 1)
    np.testing.assert_allclose(explain(model, "attention", ids, mask, tm),
                               normalise(rows, tm, CODES), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["laat", "cross_attention"])
def test_embedding_gradient_methods_vs_per_code_grad(head):
    model = make_model("bert", head)
    ids, mask, tm = make_batch()
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    emb = model.embed(jids, jmask)
    _, att = model(jids, jmask, return_attention=True)
    att = np.asarray(att)
    grad = per_code_grads(model, jmask)
    gxi = np.zeros((2, 3, WIDTH))
    for k in range(3):  # the per-code loop the batched methods replace
        g = grad(emb, jnp.asarray(np.maximum(CODES[:, k], 0)))
        gxi[:, k] = np.linalg.norm(np.asarray(emb * g), axis=-1)
    np.testing.assert_allclose(explain(model, "gradient_x_input", ids, mask, tm),
                               normalise(gxi, tm, CODES), rtol=2e-4, atol=1e-6)
    if head == "laat":
        rows = np.take_along_axis(att, np.maximum(CODES, 0)[:, :, None], 1)
        np.testing.assert_allclose(explain(model, "attingrad", ids, mask, tm),
                                   normalise(rows * gxi, tm, CODES), rtol=2e-4, atol=1e-6)
    else:  # all K = 3 backward passes in one vmap (the default on CPU is blocks of 1)
        together = dataclasses_replace(OPTS, code_batch=3)
        np.testing.assert_allclose(explain(model, "gradient_x_input", ids, mask, tm,
                                           options=together),
                                   normalise(gxi, tm, CODES), rtol=2e-4, atol=1e-6)


def dataclasses_replace(opts, **kw):
    import dataclasses
    return dataclasses.replace(opts, **kw)


def test_integrated_gradients_vs_loop(multiply=False):
    model = make_model("bert", "cross_attention")
    ids, mask, tm = make_batch()
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    opts = dataclasses_replace(OPTS, ig_method="trapezoid", ig_steps=3, ig_batch=2,
                               ig_multiply_by_inputs=multiply, baseline_token_id=7)
    emb = model.embed(jids, jmask)
    base_ids = np.where(tm == 1, 7, ids)
    assert (base_ids[:, 0] == CLS).all()
    base = model.embed(jnp.asarray(base_ids), jmask)
    grad = per_code_grads(model, jmask)
    expected = np.zeros((2, 3, WIDTH))
    for k in range(3):
        code = jnp.asarray(np.maximum(CODES[:, k], 0))
        total = (0.25 * grad(base, code) + 0.5 * grad(0.5 * (base + emb), code)
                 + 0.25 * grad(emb, code))
        if multiply:
            total = total * (emb - base)
        expected[:, k] = np.linalg.norm(np.asarray(total), axis=-1)
    np.testing.assert_allclose(explain(model, "integrated_gradients", ids, mask, tm,
                                       options=opts),
                               normalise(expected, tm, CODES), rtol=2e-4, atol=1e-6)


def test_integration_points():
    a, w = methods.integration_points(5, "gausslegendre")
    assert abs(w.sum() - 1) < 1e-12 and (a > 0).all() and (a < 1).all()
    assert abs(np.sum(w * a ** 3) - 0.25) < 1e-12  # exact for polynomials
    a, w = methods.integration_points(3, "trapezoid")
    np.testing.assert_allclose(a, [0, 0.5, 1])
    np.testing.assert_allclose(w, [0.25, 0.5, 0.25])


@pytest.mark.parametrize("head", ["laat", "cross_attention"])
def test_attgrad(head):
    model = make_model("bert", head)
    ids, mask, tm = make_batch()
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    hidden, _ = model.encode(jids, jmask)
    logits, att = model(jids, jmask, return_attention=True)
    codes = np.maximum(CODES, 0)
    rows = np.take_along_axis(np.asarray(att), codes[:, :, None], 1)
    h = model.label_wise_attention
    # the head's pooling as a function of the attention reproduces its logits
    np.testing.assert_allclose(
        methods.logits_from_attention(h, hidden, jnp.asarray(rows), jnp.asarray(codes)),
        np.take_along_axis(np.asarray(logits), codes, 1), rtol=1e-5, atol=1e-5)
    if head == "laat":  # closed form: d logit_c / d a_ct = h_t . W3[:, c]
        grad = np.einsum("btd,dbk->bkt", np.asarray(hidden),
                         np.asarray(h.third_linear.kernel[...])[:, codes])
    else:  # per-code loop of jax.grad
        grad = np.zeros_like(rows)
        for b in range(2):
            for k in range(3):
                def f(a, b=b, k=k):
                    return methods.logits_from_attention(h, hidden, a, jnp.asarray(codes))[b, k]
                grad[b, k] = np.asarray(jax.grad(f)(jnp.asarray(rows)))[b, k]
    np.testing.assert_allclose(explain(model, "attgrad", ids, mask, tm),
                               normalise(np.abs(grad) * rows, tm, CODES), rtol=1e-4, atol=1e-6)


def test_attention_rollout_vs_numpy():
    model = make_model("roberta", "cross_attention")
    ids, mask, tm = make_batch()
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    _, att = model(jids, jmask, return_attention=True)
    rows = np.take_along_axis(np.asarray(att), np.maximum(CODES, 0)[:, :, None], 1)
    probs = np.asarray(model.self_attentions(jids, jmask), np.float64)  # [L, B, n, c, c]
    expected = np.zeros((2, 3, WIDTH))
    for b in range(2):
        dense = np.zeros((2, WIDTH, WIDTH))  # de-chunked, block diagonal, like the reference
        for j in range(WIDTH // C):
            dense[:, j * C:(j + 1) * C, j * C:(j + 1) * C] = probs[:, b, j]
        dense = dense + np.eye(WIDTH)[None] / 2
        rollout = dense[0]
        for layer in range(1, 2):
            rollout = dense[layer] @ rollout
        expected[b] = rows[b] @ rollout
    np.testing.assert_allclose(explain(model, "attention_rollout", ids, mask, tm),
                               normalise(expected, tm, CODES), rtol=1e-5, atol=1e-6)


def test_occlusion_vs_naive_loop(family="roberta"):
    model = make_model(family, "cross_attention")
    ids, mask, tm = make_batch()
    opts = dataclasses_replace(OPTS, baseline_token_id=9)
    forward = nnx.jit(lambda m, i, a: m(i, a))
    base = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    codes = np.maximum(CODES, 0)
    expected = np.zeros((2, 3, WIDTH))
    copies = np.repeat(ids[:, None], WIDTH, axis=1)  # [B, T(copy), T]
    copies[:, np.arange(WIDTH), np.arange(WIDTH)] = 9
    for b in range(2):
        logits = np.asarray(forward(model, jnp.asarray(copies[b]),
                                    jnp.asarray(np.repeat(mask[b:b + 1], WIDTH, 0))))
        expected[b] = np.abs(base[b, codes[b]][:, None] - logits[:, codes[b]].T)
    np.testing.assert_allclose(explain(model, "occlusion", ids, mask, tm, options=opts),
                               normalise(expected, tm, CODES), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", methods.METHODS)
def test_masking_normalisation_and_padding_invariance(method):
    model = make_model("bert", "laat")
    ids, mask, tm = make_batch()
    out = explain(model, method, ids, mask, tm)
    assert out.shape == (2, 3, WIDTH) and out.dtype == np.float32
    assert (out >= 0).all()
    assert (out[np.broadcast_to(tm[:, None, :] == 0, out.shape)] == 0).all()
    np.testing.assert_allclose(out.sum(-1)[CODES >= 0], 1.0, rtol=1e-5)
    assert (out[CODES < 0] == 0).all()
    if method not in ("attention", "attention_rollout", "attingrad", "occlusion"):
        return  # (compile time) the other methods share these code paths
    # two extra all-padding chunks: real tokens' scores unchanged (masked head)
    pad = ((0, 0), (0, 2 * C))
    wide_ids = np.pad(ids, pad, constant_values=PAD)
    wide_mask, wide_tm = np.pad(mask, pad), np.pad(tm, pad)
    wide = explain(model, method, wide_ids, wide_mask, wide_tm)
    np.testing.assert_allclose(wide[..., :WIDTH], out, rtol=2e-4, atol=1e-6)
    assert (wide[..., WIDTH:] == 0).all()


def test_token_mask_and_errors():
    ids = np.array([[0, 5, 6, 2, 1, 1]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
    tm = methods.token_mask_from_ids(ids, mask, (0, 1, 2))
    np.testing.assert_array_equal(tm, [[0, 1, 1, 0, 0, 0]])
    assert isinstance(tm, np.ndarray)
    assert isinstance(methods.token_mask_from_ids(jnp.asarray(ids), jnp.asarray(mask), (0,)),
                      jax.Array)
    with pytest.raises(ValueError, match="unknown explanation method"):
        methods.make_explain_fn(None, "deeplift")
    with pytest.raises(ValueError, match="ig_method"):
        ExplainOptions(ig_method="riemann")


# --- PLM-RR -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def make_plmrr():
    from medcode_jax.models.reranker import create_plmrr

    rng = np.random.default_rng(5)
    desc_ids = rng.integers(3, VOCAB, (LABELS, 6)).astype(np.int32)
    desc_mask = (np.arange(6)[None] < rng.integers(2, 7, LABELS)[:, None]).astype(np.int32)
    enc = build_encoder(encoder_config("bert"), rngs=nnx.Rngs(0))
    model = create_plmrr(enc, description_ids=np.where(desc_mask == 1, desc_ids, PAD),
                         description_mask=desc_mask, chunk_size=C, pad_token_id=PAD,
                         fuse_retriever=True, rngs=nnx.Rngs(1))
    return perturb(model, seed=4, scale=0.3)


def test_plmrr_attention_gradients_and_occlusion():
    from medcode_jax.models.plm_icd import encode_embedding_rows

    model = make_plmrr()
    ids, mask, tm = make_batch()
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    codes = jnp.asarray(np.maximum(CODES, 0))
    cand = jnp.asarray(np.random.default_rng(1).normal(size=CODES.shape), jnp.float32)
    forward = nnx.jit(lambda m, i, a, k, s: m(i, a, k, s, return_attention=True))
    logits, att = forward(model, jids, jmask, codes, cand)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(method, **kw):
        fn = jitted(graphdef, method, OPTS)
        batch = dict(input_ids=jids, attention_mask=jmask, token_mask=jnp.asarray(tm),
                     candidate_scores=cand, **kw)
        return np.asarray(fn(params, nnx.State({}), rest, batch, jnp.asarray(CODES),
                             jax.random.key(0)))

    np.testing.assert_allclose(run("attention"), normalise(np.asarray(att), tm, CODES),
                               rtol=1e-5, atol=1e-6)
    # per-code gradients of the candidate's (fused) score w.r.t. the note's embedding output
    desc_ids, desc_mask, slots = model.descriptions(codes)
    desc_hidden = model.encoder(desc_ids, desc_mask)

    def score(emb):
        hidden = encode_embedding_rows(model.encoder, emb.reshape(-1, C, 32),
                                       jmask.reshape(-1, C), deterministic=True)
        out = model.rerank_attention(desc_hidden, desc_mask, slots, hidden.reshape(2, WIDTH, 32),
                                     jmask)
        return out + model.fusion_alpha[...] * cand

    emb = model.encoder.embed(jids.reshape(-1, C)).reshape(2, WIDTH, 32)
    np.testing.assert_allclose(score(emb), logits, rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda e, k: jnp.sum(score(e) * jax.nn.one_hot(k, 3))))  # 1 program
    gxi = np.stack([np.linalg.norm(np.asarray(emb * grad(emb, k)), axis=-1) for k in range(3)], 1)
    np.testing.assert_allclose(run("gradient_x_input"), normalise(gxi, tm, CODES),
                               rtol=2e-4, atol=1e-6)
    # occlusion against the full model on every occluded copy
    opts_ids = np.repeat(ids[:, None], WIDTH, axis=1)
    opts_ids[:, np.arange(WIDTH), np.arange(WIDTH)] = PAD
    expected = np.zeros((2, 3, WIDTH))
    for b in range(2):
        rep = lambda x: jnp.asarray(np.repeat(np.asarray(x)[b:b + 1], WIDTH, 0))  # noqa: E731
        occluded, _ = forward(model, jnp.asarray(opts_ids[b]), rep(mask), rep(codes), rep(cand))
        expected[b] = np.abs(np.asarray(logits)[b][:, None] - np.asarray(occluded).T)
    np.testing.assert_allclose(run("occlusion"), normalise(expected, tm, CODES),
                               rtol=2e-4, atol=1e-6)
    with pytest.raises(ValueError, match="attgrad is not supported for PLM-RR"):
        run("attgrad")
