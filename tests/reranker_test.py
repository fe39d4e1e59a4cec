"""Tests for the PLM-RR re-ranker (`medcode_jax.models.reranker`), spec plmrr.md §1.

The head is compared with an independent float64 NumPy implementation of the reference formula
in its naive form (full [B, K, L, T] attention, context zeroed on description padding, mean,
LayerNorm, w·y + b). PLMRR is tested with a small fake encoder (cheap, per-row context so that
chunking matters) and once end to end with a tiny random BERT.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medcode_jax.models import reranker
from medcode_jax.models.reranker import (
    DescriptionCrossAttention,
    DescriptionTable,
    PLMRR,
    create_plmrr,
)

D, VOCAB, CHUNK, PAD, C, L = 16, 50, 4, 1, 9, 5


# ----------------------------------------------------------------------------- helpers


class FakeEncoder(nnx.Module):
    """Encoder contract `(ids [N, c], mask [N, c], *, deterministic) -> [N, c, D]`; position ids
    restart per row and every token sees its row's masked mean."""

    def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.position = nnx.Embed(16, D, rngs=rngs)
        self.dense = nnx.Linear(D, D, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask, *, deterministic: bool = True):
        x = self.embed(input_ids) + self.position(jnp.arange(input_ids.shape[1]))[None]
        m = (attention_mask != 0).astype(jnp.float32)[..., None]
        context = jnp.sum(x * m, axis=1, keepdims=True) / jnp.maximum(
            jnp.sum(m, axis=1, keepdims=True), 1.0)
        return jnp.tanh(self.dense(x + context))


def _np(x):
    return np.asarray(x, dtype=np.float64)


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def numpy_reranker(head: DescriptionCrossAttention, desc_hidden, desc_mask, slots, note_hidden,
                   note_mask):
    """Naive reference form, one (document, candidate) pair at a time; float64."""
    h = head.num_heads
    dh = D // h
    wq, wk, wv = (_np(p.kernel[...]) for p in (head.q_proj, head.k_proj, head.v_proj))
    gamma, beta = _np(head.layernorm.scale[...]), _np(head.layernorm.bias[...])
    w, b0 = _np(head.output_linear.kernel[...])[:, 0], _np(head.output_linear.bias[...])[0]
    desc_hidden, note_hidden = _np(desc_hidden), _np(note_hidden)
    desc_mask, note_mask, slots = map(np.asarray, (desc_mask, note_mask, slots))
    batch, k_slots = slots.shape
    scores = np.zeros((batch, k_slots))
    attention = np.zeros((batch, k_slots, note_hidden.shape[1]))
    for bi in range(batch):
        keys = note_hidden[bi] @ wk
        values = note_hidden[bi] @ wv
        for ki in range(k_slots):
            u = slots[bi, ki]
            q = desc_hidden[u] @ wq  # [L, D]
            m = desc_mask[u] != 0
            combined = m[:, None] & (note_mask[bi] != 0)[None, :]  # [L, T]
            context = np.zeros_like(q)
            att_heads = []
            for hi in range(h):
                sl = slice(hi * dh, (hi + 1) * dh)
                s = q[:, sl] @ keys[:, sl].T / np.sqrt(dh)
                att = _softmax(np.where(combined, s, -1e9))  # [L, T]
                context[:, sl] = att @ values[:, sl]
                att_heads.append((att * m[:, None]).sum(0) / m.sum())
            context[~m] = 0.0
            p = context.sum(0) / m.sum()
            y = (p - p.mean()) / np.sqrt(p.var() + 1e-5) * gamma + beta
            scores[bi, ki] = y @ w + b0
            attention[bi, ki] = np.mean(att_heads, axis=0)
    return scores, attention


def head_inputs(seed=0, note_lengths=(7, 3), t=8, desc_lengths=(5, 2, 4, 1, 3), slots=None):
    key1, key2 = jax.random.split(jax.random.key(seed))
    u = len(desc_lengths)
    desc_hidden = jax.random.normal(key1, (u, L, D))
    note_hidden = jax.random.normal(key2, (len(note_lengths), t, D))
    desc_mask = (np.arange(L)[None] < np.asarray(desc_lengths)[:, None]).astype(np.int32)
    note_mask = (np.arange(t)[None] < np.asarray(note_lengths)[:, None]).astype(np.int32)
    if slots is None:
        slots = np.array([[0, 1, 2], [3, 4, 1]], np.int32)
    return desc_hidden, jnp.asarray(desc_mask), jnp.asarray(slots), note_hidden, jnp.asarray(
        note_mask)


