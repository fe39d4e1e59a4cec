"""Explanation-aware losses (medcode_jax/explain/losses.py) on a tiny random BERT PLM-CA.

2 layers x 32, chunk 8, T = 16, C = 6, B = 2 (B = 1 micro-batches in the accumulation tests).
Finite differences run in float32 (the heads return fp32 logits / attention whatever the
compute dtype) along one random direction, central, h = 1e-3: tolerance 3 % relative.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medcode_jax import steps
from medcode_jax.explain import losses
from medcode_jax.models import encoders, plm_icd

V, C, CHUNK, T, B, E = 40, 6, 8, 16, 2, 3
PAD, CLS, SEP, BASELINE = 0, 2, 3, 4


def make_model(seed: int = 0, head: str = "cross_attention") -> plm_icd.PLMICD:
    cfg = encoders.EncoderConfig(
        family="bert", vocab_size=V, hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64, pad_token_id=PAD, max_position_embeddings=CHUNK,
        layer_norm_eps=1e-12, type_vocab_size=2)
    rngs = nnx.Rngs(seed)
    with nnx.use_eager_sharding(False):
        return plm_icd.create_plmicd(encoders.build_encoder(cfg, rngs=rngs), num_labels=C,
                                     head_type=head, chunk_size=CHUNK, pad_token_id=PAD,
                                     rngs=rngs)


def make_batch(seed: int = 0) -> dict[str, jax.Array]:
    """Doc 0: 13 tokens, evidence for two of its codes; doc 1: 9 tokens, no evidence."""
    rng = np.random.default_rng(seed)
    ids = np.full((B, T), PAD, np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, length in enumerate((13, 9)):
        ids[b, :length] = rng.integers(5, V, length)
        ids[b, 0], ids[b, length - 1] = CLS, SEP
        mask[b, :length] = 1
    ids[0, 5] = ids[0, 2] = ids[1, 3]  # repeated tokens (shared table rows)
    labels = np.zeros((B, C), np.float32)
    labels[0, [1, 3, 4]] = 1
    labels[1, [0, 3]] = 1
    codes = np.full((B, E), -1, np.int32)
    evidence = np.zeros((B, E, T), np.int8)
    codes[0, :2] = [1, 4]
    evidence[0, 0, [3, 4]] = 1
    evidence[0, 1, [7]] = 1
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels), "valid": jnp.ones((B,), bool),
            "evidence_codes": jnp.asarray(codes), "evidence_mask": jnp.asarray(evidence)}


def denom_counts(io, batch):
    denom = jnp.maximum(jnp.sum(batch["valid"].astype(jnp.float32)), 1.0) * C
    return denom, io.counts(batch)


def run_loss(io, model, batch, *, teacher=None, key=0):
    denom, counts = denom_counts(io, batch)
    return io.loss(model, batch, deterministic=True, key=jax.random.key(key), denom=denom,
                   counts=counts, teacher=teacher)


TM = dict(baseline_token_id=BASELINE, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)


def test_every_loss_is_bce_at_lambda_zero():
    model, batch = make_model(), make_batch()
    bce, _ = run_loss(steps.PLMICD_IO, model, batch)
    for io in (losses.SupervisedAttentionIO(lambda_1=0.0),
               losses.InputGradientIO(lambda_1=0.0),
               losses.InputGradientIO(lambda_1=0.0, scope="document"),
               losses.AdversarialIO(lambda_1=0.0, lambda_2=0.0),
               losses.TokenMaskingIO(lambda_1=0.0, distillation=False, **TM)):
        loss, _ = run_loss(io, model, batch)
        assert float(loss) == float(bce), io
    # with a weight but no evidence the KL term is exactly 0 too
    no_evidence = dict(batch, evidence_codes=jnp.full((B, E), -1, jnp.int32))
    loss, parts = run_loss(losses.SupervisedAttentionIO(lambda_1=2.5), model, no_evidence)
    assert float(parts["attention_kl"]) == 0.0
    np.testing.assert_allclose(float(loss), float(bce), rtol=1e-6)


def test_supervised_kl_matches_a_direct_computation():
    model, batch = make_model(), make_batch()
    io = losses.SupervisedAttentionIO(lambda_1=2.5)
    _, parts = run_loss(io, model, batch)
    _, att = model(batch["input_ids"], batch["attention_mask"], return_attention=True)
    att = np.asarray(att, np.float64)
    # doc 0 (the only one with evidence): targets 1, 3, 4; evidence for 1 and 4; mean over
    # [3 targets x T]; averaged over the 1 document with evidence
    total = 0.0
    for code, positions in ((1, [3, 4]), (4, [7])):
        p = np.zeros(T)
        p[positions] = 1.0 / len(positions)
        nz = p > 0
        total += np.sum(p[nz] * (np.log(p[nz]) - np.log(att[0, code, nz])))
    # "reference": the longest note (13 tokens) padded past a whole chunk: 16; "document":
    # doc 0's own 13 -> 16 too; "padded": T = 16. Check the rule on other lengths.
    np.testing.assert_allclose(float(parts["attention_kl"]), 2.5 * total / (3 * T), rtol=1e-5)
    mask = jnp.asarray([[1] * 8 + [0] * 8, [1] * 3 + [0] * 13])
    np.testing.assert_array_equal(io.kl_lengths(mask, CHUNK), 16)  # 8 -> 16 (extra chunk)
    np.testing.assert_array_equal(
        dataclasses.replace(io, kl_length="document").kl_lengths(mask, CHUNK), [16, 8])


def _params_direction(model, seed=1):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves = [jax.random.normal(k, p.shape, jnp.float32)
              for k, p in zip(keys, jax.tree.leaves(params))]
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in leaves))
    direction = jax.tree.unflatten(jax.tree.structure(params), [x / norm for x in leaves])
    return graphdef, params, rest, direction


@pytest.mark.parametrize("io,part", [
    (losses.SupervisedAttentionIO(lambda_1=1.0), "attention_kl"),
    (losses.InputGradientIO(lambda_1=1.0), "input_gradient"),
], ids=["supervised", "igr"])
def test_regulariser_gradient_matches_finite_differences(io, part):
    model, batch = make_model(), make_batch()
    graphdef, params, rest, direction = _params_direction(model)

    def term(p):
        m = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
        return run_loss(io, m, batch)[1][part]

    value_and_grad = jax.jit(jax.value_and_grad(term))  # one compiled program
    _, grad = value_and_grad(params)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                  jax.tree.leaves(direction)))
    h = 1e-3
    shift = lambda s: jax.tree.map(lambda p, d: p + s * h * d, params, direction)
    numeric = (value_and_grad(shift(1.0))[0] - value_and_grad(shift(-1.0))[0]) / (2 * h)
    assert abs(float(analytic)) > 1e-6
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=3e-2)


def _table_grads(model, batch, weights):
    """Gradient of sum_b weights[b] * BCE-sum of document b w.r.t. the word-embedding table,
    for each row of `weights` [N, B] (one compiled program): [N, V, Dw] float64."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grad(p, w):
        def f(p):
            logits = nnx.merge(graphdef, p, rest)(batch["input_ids"], batch["attention_mask"])
            per_doc = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                         batch["labels"]).sum(-1)
            return jnp.sum(w * per_doc)
        return jax.grad(f)(p)["encoder"]["embeddings"]["word_embeddings"]["embedding"][...]

    return np.stack([np.asarray(grad(params, jnp.asarray(w, jnp.float32)), np.float64)
                     for w in weights])


