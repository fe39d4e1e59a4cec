"""Tiny random ``transformers`` encoders saved as local HF folders (offline, CPU, seconds).

Every parameter (biases and LayerNorms included, which ``transformers`` initialises to 0 / 1) is
perturbed with noise so that parity tests exercise all of them.
"""
from __future__ import annotations

import os
import tempfile

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)

# vocab sizes match tests.utils.tiny_tokenizer_dir ("wordpiece": 300, pad 0; "bpe": 400, pad 1).
FAMILY_CONFIGS = {
    "bert": dict(vocab_size=300, pad_token_id=0, max_position_embeddings=64, type_vocab_size=2,
                 layer_norm_eps=1e-12),
    "roberta": dict(vocab_size=400, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5),
}


def tiny_config(family: str, **overrides):
    """A 2-layer ``BertConfig`` / ``RobertaConfig``."""
    import transformers

    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]
    return cls(**{**TINY, **FAMILY_CONFIGS[family], **overrides})


def perturb_(model, seed: int = 0, scale: float = 0.05):
    """Add N(0, scale) noise to every parameter, in place; returns the model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def tiny_model(family: str, *, task: str = "base", seed: int = 0, **overrides):
    """A perturbed tiny model in eval mode, eager attention; task "base" or "mlm"."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cfg._attn_implementation = "eager"
    classes = {("bert", "base"): transformers.BertModel,
               ("bert", "mlm"): transformers.BertForMaskedLM,
               ("roberta", "base"): transformers.RobertaModel,
               ("roberta", "mlm"): transformers.RobertaForMaskedLM}
    return perturb_(classes[family, task](cfg), seed).eval()


def save_tiny_model(model, out_dir: str | None = None, **save_kwargs) -> str:
    """``model.save_pretrained`` into ``out_dir`` (a new temp folder by default)."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="tiny_hf_")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir
