"""ModernBERT and NeoBERT encoders against tiny random PyTorch models (offline, CPU).

ModernBERT is compared with ``transformers.ModernBertModel`` (eager attention, fp32); NeoBERT,
which is not in ``transformers``, with the PyTorch NeoBERT in ``medcode_jax.torch_model``
(written separately from the spec). Both are compared on real tokens, with padded rows and an
all-padding row in the batch.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

import hf_utils
from medcode_jax import torch_model
from medcode_jax.convert import hf_io, keymaps
from medcode_jax.models import layers
from medcode_jax.models.encoders import EncoderConfig, build_encoder, read_encoder_config

N, C = 4, 32  # one chunk shape for the jitted forwards; local windows (±4) are much shorter
LENGTHS = (C, 20, 5, 0)

MODERNBERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=48, local_attention=8, global_attn_every_n_layers=2,
                  global_rope_theta=1000.0, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
# The hub's NeoBERT config.json form; intermediate_size 72 -> SwiGLU hidden size 48.
NEOBERT = {"model_type": "neobert", "architectures": ["NeoBERTLMHead"], "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 72,
           "vocab_size": 100, "max_length": 64, "pad_token_id": 0, "norm_eps": 1e-5,
           "embedding_init_range": 0.02, "decoder_init_range": 0.02,
           "auto_map": {"AutoConfig": "model.NeoBERTConfig", "AutoModel": "model.NeoBERT"}}


@nnx.jit(static_argnames="deterministic")
def forward(encoder, input_ids, attention_mask, deterministic=True):
    return encoder(input_ids, attention_mask, deterministic=deterministic)


def batch(vocab_size: int = 100, pad: int = 0, seed: int = 0, lengths=LENGTHS, width: int = C):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, (len(lengths), width)).astype(np.int32)
    mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, pad).astype(np.int32), mask


def torch_hidden(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.last_hidden_state.float().numpy()


def load(path: str, **options):
    cfg = read_encoder_config(path)
    if options:
        cfg = cfg.with_options(**options)
    encoder = build_encoder(cfg, rngs=nnx.Rngs(0))
    hf_io.load_pretrained_into(encoder, cfg, path)
    return cfg, encoder


def max_diff_on_real(ours, ref, mask) -> float:
    real = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[real] - ref[real]).max())


def tiny_modernbert(seed: int = 0, task: str = "base", **overrides):
    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(**{**MODERNBERT, **overrides})
    config._attn_implementation = "eager"
    cls = {"base": transformers.ModernBertModel, "mlm": transformers.ModernBertForMaskedLM}[task]
    return hf_utils.perturb_(cls(config), seed).eval()


def tiny_neobert(seed: int = 0):
    torch.manual_seed(seed)
    return hf_utils.perturb_(torch_model.neobert_classes().NeoBERT(NEOBERT), seed).eval()


def save_neobert(model, out_dir: str, *, prefix: str = "model.", dtype=torch.float32,
                 lm_head: bool = True) -> str:
    """A hub-style NeoBERT folder: config.json + model.safetensors (NeoBERTLMHead keys)."""
    os.makedirs(out_dir, exist_ok=True)
    state = {prefix + k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if lm_head:
        state["decoder.weight"] = torch.zeros(NEOBERT["vocab_size"], NEOBERT["hidden_size"],
                                              dtype=dtype)
    safetensors.torch.save_file(state, os.path.join(out_dir, "model.safetensors"),
                                metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(NEOBERT, f)
    return out_dir


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory):
    model = tiny_modernbert()
    return model, hf_utils.save_tiny_model(model, str(tmp_path_factory.mktemp("modernbert")))


@pytest.fixture(scope="module")
def neobert(tmp_path_factory):
    model = tiny_neobert()
    return model, save_neobert(model, str(tmp_path_factory.mktemp("neobert")))


# --- ModernBERT ---------------------------------------------------------------------------------

@pytest.mark.parametrize("biases", [False, True])
def test_modernbert_parity_both_attention_paths(modernbert, tmp_path, biases):
    """Global and local layers, padding; dot_product_attention == explicit mask path."""
    if biases:
        model = tiny_modernbert(seed=3, attention_bias=True, mlp_bias=True, norm_bias=True)
        path = hf_utils.save_tiny_model(model, str(tmp_path))
    else:
        model, path = modernbert
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    ids, mask = batch()
    ref = torch_hidden(model, ids, mask)
    outs = {}
    for impl in layers.ATTENTION_IMPLS:
        cfg, encoder = load(path, attention_impl=impl)
        assert cfg.options["attention_bias"] is biases
        outs[impl] = np.asarray(forward(encoder, ids, mask))
        assert np.isfinite(outs[impl]).all(), "padding / all-pad rows must stay finite"
        assert max_diff_on_real(outs[impl], ref, mask) < 1e-5
    np.testing.assert_allclose(outs["mask"], outs["dot_product_attention"], atol=1e-5, rtol=0)
    # The local window matters here: making every layer global changes the output.
    _, everywhere = load(path, layer_types=("full_attention",) * 3)
    assert max_diff_on_real(forward(everywhere, ids, mask), ref, mask) > 1e-3


def test_modernbert_without_chunking(modernbert):
    """One 96-token row (12x the local window), as with chunk_size = document length."""
    model, path = modernbert
    ids, mask = batch(lengths=(90,), width=96, seed=5)
    ref = torch_hidden(model, ids, mask)
    for impl in layers.ATTENTION_IMPLS:
        _, encoder = load(path, attention_impl=impl)
        assert max_diff_on_real(encoder(jnp.asarray(ids), jnp.asarray(mask)), ref, mask) < 1e-5


def test_modernbert_config_forms_parse_equal(modernbert):
    model, path = modernbert
    new = read_encoder_config(path)
    with open(os.path.join(path, "config.json")) as f:
        old = json.load(f)
    assert "layer_types" in old and "rope_parameters" in old  # transformers 5 writes these
    for key in ("layer_types", "rope_parameters"):
        del old[key]
    old.update(global_rope_theta=1000.0, local_rope_theta=10000.0, global_attn_every_n_layers=2)
    parsed_old = EncoderConfig.from_hf_config(old)
    assert parsed_old == new
    assert new.options["layer_types"] == ("full_attention", "sliding_attention", "full_attention")
    assert (new.options["global_rope_theta"], new.options["local_rope_theta"]) == (1000.0, 1e4)
    assert new.options["local_attention"] == 8
    for cfg in (new, parsed_old):
        assert EncoderConfig.from_hf_config(cfg.to_hf_config()) == cfg
        hf = cfg.to_hf_config()
        assert hf["architectures"] == ["ModernBertModel"]
        assert transformers.ModernBertConfig(**hf).layer_types == model.config.layer_types
    truncated = read_encoder_config(path, num_layers=2).to_hf_config()
    assert truncated["layer_types"] == ["full_attention", "sliding_attention"]
    bad = dict(old, rope_parameters={"full_attention": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        EncoderConfig.from_hf_config(bad)


def test_modernbert_round_trip_through_automodel(modernbert, tmp_path):
    """MLM checkpoint (``model.`` prefix) -> ours -> save_hf_encoder -> AutoModel."""
    mlm = tiny_modernbert(seed=2, task="mlm")
    src = hf_utils.save_tiny_model(mlm, str(tmp_path / "mlm"))
    cfg, encoder = load(src)
    out = str(tmp_path / "export")
    hf_io.save_hf_encoder(encoder, cfg, out)
    reloaded, info = transformers.AutoModel.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert isinstance(reloaded, transformers.ModernBertModel)
    ref_state = mlm.model.state_dict()
    ours = hf_io.encoder_state_dict(encoder, cfg)
    assert sorted(ours) == sorted(ref_state)
    for k, v in ref_state.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
    ids, mask = batch(seed=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_hidden(reloaded.eval(), ids, mask)[real],
                               torch_hidden(mlm.model, ids, mask)[real], atol=1e-6, rtol=0)


def test_modernbert_bf16_and_sharded_checkpoints(modernbert, tmp_path):
    model, _ = modernbert
    sharded = hf_utils.save_tiny_model(model, str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    cfg, encoder = load(sharded)
    ours = hf_io.encoder_state_dict(encoder, cfg)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
    bf16 = tiny_modernbert().to(torch.bfloat16)
    cfg, encoder = load(hf_utils.save_tiny_model(bf16, str(tmp_path / "bf16")))
    assert encoder.layers[1].attn.qkv.kernel[...].dtype == jnp.float32
    ours = hf_io.encoder_state_dict(encoder, cfg)
    for k, v in bf16.state_dict().items():
        np.testing.assert_array_equal(ours[k], v.float().numpy(), err_msg=k)


def test_modernbert_errors_list_every_problem(modernbert, tmp_path):
    _, path = modernbert
    state = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
    del state["layers.1.attn_norm.weight"]
    state["layers.0.attn_norm.weight"] = torch.ones(32)  # layer 0 has no attn_norm
    state["layers.2.mlp.Wi.weight"] = torch.zeros(10, 32)
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    cfg = read_encoder_config(str(tmp_path))
    with pytest.raises(hf_io.CheckpointMismatchError) as err:
        hf_io.load_pretrained_into(build_encoder(cfg, rngs=nnx.Rngs(0)), cfg, str(tmp_path))
    msg = str(err.value)
    for needle in ("missing (1)", "layers.1.attn_norm.weight", "unexpected (1)",
                   "layers.0.attn_norm.weight", "shape mismatch (1)", "layers.2.mlp.Wi.weight"):
        assert needle in msg, (needle, msg)


def test_every_param_has_logical_axes(modernbert, neobert):
    allowed = {"embed", "mlp", "heads", "kv", "vocab", "labels", "qkv", "layers", None}
    golden = {
        "modernbert": {"embeddings.tok_embeddings.embedding": ("vocab", "embed"),
                       "layers.1.attn.qkv.kernel": ("embed", "qkv", "heads"),
                       "layers.1.attn.out.kernel": ("heads", "embed"),
                       "layers.1.mlp.wi.kernel": ("embed", None, "mlp"),
                       "layers.1.mlp.wo.kernel": ("mlp", "embed"),
                       "final_norm.scale": ("embed",)},
        "neobert": {"tok_embeddings.embedding": ("vocab", "embed"),
                    "layers.0.attn.qkv.kernel": ("embed", "heads"),
                    "layers.0.mlp.wi.kernel": ("embed", None, "mlp"),
                    "layers.0.attention_norm.scale": ("embed",)},
    }
    for path in (modernbert[1], neobert[1]):
        cfg = read_encoder_config(path)
        encoder = build_encoder(cfg, rngs=nnx.Rngs(0))
        specs = {".".join(map(str, p)): v for p, v in nnx.iter_graph(encoder)
                 if isinstance(v, nnx.Param)}
        for name, var in specs.items():
            axes = var.get_metadata()["out_sharding"]
            assert len(axes) == var[...].ndim and set(axes) <= allowed, (name, axes)
        for name, axes in golden[cfg.family].items():
            assert specs[name].get_metadata()["out_sharding"] == axes, name


# --- NeoBERT ------------------------------------------------------------------------------------

def test_neobert_parity_with_torch_reference(neobert):
    model, path = neobert
    ids, mask = batch(seed=2)
    ref = torch_hidden(model, ids, mask)
    outs = {}
    for impl in layers.ATTENTION_IMPLS:
        cfg, encoder = load(path, attention_impl=impl)
        assert cfg.intermediate_size == 48 and cfg.layer_norm_eps == 1e-5
        outs[impl] = np.asarray(forward(encoder, ids, mask))
        assert np.isfinite(outs[impl]).all()
        assert max_diff_on_real(outs[impl], ref, mask) < 1e-5
    np.testing.assert_allclose(outs["mask"], outs["dot_product_attention"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_length 64"):
        encoder(jnp.zeros((1, 65), jnp.int32), jnp.ones((1, 65), jnp.int32))


def test_neobert_rotary_is_interleaved():
    """Interleaved pairs (2j, 2j+1) vs rotate-half (j, j+d/2): the same rotation, permuted."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 2, 8)), jnp.float32)
    angles = layers.rotary_angles(6, 8, 10_000.0)
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> halves
    np.testing.assert_allclose(layers.interleaved_rope(x, angles)[..., perm],
                               layers.rotate_half_rope(x[..., perm], angles), atol=1e-6)
    differ = layers.interleaved_rope(x, angles) - layers.rotate_half_rope(x, angles)
    assert np.abs(differ).max() > 0.1