def random_notes(seed, lengths, total):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(len(lengths), total)).astype(np.int32)
    mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return jnp.asarray(np.where(mask == 1, ids, PAD)), jnp.asarray(mask)


def description_table(seed=11, extra_columns=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, L + 1, size=C)
    ids = rng.integers(3, VOCAB, size=(C, L)).astype(np.int32)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, PAD).astype(np.int32)
    if extra_columns:
        ids = np.pad(ids, ((0, 0), (0, extra_columns)), constant_values=PAD)
        mask = np.pad(mask, ((0, 0), (0, extra_columns)))
    return ids, mask


# Codes repeat within and across documents; 7 distinct codes.
CANDIDATES = jnp.asarray([[0, 3, 5, 2], [3, 0, 8, 6], [5, 2, 3, 7]], jnp.int32)
RETRIEVER = jax.random.normal(jax.random.key(5), CANDIDATES.shape)


def make_model(*, extra_columns=0, dtype=jnp.float32, **kwargs):
    ids, mask = description_table(extra_columns=extra_columns)
    return create_plmrr(FakeEncoder(rngs=nnx.Rngs(1), dtype=dtype), description_ids=ids,
                        description_mask=mask, chunk_size=CHUNK, pad_token_id=PAD,
                        rngs=nnx.Rngs(2), dtype=dtype, **kwargs)


# ----------------------------------------------------------------------------- head


@pytest.mark.parametrize("num_heads", [1, 2])
def test_head_matches_naive_numpy_reference(num_heads):
    head = DescriptionCrossAttention(D, num_heads=num_heads, rngs=nnx.Rngs(0))
    inputs = head_inputs()  # note and description padding in both documents
    scores, att = head(*inputs, return_attention=True)
    ref_scores, ref_att = numpy_reranker(head, *inputs)
    assert scores.shape == (2, 3) and scores.dtype == jnp.float32
    assert att.shape == (2, 3, 8) and att.dtype == jnp.float32
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(att, ref_att, atol=1e-6)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(att) * (1 - np.asarray(inputs[4]))[:, None], 0.0)


def test_multi_head_one_equals_default_and_two_differs():
    inputs = head_inputs(seed=1)
    default = DescriptionCrossAttention(D, rngs=nnx.Rngs(3))(*inputs)
    one = DescriptionCrossAttention(D, num_heads=1, rngs=nnx.Rngs(3))(*inputs)
    two = DescriptionCrossAttention(D, num_heads=2, rngs=nnx.Rngs(3))(*inputs)
    np.testing.assert_array_equal(default, one)
    assert np.isfinite(np.asarray(two)).all()
    assert np.abs(np.asarray(two) - np.asarray(one)).max() > 1e-5
    with pytest.raises(ValueError, match="num_heads"):
        DescriptionCrossAttention(D, num_heads=3, rngs=nnx.Rngs(0))


def test_head_document_without_real_token_is_finite():
    head = DescriptionCrossAttention(D, rngs=nnx.Rngs(0))
    desc_hidden, desc_mask, slots, note_hidden, _ = head_inputs()
    note_mask = jnp.asarray([[0] * 8, [1, 1, 1, 0, 0, 0, 0, 0]], jnp.int32)
    scores, att = head(desc_hidden, desc_mask, slots, note_hidden, note_mask,
                       return_attention=True)
    assert np.isfinite(np.asarray(scores)).all()
    np.testing.assert_array_equal(att[0], 0.0)
    w = head.output_linear.kernel[...][:, 0]
    expected = jnp.dot(w, head.layernorm.bias[...]) + head.output_linear.bias[...][0]
    np.testing.assert_allclose(scores[0], np.full(3, expected), atol=1e-6)

    def loss(head, desc_hidden, note_hidden):
        return jnp.sum(head(desc_hidden, desc_mask, slots, note_hidden, note_mask) ** 2)

    grads = nnx.grad(loss, argnums=(0, 1, 2))(head, desc_hidden, note_hidden)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_parameter_names_shapes_logical_axes_and_init():
    head = DescriptionCrossAttention(D, rngs=nnx.Rngs(0))
    table = {".".join(map(str, path)): (var.shape, var.get_metadata()["out_sharding"])
             for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param))}
    assert table == {
        "q_proj.kernel": ((D, D), ("embed", "kv")),
        "k_proj.kernel": ((D, D), ("embed", "kv")),
        "v_proj.kernel": ((D, D), ("embed", "kv")),
        "layernorm.scale": ((D,), ("embed",)),
        "layernorm.bias": ((D,), ("embed",)),
        "output_linear.kernel": ((D, 1), ("embed", None)),
        "output_linear.bias": ((1,), (None,)),
    }
    big = DescriptionCrossAttention(128, rngs=nnx.Rngs(0))
    for p in (big.q_proj.kernel, big.k_proj.kernel, big.v_proj.kernel):
        assert abs(np.asarray(p[...]).std() - 0.03) < 0.0015
    assert abs(float(big.output_linear.bias[...][0])) <= 1 / np.sqrt(128)
    assert head.layernorm.epsilon == 1e-5