def test_igr_penalty_is_the_norm_of_the_table_gradient():
    model, batch = make_model(), make_batch()
    _, parts = run_loss(losses.InputGradientIO(lambda_1=1.0), model, batch)
    # the batch's mean BCE (both documents valid: sum / (B * C)), then each document's own
    # BCE / C (scope="document": the norms averaged over documents)
    weights = [np.full(B, 1.0 / (B * C))] + [np.eye(B)[b] / C for b in range(B)]
    tables = _table_grads(model, batch, weights)
    np.testing.assert_allclose(float(parts["input_gradient"]),
                               np.linalg.norm(tables[0], axis=1).sum(), rtol=1e-4)
    _, parts = run_loss(losses.InputGradientIO(lambda_1=1.0, scope="document"), model, batch)
    expected = sum(np.linalg.norm(t, axis=1).sum() for t in tables[1:]) / B
    np.testing.assert_allclose(float(parts["input_gradient"]), expected, rtol=1e-4)


def test_pgd_noise_is_bounded_and_raises_the_bce():
    model, batch = make_model(), make_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    emb = model.embed(ids, mask, deterministic=True)

    def bce(noise):
        logits = model.from_embeddings(emb + noise, mask, deterministic=True)
        return float(steps.bce_mean(logits, batch["labels"], batch["valid"]))

    eps = 0.1  # large enough for the BCE change to show in float32 (the recipe's is 1e-5)
    io = losses.AdversarialIO(epsilon=eps)
    noise, taken = jax.jit(io.noise)(model, batch, jax.random.key(0))
    assert noise.shape == emb.shape
    assert float(jnp.max(jnp.abs(noise))) <= eps
    assert 3 <= int(taken) <= io.max_iter  # the stopping rule needs two earlier losses
    assert bce(noise) > bce(jnp.zeros_like(noise)) + 1e-4
    random = jax.random.uniform(jax.random.key(1), emb.shape, jnp.float32, -eps, eps)
    assert bce(noise) > bce(random)


