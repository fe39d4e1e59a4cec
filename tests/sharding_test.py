"""Sharding: the rules table -> PartitionSpecs, and (on 8 simulated CPU devices, in one
subprocess) loss/gradient parity of a (2, 2, 2) mesh with one device and FSDP memory ~1/N."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from configs import common
from medcode_jax import sharding as shd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_222 = AbstractMesh((2, 2, 2), shd.MESH_AXES)


@pytest.mark.parametrize("rules, logical, shape, expected", [
    (common.DATA_PARALLEL_RULES, ("embed", "mlp"), (32, 64), P()),
    (common.FSDP_RULES, ("embed", "mlp"), (32, 64), P("fsdp")),
    (common.FSDP_TENSOR_RULES, ("embed", "mlp"), (32, 64), P("fsdp", "tensor")),
    (common.FSDP_TENSOR_RULES, ("vocab", "embed"), (300, 32), P("tensor", "fsdp")),
    (common.FSDP_TENSOR_RULES, ("labels", "embed"), (12, 32), P("tensor", "fsdp")),
    # a mesh axis is used once per parameter: [embed, heads, kv] -> kv stays replicated
    (common.FSDP_TENSOR_RULES, ("embed", "heads", "kv"), (32, 2, 16), P("fsdp", "tensor")),
    # a dimension the axis does not divide stays replicated
    (common.FSDP_TENSOR_RULES, ("labels", "embed"), (7, 32), P(None, "fsdp")),
    (common.FSDP_TENSOR_RULES, (None,), (5,), P()),
])
def test_rules_map_logical_names(rules, logical, shape, expected):
    assert shd.logical_to_mesh_spec(P(*logical), shape, MESH_222, rules) == expected


def test_rules_errors_name_the_problem():
    with pytest.raises(ValueError, match="no entry in config.mesh.rules"):
        shd.logical_to_mesh_spec(P("experts"), (4,), MESH_222, common.FSDP_RULES)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        shd.logical_to_mesh_spec(P("embed"), (4,), MESH_222, (("embed", "model"),))
    with pytest.raises(ValueError, match="devices"):
        shd.resolve_mesh_shape((3, -1, 1), 8)
    assert shd.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)


_SCRIPT = textwrap.dedent('''
    import jax, numpy as np, jax.numpy as jnp, optax
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from configs import common
    from medcode_jax import sharding as shd, steps
    from medcode_jax.models import encoders, plm_icd
    assert jax.device_count() == 8, jax.devices()
    C, T = 12, 32
    enc_cfg = encoders.EncoderConfig.from_hf_config(dict(
        model_type="bert", vocab_size=300, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))

    def make_model():
        rngs = nnx.Rngs(params=0, dropout=1)
        enc = encoders.build_encoder(enc_cfg, rngs=rngs)
        return plm_icd.create_plmicd(enc, num_labels=C, chunk_size=16, pad_token_id=0, rngs=rngs)

    def init():
        _, params, frozen, rest = nnx.split(make_model(), nnx.Param, nnx.Param, ...)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                                opt_state=(), skipped=jnp.zeros((), jnp.int32)), rest

    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(make_model), nnx.Param, nnx.Param, ...)[0]
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, (8, T)).astype(np.int32)
    mask = np.ones((8, T), np.int32); mask[:, 27:] = 0; ids[mask == 0] = 0
    host = {"input_ids": ids, "attention_mask": mask,
            "labels": (rng.random((8, C)) < 0.3).astype(np.float32), "valid": np.ones(8, bool)}

    def loss_and_grads(mesh, rules):
        (state, rest), (ssh, rsh), _ = shd.create_sharded(init, mesh, rules)
        step = steps.jit_train_step(steps.make_train_step(
            graphdef, optax.identity(), lambda s: 1.0, accum_steps=2, seed=0,
            skip_nonfinite=False, deterministic=True, mesh=mesh), ssh, rsh, mesh)
        batch = jax.device_put(host, shd.batch_sharding(mesh))
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = step(state, rest, batch)
        grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, new.params)
        return float(metrics["loss"]), jax.tree.leaves(grads), new

    single = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    loss1, g1, _ = loss_and_grads(single, common.DATA_PARALLEL_RULES)
    mesh = shd.make_mesh((2, 2, 2))
    loss8, g8, state8 = loss_and_grads(mesh, common.FSDP_TENSOR_RULES)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(g1, g8):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    specs = {jax.tree_util.keystr(k): v.sharding.spec
             for k, v in jax.tree_util.tree_flatten_with_path(state8.params)[0]}
    assert any(s == jax.sharding.PartitionSpec("fsdp", "tensor") for s in specs.values()), specs

    fsdp = shd.make_mesh((1, 8, 1))
    (state, _), _, _ = shd.create_sharded(init, fsdp, common.FSDP_RULES)
    per_device = shd.per_device_bytes(state.params)
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert len(per_device) == 8
    ratio = max(per_device.values()) / total
    assert ratio < 1.25 / 8, (ratio, total)

    # The SIGIR recipe (1 x 16 accumulation) on 8 devices without editing micro_batch_size:
    # validate_config picks 8 x 2, and the update equals the single-device 1 x 16 one.
    from configs import plmicd
    from medcode_jax import train
    sigir = plmicd.get_config("")
    assert (sigir.train.micro_batch_size, sigir.train.global_batch_size) == (1, 16)
    dp = shd.make_mesh((8, 1, 1))
    accum = train.validate_config(sigir, dp)
    assert (sigir.train.micro_batch_size, accum) == (8, 2), (sigir.train.micro_batch_size, accum)
    host = {k: np.concatenate([v, v[::-1]]) for k, v in host.items()}

    def update(mesh, accum_steps):
        (state, rest), (ssh, rsh), _ = shd.create_sharded(init, mesh, common.DATA_PARALLEL_RULES)
        step = steps.jit_train_step(steps.make_train_step(
            graphdef, optax.identity(), lambda s: 1.0, accum_steps=accum_steps, seed=0,
            skip_nonfinite=False, deterministic=True, mesh=mesh), ssh, rsh, mesh)
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = step(state, rest, jax.device_put(host, shd.batch_sharding(mesh)))
        return float(metrics["loss"]), jax.tree.leaves(
            jax.tree.map(lambda a, b: a - np.asarray(b), before, new.params))

    loss_1x16, g_1x16 = update(single, 16)
    loss_8x2, g_8x2 = update(dp, accum)
    np.testing.assert_allclose(loss_8x2, loss_1x16, rtol=1e-5)
    for a, b in zip(g_1x16, g_8x2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print("OK", loss1, loss8, ratio, loss_1x16)
''')


def test_mesh_222_matches_single_device_and_fsdp_shards_memory():
    """One subprocess with 8 simulated CPU devices (this process may have fewer)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "OK" in out.stdout


