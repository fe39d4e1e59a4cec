"""Export to PyTorch (reference layout) and import back, on tiny random BERT / RoBERTa models."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
import yaml
from flax import nnx

from hf_utils import save_tiny_model, tiny_model
from utils import tiny_tokenizer_dir

from medcode_jax import export, torch_model
from medcode_jax.convert import hf_io
from medcode_jax.models.encoders import build_encoder, read_encoder_config
from medcode_jax.models.plm_icd import create_plmicd

CHUNK = 16
NUM_LABELS = 5
LABELS = [f"A{i:02d}.{i}" for i in range(NUM_LABELS)]


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory):
    """family -> a tiny HF base-model folder (with its pooler) plus tokenizer files."""
    out = {}
    for family in ("bert", "roberta"):
        path = str(tmp_path_factory.mktemp(f"pretrained_{family}"))
        save_tiny_model(tiny_model(family, seed=1), path)
        tok = tiny_tokenizer_dir("wordpiece")  # only copied: its content is not used here
        for name in os.listdir(tok):
            shutil.copyfile(os.path.join(tok, name), os.path.join(path, name))
        out[family] = path
    return out


def make_model(path: str, head_type: str, *, seed: int = 0, mask_padding: bool = True,
               load: bool = True):
    """Our PLMICD on the tiny encoder at ``path`` (pretrained weights loaded if ``load``)."""
    cfg = read_encoder_config(path)
    encoder = build_encoder(cfg, rngs=nnx.Rngs(seed))
    if load:
        hf_io.load_pretrained_into(encoder, cfg, path)
    model = create_plmicd(encoder, num_labels=NUM_LABELS, head_type=head_type, chunk_size=CHUNK,
                          pad_token_id=cfg.pad_token_id, mask_padding=mask_padding,
                          scale=2.0 if head_type == "cross_attention" else 1.0,
                          rngs=nnx.Rngs(seed + 1))
    return model, cfg


def jax_logits(model, ids, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), deterministic=True))


def expected_keys(pretrained: str, head_type: str, *, pooler: bool) -> set[str]:
    """What the reference PLMICD's state dict holds, from transformers itself."""
    base = transformers.AutoModel.from_pretrained(pretrained, add_pooling_layer=pooler)
    keys = {"roberta_encoder." + k for k in base.state_dict()}
    head = {"cross_attention": ["weights_k.weight", "label_representations", "weights_v.weight",
                                "weights_v.bias", "output_linear.weight", "output_linear.bias",
                                "layernorm.weight", "layernorm.bias"],
            "laat": ["first_linear.weight", "second_linear.weight", "third_linear.weight",
                     "third_linear.bias"]}[head_type]
    return keys | {"label_wise_attention." + k for k in head}


