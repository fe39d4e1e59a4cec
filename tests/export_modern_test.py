"""Export to PyTorch of ModernBERT and NeoBERT models (both head types), on tiny random encoders.

Same structure as ``export_test.py`` (whose helpers it reuses): export, reload with
``torch_model.load_exported``, compare logits with JAX, check the encoder folder and the
reference-named state dict, import the weights back.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import transformers

from export_test import CHUNK, LABELS, jax_logits, make_model
from modern_encoders_test import save_neobert, tiny_modernbert, tiny_neobert
from utils import tiny_tokenizer_dir

from medcode_jax import export, torch_model

HEAD_KEYS = {"cross_attention": ["weights_k.weight", "label_representations", "weights_v.weight",
                                 "weights_v.bias", "output_linear.weight", "output_linear.bias",
                                 "layernorm.weight", "layernorm.bias"],
             "laat": ["first_linear.weight", "second_linear.weight", "third_linear.weight",
                      "third_linear.bias"]}


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory):
    """family -> (tiny pretrained folder with tokenizer files, its PyTorch base model)."""
    out = {}
    for family in ("modernbert", "neobert"):
        path = str(tmp_path_factory.mktemp(f"pretrained_{family}"))
        if family == "modernbert":
            base = tiny_modernbert(seed=1)
            base.save_pretrained(path)
        else:
            base = tiny_neobert(seed=1)
            save_neobert(base, path)
        tok = tiny_tokenizer_dir("wordpiece")  # only copied: its content is not used here
        for name in os.listdir(tok):
            shutil.copyfile(os.path.join(tok, name), os.path.join(path, name))
        out[family] = path, base
    return out


@pytest.mark.parametrize("family", ["modernbert", "neobert"])
@pytest.mark.parametrize("head_type", ["cross_attention", "laat"])
def test_export_roundtrip(pretrained_dirs, tmp_path, family, head_type):
    src, base = pretrained_dirs[family]
    model, cfg = make_model(src, head_type)
    assert CHUNK > cfg.options.get("local_attention", 0)  # ModernBERT's local window is used
    out = export.export_model(model, encoder_cfg=cfg, encoder_path=src, label_space=LABELS,
                              threshold=0.3, out_dir=str(tmp_path / "export"))
    meta = torch_model.read_meta(out)
    assert meta["family"] == family and meta["parity_max_abs_diff"] <= 1e-4

    # model.safetensors: the base model's keys under roberta_encoder. + the head's keys.
    state = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(state) == ({"roberta_encoder." + k for k in base.state_dict()}
                          | {"label_wise_attention." + k for k in HEAD_KEYS[head_type]})

    # encoder/: transformers (ModernBERT) / our PyTorch NeoBERT loads it, nothing missing.
    encoder_dir = os.path.join(out, "encoder")
    if family == "modernbert":
        _, info = transformers.AutoModel.from_pretrained(encoder_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    else:
        torch_model.load_neobert(encoder_dir)  # strict

    # PyTorch vs JAX logits on fresh inputs (padding, an all-padding chunk).
    ids, mask = export.parity_inputs(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id,
                                     chunk_size=CHUNK, seed=3)
    want = jax_logits(model, ids, mask)
    net, _ = torch_model.load_exported(out)
    probs = torch_model.predict(net, ids, mask).numpy()
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-want)), atol=1e-5)

    # Import the exported weights into a fresh (randomly initialised) JAX model.
    fresh, _ = make_model(src, head_type, seed=11, load=False)
    assert np.max(np.abs(jax_logits(fresh, ids, mask) - want)) > 1e-3
    export.import_reference_state_dict(os.path.join(out, "model.safetensors"), fresh,
                                       encoder_cfg=cfg)
    np.testing.assert_allclose(jax_logits(fresh, ids, mask), want, atol=1e-6)