def test_neobert_config_and_save_round_trip(neobert, tmp_path):
    model, path = neobert
    cfg, encoder = load(path)
    hf = cfg.to_hf_config()
    assert hf["intermediate_size"] == 72 and hf["max_length"] == 64
    assert hf["model_type"] == "neobert"
    assert hf["architectures"] == ["NeoBERT"] and hf["auto_map"] == NEOBERT["auto_map"]
    assert EncoderConfig.from_hf_config(hf) == cfg
    fresh = dict(NEOBERT, intermediate_size=3072, hidden_size=768, num_attention_heads=12)
    assert EncoderConfig.from_hf_config(fresh).intermediate_size == 2048  # hub's 2/3 rule
    with pytest.raises(ValueError, match="rms_norm=False"):
        EncoderConfig.from_hf_config(dict(NEOBERT, rms_norm=False))

    out = str(tmp_path / "saved")
    hf_io.save_hf_encoder(encoder, cfg, out)
    saved = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    assert set(saved) == set(model.state_dict())  # hub base-model keys, no prefix
    reloaded = torch_model.load_neobert(out)
    ids, mask = batch(seed=4)
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_hidden(reloaded, ids, mask)[real],
                               torch_hidden(model, ids, mask)[real], atol=1e-6, rtol=0)
    # bf16 checkpoint without a prefix loads into fp32 parameters
    bf16 = save_neobert(model, str(tmp_path / "bf16"), prefix="", dtype=torch.bfloat16,
                        lm_head=False)
    cfg16, enc16 = load(bf16)
    assert enc16.layers[0].attn.qkv.kernel[...].dtype == jnp.float32
    ours = hf_io.encoder_state_dict(enc16, cfg16)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(ours[k], v.to(torch.bfloat16).float().numpy(), err_msg=k)


