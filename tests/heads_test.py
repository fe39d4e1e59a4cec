"""Tests for the label-wise heads (LAAT, cross-attention) and the chunked PLMICD model.

The heads are compared with an independent float64 NumPy implementation of spec models.md §3;
PLMICD is tested with a small fake encoder (embedding + per-row context + tanh dense), so these
tests do not depend on the real encoders except for one integration test.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medcode_jax.models import heads as heads_lib
from medcode_jax.models.heads import LabelAttention, LabelCrossAttention
from medcode_jax.models import plm_icd
from medcode_jax.models.plm_icd import PLMICD, create_plmicd

D, C, VOCAB, CHUNK, PAD = 16, 7, 50, 4, 1


# ----------------------------------------------------------------------------- helpers


class FakeEncoder(nnx.Module):
    """Tiny encoder with the PLMICD contract: position ids restart per row, and every token
    sees the masked mean of its row, so encoding chunks jointly or separately would differ."""

    def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.0, dtype=jnp.float32):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.position = nnx.Embed(64, D, rngs=rngs)
        self.dense = nnx.Linear(D, D, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, input_ids, attention_mask, *, deterministic: bool = True):
        x = self.embed(input_ids) + self.position(jnp.arange(input_ids.shape[1]))[None]
        m = (attention_mask != 0).astype(jnp.float32)[..., None]
        context = jnp.sum(x * m, axis=1, keepdims=True) / jnp.maximum(
            jnp.sum(m, axis=1, keepdims=True), 1.0)
        return self.dropout(jnp.tanh(self.dense(x + context)), deterministic=deterministic)


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _np(x):
    return np.asarray(x, dtype=np.float64)


def numpy_cross_attention(head: LabelCrossAttention, h, mask, masked: bool):
    h = _np(h)
    keys = h @ _np(head.weights_k.kernel[...])
    values = h @ _np(head.weights_v.kernel[...]) + _np(head.weights_v.bias[...])
    scores = np.einsum("cd,bld->bcl", _np(head.label_representations[...]), keys) / head.scale
    if masked:
        scores = np.where(np.asarray(mask)[:, None, :] != 0, scores, -np.inf)
    att = _softmax(scores)
    y = att @ values
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    y = y * _np(head.layernorm.scale[...]) + _np(head.layernorm.bias[...])
    return y @ _np(head.output_linear.kernel[...])[:, 0] + _np(head.output_linear.bias[...])[0], att


def numpy_laat(head: LabelAttention, h, mask, masked: bool):
    h = _np(h)
    z = np.tanh(h @ _np(head.first_linear.kernel[...]))
    scores = np.swapaxes(z @ _np(head.second_linear.kernel[...]), 1, 2)  # [B, C, L]
    if masked:
        scores = np.where(np.asarray(mask)[:, None, :] != 0, scores, -np.inf)
    att = _softmax(scores)
    pooled = att @ h  # [B, C, D]
    w3 = _np(head.third_linear.kernel[...]).T  # [C, D]
    return (w3[None] * pooled).sum(-1) + _np(head.third_linear.bias[...]), att


def make_head(kind: str, *, mask_padding=True, scale=1.0, seed=0, dtype=jnp.float32):
    rngs = nnx.Rngs(seed)
    if kind == "ca":
        return LabelCrossAttention(D, C, scale=scale, mask_padding=mask_padding, rngs=rngs,
                                   dtype=dtype)
    return LabelAttention(D, C, mask_padding=mask_padding, rngs=rngs, dtype=dtype)


NUMPY_REF = {"ca": numpy_cross_attention, "laat": numpy_laat}


def hidden_and_mask(seed=0, lengths=(9, 5, 1), length=12):
    h = jax.random.normal(jax.random.key(seed), (len(lengths), length, D), jnp.float32)
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return h, jnp.asarray(mask)


def random_ids(seed, lengths, total):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(len(lengths), total)).astype(np.int32)
    mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, PAD).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def make_model(head_type="cross_attention", *, dtype=jnp.float32, **kwargs):
    encoder = FakeEncoder(rngs=nnx.Rngs(1), dtype=dtype)
    return create_plmicd(encoder, num_labels=C, head_type=head_type, chunk_size=CHUNK,
                         pad_token_id=PAD, rngs=nnx.Rngs(2), dtype=dtype, **kwargs)


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("kind", ["ca", "laat"])
@pytest.mark.parametrize("masked", [True, False])
def test_head_matches_numpy(kind, masked):
    scale = 2.5 if kind == "ca" else 1.0
    head = make_head(kind, mask_padding=masked, scale=scale)
    h, mask = hidden_and_mask()
    logits, att = head(h, mask, return_attention=True)
    ref_logits, ref_att = NUMPY_REF[kind](head, h, mask, masked)
    assert logits.dtype == jnp.float32 and logits.shape == (3, C)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(att, ref_att, atol=1e-6)


@pytest.mark.parametrize("kind", ["ca", "laat"])
def test_padding_changes_logits_only_when_unmasked(kind):
    h, mask = hidden_and_mask(lengths=(5,), length=5)
    extra = jax.random.normal(jax.random.key(7), (1, 6, D)) * 3.0
    h_padded = jnp.concatenate([h, extra], axis=1)
    mask_padded = jnp.pad(mask, ((0, 0), (0, 6)))

    masked = make_head(kind, mask_padding=True)
    np.testing.assert_allclose(masked(h, mask), masked(h_padded, mask_padded), atol=1e-6)

    unmasked = make_head(kind, mask_padding=False)
    diff = np.abs(np.asarray(unmasked(h, mask)) - np.asarray(unmasked(h_padded, mask_padded)))
    assert diff.max() > 1e-4


@pytest.mark.parametrize("kind", ["ca", "laat"])
def test_all_pad_document_is_finite_with_bias_only_logits(kind):
    head = make_head(kind)
    h, mask = hidden_and_mask(lengths=(0, 3), length=6)
    logits, att = head(h, mask, return_attention=True)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(att[0], 0.0)
    if kind == "ca":
        w = head.output_linear.kernel[...][:, 0]
        expected = jnp.dot(w, head.layernorm.bias[...]) + head.output_linear.bias[...][0]
        np.testing.assert_allclose(logits[0], np.full(C, expected), atol=1e-6)
    else:
        np.testing.assert_allclose(logits[0], head.third_linear.bias[...], atol=1e-6)

    def loss(head, h):
        return jnp.sum(head(h, mask) ** 2)

    grads_head, grads_h = nnx.grad(loss, argnums=(0, 1))(head, h)
    for leaf in jax.tree.leaves(grads_head) + [grads_h]:
        assert np.isfinite(np.asarray(leaf)).all()


@pytest.mark.parametrize("kind", ["ca", "laat"])
def test_attention_rows_sum_to_one_over_real_tokens(kind):
    head = make_head(kind)
    h, mask = hidden_and_mask()
    _, att = head(h, mask, return_attention=True)
    assert att.shape == (3, C, 12) and att.dtype == jnp.float32
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(att) * (1 - np.asarray(mask))[:, None, :], 0.0)


def test_initial_parameter_statistics():
    d, c = 128, 1024
    ca = LabelCrossAttention(d, c, rngs=nnx.Rngs(0))
    laat = LabelAttention(d, c, rngs=nnx.Rngs(0))
    normals = [ca.weights_k.kernel, ca.weights_v.kernel, ca.label_representations,
               laat.first_linear.kernel, laat.second_linear.kernel, laat.third_linear.kernel]
    for p in normals:
        x = np.asarray(p[...])
        assert abs(x.std() - 0.03) < 0.0015 and abs(x.mean()) < 0.002, (p.shape, x.std())
    w = np.asarray(ca.output_linear.kernel[...])  # only D values: loose check
    assert 0.02 < w.std() < 0.04
    bound = 1 / np.sqrt(d)
    for p in [ca.weights_v.bias, laat.third_linear.bias]:
        x = np.asarray(p[...])
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound
        assert abs(x.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)
    assert abs(float(ca.output_linear.bias[...][0])) <= bound
    np.testing.assert_array_equal(ca.layernorm.scale[...], 1.0)
    np.testing.assert_array_equal(ca.layernorm.bias[...], 0.0)
    for p in jax.tree.leaves(nnx.state(ca, nnx.Param)) + jax.tree.leaves(nnx.state(laat)):
        assert p.dtype == jnp.float32


def test_parameter_names_shapes_and_logical_axes():
    """Names follow the reference state dict (export); every Param has logical axis names."""

    def table(module):
        state = nnx.state(module, nnx.Param)
        out = {}
        for path, var in nnx.to_flat_state(state):
            out[".".join(map(str, path))] = (var.shape, var.get_metadata()["out_sharding"])
        return out

    assert table(make_head("ca")) == {
        "weights_k.kernel": ((D, D), ("embed", "kv")),
        "weights_v.kernel": ((D, D), ("embed", "kv")),
        "weights_v.bias": ((D,), ("kv",)),
        "label_representations": ((C, D), ("labels", "embed")),
        "layernorm.scale": ((D,), ("embed",)),
        "layernorm.bias": ((D,), ("embed",)),
        "output_linear.kernel": ((D, 1), ("embed", None)),
        "output_linear.bias": ((1,), (None,)),
    }
    assert table(make_head("laat")) == {
        "first_linear.kernel": ((D, D), ("embed", "mlp")),
        "second_linear.kernel": ((D, C), ("mlp", "labels")),
        "third_linear.kernel": ((D, C), ("embed", "labels")),
        "third_linear.bias": ((C,), ("labels",)),
    }


def test_head_rejects_mismatched_shapes():
    head = make_head("ca")
    with pytest.raises(ValueError, match="hidden_size"):
        head(jnp.zeros((1, 4, D + 1)), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="attention mask"):
        head(jnp.zeros((1, 4, D)), jnp.ones((1, 5)))


# ----------------------------------------------------------------------------- PLMICD


def test_chunked_encoding_equals_separate_chunks():
    model = make_model()
    ids, mask = random_ids(0, lengths=(12, 6), total=3 * CHUNK)  # doc 2: trailing pad chunk
    hidden, out_mask = model.encode(ids, mask)
    manual = jnp.concatenate(
        [model.encoder(ids[:, k * CHUNK:(k + 1) * CHUNK], mask[:, k * CHUNK:(k + 1) * CHUNK])
         for k in range(3)], axis=1)
    np.testing.assert_allclose(hidden, manual, atol=1e-6)
    np.testing.assert_array_equal(out_mask, mask)
    # Joint (unchunked) encoding differs: the test would catch a missing reshape.
    assert np.abs(np.asarray(model.encoder(ids, mask)) - np.asarray(manual)).max() > 1e-3
    np.testing.assert_allclose(model(ids, mask), model.label_wise_attention(manual, mask),
                               atol=1e-6)


@pytest.mark.parametrize("head_type", ["cross_attention", "laat"])
def test_chunking_edge_cases(head_type):
    model = make_model(head_type)
    # B=1, T exactly one chunk.
    ids1, mask1 = random_ids(1, lengths=(3,), total=CHUNK)
    logits1 = model(ids1, mask1)
    assert logits1.shape == (1, C) and np.isfinite(np.asarray(logits1)).all()
    # A document whose length is an exact multiple of c, in a batch with a shorter one.
    ids2, mask2 = random_ids(2, lengths=(2 * CHUNK, CHUNK + 1), total=2 * CHUNK)
    logits2 = model(ids2, mask2)
    # The same documents with a fully padded trailing chunk (next bucket): same logits.
    logits3, att3 = model(jnp.pad(ids2, ((0, 0), (0, CHUNK)), constant_values=PAD),
                          jnp.pad(mask2, ((0, 0), (0, CHUNK))), return_attention=True)
    np.testing.assert_allclose(logits2, logits3, atol=1e-6)
    assert att3.shape == (2, C, 3 * CHUNK)
    np.testing.assert_array_equal(att3[:, :, 2 * CHUNK:], 0.0)


def test_sequence_length_must_be_whole_chunks():
    model = make_model()
    ids, mask = random_ids(0, lengths=(3,), total=CHUNK + 1)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        model(ids, mask)


def test_encoder_batch_size_matches_and_carries_rng():
    ids, mask = random_ids(3, lengths=(12, 5, 9), total=3 * CHUNK)  # 9 chunk rows
    model = make_model()
    sliced = make_model(encoder_batch_size=4)  # 3 scan steps, the last one padded
    np.testing.assert_allclose(model(ids, mask), sliced(ids, mask), atol=1e-6)

    encoder = FakeEncoder(rngs=nnx.Rngs(1), dropout=0.5)
    dropout_model = PLMICD(encoder, make_head("ca"), chunk_size=CHUNK, pad_token_id=PAD,
                           encoder_batch_size=4)
    first = dropout_model(ids, mask, deterministic=False)
    second = dropout_model(ids, mask, deterministic=False)
    assert np.isfinite(np.asarray(first)).all()
    assert np.abs(np.asarray(first) - np.asarray(second)).max() > 0  # RNG state advanced


def test_bf16_compute_gives_fp32_logits_close_to_fp32():
    ids, mask = random_ids(4, lengths=(11, 4), total=3 * CHUNK)
    for head_type in ["cross_attention", "laat"]:
        ref = make_model(head_type)(ids, mask)
        low, att = make_model(head_type, dtype=jnp.bfloat16)(ids, mask, return_attention=True)
        assert low.dtype == jnp.float32 and att.dtype == jnp.float32
        np.testing.assert_allclose(low, ref, atol=3e-2, rtol=3e-2)


def test_create_plmicd_validates_arguments():
    with pytest.raises(ValueError, match="head_type"):
        make_model("transformer")
    with pytest.raises(ValueError, match="scale"):
        make_model("laat", scale=2.0)
    model = make_model("laat", mask_padding=False)
    assert isinstance(model.label_wise_attention, LabelAttention)
    assert not model.label_wise_attention.mask_padding


# ----------------------------------------------------------------------------- PLM-DCA


def test_description_query_init_mean_pools_real_tokens():
    encoder = FakeEncoder(rngs=nnx.Rngs(5))
    lengths = [3, 1, 4, 2, 4]
    ids, mask = random_ids(5, lengths=lengths, total=4)
    pooled = heads_lib.description_query_init(encoder, np.asarray(ids), np.asarray(mask),
                                              batch_size=2)  # 3 batches, last one padded
    hidden = np.asarray(encoder(ids, mask))
    expected = np.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
    assert pooled.shape == (5, D) and pooled.dtype == jnp.float32
    np.testing.assert_allclose(pooled, expected, atol=1e-6)

    head = LabelCrossAttention(D, 5, rngs=nnx.Rngs(0))
    head.init_queries_from(pooled)
    np.testing.assert_allclose(head.label_representations[...], expected, atol=1e-6)
    with pytest.raises(ValueError, match="num_labels"):
        head.init_queries_from(np.zeros((4, D)))


def test_random_description_ids_keep_lengths_and_specials():
    ids = np.array([[2, 10, 11, 3, 0, 0], [2, 12, 3, 0, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int8)
    out = heads_lib.random_description_ids(ids, mask, vocab_size=40, special_ids=[0, 1, 2, 3],
                                           seed=0)
    assert out.shape == ids.shape and out.dtype == ids.dtype
    special = np.isin(ids, [0, 2, 3])
    np.testing.assert_array_equal(out[special], ids[special])
    replaced = out[~special]
    assert ((replaced >= 4) & (replaced < 40)).all()
    assert not np.array_equal(out, ids)


def test_frozen_param_filter_selects_label_queries_only():
    model = make_model()
    frozen = heads_lib.frozen_param_filter(freeze_label_queries=True)
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, frozen))]
    assert paths == [("label_wise_attention", "label_representations")]
    none = heads_lib.frozen_param_filter(freeze_label_queries=False)
    assert not nnx.to_flat_state(nnx.state(model, none))


# ----------------------------------------------------------------------------- integration


def test_plmicd_with_real_bert_encoder():
    encoders = pytest.importorskip("medcode_jax.models.encoders")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, pad_token_id=PAD).to_dict()
    cfg = encoders.EncoderConfig.from_hf_config(hf)
    encoder = encoders.build_encoder(cfg, rngs=nnx.Rngs(0))
    model = create_plmicd(encoder, num_labels=C, chunk_size=CHUNK, pad_token_id=PAD,
                          rngs=nnx.Rngs(1))
    ids, mask = random_ids(6, lengths=(9, 2), total=3 * CHUNK)  # doc 2: one all-pad chunk

    @nnx.jit  # one compilation instead of many eager BERT ops
    def run(model):
        manual = jnp.concatenate(
            [model.encoder(ids[:, k * CHUNK:(k + 1) * CHUNK], mask[:, k * CHUNK:(k + 1) * CHUNK])
             for k in range(3)], axis=1)
        grads = nnx.grad(lambda m: jnp.mean(m(ids, mask, deterministic=False) ** 2))(model)
        return model(ids, mask), model.label_wise_attention(manual, mask), grads

    logits, expected, grads = run(model)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("masked", [True, False])
def test_label_softmax_custom_vjp_matches_autodiff(masked):
    scores = jax.random.normal(jax.random.key(3), (3, 5, 6)) * 4.0
    mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6])
    cotangent = jax.random.normal(jax.random.key(4), scores.shape)

    def reference(s):
        x = s * 0.5
        if not masked:
            return jax.nn.softmax(x, axis=-1)
        x = jnp.where(mask[:, None, :] != 0, x, -jnp.inf)
        keep = jnp.any(mask != 0, axis=-1)[:, None, None]
        return jnp.where(keep, jax.nn.softmax(jnp.where(keep, x, 0.0), axis=-1), 0.0)

    def ours(s):
        return heads_lib._label_softmax(s, mask, mask_padding=masked, inv_scale=0.5)

    np.testing.assert_allclose(ours(scores), reference(scores), atol=1e-6)
    grad = jax.vjp(ours, scores)[1](cotangent)[0]
    grad_ref = jax.vjp(reference, scores)[1](cotangent)[0]
    np.testing.assert_allclose(grad, grad_ref, atol=1e-6)
    # bf16 compute: probabilities (the saved residual) come back in bf16.
    assert ours(scores.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- reference padding


def _reference_fill(longest: int, padding: str) -> int:
    """Padding tokens the reference adds to a batch collated to its longest note (written from
    the reference code: EMC `split_input_into_chunks` pads `c - L % c`, SIGIR's collate pads to
    the next multiple of c only when L is not one)."""
    if padding == "emc":
        return CHUNK - longest % CHUNK
    return 0 if longest % CHUNK == 0 else CHUNK - longest % CHUNK


@pytest.mark.parametrize("head_type", ["cross_attention", "laat"])
@pytest.mark.parametrize("padding", ["emc", "sigir2023"])
@pytest.mark.parametrize("longest", [2 * CHUNK, 2 * CHUNK - 1])  # a multiple of c, and not
def test_unmasked_heads_attend_to_the_reference_padding(head_type, padding, longest):
    model = make_model(head_type, mask_padding=False, unmasked_padding=padding)
    ids, mask = random_ids(3, lengths=(longest, 3), total=longest)  # collated as the reference
    fill = _reference_fill(longest, padding)
    ref_ids = jnp.pad(ids, ((0, 0), (0, fill)), constant_values=PAD)
    ref_mask = jnp.pad(mask, ((0, 0), (0, fill)))
    hidden, hidden_mask = model.encode(ref_ids, ref_mask)
    expected = model.label_wise_attention(hidden, hidden_mask)  # unmasked: every position
    # Our pipeline pads the same batch to a bucket of 5 chunks.
    bucket = 5 * CHUNK
    ids5 = jnp.pad(ids, ((0, 0), (0, bucket - longest)), constant_values=PAD)
    mask5 = jnp.pad(mask, ((0, 0), (0, bucket - longest)))
    np.testing.assert_allclose(model(ids5, mask5), expected, atol=1e-6)
    # Attending to the whole bucket (what the span prevents) gives other logits.
    whole = model.label_wise_attention(*model.encode(ids5, mask5))
    assert np.abs(np.asarray(whole) - np.asarray(expected)).max() > 1e-4
    if padding == "emc" and longest % CHUNK == 0:
        assert fill == CHUNK  # the extra chunk this mode exists for
        assert plm_icd.reserve_tokens(False, "emc") == 1
    # Masked heads ignore all of this.
    masked = make_model(head_type, unmasked_padding=padding)
    np.testing.assert_allclose(masked(ids5, mask5), masked(ref_ids, ref_mask), atol=1e-6)


def test_reference_length_and_reserve():
    assert [plm_icd.reference_length(n, 4, "emc") for n in (3, 4, 5, 8)] == [4, 8, 8, 12]
    assert [plm_icd.reference_length(n, 4, "sigir2023") for n in (3, 4, 5, 8)] == [4, 4, 8, 8]
    assert plm_icd.reserve_tokens(True, "emc") == 0
    assert plm_icd.reserve_tokens(False, "sigir2023") == 0
    with pytest.raises(ValueError, match="unmasked_padding"):
        make_model("laat", mask_padding=False, unmasked_padding="fork")


@pytest.mark.parametrize("kind", ["ca", "laat"])
@pytest.mark.parametrize("masked", [True, False])
def test_head_gradients_match_pytorch_autograd(kind, masked):
    """Every parameter's and the hidden states' gradient equals PyTorch autograd of the
    reference formula (LAAT as the SIGIR `LabelAttention.forward`: softmax over dim=1 of the
    [B, L, C] scores; PLM-CA as EMC's `LabelCrossAttention`)."""
    torch = pytest.importorskip("torch")
    head = make_head(kind, mask_padding=masked, seed=3)
    h, mask = hidden_and_mask(seed=5)
    cotangent = np.asarray(jax.random.normal(jax.random.key(6), (h.shape[0], C)))

    def loss(head, h):
        return jnp.sum(head(h, mask) * cotangent)

    grads_head, grads_h = nnx.grad(loss, argnums=(0, 1))(head, h)
    t = lambda x: torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    th = t(h)
    keep = torch.tensor(np.asarray(mask) != 0)
    if kind == "laat":
        w1, w2 = t(head.first_linear.kernel[...]), t(head.second_linear.kernel[...])
        w3, b3 = t(head.third_linear.kernel[...]), t(head.third_linear.bias[...])
        scores = torch.tanh(th @ w1) @ w2  # [B, L, C]
        if masked:
            scores = scores.masked_fill(~keep[:, :, None], float("-inf"))
        att = torch.softmax(scores, dim=1).transpose(1, 2)  # [B, C, L]
        logits = (w3.T * (att @ th)).sum(2) + b3
        leaves = {"first_linear": w1, "second_linear": w2, "third_linear": w3}
        bias = ("third_linear", b3)
    else:
        wk, wv, bv = (t(head.weights_k.kernel[...]), t(head.weights_v.kernel[...]),
                      t(head.weights_v.bias[...]))
        q = t(head.label_representations[...])
        gamma, beta = t(head.layernorm.scale[...]), t(head.layernorm.bias[...])
        w, b = t(head.output_linear.kernel[...]), t(head.output_linear.bias[...])
        scores = torch.einsum("cd,bld->bcl", q, th @ wk)
        if masked:
            scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        mixed = torch.softmax(scores, dim=-1) @ (th @ wv + bv)
        normed = torch.nn.functional.layer_norm(mixed, (D,), gamma, beta, eps=1e-5)
        logits = (normed @ w)[..., 0] + b
        leaves = {"weights_k": wk, "weights_v": wv, "output_linear": w}
        bias = ("weights_v", bv)
    (logits * torch.tensor(cotangent, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(np.asarray(grads_h), th.grad.numpy(), atol=2e-5)
    for name, leaf in leaves.items():
        np.testing.assert_allclose(np.asarray(grads_head[name]["kernel"][...]),
                                   leaf.grad.numpy(), atol=2e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(grads_head[bias[0]]["bias"][...]),
                               bias[1].grad.numpy(), atol=2e-5)
    if kind == "ca":
        np.testing.assert_allclose(np.asarray(grads_head["label_representations"][...]),
                                   q.grad.numpy(), atol=2e-5)
        np.testing.assert_allclose(np.asarray(grads_head["layernorm"]["scale"][...]),
                                   gamma.grad.numpy(), atol=2e-5)
