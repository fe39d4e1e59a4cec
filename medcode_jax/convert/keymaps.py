"""Declarative key tables between Hugging Face checkpoints and our NNX parameter paths.

One ``KeyTable`` per encoder family, used in both directions: ``to_ours`` when loading a
checkpoint (``hf_io.load_pretrained_into``) and ``to_hf`` when exporting
(``hf_io.encoder_state_dict``). Each ``Rule`` pairs an HF key template with our parameter path
(dot-joined ``nnx.state`` path); ``{i}`` stands for the layer index in both. Its ``Transform``
converts the array (PyTorch ``Linear.weight`` is ``[out, in]``, our kernels are ``[in, out]``).

Adding a family:
1. write its module so that every parameter has a stable path (``layers.{i}.…``);
2. write a ``KeyTable`` here: one ``Rule`` per HF tensor (``TRANSPOSE`` for linear weights,
   ``IDENTITY`` for embeddings, norms and biases, ``_fused_linear`` for a fused ``Linear``
   held by a ``FusedDense``, a ``Transform`` with two functions for other reshapes), the
   task prefixes its hub checkpoints carry (``model.``), the buffers to ignore, and the
   task-head keys to skip;
3. reference it from the family's entry in ``medcode_jax.models.encoders._FAMILIES``.
The loader then reports, in one error, every HF key no rule reads and every parameter no key
fills, and ``AutoModel.from_pretrained`` of an export is checked by the round-trip tests.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of inverse array maps: HF tensor -> our parameter and back."""

    name: str
    to_ours: Callable[[Array], Array]
    to_hf: Callable[[Array], Array]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
TRANSPOSE = Transform("transpose", lambda x: np.ascontiguousarray(x.T),
                      lambda x: np.ascontiguousarray(x.T))


def _fused(parts: int) -> tuple[Transform, Transform]:
    """Transforms for a fused ``Linear`` whose ``[parts·out, in]`` weight stacks ``parts``
    projections: weight <-> ``FusedDense`` kernel ``[in, parts, out]``, bias ``[parts·out]`` <->
    ``[parts, out]``."""
    kernel = Transform(
        f"split{parts}-transpose",
        lambda x: np.ascontiguousarray(x.T).reshape(x.shape[1], parts, x.shape[0] // parts),
        lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1).T))
    bias = Transform(f"split{parts}", lambda x: x.reshape(parts, -1), lambda x: x.reshape(-1))
    return kernel, bias


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """``hf`` key template <-> ``ours`` parameter path template, with a ``Transform``."""

    hf: str
    ours: str
    transform: Transform = IDENTITY

    def __post_init__(self) -> None:
        if ("{i}" in self.hf) != ("{i}" in self.ours):
            raise ValueError(f"rule {self.hf!r} -> {self.ours!r}: '{{i}}' must be in both or neither")
        object.__setattr__(self, "_hf_re", _template_regex(self.hf))
        object.__setattr__(self, "_ours_re", _template_regex(self.ours))

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


class Match(NamedTuple):
    """A key resolved through a rule: the other side's name and the layer index (or None)."""

    key: str
    layer: int | None
    rule: Rule


def _resolve(pattern: re.Pattern[str], key: str, template: str, rule: Rule) -> Match | None:
    m = pattern.match(key)
    if m is None:
        return None
    layer = int(m.group("i")) if rule.per_layer else None
    return Match(template.replace("{i}", str(layer)) if layer is not None else template, layer, rule)


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """The HF <-> ours key table of one family.

    prefixes: task-model prefixes stripped from HF keys (``bert.`` in ``BertForMaskedLM``).
    ignored: regexes of HF keys that are not parameters of the encoder and are neither loaded nor
      reported (buffers such as ``embeddings.position_ids``; the pooler, read separately).
    head_keys: regexes of task-head keys (MLM / NSP / classifier) skipped with a note.
    pooler_prefix: HF prefix of the pooler tensors (``hf_io.read_pooler``), None if the family
      has no pooler.
    """

    rules: tuple[Rule, ...]
    prefixes: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    head_keys: tuple[str, ...] = ()
    pooler_prefix: str | None = None

    def __post_init__(self) -> None:
        for side in ("hf", "ours"):
            names = [getattr(r, side) for r in self.rules]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"key table has duplicate {side} templates: {sorted(dup)}")

    def strip_prefix(self, key: str) -> str:
        """``key`` without a leading task prefix (at most one is removed)."""
        for prefix in self.prefixes:
            if key.startswith(prefix):
                return key[len(prefix):]
        return key

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignored)

    def is_head(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.head_keys)

    def to_ours(self, hf_key: str) -> Match | None:
        """Our parameter path for a (prefix-stripped) HF key, or None if no rule reads it."""
        for rule in self.rules:
            m = _resolve(rule._hf_re, hf_key, rule.ours, rule)  # type: ignore[attr-defined]
            if m is not None:
                return m
        return None

    def to_hf(self, our_path: str) -> Match | None:
        """The HF key (no prefix) for one of our parameter paths, or None if no rule writes it."""
        for rule in self.rules:
            m = _resolve(rule._ours_re, our_path, rule.hf, rule)  # type: ignore[attr-defined]
            if m is not None:
                return m
        return None