def test_key_tables_are_bijections():
    for table in (keymaps.MODERNBERT, keymaps.NEOBERT):
        for rule in table.rules:
            hf = rule.hf.replace("{i}", "3")
            ours = table.to_ours(hf)
            assert ours is not None and table.to_hf(ours.key).key == hf
    w = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)  # a fused [3·2, 4] weight
    kernel, _ = keymaps._fused(3)  # noqa: SLF001
    ours = kernel.to_ours(w)
    assert ours.shape == (4, 3, 2)
    np.testing.assert_array_equal(ours[:, 1, :], w[2:4].T)  # part 1 = rows 2..3
    np.testing.assert_array_equal(kernel.to_hf(ours), w)


def test_encoder_presets():
    from configs import encoders as presets

    from medcode_jax.models.encoders import get_family

    for name in presets.PRESETS:
        preset = presets.get(name)
        assert set(preset) == {"path", "family", "chunk_size", "max_length"}, name
        get_family(preset.family)
        assert 0 < preset.chunk_size <= preset.max_length
    with pytest.raises(ValueError, match="unknown encoder preset 'gpt'"):
        presets.get("gpt")


def test_modernbert_training_mode_and_bf16(tmp_path):
    """Dropout (attention dropout takes the mask path) and bf16 compute stay finite and close."""
    model = tiny_modernbert(seed=4, attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1)
    path = hf_utils.save_tiny_model(model, str(tmp_path))
    cfg, encoder = load(path)
    assert (cfg.attention_dropout, cfg.hidden_dropout) == (0.1, 0.1)
    ids, mask = batch(seed=6)
    eval_out = np.asarray(forward(encoder, ids, mask))
    train_out = np.asarray(forward(encoder, ids, mask, deterministic=False))
    assert np.isfinite(train_out).all() and np.abs(train_out - eval_out).max() > 1e-2
    enc16 = build_encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    hf_io.load_pretrained_into(enc16, cfg, path)
    out16 = np.asarray(forward(enc16, ids, mask))
    assert out16.dtype == np.float32  # fp32 residual stream (autocast semantics)
    assert max_diff_on_real(out16, eval_out, mask) < 0.02