# ----------------------------------------------------------------------------- PLMRR


def test_model_equals_head_on_manual_encodings():
    model = make_model()
    ids, mask = random_notes(0, lengths=(11, 6, 3), total=3 * CHUNK)
    logits, att = model(ids, mask, CANDIDATES, RETRIEVER, return_attention=True)
    assert logits.shape == (3, 4) and att.shape == (3, 4, 3 * CHUNK)
    hidden = jnp.concatenate(
        [model.encoder(ids[:, j * CHUNK:(j + 1) * CHUNK], mask[:, j * CHUNK:(j + 1) * CHUNK])
         for j in range(3)], axis=1)
    table_ids, table_mask = description_table()
    desc_ids = jnp.asarray(table_ids)[CANDIDATES.reshape(-1)]
    desc_mask = jnp.asarray(table_mask)[CANDIDATES.reshape(-1)]
    desc_hidden = model.encoder(desc_ids, desc_mask)
    slots = jnp.arange(12).reshape(3, 4)
    expected = model.rerank_attention(desc_hidden, desc_mask, slots, hidden, mask)
    np.testing.assert_allclose(logits, expected, atol=1e-6)
    ref, _ = numpy_reranker(model.rerank_attention, desc_hidden, desc_mask, slots, hidden, mask)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)


def test_invariant_to_note_and_description_padding():
    ids, mask = random_notes(1, lengths=(8, 5, 2), total=2 * CHUNK)
    base = make_model()(ids, mask, CANDIDATES, RETRIEVER)
    # Two extra all-padding chunks (a larger bucket).
    padded = make_model()(jnp.pad(ids, ((0, 0), (0, 2 * CHUNK)), constant_values=PAD),
                          jnp.pad(mask, ((0, 0), (0, 2 * CHUNK))), CANDIDATES, RETRIEVER)
    np.testing.assert_allclose(base, padded, atol=1e-6)
    # Three extra description padding columns in the table.
    wide = make_model(extra_columns=3)(ids, mask, CANDIDATES, RETRIEVER)
    np.testing.assert_allclose(base, wide, atol=1e-6)


@pytest.mark.parametrize("num_unique", [7, 10])
def test_unique_descriptions_give_same_logits_and_gradients(num_unique):
    model = make_model()
    ids, mask = random_notes(2, lengths=(12, 7, 4), total=3 * CHUNK)
    cotangent = jax.random.normal(jax.random.key(9), CANDIDATES.shape)

    def loss(model, num_unique):
        logits = model(ids, mask, CANDIDATES, RETRIEVER, num_unique=num_unique)
        return jnp.sum(logits * cotangent), logits

    (_, per_slot), g_slot = nnx.value_and_grad(loss, has_aux=True)(model, None)
    (_, unique), g_unique = nnx.value_and_grad(loss, has_aux=True)(model, num_unique)
    np.testing.assert_allclose(unique, per_slot, atol=1e-6)
    flat_slot = dict(nnx.to_flat_state(g_slot))
    flat_unique = dict(nnx.to_flat_state(g_unique))
    assert flat_slot.keys() == flat_unique.keys()
    assert any(path[0] == "encoder" for path in flat_slot)
    for path, g in flat_slot.items():
        np.testing.assert_allclose(flat_unique[path][...], g[...], atol=1e-6, rtol=1e-5,
                                   err_msg=str(path))
    # The descriptions actually encoded: the distinct codes, sorted, then filler rows.
    desc_ids, _, slots = model.descriptions(CANDIDATES, num_unique=num_unique)
    table_ids, _ = description_table()
    distinct = np.unique(np.asarray(CANDIDATES))
    np.testing.assert_array_equal(desc_ids[:7], table_ids[distinct])
    assert desc_ids.shape == (num_unique, L)
    np.testing.assert_array_equal(distinct[np.asarray(slots)], CANDIDATES)