def test_token_masking_keeps_cls_sep_and_padding():
    model, batch = make_model(), make_batch()
    io = losses.TokenMaskingIO(**TM)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = model.embed(io.baseline_ids(ids), mask, deterministic=True)
    soft, taken = jax.jit(io.token_mask)(model, batch, base)
    assert soft.shape == ids.shape and 1 <= int(taken) <= io.max_iter
    assert bool(jnp.all((soft > 0) & (soft < 1)))
    special = (ids == CLS) | (ids == SEP) | (ids == PAD)
    for s in (soft, jnp.zeros_like(soft), jnp.ones_like(soft)):
        out = np.asarray(io.masked_ids(ids, mask, s))
        assert (out[:, 0] == CLS).all()
        np.testing.assert_array_equal(out[np.asarray(special)], np.asarray(ids)[special])
        other = ~np.asarray(special)
        assert np.isin(out[other], [BASELINE]).all() or (
            (out[other] == np.asarray(ids)[other]) | (out[other] == BASELINE)).all()
    dropped = np.asarray(io.masked_ids(ids, mask, jnp.zeros_like(soft)))
    assert (dropped[~np.asarray(special)] == BASELINE).all()


def _state(model, tx):
    graphdef, params, frozen, rest = nnx.split(model, nnx.Param, nnx.Param, ...)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                             opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    return graphdef, state, rest


# supervised and igr run through the train step in test_accumulation_2x1_equals_1x2, tm
# through train.py in test_supervised_run_then_token_masking_from_it (with dropout, parts
# adding up). pgd with adv_dist="kl" and lambda_1 > 0 compiles a third, double-backprop step:
# left out to keep the suite's compile time down; its terms are the ones tested above.
def test_pgd_train_steps_run_with_dropout():
    """Two steps with dropout, accumulation 2: finite, parts add up, parameters move."""
    io = losses.AdversarialIO(max_iter=5)
    model = make_model()
    tx = steps.make_optimizer(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
    graphdef, state, rest = _state(model, tx)
    step = jax.jit(steps.make_train_step(graphdef, tx, lambda s: 1e-3, accum_steps=2, seed=0,
                                         skip_nonfinite=False, io=io))
    args = (rest, state.params) if io.needs_teacher else rest
    batch = {k: v for k, v in make_batch().items() if k in io.train_keys}
    before = state.params
    for _ in range(2):
        state, metrics = step(state, args, batch)
        assert np.isfinite(float(metrics["loss"])) and int(metrics["nonfinite"]) == 0
        assert set(f"loss_{k}" for k in io.loss_parts) <= set(metrics)
        total = sum(float(metrics[f"loss_{k}"]) for k in io.loss_parts)
        np.testing.assert_allclose(total, float(metrics["loss"]), rtol=1e-5)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(state.params)))


def _grads(io, accum, batch):
    graphdef, state, rest = _state(make_model(), optax.identity())
    step = jax.jit(steps.make_train_step(graphdef, optax.identity(), lambda s: 1.0,
                                         accum_steps=accum, seed=0, skip_nonfinite=True,
                                         deterministic=True, io=io))
    new, metrics = step(state, rest, {k: batch[k] for k in io.train_keys})
    return metrics, jax.tree.map(lambda a, b: a - b, state.params, new.params)


def _assert_same(io, a, b):
    (m1, g1), (m2, g2) = a, b
    for k in ("loss",) + tuple(f"loss_{p}" for p in io.loss_parts):
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, atol=1e-8)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["supervised", "igr"])
def test_accumulation_2x1_equals_1x2(name):
    """Loss, parts and gradients of one micro-batch of 2 = two micro-batches of 1 (through
    steps.make_train_step, deterministic). igr: exact for scope="document"; the reference's
    scope="micro_batch" on 1-document micro-batches equals it too."""
    batch = make_batch()
    if name == "supervised":
        io = losses.SupervisedAttentionIO(lambda_1=2.5, kl_length="document")
        one = _grads(io, 1, batch)
        assert float(one[0]["loss_attention_kl"]) > 0
        _assert_same(io, one, _grads(io, 2, batch))
    else:
        io = losses.InputGradientIO(lambda_1=0.1, scope="document")
        one = _grads(io, 1, batch)
        assert float(one[0]["loss_input_gradient"]) > 0
        # the reference's scope="micro_batch" on 1-document micro-batches is the same program
        # as scope="document" with accumulation 2
        _assert_same(io, one, _grads(dataclasses.replace(io, scope="micro_batch"), 2, batch))