_RERANK_SCRIPT = textwrap.dedent('''
    import jax, numpy as np, jax.numpy as jnp, optax
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from configs import common
    from medcode_jax import sharding as shd, steps
    from medcode_jax.models import encoders, reranker
    assert jax.device_count() == 8, jax.devices()
    C, T, K, L = 16, 32, 4, 8
    enc_cfg = encoders.EncoderConfig.from_hf_config(dict(
        model_type="bert", vocab_size=300, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    rng = np.random.default_rng(0)
    desc_ids = rng.integers(5, 300, (C, L)).astype(np.int32)
    desc_mask = np.ones((C, L), np.int32); desc_mask[:, 5:] = 0; desc_ids[desc_mask == 0] = 0

    def make_model():
        rngs = nnx.Rngs(params=0, dropout=1)
        enc = encoders.build_encoder(enc_cfg, rngs=rngs)
        return reranker.create_plmrr(enc, description_ids=desc_ids, description_mask=desc_mask,
                                     chunk_size=16, pad_token_id=0, rngs=rngs)

    def init():
        _, params, frozen, rest = nnx.split(make_model(), nnx.Param, nnx.Param, ...)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                                opt_state=(), skipped=jnp.zeros((), jnp.int32)), rest

    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(make_model), nnx.Param, nnx.Param, ...)[0]
    ids = rng.integers(5, 300, (8, T)).astype(np.int32)
    mask = np.ones((8, T), np.int32); mask[:, 27:] = 0; ids[mask == 0] = 0
    cands = np.stack([rng.permutation(C)[:K] for _ in range(8)]).astype(np.int32)
    host = {"input_ids": ids, "attention_mask": mask,
            "labels": (rng.random((8, C)) < 0.3).astype(np.float32), "valid": np.ones(8, bool),
            "candidates": cands, "candidate_scores": rng.normal(size=(8, K)).astype(np.float32)}
    io = steps.RerankIO(num_unique=16)

    def loss_and_grads(mesh, rules):
        (state, rest), (ssh, rsh), _ = shd.create_sharded(init, mesh, rules)
        step = steps.jit_train_step(steps.make_train_step(
            graphdef, optax.identity(), lambda s: 1.0, accum_steps=2, seed=0,
            skip_nonfinite=False, deterministic=True, mesh=mesh, io=io), ssh, rsh, mesh)
        batch = jax.device_put(host, shd.batch_sharding(mesh))
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = step(state, rest, batch)
        grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, new.params)
        return float(metrics["loss"]), jax.tree.leaves(grads), rest

    single = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    loss1, g1, _ = loss_and_grads(single, common.DATA_PARALLEL_RULES)
    loss8, g8, rest8 = loss_and_grads(shd.make_mesh((2, 2, 2)), common.FSDP_TENSOR_RULES)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(g1, g8):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    tables = [v for k, v in jax.tree_util.tree_flatten_with_path(rest8)[0]
              if "description_ids" in jax.tree_util.keystr(k)]
    assert tables and tables[0].sharding.spec == P("tensor"), [t.sharding for t in tables]
    print("OK", loss1, loss8)
''')


def test_plmrr_step_on_mesh_222_matches_single_device():
    """The re-ranker train step (unique descriptions, accumulation 2) on a (2, 2, 2) mesh with
    the label table sharded over `tensor` equals one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", _RERANK_SCRIPT], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "OK" in out.stdout


def test_plan_mode_reports_per_device_memory(tmp_path):
    """--mode=plan on 8 simulated devices, FSDP, without prepared shards: the state bytes per
    device are 1/8 of the total (exact), the compiled step's temporaries are reported."""
    from train_test import tiny_bert_dir

    bert = tiny_bert_dir(str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "medcode_jax.main", "--mode=plan",
         "--config=configs/plmca.py:tiny,fsdp", f"--config.encoder.path={bert}",
         f"--config.data.dir={tmp_path / 'none'}", "--plan_devices=8", "--plan_num_labels=100",
         f"--workdir={tmp_path / 'w'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "estimated peak" in out.stdout and "on 8 devices" in out.stdout
    with open(tmp_path / "w" / "plan.json") as f:
        plan = json.load(f)
    b = plan["per_device_bytes"]
    total = 4 * plan["parameters_total"]  # fp32
    assert plan["devices"] == 8 and plan["mesh"]["fsdp"] == 8
    assert total / 8 <= b["parameters"] < 1.25 * total / 8
    # Adam's two moments, sharded alike, and its step count (one int32 scalar)
    assert b["optimiser"] == 2 * b["parameters"] + 4
    assert b["temporaries"] > 0
    assert b["estimated_peak"] > b["parameters"] + b["optimiser"] + b["temporaries"]
    # micro_batch_size 4 cannot split over 8 devices: fitted to 8, same effective batch.
    assert (plan["micro_batch"], plan["accumulation"]) == (8, 1)