def reference_shaped_module(encoder_dir: str, head_type: str, *, pooler: bool):
    """A minimal module with the reference PLMICD's attribute names (written from its layout)."""
    nn = torch.nn
    encoder = transformers.AutoModel.from_pretrained(encoder_dir, add_pooling_layer=pooler)
    d = encoder.config.hidden_size
    head = nn.Module()
    if head_type == "cross_attention":
        head.weights_k = nn.Linear(d, d, bias=False)
        head.label_representations = nn.Parameter(torch.rand(NUM_LABELS, d))
        head.weights_v = nn.Linear(d, d)
        head.output_linear = nn.Linear(d, 1)
        head.layernorm = nn.LayerNorm(d)
    else:
        head.first_linear = nn.Linear(d, d, bias=False)
        head.second_linear = nn.Linear(d, NUM_LABELS, bias=False)
        head.third_linear = nn.Linear(d, NUM_LABELS)
    module = nn.Module()
    module.roberta_encoder = encoder
    module.label_wise_attention = head
    return module


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("head_type", ["cross_attention", "laat"])
def test_export_roundtrip(pretrained_dirs, tmp_path, family, head_type):
    src = pretrained_dirs[family]
    model, cfg = make_model(src, head_type)
    out = export.export_model(model, encoder_cfg=cfg, encoder_path=src, label_space=LABELS,
                              threshold=0.35, out_dir=str(tmp_path / "export"), epoch=7,
                              config_dict={"chunk_size": CHUNK})
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind

    # encoder/: AutoModel loads it with no missing/unexpected keys; pooler carried unchanged.
    enc, info = transformers.AutoModel.from_pretrained(os.path.join(out, "encoder"),
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    original = transformers.AutoModel.from_pretrained(src)
    torch.testing.assert_close(enc.pooler.dense.weight, original.pooler.dense.weight)
    assert transformers.AutoTokenizer.from_pretrained(os.path.join(out, "encoder")) is not None

    # model.safetensors: exactly the reference keys, fork flavour (pooler), no position_ids.
    state = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(state) == expected_keys(src, head_type, pooler=True)
    assert not any("position_ids" in k for k in state)
    shapes = {k: v.shape for k, v in state.items() if k.startswith("label_wise_attention.")}
    d = cfg.hidden_size
    if head_type == "cross_attention":
        assert shapes["label_wise_attention.label_representations"] == (NUM_LABELS, d)
        assert shapes["label_wise_attention.output_linear.weight"] == (1, d)
        assert shapes["label_wise_attention.output_linear.bias"] == (1,)
    else:
        assert shapes["label_wise_attention.first_linear.weight"] == (d, d)
        assert shapes["label_wise_attention.second_linear.weight"] == (NUM_LABELS, d)
        assert shapes["label_wise_attention.third_linear.weight"] == (NUM_LABELS, d)

    # best_model.pt: the reference trainer's layout, loadable with weights_only=True.
    ckpt = torch.load(os.path.join(out, "best_model.pt"), weights_only=True)
    assert isinstance(ckpt["db"], torch.Tensor) and float(ckpt["db"]) == pytest.approx(0.35)
    assert ckpt["num_classes"] == NUM_LABELS and ckpt["epoch"] == 7
    assert set(ckpt["model"]) == set(state)
    np.testing.assert_array_equal(ckpt["model"]["label_wise_attention.third_linear.bias"
                                               if head_type == "laat" else
                                               "label_wise_attention.weights_v.bias"].numpy(),
                                  state["label_wise_attention.third_linear.bias"
                                        if head_type == "laat" else
                                        "label_wise_attention.weights_v.bias"])

    # config.yaml / target_tokenizer.json / config.json
    with open(os.path.join(out, "config.yaml")) as f:
        ref_cfg = yaml.safe_load(f)["model"]
    assert ref_cfg["name"] == "PLMICD"
    assert ref_cfg["configs"]["chunk_size"] == CHUNK
    assert ref_cfg["configs"]["cross_attention"] is (head_type == "cross_attention")
    assert ref_cfg["configs"]["model_path"] == os.path.join(out, "encoder")
    with open(os.path.join(out, "target_tokenizer.json")) as f:
        assert json.load(f) == LABELS
    meta = torch_model.read_meta(out)
    assert meta["parity_max_abs_diff"] <= 1e-4 and meta["threshold"] == 0.35
    assert meta["training_config"] == {"chunk_size": CHUNK}

    # PyTorch vs JAX logits on fresh inputs; torch pads a ragged length itself.
    ids, mask = export.parity_inputs(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id,
                                     chunk_size=CHUNK, seed=3)
    want = jax_logits(model, ids, mask)
    net, _ = torch_model.load_exported(out)
    ragged = 2 * CHUNK + 3  # not a multiple of the chunk size: torch pads to 3 chunks itself
    mask_r = np.where(np.arange(3 * CHUNK) < ragged, mask, 0)
    ids_r = np.where(mask_r == 1, ids, cfg.pad_token_id)
    probs = torch_model.predict(net, ids_r[:, :ragged], mask_r[:, :ragged]).numpy()
    want_r = jax_logits(model, ids_r, mask_r)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-want_r)), atol=1e-5)
    assert set(net.state_dict()) == set(state)

    # Import the exported weights into a fresh (randomly initialised) JAX model.
    fresh, _ = make_model(src, head_type, seed=11, load=False)
    assert np.max(np.abs(jax_logits(fresh, ids, mask) - want)) > 1e-3
    export.import_reference_state_dict(os.path.join(out, "model.safetensors"), fresh,
                                       encoder_cfg=cfg)
    np.testing.assert_allclose(jax_logits(fresh, ids, mask), want, atol=1e-6)

    # Strict load into a module shaped like the reference PLMICD (fork: with pooler).
    reference = reference_shaped_module(os.path.join(out, "encoder"), head_type, pooler=True)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


@pytest.mark.parametrize("head_type", ["cross_attention", "laat"])
def test_emc_flavour_and_reference_checkpoint_import(pretrained_dirs, tmp_path, head_type):
    """EMC flavour: no pooler in model.safetensors; the reference best_model.pt imports back."""
    src = pretrained_dirs["roberta"]
    model, cfg = make_model(src, head_type, mask_padding=False)
    out = export.export_model(model, encoder_cfg=cfg, encoder_path=src, label_space=LABELS,
                              threshold=0.4, out_dir=str(tmp_path / "emc"), flavour="emc")
    state = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(state) == expected_keys(src, head_type, pooler=False)
    reference = reference_shaped_module(os.path.join(out, "encoder"), head_type, pooler=False)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert torch_model.read_meta(out)["mask_padding"] is False

    # A reference-trainer checkpoint as torch.compile saves it (prefixed keys, position_ids).
    ckpt = torch.load(os.path.join(out, "best_model.pt"), weights_only=True)
    ckpt["model"] = {"_orig_mod." + k: v for k, v in ckpt["model"].items()}
    ckpt["model"]["_orig_mod.roberta_encoder.embeddings.position_ids"] = torch.arange(66)[None]
    torch.save(ckpt, tmp_path / "reference.pt")
    fresh, _ = make_model(src, head_type, seed=5, load=False, mask_padding=False)
    info = export.import_reference_state_dict(str(tmp_path / "reference.pt"), fresh,
                                              encoder_cfg=cfg)
    assert info["threshold"] == pytest.approx(0.4) and info["num_classes"] == NUM_LABELS
    ids, mask = export.parity_inputs(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id,
                                     chunk_size=CHUNK, seed=4)
    np.testing.assert_allclose(jax_logits(fresh, ids, mask), jax_logits(model, ids, mask),
                               atol=1e-6)


