"""Encoder presets: where a pretrained encoder lives and how to chunk documents for it.

Each preset returns a ConfigDict fragment::

    path        local Hugging Face folder (a placeholder under models/: download the hub
                checkpoint there; nothing is fetched at run time)
    family      encoder family (medcode_jax.models.encoders: bert | roberta | modernbert | neobert);
                informative, the loader reads the family from path/config.json
    chunk_size  suggested tokens per chunk (spec models.md §1)
    max_length  suggested maximum document length in tokens (must equal the prepared shards')

`get(name)` looks a preset up by name (`PRESETS`), e.g. for `--config.encoder=modernbert_base`.
"""
from __future__ import annotations

from collections.abc import Callable

import ml_collections


def _preset(path: str, family: str, chunk_size: int, max_length: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"path": path, "family": family, "chunk_size": chunk_size, "max_length": max_length})


def roberta_pm_m3_voc() -> ml_collections.ConfigDict:
    """RoBERTa-base-PM-M3-Voc-distill-align (the PLM-ICD / PLM-CA encoder): 514 positions."""
    return _preset("models/RoBERTa-base-PM-M3-Voc-distill-align-hf", "roberta", 128, 6000)


def minilm() -> ml_collections.ConfigDict:
    """BERT-family MiniLM-L6 (all-MiniLM-L6-v2, 512 positions); the demo uses the wheel's copy."""
    return _preset("models/all-MiniLM-L6-v2", "bert", 128, 6000)


def modernbert_base() -> ml_collections.ConfigDict:
    """answerdotai/ModernBERT-base: 8192 positions, so a whole note fits in one chunk."""
    return _preset("models/ModernBERT-base", "modernbert", 8192, 8192)


def modernbert_large() -> ml_collections.ConfigDict:
    """answerdotai/ModernBERT-large (28 layers, D 1024): one chunk per note."""
    return _preset("models/ModernBERT-large", "modernbert", 8192, 8192)


def bioclinical_modernbert() -> ml_collections.ConfigDict:
    """thomas-sounack/BioClinical-ModernBERT-base (clinical continued pre-training, 8192
    positions)."""
    return _preset("models/BioClinical-ModernBERT-base", "modernbert", 8192, 8192)


def neobert() -> ml_collections.ConfigDict:
    """chandar-lab/NeoBERT (28 x 768, 4096 positions): notes longer than 4096 tokens get two
    chunks."""
    return _preset("models/NeoBERT", "neobert", 4096, 8192)


PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "roberta_pm_m3_voc": roberta_pm_m3_voc,
    "minilm": minilm,
    "modernbert_base": modernbert_base,
    "modernbert_large": modernbert_large,
    "bioclinical_modernbert": bioclinical_modernbert,
    "neobert": neobert,
}


def get(name: str) -> ml_collections.ConfigDict:
    """The preset called ``name`` (a key of ``PRESETS``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown encoder preset {name!r}; known: {sorted(PRESETS)}") from None