# --- bf16 numerics (PyTorch autocast semantics) -------------------------------------------------

# Stated tolerances, max |difference| of the last hidden state over real tokens, bf16 compute
# (fp32 parameters) against (a) the same encoder in fp32 and (b) the PyTorch model under
# torch.autocast(bfloat16) on CPU. Measured on these tiny models (fp32 / autocast): BERT
# 0.0019 / 0.0023, RoBERTa 0.0033 / 0.0029, ModernBERT 0.0010 / 0.0007, NeoBERT 0.0060 / 0.0048.
BF16_VS_FP32_TOL = 0.02
BF16_VS_AUTOCAST_TOL = 0.02


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert", "neobert"])
def test_bf16_forward_matches_fp32_and_torch_autocast(family, modernbert, neobert, tmp_path):
    if family in ("bert", "roberta"):
        model = hf_utils.tiny_model(family, seed=2)
        path = hf_utils.save_tiny_model(model, str(tmp_path))
    else:
        model, path = modernbert if family == "modernbert" else neobert
    cfg = read_encoder_config(path)
    enc32 = build_encoder(cfg, rngs=nnx.Rngs(0))
    hf_io.load_pretrained_into(enc32, cfg, path)
    enc16 = build_encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    hf_io.load_pretrained_into(enc16, cfg, path)
    ids, mask = batch(vocab_size=cfg.vocab_size, pad=cfg.pad_token_id, seed=3)
    out16 = np.asarray(forward(enc16, ids, mask))
    # The residual stream and the output stay fp32 (LayerNorm/RMSNorm outputs), as in autocast.
    assert out16.dtype == np.float32 and np.isfinite(out16).all()
    out32 = np.asarray(forward(enc32, ids, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = torch_hidden(model, ids, mask)
    vs_fp32 = max_diff_on_real(out16, out32, mask)
    vs_autocast = max_diff_on_real(out16, autocast, mask)
    print(f"{family}: bf16 vs fp32 {vs_fp32:.4f}, vs torch autocast {vs_autocast:.4f}")
    assert 0 < vs_fp32 < BF16_VS_FP32_TOL, vs_fp32  # > 0: the bf16 path really ran in bf16
    assert vs_autocast < BF16_VS_AUTOCAST_TOL, vs_autocast


@pytest.mark.parametrize("window", [None, 4])
def test_cudnn_attention_traces_with_a_padding_mask(monkeypatch, window):
    """The cuDNN path's shape checks run at trace time: with the version checks stubbed (no
    GPU here), `self_attention(backend="cudnn")` must trace for global and local layers. (It
    failed for global layers: cuDNN needs the mask as a [N, 1, c, c] bias, not [N, 1, 1, c].)"""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from medcode_jax.models import layers

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    q = jax.ShapeDtypeStruct((2, 128, 4, 32), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    dropout = nnx.Dropout(0.0, rngs=nnx.Rngs(0))
    out = jax.eval_shape(lambda q, k, v, m: layers.self_attention(
        q, k, v, m, window=window, backend="cudnn", dropout=dropout, deterministic=True),
        q, q, q, mask)
    assert out.shape == (2, 128, 4, 32)