def test_document_without_real_token_gives_finite_scores():
    model = make_model()
    ids, mask = random_notes(3, lengths=(0, 5, 9), total=3 * CHUNK)
    logits, att = model(ids, mask, CANDIDATES, RETRIEVER, return_attention=True)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(att[0], 0.0)
    head = model.rerank_attention
    expected = jnp.dot(head.output_linear.kernel[...][:, 0], head.layernorm.bias[...])
    np.testing.assert_allclose(logits[0], expected + head.output_linear.bias[...][0], atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(ids, mask, CANDIDATES, RETRIEVER) ** 2))(model)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_description_grad_false_blocks_the_description_path(monkeypatch):
    """With the note path's gradient cut as well, the encoder gets zero gradient exactly when
    description_grad=False; the logits and the head's gradients are unaffected by the flag."""
    original = reranker.chunked_encode

    def note_without_grad(*args, **kwargs):
        hidden, mask = original(*args, **kwargs)
        return jax.lax.stop_gradient(hidden), mask

    monkeypatch.setattr(reranker, "chunked_encode", note_without_grad)
    ids, mask = random_notes(4, lengths=(10, 3, 7), total=3 * CHUNK)

    def grads(description_grad):
        model = make_model(description_grad=description_grad)
        loss = lambda m: jnp.sum(m(ids, mask, CANDIDATES, RETRIEVER) ** 2)  # noqa: E731
        return model(ids, mask, CANDIDATES, RETRIEVER), nnx.grad(loss)(model)

    logits_on, on = grads(True)
    logits_off, off = grads(False)
    np.testing.assert_array_equal(logits_on, logits_off)
    on_encoder = jax.tree.leaves(on["encoder"])
    assert max(np.abs(np.asarray(g)).max() for g in on_encoder) > 1e-6
    for g in jax.tree.leaves(off["encoder"]):
        np.testing.assert_array_equal(g, 0.0)
    for a, b in zip(jax.tree.leaves(on["rerank_attention"]),
                    jax.tree.leaves(off["rerank_attention"])):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_fuse_retriever_adds_alpha_times_retriever_logit():
    ids, mask = random_notes(5, lengths=(9, 4, 12), total=3 * CHUNK)
    plain = make_model()
    fused = make_model(fuse_retriever=True)
    assert not hasattr(plain, "fusion_alpha")
    params = dict(nnx.to_flat_state(nnx.state(fused, nnx.Param)))
    assert params[("fusion_alpha",)][...].shape == ()
    assert float(fused.fusion_alpha[...]) == 0.0
    base = plain(ids, mask, CANDIDATES, RETRIEVER)
    np.testing.assert_allclose(fused(ids, mask, CANDIDATES, RETRIEVER), base, atol=1e-7)
    fused.fusion_alpha[...] = jnp.asarray(0.7)
    np.testing.assert_allclose(fused(ids, mask, CANDIDATES, RETRIEVER),
                               base + 0.7 * RETRIEVER, atol=1e-6)
    grad = nnx.grad(lambda m: jnp.sum(m(ids, mask, CANDIDATES, RETRIEVER)))(fused)
    np.testing.assert_allclose(grad["fusion_alpha"][...], jnp.sum(RETRIEVER), rtol=1e-6)


def test_description_table_is_not_a_param_and_create_sharded_works():
    from configs import common
    from medcode_jax import sharding as shd

    model = make_model(fuse_retriever=True)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    param_paths = {path for path, _ in nnx.to_flat_state(params)}
    rest_flat = dict(nnx.to_flat_state(rest))
    assert not any(p[0].startswith("description") for p in param_paths)
    assert set(rest_flat) == {("description_ids",), ("description_mask",)}
    for var in rest_flat.values():
        assert isinstance(var, DescriptionTable)
        assert var.get_metadata()["out_sharding"] == ("labels", None)
        assert var[...].dtype == jnp.int32 and var[...].shape == (C, L)
    assert model.num_labels == C

    def init():
        _, p, r = nnx.split(make_model(fuse_retriever=True), nnx.Param, ...)
        return p, r

    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    (p, r), _, _ = shd.create_sharded(init, mesh, common.FSDP_TENSOR_RULES)
    np.testing.assert_array_equal(r["description_ids"][...], description_table()[0])
    assert p["fusion_alpha"][...].shape == ()