def _linear(hf: str, ours: str) -> tuple[Rule, Rule]:
    """A PyTorch ``Linear`` (``weight [out, in]``, ``bias``) -> our ``Dense`` (``kernel [in, out]``)."""
    return (Rule(f"{hf}.weight", f"{ours}.kernel", TRANSPOSE),
            Rule(f"{hf}.bias", f"{ours}.bias"))


def _layer_norm(hf: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{hf}.weight", f"{ours}.scale"), Rule(f"{hf}.bias", f"{ours}.bias")


_L = "encoder.layer.{i}"
_O = "layers.{i}"

# BertModel / RobertaModel / XLMRobertaModel (same key names).
BERT = KeyTable(
    rules=(
        Rule("embeddings.word_embeddings.weight", "embeddings.word_embeddings.embedding"),
        Rule("embeddings.position_embeddings.weight", "embeddings.position_embeddings.embedding"),
        Rule("embeddings.token_type_embeddings.weight",
             "embeddings.token_type_embeddings.embedding"),
        *_layer_norm("embeddings.LayerNorm", "embeddings.layer_norm"),
        *_linear(f"{_L}.attention.self.query", f"{_O}.attention.query"),
        *_linear(f"{_L}.attention.self.key", f"{_O}.attention.key"),
        *_linear(f"{_L}.attention.self.value", f"{_O}.attention.value"),
        *_linear(f"{_L}.attention.output.dense", f"{_O}.attention.output"),
        *_layer_norm(f"{_L}.attention.output.LayerNorm", f"{_O}.attention_norm"),
        *_linear(f"{_L}.intermediate.dense", f"{_O}.mlp.intermediate"),
        *_linear(f"{_L}.output.dense", f"{_O}.mlp.output"),
        *_layer_norm(f"{_L}.output.LayerNorm", f"{_O}.mlp_norm"),
    ),
    prefixes=("bert.", "roberta.", "model."),
    ignored=(r"embeddings\.position_ids", r"embeddings\.token_type_ids", r"pooler\..*"),
    head_keys=(r"cls\..*", r"lm_head\..*", r"classifier\..*", r"qa_outputs\..*"),
    pooler_prefix="pooler.",
)


def _fused_linear(hf: str, ours: str, parts: int) -> tuple[Rule, Rule]:
    kernel, bias = _fused(parts)
    return Rule(f"{hf}.weight", f"{ours}.kernel", kernel), Rule(f"{hf}.bias", f"{ours}.bias", bias)


_M = "layers.{i}"

# ModernBertModel. Biases and LayerNorm biases exist only when config.json sets attention_bias /
# mlp_bias / norm_bias (a parameter the model does not have is reported, not silently dropped).
# Layer 0 has no attn_norm. Wqkv is [3D, D] laid out (3, heads, head_dim); Wi is [2I, D]
# (input half, then gate half).
MODERNBERT = KeyTable(
    rules=(
        Rule("embeddings.tok_embeddings.weight", "embeddings.tok_embeddings.embedding"),
        *_layer_norm("embeddings.norm", "embeddings.norm"),
        *_layer_norm(f"{_M}.attn_norm", f"{_M}.attn_norm"),
        *_fused_linear(f"{_M}.attn.Wqkv", f"{_M}.attn.qkv", 3),
        *_linear(f"{_M}.attn.Wo", f"{_M}.attn.out"),
        *_layer_norm(f"{_M}.mlp_norm", f"{_M}.mlp_norm"),
        *_fused_linear(f"{_M}.mlp.Wi", f"{_M}.mlp.wi", 2),
        *_linear(f"{_M}.mlp.Wo", f"{_M}.mlp.wo"),
        *_layer_norm("final_norm", "final_norm"),
    ),
    prefixes=("model.",),
    head_keys=(r"head\..*", r"decoder\..*", r"classifier\..*", r"qa_outputs\..*"),
)

_N = "transformer_encoder.{i}"

# chandar-lab/NeoBERT (hub remote code). qkv is [3D, D] laid out per head (heads, 3, head_dim):
# kept fused ([D, 3D]) and split at run time, so the table needs no head count. w12 is [2F, D]
# (w1 half, then w2 half).
NEOBERT = KeyTable(
    rules=(
        Rule("encoder.weight", "tok_embeddings.embedding"),
        Rule(f"{_N}.attention_norm.weight", f"{_O}.attention_norm.scale"),
        Rule(f"{_N}.qkv.weight", f"{_O}.attn.qkv.kernel", TRANSPOSE),
        Rule(f"{_N}.wo.weight", f"{_O}.attn.out.kernel", TRANSPOSE),
        Rule(f"{_N}.ffn_norm.weight", f"{_O}.mlp_norm.scale"),
        Rule(f"{_N}.ffn.w12.weight", f"{_O}.mlp.wi.kernel", _fused(2)[0]),
        Rule(f"{_N}.ffn.w3.weight", f"{_O}.mlp.wo.kernel", TRANSPOSE),
        Rule("layer_norm.weight", "final_norm.scale"),
    ),
    prefixes=("model.",),
    head_keys=(r"decoder\..*", r"dense\..*", r"classifier\..*"),
)