def test_parity_failure_deletes_folder(pretrained_dirs, tmp_path, monkeypatch):
    src = pretrained_dirs["bert"]
    model, cfg = make_model(src, "cross_attention")
    original = export.reference_state_dict

    def corrupted(*args, **kwargs):
        state = original(*args, **kwargs)
        key = "label_wise_attention.output_linear.bias"  # (a weights_v.bias shift is invisible:
        state[key] = state[key] + 1e-3                     # LayerNorm removes it)
        return state

    monkeypatch.setattr(export, "reference_state_dict", corrupted)
    with pytest.raises(export.ExportParityError, match="differ"):
        export.export_model(model, encoder_cfg=cfg, encoder_path=src, label_space=LABELS,
                            threshold=0.5, out_dir=str(tmp_path / "bad"))
    assert os.listdir(tmp_path) == []


def test_missing_pretrained_pooler_exports_zero_pooler(pretrained_dirs, tmp_path):
    """A source checkpoint without a pooler: a deterministic all-zero pooler is exported."""
    src = str(tmp_path / "no_pooler")
    shutil.copytree(pretrained_dirs["bert"], src)
    weights = os.path.join(src, "model.safetensors")
    state = safetensors.numpy.load_file(weights)
    safetensors.numpy.save_file({k: v for k, v in state.items() if not k.startswith("pooler.")},
                                weights, metadata={"format": "pt"})
    model, cfg = make_model(src, "cross_attention")
    out = export.export_model(model, encoder_cfg=cfg, encoder_path=src, label_space=LABELS,
                              threshold=0.5, out_dir=str(tmp_path / "out"))
    enc, info = transformers.AutoModel.from_pretrained(os.path.join(out, "encoder"),
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not enc.pooler.dense.weight.detach().any()
    exported = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert not exported["roberta_encoder.pooler.dense.bias"].any()


def test_import_reports_every_bad_key(pretrained_dirs, tmp_path):
    src = pretrained_dirs["bert"]
    model, cfg = make_model(src, "laat")
    out = export.export_model(model, encoder_cfg=cfg, encoder_path=src, label_space=LABELS,
                              threshold=0.5, out_dir=str(tmp_path / "ok"))
    state = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    del state["label_wise_attention.third_linear.bias"]
    del state["roberta_encoder.encoder.layer.1.output.dense.weight"]
    state["label_wise_attention.extra"] = np.zeros(3, np.float32)
    state["label_wise_attention.first_linear.weight"] = np.zeros((3, 3), np.float32)
    bad = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(state, bad)
    with pytest.raises(hf_io.CheckpointMismatchError) as err:
        export.import_reference_state_dict(bad, model, encoder_cfg=cfg)
    message = str(err.value)
    for fragment in ("label_wise_attention.third_linear.bias",
                     "encoder.layers.1.mlp.output.kernel", "label_wise_attention.extra",
                     "label_wise_attention.first_linear.weight"):
        assert fragment in message
    # a mismatched head is refused before anything is written
    with pytest.raises(hf_io.CheckpointMismatchError):
        export.import_reference_state_dict(out, make_model(src, "cross_attention")[0],
                                           encoder_cfg=cfg)


def test_torch_model_needs_no_torch_to_import():
    """torch is imported lazily; bad folders and unsupported families give clear errors."""
    import subprocess
    import sys

    code = ("import sys, medcode_jax.torch_model as m; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'eager import'")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(FileNotFoundError, match="export folder"):
        torch_model.read_meta("/nonexistent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        torch_model.build_encoder("/nonexistent", family="neobert", with_pooler=False)


@pytest.mark.slow
def test_export_from_workdir_bf16_run(tmp_path):
    """`--mode=export` path: a 1-step bf16 tiny run, exported (parity on an fp32 copy)."""
    from train_test import synthetic_dataset, tiny_bert_dir, tiny_config

    from medcode_jax import train

    assets = {"data": synthetic_dataset(str(tmp_path)), "encoder": tiny_bert_dir(str(tmp_path))}
    config = tiny_config(assets, max_steps_per_run=1, dtype="bfloat16")
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    out = export.export_from_workdir(config, workdir)
    assert out == os.path.join(workdir, "export")
    meta = torch_model.read_meta(out)
    assert meta["parity_max_abs_diff"] <= 1e-4 and meta["threshold"] == 0.5
    assert meta["training_config"]["train"]["dtype"] == "bfloat16"
    with open(os.path.join(out, "descriptions.json")) as f:
        descriptions = json.load(f)
    with open(os.path.join(out, "target_tokenizer.json")) as f:
        assert list(descriptions) == json.load(f)
    assert "tokenizer.json" in os.listdir(os.path.join(out, "encoder"))
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_from_workdir(config, workdir)