def test_bf16_compute_gives_fp32_logits_close_to_fp32():
    ids, mask = random_notes(6, lengths=(11, 4, 8), total=3 * CHUNK)
    ref = make_model()(ids, mask, CANDIDATES, RETRIEVER)
    low, att = make_model(dtype=jnp.bfloat16)(ids, mask, CANDIDATES, RETRIEVER,
                                              return_attention=True)
    assert low.dtype == jnp.float32 and att.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, atol=3e-2, rtol=3e-2)


def test_plmrr_validates_arguments():
    model = make_model()
    ids, mask = random_notes(0, lengths=(3, 3, 3), total=CHUNK)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        model(ids[:, :3], mask[:, :3], CANDIDATES, RETRIEVER)
    with pytest.raises(ValueError, match="candidate_scores"):
        model(ids, mask, CANDIDATES, RETRIEVER[:, :2])
    with pytest.raises(ValueError, match="num_unique"):
        model(ids, mask, CANDIDATES, RETRIEVER, num_unique=0)
    with pytest.raises(ValueError, match=r"\[C, L\]"):
        PLMRR(FakeEncoder(rngs=nnx.Rngs(0)), DescriptionCrossAttention(D, rngs=nnx.Rngs(0)),
              description_ids=np.zeros((C, L)), description_mask=np.zeros((C, L + 1)),
              chunk_size=CHUNK, pad_token_id=PAD, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- integration


def test_plmrr_end_to_end_with_tiny_bert():
    encoders = pytest.importorskip("medcode_jax.models.encoders")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, pad_token_id=PAD).to_dict()
    encoder = encoders.build_encoder(encoders.EncoderConfig.from_hf_config(hf),
                                     rngs=nnx.Rngs(0))
    table_ids, table_mask = description_table()
    model = create_plmrr(encoder, description_ids=table_ids, description_mask=table_mask,
                         chunk_size=CHUNK, pad_token_id=PAD, rngs=nnx.Rngs(1))
    ids, mask = random_notes(7, lengths=(7, 2), total=2 * CHUNK)  # [B=2, T=2 chunks]
    candidates = jnp.asarray([[4, 1, 6], [6, 0, 4]], jnp.int32)
    scores = jnp.zeros(candidates.shape)

    @nnx.jit  # one compilation instead of many eager BERT ops
    def run(model):
        rows = model.encoder(ids.reshape(4, CHUNK), mask.reshape(4, CHUNK))  # the chunks
        desc_ids = jnp.asarray(table_ids)[candidates.reshape(-1)]
        desc_mask = jnp.asarray(table_mask)[candidates.reshape(-1)]
        desc_hidden = model.encoder(desc_ids, desc_mask)
        manual = model.rerank_attention(desc_hidden, desc_mask, jnp.arange(6).reshape(2, 3),
                                        rows.reshape(2, 2 * CHUNK, D), mask)

        def loss(m):
            logits = m(ids, mask, candidates, scores, num_unique=4)
            return jnp.mean(logits ** 2), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return logits, manual, grads

    logits, manual, grads = run(model)
    assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(logits, manual, atol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads["encoder"])) > 0


def test_identity_qk_init_is_an_option_and_normal_is_the_default():
    from flax import nnx
    import numpy as np
    import pytest as _pytest

    from medcode_jax.models import reranker as rr

    default = rr.DescriptionCrossAttention(8, rngs=nnx.Rngs(0))
    assert abs(float(np.std(np.asarray(default.q_proj.kernel[...]))) - 0.03) < 0.01
    warm = rr.DescriptionCrossAttention(8, qk_init="identity", rngs=nnx.Rngs(0))
    for proj in (warm.q_proj, warm.k_proj):
        np.testing.assert_array_equal(np.asarray(proj.kernel[...]), np.eye(8))
    assert not np.allclose(np.asarray(warm.v_proj.kernel[...]), np.eye(8))  # v stays N(0, .03)
    with _pytest.raises(ValueError, match="qk_init"):
        rr.DescriptionCrossAttention(8, qk_init="zeros", rngs=nnx.Rngs(0))
