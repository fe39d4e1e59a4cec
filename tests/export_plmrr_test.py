"""PLM-RR export to PyTorch (the fork's token-level PLMICD layout), on tiny random BERT encoders.

The retriever is a JAX PLM-CA (``plm_icd.create_plmicd``, cross-attention head), the re-ranker a
JAX ``reranker.create_plmrr`` with a tiny description table; the export is reloaded with
``torch_model.load_exported`` and compared with the JAX cascade (``export.plmrr_cascade``).
"""
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
from medcode_jax.convert.keymaps import IDENTITY, KeyTable, Rule
from medcode_jax.models.encoders import build_encoder, read_encoder_config
from medcode_jax.models.plm_icd import create_plmicd
from medcode_jax.models.reranker import create_plmrr

CHUNK = 16
NUM_LABELS = 12
TOP_K = 4
DESC_LEN = 8  # table width; the longest description has 6 real tokens
LABELS = [f"B{i:02d}.{i}" for i in range(NUM_LABELS)]
DESCRIPTIONS = [f"description of code {i}" for i in range(NUM_LABELS)]

# The fork's PLMICD(attention_type="token_level") state dict, besides the two HF encoders
# (roberta_encoder.* and frozen_encoder.*, each with its pooler in the "fork" flavour).
RETRIEVER_HEAD_KEYS = ["label_wise_attention." + k for k in (
    "weights_k.weight", "label_representations", "weights_v.weight", "weights_v.bias",
    "output_linear.weight", "output_linear.bias", "layernorm.weight", "layernorm.bias")]
RERANKER_KEYS = ["_dynamic_token_attention." + k for k in (
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "layernorm.weight", "layernorm.bias",
    "output_linear.weight", "output_linear.bias",
    "description_input_ids", "description_attention_mask")]  # the last two are buffers
ENCODER_PREFIXES = ("roberta_encoder.", "frozen_encoder.")
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BERT base-model folder (with its pooler) plus tokenizer files."""
    path = str(tmp_path_factory.mktemp("pretrained_bert"))
    save_tiny_model(tiny_model("bert", seed=1), path)
    tok = tiny_tokenizer_dir("wordpiece")  # only copied: its content is not used here
    for name in os.listdir(tok):
        shutil.copyfile(os.path.join(tok, name), os.path.join(path, name))
    return path


def description_table(vocab_size: int, pad_id: int, seed: int = 0):
    """[C, DESC_LEN] ids / mask: CLS-like first token, 2..6 real tokens, right padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 7, size=NUM_LABELS)
    lengths[0] = 6
    ids = rng.integers(pad_id + 1, vocab_size, size=(NUM_LABELS, DESC_LEN))
    mask = (np.arange(DESC_LEN)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, pad_id).astype(np.int32), mask


def make_models(path: str, *, fuse: bool = False, num_heads: int = 1, scale: float = 1.0,
                retriever_layers: int | None = None, dtype=jnp.float32):
    """(reranker, retriever, cfg, retriever cfg): stage 2 from the pretrained weights, stage 1
    a different (random) encoder of the same architecture."""
    cfg = read_encoder_config(path)
    encoder = build_encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    hf_io.load_pretrained_into(encoder, cfg, path)
    ids, mask = description_table(cfg.vocab_size, cfg.pad_token_id)
    reranker = create_plmrr(encoder, description_ids=ids, description_mask=mask,
                            chunk_size=CHUNK, pad_token_id=cfg.pad_token_id, num_heads=num_heads,
                            fuse_retriever=fuse, rngs=nnx.Rngs(1), dtype=dtype)
    retriever_cfg = read_encoder_config(path, num_layers=retriever_layers)
    retriever = create_plmicd(build_encoder(retriever_cfg, rngs=nnx.Rngs(2), dtype=dtype),
                              num_labels=NUM_LABELS, head_type="cross_attention",
                              chunk_size=CHUNK, pad_token_id=cfg.pad_token_id, scale=scale,
                              rngs=nnx.Rngs(3), dtype=dtype)
    return reranker, retriever, cfg, retriever_cfg


def do_export(reranker, retriever, cfg, retriever_cfg, src, out, **kwargs):
    return export.export_plmrr_model(
        reranker, retriever, encoder_cfg=cfg, retriever_encoder_cfg=retriever_cfg,
        encoder_path=src, label_space=LABELS, descriptions=DESCRIPTIONS, top_k=TOP_K,
        threshold=0.45, out_dir=out, **kwargs)


def expected_keys(encoder_dir: str) -> set[str]:
    """The fork's key set: both encoders (transformers' own key names, pooler included), the
    retriever head, the re-ranker head and its description buffers."""
    base = transformers.AutoModel.from_pretrained(encoder_dir, add_pooling_layer=True)
    encoder_keys = set(base.state_dict())
    assert set(POOLER_KEYS) <= encoder_keys
    assert not any("position_ids" in k for k in encoder_keys)
    keys = {p + k for p in ENCODER_PREFIXES for k in encoder_keys}
    return keys | set(RETRIEVER_HEAD_KEYS) | set(RERANKER_KEYS)


