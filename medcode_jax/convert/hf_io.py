"""Hugging Face checkpoint folders <-> our encoders (safetensors only, never pickle).

Reading: ``model.safetensors`` or a sharded ``model.safetensors.index.json``; any float dtype
(bf16 / fp16 / fp32) is converted to the parameter dtype. A folder with only
``pytorch_model.bin`` is refused with the command that converts it (unpickling an untrusted
file can run arbitrary code).

Pooler decision: our encoders return the last hidden state and have no pooler, but
``transformers.AutoModel`` builds one for BERT / RoBERTa and the reference project's model
loads it strictly. ``read_pooler`` reads the pretrained pooler tensors so that an export can
carry them through unchanged (``save_hf_encoder(..., pooler=read_pooler(src))``). With
``pooler=None`` no pooler is written (the flavour without a pooler); ``AutoModel`` then reports
``pooler.dense.*`` as missing and initialises them randomly, which does not affect
``last_hidden_state``.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx

from medcode_jax.convert import keymaps
from medcode_jax.models.encoders import EncoderConfig, get_family, read_encoder_config

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every problem."""


def read_safetensors_file(file: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only memory-mapped numpy arrays.

    The format is an 8-byte little-endian header size, a JSON header
    (``{name: {dtype, shape, data_offsets}}``) and the raw data. Read here directly because the
    ``safetensors`` numpy backend cannot represent bf16; ``ml_dtypes`` can.
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"{file}: not a safetensors file (header size {n} > file size)")
        header = json.loads(f.read(n))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape)) * dtype.itemsize or end > size - 8 - n:
            raise ValueError(f"{file}: tensor {name!r} has inconsistent offsets {begin}..{end}")
        raw = data[begin:end] if data is not None else np.zeros(0, np.uint8)
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return out


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the HF folder ``path`` (single or sharded safetensors), by HF key."""
    single, index = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return read_safetensors_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = os.path.join(path, shard)
            if not os.path.isfile(shard_file):
                raise FileNotFoundError(f"{index} names shard {shard!r}, which is not in {path}")
            tensors.update(read_safetensors_file(shard_file))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{index} lists tensors that no shard contains: {absent}")
        return tensors
    if any(os.path.isfile(os.path.join(path, f))
           for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise FileNotFoundError(
            f"{path} holds only pytorch_model.bin (a pickle, which we never load: it can run "
            "arbitrary code). Convert it to safetensors once, from a trusted environment: "
            "python -c \"import transformers as t; "
            f"t.AutoModel.from_pretrained('{path}').save_pretrained('{path}')\"")
    raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}")


def read_pooler(path: str) -> dict[str, np.ndarray] | None:
    """The pretrained pooler tensors of ``path`` (HF names, fp32), or None if it has none."""
    table = get_family(read_encoder_config(path).family).key_table
    if table.pooler_prefix is None:
        return None
    pooler = {}
    for raw_key, value in read_checkpoint(path).items():
        key = table.strip_prefix(raw_key)
        if key.startswith(table.pooler_prefix):
            pooler[key] = np.array(value, dtype=np.float32)
    return pooler or None


def _params(encoder: nnx.Module) -> dict[str, nnx.Param]:
    """Our parameters by dot-joined path (``layers.0.attention.query.kernel``)."""
    return {".".join(str(p) for p in path): var for path, var in nnx.iter_graph(encoder)
            if isinstance(var, nnx.Param)}


def load_pretrained_into(encoder: nnx.Module, cfg: EncoderConfig, path: str) -> None:
    """Overwrite ``encoder``'s parameters with the checkpoint in the HF folder ``path``.

    Task prefixes are stripped, keys are mapped through the family's key table, layers beyond
    ``cfg.num_layers`` are skipped, and every missing / unexpected key and shape mismatch is
    reported in one ``CheckpointMismatchError``. Each value keeps the sharding of the parameter
    it replaces (``jax.device_put(value, param.sharding)``) and takes its dtype.
    """
    table = get_family(cfg.family).key_table
    params = _params(encoder)
    found: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    unexpected, mismatched, heads = [], [], []
    mismatched_params: set[str] = set()
    for raw_key, value in read_checkpoint(path).items():
        key = table.strip_prefix(raw_key)
        if table.is_ignored(key):
            continue
        if table.is_head(key):
            heads.append(raw_key)
            continue
        match = table.to_ours(key)
        if match is None:
            unexpected.append(f"{raw_key} (no rule for this key in the {cfg.family} key table)")
            continue
        if match.layer is not None and match.layer >= cfg.num_layers:
            continue  # the config keeps only the first num_layers layers
        if match.key not in params:
            unexpected.append(f"{raw_key} (maps to {match.key}, which this model does not have)")
            continue
        if match.key in found:
            unexpected.append(f"{raw_key} (duplicate of {source[match.key]})")
            continue
        value = match.rule.transform.to_ours(np.asarray(value))
        want = tuple(params[match.key].shape)
        if value.shape != want:
            mismatched.append(f"{raw_key}: checkpoint {tuple(value.shape)} (after "
                              f"{match.rule.transform.name}) vs model {match.key} {want}")
            mismatched_params.add(match.key)
            continue
        found[match.key] = value
        source[match.key] = raw_key
    missing = [f"{_hf_name(table, p)} (for {p})" for p in params
               if p not in found and p not in mismatched_params]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {path} does not fit the {cfg.family} encoder "
                 f"({cfg.num_layers} layers):"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                parts.append(f"  {title} ({len(items)}):")
                parts.extend(f"    {item}" for item in items)
        raise CheckpointMismatchError("\n".join(parts))
    if heads:
        log.info("%s: skipped %d task-head tensors (e.g. %s)", path, len(heads), heads[0])
    for p, value in found.items():
        var = params[p]
        current = var.get_value()
        var.set_value(jax.device_put(value.astype(current.dtype), current.sharding))


def _hf_name(table: keymaps.KeyTable, our_path: str) -> str:
    match = table.to_hf(our_path)
    return match.key if match is not None else f"<no rule writes {our_path}>"


def encoder_state_dict(encoder: nnx.Module, cfg: EncoderConfig) -> dict[str, np.ndarray]:
    """Our parameters as an HF-named (no task prefix) dict of fp32 numpy arrays.

    Parameters must be fully addressable from this process (gather them first on multi-host).
    """
    table = get_family(cfg.family).key_table
    out = {}
    for p, var in _params(encoder).items():
        match = table.to_hf(p)
        if match is None:
            raise ValueError(f"the {cfg.family} key table has no rule for parameter {p}")
        value = np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
        out[match.key] = np.ascontiguousarray(match.rule.transform.to_hf(value))
    return out


def save_hf_encoder(encoder: nnx.Module, cfg: EncoderConfig, out_dir: str,
                    pooler: Mapping[str, np.ndarray] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.AutoModel`` loads.

    ``pooler``: HF-named pooler tensors to carry through (``read_pooler(source)``); see the
    module docstring for what happens without them.
    """
    state = encoder_state_dict(encoder, cfg)
    if pooler:
        prefix = get_family(cfg.family).key_table.pooler_prefix
        if prefix is None:
            raise ValueError(f"the {cfg.family} family has no pooler, but pooler tensors were given")
        d = cfg.hidden_size
        expected = {f"{prefix}dense.weight": (d, d), f"{prefix}dense.bias": (d,)}
        got = {k: tuple(np.shape(v)) for k, v in pooler.items()}
        if got != expected:
            raise ValueError(f"pooler tensors {got} do not match the expected {expected}")
        state.update({k: np.asarray(v, dtype=np.float32) for k, v in pooler.items()})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_config(), f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(state, os.path.join(out_dir, SAFETENSORS_FILE),
                                metadata={"format": "pt"})