def test_make_io_from_the_configs():
    from configs import plmicd

    tok = {"cls_token_id": CLS, "sep_token_id": SEP, "pad_token_id": PAD}
    expected = {"bce": steps.ModelIO, "supervised": losses.SupervisedAttentionIO,
                "igr": losses.InputGradientIO, "pgd": losses.AdversarialIO,
                "tm": losses.TokenMaskingIO}
    for name, cls in expected.items():
        c = plmicd.get_config(name)
        assert c.model.head == "cross_attention" and c.train.global_batch_size == 16
        io = losses.make_io(c.loss, tokenizer=tok)
        assert type(io) is cls
        hash(io)
    assert plmicd.get_config("supervised").data.max_evidence_codes > 0
    assert plmicd.get_config("igr").train.micro_batch_size == 4
    pgd = losses.make_io(plmicd.get_config("pgd").loss)
    assert (pgd.epsilon, pgd.alpha, pgd.lambda_1, pgd.lambda_2) == (1e-5, 0.1, 0.0, 0.5)
    tm = losses.make_io(plmicd.get_config("demo,tm").loss, tokenizer=tok, vocab_size=V)
    assert tm.baseline_token_id == PAD and tm.needs_teacher and tm.diet_constant == 0.01
    with pytest.raises(ValueError, match="baseline_token_id"):
        losses.make_io(plmicd.get_config("tm").loss, tokenizer=tok, vocab_size=V)
    with pytest.raises(ValueError, match="more than one loss preset"):
        plmicd.get_config("demo,igr,pgd")
    assert dataclasses.replace(losses.InputGradientIO(), lambda_1=0.5) != losses.InputGradientIO()
    # --config.loss.name=... alone takes the reference's weight for that loss
    c = plmicd.get_config("demo")
    assert c.loss.name == "bce" and losses.make_io(c.loss) is steps.PLMICD_IO
    for name, value in losses.REFERENCE_LAMBDA_1.items():
        c.loss.name = name
        assert losses.make_io(c.loss, tokenizer=tok).lambda_1 == value


@pytest.mark.slow
def test_supervised_run_then_token_masking_from_it(tmp_path):
    """train.py: `configs/plmicd.py:tiny,supervised` on a synthetic dataset with evidence:
    the batches carry the evidence fields and the KL term is logged (> 0); then
    `tiny,tm` with loss.init_workdir = that run starts from (and distils from) its parameters."""
    import json
    import os

    from configs import plmicd
    from medcode_jax import train
    from shards_test import MAX_LENGTH, write_synthetic
    from train_test import tiny_bert_dir

    root = str(tmp_path)
    data = os.path.join(root, "ev")
    write_synthetic(data, sizes={"train": 16, "val": 8, "test": 8}, evidence=True)
    c = plmicd.get_config("tiny,supervised")
    c.data.dir, c.encoder.path, c.train.num_epochs = data, tiny_bert_dir(root), 1
    c.data.max_length = MAX_LENGTH
    c.data.bucket_multiple = -(-MAX_LENGTH // c.data.chunk_size)  # one bucket: one shape
    assert c.data.max_evidence_codes > 0
    results = train.train_and_evaluate(c, os.path.join(root, "run"))
    assert np.isfinite(results["test"]["map"])
    with open(os.path.join(root, "run", "metrics.jsonl"), encoding="utf-8") as f:
        logged = [json.loads(line) for line in f if '"train"' in line]
    assert logged and all(r["loss_attention_kl"] > 0 for r in logged)
    assert all(r["loss"] == pytest.approx(r["loss_bce"] + r["loss_attention_kl"]) for r in logged)

    # token masking fine-tunes that finished run (loss.init_workdir) and distils from it
    tm = plmicd.get_config("tiny,tm")
    tm.data.dir, tm.encoder.path, tm.train.num_epochs = data, c.encoder.path, 1
    tm.data.max_length, tm.data.bucket_multiple = MAX_LENGTH, c.data.bucket_multiple
    tm.loss.init_workdir, tm.loss.mask_max_iter = os.path.join(root, "run"), 3
    results = train.train_and_evaluate(tm, os.path.join(root, "tm"))
    assert np.isfinite(results["test"]["map"])
    with open(os.path.join(root, "tm", "metrics.jsonl"), encoding="utf-8") as f:
        first = next(r for r in map(json.loads, f) if r["prefix"] == "train")
    assert first["step"] == 1 and {"loss_model", "loss_masked"} <= set(first)
    assert first["loss"] == pytest.approx(first["loss_model"] + first["loss_masked"])
    assert np.isfinite(first["loss_masked"]) and first["loss_masked"] > 0
    # distillation from the starting point: small at the first step (dropout only)
    assert first["loss_model"] < 0.1
