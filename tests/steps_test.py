"""Train/eval step tests on a small stand-in model (the full stack is in train_test.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medcode_jax import steps

C, T, V, D = 12, 8, 50, 16


class StandIn(nnx.Module):
    """Embedding -> dropout -> masked mean -> linear: logits fp32 [B, C]."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.5), ("vocab", "embed")))
        self.out = nnx.Linear(D, C, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.normal(0.5), ("embed", "labels")))
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, ids, mask, *, deterministic=True):
        h = self.drop(self.embed(ids), deterministic=deterministic)
        w = mask.astype(jnp.float32)[..., None]
        return self.out((h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)).astype(jnp.float32)


def _batch(rows: int, seed: int = 0) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": jnp.asarray(rng.integers(1, V, (rows, T)), jnp.int32),
            "attention_mask": jnp.ones((rows, T), jnp.int32),
            "labels": jnp.asarray(rng.random((rows, C)) < 0.3, jnp.float32),
            "valid": jnp.ones((rows,), bool)}


def _state(tx):
    with nnx.use_eager_sharding(False):
        model = StandIn(nnx.Rngs(0))
    graphdef, params, frozen, rest = nnx.split(model, nnx.Param, nnx.Param, ...)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                             opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    return graphdef, state, rest


def _grads(graphdef, state, rest, batch, accum):
    """Gradients via a step with SGD(lr=1): params_before - params_after."""
    tx = optax.identity()
    step = jax.jit(steps.make_train_step(graphdef, tx, lambda s: 1.0, accum_steps=accum, seed=0,
                                         skip_nonfinite=True, deterministic=True))
    new, metrics = step(state, rest, batch)
    return metrics["loss"], jax.tree.map(lambda a, b: a - b, state.params, new.params)


def test_accumulation_2x8_equals_16x1():
    graphdef, state, rest = _state(optax.identity())
    batch = _batch(16)
    loss1, g1 = _grads(graphdef, state, rest, batch, 1)
    loss2, g2 = _grads(graphdef, state, rest, batch, 2)
    np.testing.assert_allclose(loss1, loss2, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_is_mean_over_rows_and_codes():
    logits = jnp.asarray([[0.0, 2.0, -1.0], [3.0, -2.0, 0.5]])
    labels = jnp.asarray([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    sig = 1 / (1 + np.exp(-np.asarray(logits)))
    ref = -(labels * np.log(sig) + (1 - labels) * np.log(1 - sig)).mean()
    np.testing.assert_allclose(steps.bce_mean(logits, labels, jnp.ones(2, bool)), ref, rtol=1e-6)
    # filler rows (valid False) are ignored, not averaged in
    np.testing.assert_allclose(steps.bce_mean(logits, labels, jnp.asarray([True, False])),
                               np.asarray(-(labels[0] * np.log(sig[0]) + (1 - labels[0])
                                            * np.log(1 - sig[0]))).mean(), rtol=1e-6)


def test_schedule_values():
    warm = steps.warmup_steps_for(100, warmup_steps=-1, warmup_fraction=0.1)
    assert warm == 10
    assert steps.warmup_steps_for(100, warmup_steps=20, warmup_fraction=0.1) == 20
    sched = steps.learning_rate_schedule(5e-5, 100, warm)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 5e-5)
    np.testing.assert_allclose(float(sched(5)), 2.5e-5)
    np.testing.assert_allclose(float(sched(55)), 2.5e-5, rtol=1e-6)
    assert float(sched(100)) == 0.0


def test_nonfinite_update_is_skipped_and_counted():
    tx = steps.make_optimizer(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
    graphdef, state, rest = _state(tx)
    step = jax.jit(steps.make_train_step(graphdef, tx, lambda s: 1e-2, accum_steps=2, seed=0,
                                         skip_nonfinite=True))
    bad = dict(_batch(8))
    bad["labels"] = bad["labels"].at[3, 2].set(jnp.nan)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, rest, bad)
    assert int(metrics["skipped"]) == 1 and int(metrics["nonfinite"]) == 1
    assert int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, rest, _batch(8))
    assert int(metrics["skipped"]) == 1 and int(metrics["nonfinite"]) == 0
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)))


def test_dropout_keys_depend_on_step_only():
    tx = optax.sgd(0.1)
    graphdef, state, rest = _state(tx)
    step = jax.jit(steps.make_train_step(graphdef, tx, lambda s: 0.1, accum_steps=1, seed=3,
                                         skip_nonfinite=True))
    batch = _batch(4)
    _, m1 = step(state, rest, batch)
    _, m2 = step(state, rest, batch)
    assert float(m1["loss"]) == float(m2["loss"])  # same (seed, step): same masks
    _, m3 = step(state.replace(step=state.step + 1), rest, batch)
    assert float(m1["loss"]) != float(m3["loss"])  # another step: other masks


def test_eval_step_returns_probabilities():
    graphdef, state, rest = _state(optax.identity())
    probs = jax.jit(steps.make_eval_step(graphdef))(state.params, state.frozen, rest, _batch(4))
    assert probs.shape == (4, C) and probs.dtype == jnp.float32
    assert bool(jnp.all((probs >= 0) & (probs <= 1)))


def test_head_lr_multiplier_scales_only_the_head():
    """`head_lr_multiplier`: the label head's updates are that multiple of the others'."""
    params = {"encoder": {"w": jnp.ones((3,))},
              steps.HEAD_MODULE: {"q": jnp.ones((2,)), "out": {"b": jnp.ones(())}}}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    plain = steps.make_optimizer(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.0)
    scaled = steps.make_optimizer(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.0,
                                  head_lr_multiplier=10.0)
    u1, _ = plain.update(grads, plain.init(params), params)
    u10, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(u10["encoder"]["w"], u1["encoder"]["w"])
    np.testing.assert_allclose(u10[steps.HEAD_MODULE]["q"], 10 * u1[steps.HEAD_MODULE]["q"])
    np.testing.assert_allclose(u10[steps.HEAD_MODULE]["out"]["b"],
                               10 * u1[steps.HEAD_MODULE]["out"]["b"])


def test_inference_programs_compile_without_ynn_fusions_on_cpu():
    """`jit_inference` (every eval / prediction step) drops XLA:CPU's YNNPACK fusions, which
    made the forward pass slower; a plain jit of the same function keeps them."""
    def f(x, w):
        h = jax.nn.gelu(x @ w)
        return (h - h.mean(-1, keepdims=True)).sum()

    x = jax.ShapeDtypeStruct((128, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    plain = jax.jit(f).lower(x, w).compile().as_text()
    inference = steps.jit_inference(f, "cpu").lower(x, w).compile().as_text()
    assert "__ynn_fusion" in plain and "__ynn_fusion" not in inference
    assert steps.inference_compiler_options("gpu") is None
    assert steps.inference_compiler_options("cpu") == steps.CPU_INFERENCE_OPTIONS
