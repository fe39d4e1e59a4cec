"""Encoder factory: one config dataclass for every family, a family registry, ``build_encoder``.

A *family* bundles what differs between encoder architectures: the HF ``model_type`` values it
accepts, the HF base class (for ``config.json`` ``architectures``), a parser from ``config.json``
to ``EncoderConfig`` fields and its inverse, the Flax module, and the checkpoint key table
(``medcode_jax.convert.keymaps``). To add a family, write ``models/<family>.py`` (module +
``parse_hf_config`` + ``hf_config_fields``), its key table in ``convert/keymaps.py``, and one
``Family`` entry in ``_FAMILIES`` below. Family-specific settings (e.g. rotary theta) go in
``EncoderConfig.options``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from medcode_jax.convert import keymaps
from medcode_jax.models import bert, modernbert, neobert

# config.json bookkeeping fields that are not carried into an exported config.
_TRANSIENT_HF_FIELDS = ("_name_or_path", "transformers_version", "architectures", "auto_map",
                        "torch_dtype", "dtype")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a pretrained encoder (the fields every family shares).

    ``options`` holds family-specific parsed settings; ``hf_config`` is the original
    ``config.json`` (kept so an exported config carries through fields we do not model, such as
    token ids). ``num_layers`` may be smaller than the checkpoint's layer count (keep the first
    ``num_layers`` layers).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    pad_token_id: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False,
                                                     compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"unknown encoder family {self.family!r}; known: {sorted(_FAMILIES)}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def with_options(self, **options: Any) -> EncoderConfig:
        """A copy with some ``options`` replaced (e.g. ``attention_impl="mask"``)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"unknown {self.family} encoder option(s) {unknown}; known: "
                             f"{sorted(self.options)}")
        return dataclasses.replace(self, options={**self.options, **options})

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, num_layers: int | None = None,
                       source: str = "config.json") -> EncoderConfig:
        """Parse a ``config.json`` dict; ``num_layers`` keeps only the first N layers."""
        model_type = hf.get("model_type")
        family = family_for_model_type(model_type, source=source)
        try:
            fields = family.parse_hf_config(hf)
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r} required for model_type "
                             f"{model_type!r}") from None
        available = fields["num_layers"]
        if num_layers is not None:
            if not 1 <= num_layers <= available:
                raise ValueError(f"{source}: num_layers={num_layers} requested but the checkpoint "
                                 f"has {available} layers (choose 1..{available})")
            fields["num_layers"] = num_layers
        return cls(family=family.name, hf_config=dict(hf), **fields)

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.AutoConfig`` reads as this architecture."""
        family = _FAMILIES[self.family]
        out = {k: v for k, v in self.hf_config.items() if k not in _TRANSIENT_HF_FIELDS}
        out.update(family.hf_config_fields(self))
        out.setdefault("model_type", family.model_types[0])
        out["architectures"] = [family.architectures[out["model_type"]]]
        return out


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything family-specific, looked up by ``EncoderConfig.family``."""

    name: str
    # HF model_type -> HF base-model class name (the first model_type is the default).
    architectures: Mapping[str, str]
    parse_hf_config: Callable[[Mapping[str, Any]], dict[str, Any]]
    hf_config_fields: Callable[[EncoderConfig], dict[str, Any]]
    module: Callable[..., nnx.Module]  # (cfg, *, rngs, dtype, param_dtype, remat) -> module
    key_table: keymaps.KeyTable

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.architectures)


_FAMILIES: dict[str, Family] = {
    "bert": Family("bert", {"bert": "BertModel"}, bert.parse_hf_config, bert.hf_config_fields,
                   bert.BertEncoder, keymaps.BERT),
    "roberta": Family("roberta", {"roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"},
                      bert.parse_hf_config, bert.hf_config_fields, bert.BertEncoder,
                      keymaps.BERT),
    "modernbert": Family("modernbert", {"modernbert": "ModernBertModel"},
                         modernbert.parse_hf_config, modernbert.hf_config_fields,
                         modernbert.ModernBertEncoder, keymaps.MODERNBERT),
    # Not in transformers: "NeoBERT" is the hub remote code's base class.
    "neobert": Family("neobert", {"neobert": "NeoBERT"}, neobert.parse_hf_config,
                      neobert.hf_config_fields, neobert.NeoBertEncoder, keymaps.NEOBERT),
}


def get_family(name: str) -> Family:
    """The registry entry for ``name`` (``EncoderConfig.family``)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown encoder family {name!r}; known: {sorted(_FAMILIES)}") from None


def family_for_model_type(model_type: Any, *, source: str = "config.json") -> Family:
    """The family that reads HF ``model_type``."""
    for family in _FAMILIES.values():
        if model_type in family.architectures:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {known}")


def read_encoder_config(path: str, num_layers: int | None = None) -> EncoderConfig:
    """Read ``config.json`` from a local HF model folder (optionally keeping N layers)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path!r}: expected a local Hugging Face model "
                                "folder (config.json + model.safetensors)")
    with open(file, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
    return EncoderConfig.from_hf_config(hf, num_layers=num_layers, source=file)


def build_encoder(cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                  param_dtype: jnp.dtype = jnp.float32, remat: bool = False) -> nnx.Module:
    """A randomly initialised encoder for ``cfg``.

    The module's ``__call__(input_ids [N, c] int32, attention_mask [N, c], *,
    deterministic=True)`` returns the last hidden state ``[N, c, D]`` in ``dtype``.
    ``remat=True`` rematerialises each layer in the backward pass (``nnx.remat``).
    """
    return get_family(cfg.family).module(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                         remat=remat)