def test_plmrr_export_roundtrip(pretrained, tmp_path):
    reranker, retriever, cfg, retriever_cfg = make_models(pretrained)
    out = do_export(reranker, retriever, cfg, retriever_cfg, pretrained,
                    str(tmp_path / "export"), epoch=3, icd_version=10,
                    config_dict={"top_k": TOP_K})
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind
    assert {"encoder", "model.safetensors", "best_model.pt", "config.yaml", "config.json",
            "target_tokenizer.json", "descriptions.json"} <= set(os.listdir(out))

    # model.safetensors: exactly the fork's keys; buffers int64, trimmed to the longest text.
    state = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(state) == expected_keys(os.path.join(out, "encoder"))
    ids = state["_dynamic_token_attention.description_input_ids"]
    mask = state["_dynamic_token_attention.description_attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (NUM_LABELS, 6)
    np.testing.assert_array_equal(mask, np.asarray(reranker.description_mask[...])[:, :6])
    d = cfg.hidden_size
    assert state["_dynamic_token_attention.q_proj.weight"].shape == (d, d)
    assert state["_dynamic_token_attention.output_linear.weight"].shape == (1, d)
    np.testing.assert_array_equal(state["_dynamic_token_attention.q_proj.weight"],
                                  np.asarray(reranker.rerank_attention.q_proj.kernel[...]).T)
    # the two encoders are the two different models; both carry the pretrained pooler
    assert not np.allclose(state["roberta_encoder.embeddings.word_embeddings.weight"],
                           state["frozen_encoder.embeddings.word_embeddings.weight"])
    pretrained_state = safetensors.numpy.load_file(os.path.join(pretrained, "model.safetensors"))
    for prefix in ENCODER_PREFIXES:
        np.testing.assert_array_equal(state[prefix + "pooler.dense.weight"],
                                      pretrained_state["pooler.dense.weight"])

    # encoder/ is the stage-2 encoder, loadable by transformers without missing keys
    enc, info = transformers.AutoModel.from_pretrained(os.path.join(out, "encoder"),
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_array_equal(enc.embeddings.word_embeddings.weight.detach().numpy(),
                                  state["roberta_encoder.embeddings.word_embeddings.weight"])

    # best_model.pt opens with weights_only=True and holds the same state dict
    ckpt = torch.load(os.path.join(out, "best_model.pt"), weights_only=True)
    assert set(ckpt["model"]) == set(state) and ckpt["num_classes"] == NUM_LABELS
    assert float(ckpt["db"]) == pytest.approx(0.45) and ckpt["epoch"] == 3
    assert ckpt["model"]["_dynamic_token_attention.description_input_ids"].dtype == torch.int64

    # config.yaml (the fork's token-level PLMICD, top_k at the top level), config.json, labels
    with open(os.path.join(out, "config.yaml")) as f:
        ref = yaml.safe_load(f)
    assert ref["top_k"] == TOP_K and ref["model"]["name"] == "PLMICD"
    configs = ref["model"]["configs"]
    assert configs["attention_type"] == "token_level" and configs["cross_attention"] is True
    assert configs["max_desc_len"] == DESC_LEN and configs["icd_version"] == 10
    assert configs["chunk_size"] == CHUNK and configs["scale"] == 1.0
    meta = torch_model.read_meta(out)
    assert meta["model_type"] == "plmrr" and meta["top_k"] == TOP_K
    assert meta["description_length"] == 6 and meta["num_heads"] == 1
    assert meta["parity_max_abs_diff"] <= 1e-4 and meta["parity_retriever_max_abs_diff"] <= 1e-4
    with open(os.path.join(out, "target_tokenizer.json")) as f:
        assert json.load(f) == LABELS
    with open(os.path.join(out, "descriptions.json")) as f:
        assert json.load(f) == dict(zip(LABELS, DESCRIPTIONS))

    # PyTorch cascade vs JAX cascade on fresh inputs: same top-K sets, logits within 1e-4
    net, _ = torch_model.load_exported(out)
    assert isinstance(net, torch_model.torch_classes().PLMRR)
    assert set(net.state_dict()) == set(state)
    ids_in, mask_in = export.parity_inputs(vocab_size=cfg.vocab_size,
                                           pad_token_id=cfg.pad_token_id, chunk_size=CHUNK,
                                           seed=5)
    full, cand, _ = export.plmrr_cascade(reranker, retriever, jnp.asarray(ids_in),
                                         jnp.asarray(mask_in), top_k=TOP_K)
    t_ids, t_mask = torch.from_numpy(ids_in).long(), torch.from_numpy(mask_in).long()
    with torch.no_grad():
        logits, candidates = net(t_ids, t_mask, return_candidates=True)
        looped = net(t_ids, t_mask, reference_style=True)
    for a, b in zip(np.asarray(cand), candidates.numpy()):
        assert set(a.tolist()) == set(b.tolist())
    np.testing.assert_allclose(logits.numpy(), np.asarray(full), atol=1e-4, rtol=0)
    np.testing.assert_allclose(looped.numpy(), logits.numpy(), atol=1e-5, rtol=0)
    assert (logits.numpy() == -1e9).sum() == 2 * (NUM_LABELS - TOP_K)
    # the unique-description path of the JAX model gives the same cascade
    full_u, _, _ = export.plmrr_cascade(reranker, retriever, jnp.asarray(ids_in),
                                        jnp.asarray(mask_in), top_k=TOP_K, num_unique=2 * TOP_K)
    np.testing.assert_allclose(np.asarray(full_u), np.asarray(full), atol=1e-5, rtol=0)

    # strict load into a freshly built PyTorch PLMRR
    fresh = torch_model.build_model(out, meta)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


def test_bf16_models_export_through_an_fp32_copy(pretrained, tmp_path):
    """bf16-compute models: the parity check runs fp32 copies with the same parameters."""
    reranker, retriever, cfg, retriever_cfg = make_models(pretrained, dtype=jnp.bfloat16)
    assert not export._computes_in_fp32(reranker)
    out = do_export(reranker, retriever, cfg, retriever_cfg, pretrained, str(tmp_path / "bf16"))
    assert torch_model.read_meta(out)["parity_max_abs_diff"] <= 1e-4


def test_gold_forcing_matches_the_fork_loop(pretrained, tmp_path):
    """Training-mode candidates: gold codes (ascending id) then the retriever's top non-gold."""
    classes = torch_model.torch_classes()
    net = classes.PLMRR(torch.nn.Identity(), torch.nn.Linear(1, 1), torch.nn.Identity(),
                        torch.nn.Identity(), chunk_size=CHUNK, pad_token_id=0, top_k=TOP_K)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, NUM_LABELS, generator=gen)
    targets = torch.zeros(3, NUM_LABELS)
    targets[0, [1, 7]] = 1
    targets[2, [0, 3, 5, 11]] = 1
    got = net.select(logits, TOP_K, targets)
    top = torch.topk(logits, TOP_K).indices
    for b in range(3):  # the fork's per-document loop, written out
        gold = targets[b].nonzero().squeeze(-1)
        rest = top[b][~torch.isin(top[b], gold)]
        want = torch.cat([gold, rest[:TOP_K - len(gold)]])
        assert got[b].tolist() == want.tolist()


def test_broken_mapping_fails_and_leaves_nothing(pretrained, tmp_path, monkeypatch):
    reranker, retriever, cfg, retriever_cfg = make_models(pretrained)
    rules = tuple(Rule(r.hf, r.ours, IDENTITY) if r.hf == "q_proj.weight" else r
                  for r in export.RERANKER_TABLE.rules)  # forget the transpose of q_proj
    monkeypatch.setattr(export, "RERANKER_TABLE", KeyTable(rules=rules))
    with pytest.raises(export.ExportParityError, match="candidate logits differ"):
        do_export(reranker, retriever, cfg, retriever_cfg, pretrained, str(tmp_path / "bad"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case, message", [
    ("fusion", "fusion"),
    ("heads", "num_heads=2"),
    ("encoders", "encoders differ"),
    ("scale", "scale"),
    ("emc", "only in the fork"),
])
def test_refuses_what_the_fork_cannot_hold(pretrained, tmp_path, case, message):
    kwargs = {"fusion": dict(fuse=True), "heads": dict(num_heads=2),
              "encoders": dict(retriever_layers=1), "scale": dict(scale=2.0)}.get(case, {})
    reranker, retriever, cfg, retriever_cfg = make_models(pretrained, **kwargs)
    with pytest.raises(ValueError, match=message):
        do_export(reranker, retriever, cfg, retriever_cfg, pretrained, str(tmp_path / "out"),
                  flavour="emc" if case == "emc" else "fork")
    assert os.listdir(tmp_path) == []


def test_read_meta_validates_plmrr_fields(tmp_path):
    meta = {"family": "bert", "flavour": "fork", "head_type": "cross_attention",
            "chunk_size": CHUNK, "pad_token_id": 0, "num_labels": NUM_LABELS, "scale": 1.0,
            "mask_padding": True, "model_type": "plmrr", "top_k": NUM_LABELS + 1,
            "description_length": 6, "num_heads": 1}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="top_k"):
        torch_model.read_meta(str(tmp_path))
    del meta["model_type"], meta["top_k"]  # an older PLM-ICD export: no model_type
    with open(tmp_path / "config.json", "w") as f:
        json.dump(meta, f)
    assert torch_model.read_meta(str(tmp_path))["model_type"] == "plmicd"
