"""Export a trained PLM-ICD / PLM-CA model to PyTorch, and import reference weights back.

Spec: ``export.md``. ``export_model`` writes, atomically (``OUT.tmp-XXXX/`` then rename; on any
failure, the parity check included, the temporary folder is deleted and the error re-raised)::

    OUT/
      encoder/               HF folder: config.json, model.safetensors (with the pooler), tokenizer
      model.safetensors      whole model, reference naming (see below)
      best_model.pt          {"model": state dict, "db": tensor(threshold), "num_classes", "epoch"}
      config.yaml            the reference's ``model:`` section, read by its ``load_trained_model``
      target_tokenizer.json  label space, JSON list (index = label id)
      config.json            our model settings (``medcode_jax.torch_model.read_meta``)
      descriptions.json      code -> description, label order (only if descriptions are given)

Reference naming (the ``PLMICD`` module of ``explainable_medical_coding/models/models.py``):
``roberta_encoder.<HF base-model key>`` for the encoder, whatever the family, and
``label_wise_attention.<name>`` for the head (``HEAD_TABLES``; torch ``Linear.weight`` is
``[out, in]``). Never ``embeddings.position_ids``.

Flavours: ``"fork"`` (default; ``ngray0/Automatic-Medical-Coding``) builds its encoder with the
pooling layer, so ``model.safetensors`` carries ``roberta_encoder.pooler.dense.{weight,bias}``;
``"emc"`` (``JoakimEdin/explainable-medical-coding``) builds it with ``add_pooling_layer=False``,
so they are left out. ``encoder/`` always holds the pooler so that ``AutoModel.from_pretrained``
reports no missing key.

Pooler decision: the pooler is never used by PLM-ICD, so it is carried through unchanged from
the pretrained checkpoint (``hf_io.read_pooler(encoder_path)``). If that checkpoint has none
(e.g. it was saved without it), a deterministic all-zero pooler is written (``tanh(0) = 0``: an
obviously untrained pooler, the same bytes on every export) rather than a random one.

The parity check runs the exported folder through ``medcode_jax.torch_model.load_exported`` and
the JAX model (fp32) on the same random multi-chunk inputs with padding (one document has an
all-padding chunk) and fails if the logits differ by more than ``tolerance``.

PLM-RR (``export_plmrr_model``): the same folder for the retrieve-and-re-rank cascade, in the
fork's token-level ``PLMICD`` layout (``roberta_encoder.*`` stage-2 encoder, ``frozen_encoder.*``
retriever encoder, ``label_wise_attention.*`` retriever head, ``_dynamic_token_attention.*``
re-ranker head through ``RERANKER_TABLE`` plus the two description buffers), ``config.json``
``model_type: "plmrr"``; its parity check runs the whole cascade (``plmrr_cascade``).

Import (``import_reference_state_dict``): reference-named weights (our ``model.safetensors``, or
a reference ``best_model.pt`` read with ``torch.load(weights_only=True)``) into our nnx model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_prep.shards import TOKENIZER_FILES
from medcode_jax import torch_model
from medcode_jax.convert import hf_io
from medcode_jax.convert.keymaps import TRANSPOSE, KeyTable, Rule
from medcode_jax.models.encoders import EncoderConfig, build_encoder, get_family
from medcode_jax.models.heads import LabelAttention, LabelCrossAttention
from medcode_jax.models import plm_icd
from medcode_jax.models.plm_icd import PLMICD, create_plmicd
from medcode_jax.models.reranker import PLMRR, create_plmrr

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BEST_MODEL_FILE = "best_model.pt"
YAML_FILE = "config.yaml"
LABELS_FILE = "target_tokenizer.json"
DESCRIPTIONS_FILE = "descriptions.json"
DEFAULT_TOLERANCE = 1e-4
# Prefix torch.compile adds to every state-dict key (seen in reference checkpoints).
_COMPILE_PREFIX = "_orig_mod."

# Reference head parameter <-> our head parameter path (same rule type as the encoder tables).
HEAD_TABLES: dict[str, KeyTable] = {
    "cross_attention": KeyTable(rules=(
        Rule("weights_k.weight", "weights_k.kernel", TRANSPOSE),
        Rule("label_representations", "label_representations"),
        Rule("weights_v.weight", "weights_v.kernel", TRANSPOSE),
        Rule("weights_v.bias", "weights_v.bias"),
        Rule("output_linear.weight", "output_linear.kernel", TRANSPOSE),
        Rule("output_linear.bias", "output_linear.bias"),
        Rule("layernorm.weight", "layernorm.scale"),
        Rule("layernorm.bias", "layernorm.bias"),
    )),
    "laat": KeyTable(rules=(
        Rule("first_linear.weight", "first_linear.kernel", TRANSPOSE),
        Rule("second_linear.weight", "second_linear.kernel", TRANSPOSE),
        Rule("third_linear.weight", "third_linear.kernel", TRANSPOSE),
        Rule("third_linear.bias", "third_linear.bias"),
    )),
}


# The PLM-RR re-ranker head (fork: ``_dynamic_token_attention``, class
# ``DynamicTokenLevelCrossAttention``) <-> ``reranker.DescriptionCrossAttention``. Its two
# description buffers are data (``PLMRR.description_ids`` / ``description_mask``), written
# separately by ``plmrr_state_dict``.
RERANKER_TABLE = KeyTable(rules=(
    Rule("q_proj.weight", "q_proj.kernel", TRANSPOSE),
    Rule("k_proj.weight", "k_proj.kernel", TRANSPOSE),
    Rule("v_proj.weight", "v_proj.kernel", TRANSPOSE),
    Rule("layernorm.weight", "layernorm.scale"),
    Rule("layernorm.bias", "layernorm.bias"),
    Rule("output_linear.weight", "output_linear.kernel", TRANSPOSE),
    Rule("output_linear.bias", "output_linear.bias"),
))


class ExportParityError(RuntimeError):
    """The exported PyTorch model's logits differ from the JAX model's."""


def head_type_of(model: PLMICD) -> str:
    """``"cross_attention"`` or ``"laat"`` from the model's head class."""
    head = model.label_wise_attention
    if isinstance(head, LabelCrossAttention):
        return "cross_attention"
    if isinstance(head, LabelAttention):
        return "laat"
    raise TypeError(f"cannot export head {type(head).__name__}: only LabelCrossAttention and "
                    "LabelAttention (LAAT) have a reference layout.")


def _params(module: nnx.Module) -> dict[str, nnx.Param]:
    """Parameters by dot-joined path (``label_wise_attention.weights_k.kernel``)."""
    return {".".join(str(p) for p in path): var for path, var in nnx.iter_graph(module)
            if isinstance(var, nnx.Param)}


def _zero_pooler(cfg: EncoderConfig, prefix: str) -> dict[str, np.ndarray]:
    d = cfg.hidden_size
    return {f"{prefix}dense.weight": np.zeros((d, d), np.float32),
            f"{prefix}dense.bias": np.zeros((d,), np.float32)}


def pooler_for_export(cfg: EncoderConfig, encoder_path: str | None) -> dict[str, np.ndarray] | None:
    """HF-named pooler tensors to export: the pretrained ones, else zeros; None if no pooler."""
    prefix = get_family(cfg.family).key_table.pooler_prefix
    if prefix is None:
        return None
    pooler = hf_io.read_pooler(encoder_path) if encoder_path else None
    if pooler is None:
        log.warning("no pretrained pooler found (encoder_path=%r): exporting an all-zero pooler "
                    "(unused by PLM-ICD)", encoder_path)
        return _zero_pooler(cfg, prefix)
    return pooler


def reference_state_dict(model: PLMICD, cfg: EncoderConfig, *, flavour: str = "fork",
                         pooler: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The whole model as fp32 numpy arrays in the reference ``PLMICD`` naming.

    ``pooler`` (HF names, e.g. ``pooler.dense.weight``) is required in the ``"fork"`` flavour
    for families with a pooler and is ignored in ``"emc"``.
    """
    if flavour not in torch_model.FLAVOURS:
        raise ValueError(f"flavour {flavour!r} is not one of {torch_model.FLAVOURS}.")
    out = _encoder_entries(model.encoder, cfg, torch_model.ENCODER_PREFIX, flavour=flavour,
                           pooler=pooler)
    out.update(_table_entries(model.label_wise_attention, HEAD_TABLES[head_type_of(model)],
                              torch_model.HEAD_PREFIX))
    return out


def _encoder_entries(encoder: nnx.Module, cfg: EncoderConfig, prefix: str, *, flavour: str,
                     pooler: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """An encoder's tensors under ``prefix`` (family key table; the pooler in "fork")."""
    table = get_family(cfg.family).key_table
    out = {prefix + k: v for k, v in hf_io.encoder_state_dict(encoder, cfg).items()
           if not table.is_ignored(k)}
    if flavour == "fork" and table.pooler_prefix is not None:
        if not pooler:
            raise ValueError("the 'fork' flavour needs the pooler tensors (pooler_for_export); "
                             "use flavour='emc' for the reference class without a pooler.")
        out.update({prefix + k: np.asarray(v, np.float32) for k, v in pooler.items()})
    return out


def _table_entries(module: nnx.Module, table: KeyTable, prefix: str) -> dict[str, np.ndarray]:
    """``module``'s parameters as reference-named fp32 tensors, one per rule of ``table``."""
    params = _params(module)
    out = {}
    for rule in table.rules:
        value = np.asarray(jax.device_get(params[rule.ours][...]), dtype=np.float32)
        out[prefix + rule.hf] = np.ascontiguousarray(rule.transform.to_hf(value))
    return out


# --- import -----------------------------------------------------------------------------------

def read_reference_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference-named tensors from a safetensors file, an export folder, or a ``.pt`` file.

    A ``.pt`` checkpoint (the reference trainer's ``best_model.pt``) is read with
    ``torch.load(weights_only=True)`` — tensors and plain values only, no arbitrary code — and
    only when its path is passed explicitly. Returns ``(tensors, info)`` where ``info`` holds
    ``threshold`` / ``epoch`` / ``num_classes`` when the file has them.
    """
    if os.path.isdir(path):
        path = os.path.join(path, torch_model.WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass a model.safetensors file, an export "
                                "folder, or a reference best_model.pt.")
    info: dict[str, Any] = {}
    if path.endswith(".safetensors"):
        # hf_io's reader handles bf16 / fp16 as well as fp32.
        tensors = dict(hf_io.read_safetensors_file(path))
    elif path.endswith((".pt", ".pth", ".bin")):
        import torch

        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file and the fix
            raise ValueError(f"{path} cannot be read with torch.load(weights_only=True) ({e}); "
                             "re-save its state dict with safetensors.torch.save_file.") from e
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a state dict or a dict with a 'model' state dict.")
        tensors = {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
        if "db" in checkpoint:
            info["threshold"] = float(checkpoint["db"])
        for key in ("epoch", "num_classes"):
            if key in checkpoint:
                info[key] = int(checkpoint[key])
    else:
        raise ValueError(f"{path}: unknown file type; expected .safetensors or a .pt checkpoint.")
    return {k.removeprefix(_COMPILE_PREFIX): v for k, v in tensors.items()}, info


def import_reference_state_dict(path: str, model: PLMICD, *,
                                encoder_cfg: EncoderConfig) -> dict[str, Any]:
    """Load reference-named weights (``read_reference_state_dict``) into our ``model``.

    The encoder goes through the family's key table (``convert.keymaps``), the head through
    ``HEAD_TABLES``; position-id buffers and the pooler are skipped (unused). Every missing,
    unexpected or mis-shaped key is reported in one ``hf_io.CheckpointMismatchError``; nothing
    is written unless all keys fit. Returns the file's ``info`` (threshold, epoch, ...).
    """
    tensors, info = read_reference_state_dict(path)
    enc_table = get_family(encoder_cfg.family).key_table
    head_table = HEAD_TABLES[head_type_of(model)]
    params = _params(model)
    found: dict[str, np.ndarray] = {}
    unexpected, mismatched, misshapen = [], [], set()
    for key, value in tensors.items():
        if key.startswith(torch_model.ENCODER_PREFIX):
            hf_key = key[len(torch_model.ENCODER_PREFIX):]
            if enc_table.is_ignored(hf_key):
                continue
            match, owner = enc_table.to_ours(hf_key), "encoder."
        elif key.startswith(torch_model.HEAD_PREFIX):
            match = head_table.to_ours(key[len(torch_model.HEAD_PREFIX):])
            owner = torch_model.HEAD_PREFIX
        else:
            match, owner = None, ""
        target = owner + match.key if match is not None else None
        if target is None or target not in params:
            unexpected.append(key)
            continue
        value = match.rule.transform.to_ours(np.asarray(value))
        want = tuple(params[target].shape)
        if value.shape != want:
            mismatched.append(f"{key}: file {value.shape} vs model {target} {want}")
            misshapen.add(target)
            continue
        found[target] = value
    missing = [f"{_reference_name(p, enc_table, head_table)} (for {p})" for p in params
               if p not in found and p not in misshapen]
    if missing or unexpected or mismatched:
        parts = [f"{path} does not fit the {encoder_cfg.family} / {head_type_of(model)} model:"]
        for title, items in (("missing", missing),
                             ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                parts.append(f"  {title} ({len(items)}):")
                parts.extend(f"    {item}" for item in sorted(items))
        if any(k.startswith(("frozen_encoder.", "_dynamic_token_attention.")) for k in unexpected):
            parts.append("  (a PLM-RR checkpoint: its stage-2 model is not a PLMICD)")
        raise hf_io.CheckpointMismatchError("\n".join(parts))
    for target, value in found.items():
        current = params[target][...]
        params[target][...] = jax.device_put(value.astype(current.dtype), current.sharding)
    return info


def _reference_name(our_path: str, enc_table: KeyTable, head_table: KeyTable) -> str:
    """The reference key that fills one of our parameter paths."""
    if our_path.startswith("encoder."):
        match, prefix = enc_table.to_hf(our_path[len("encoder."):]), torch_model.ENCODER_PREFIX
    else:
        match = head_table.to_hf(our_path[len(torch_model.HEAD_PREFIX):])
        prefix = torch_model.HEAD_PREFIX
    return prefix + match.key if match is not None else f"<no reference key for {our_path}>"


# --- export -----------------------------------------------------------------------------------

def export_model(
    model: PLMICD,
    *,
    encoder_cfg: EncoderConfig,
    encoder_path: str | None,
    label_space: Sequence[str],
    threshold: float,
    out_dir: str,
    flavour: str = "fork",
    descriptions: Sequence[str] | None = None,
    tokenizer_dir: str | None = None,
    config_dict: Mapping[str, Any] | None = None,
    epoch: int = 0,
    icd_version: int | None = None,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> str:
    """Write the export folder for ``model`` at ``out_dir`` (atomically) and check parity.

    ``encoder_path``: the pretrained HF folder the encoder came from (pooler and tokenizer
    source); ``tokenizer_dir``: tokenizer files to ship instead (the prepared dataset's
    ``tokenizer/``). ``config_dict``: the training config, kept in ``config.json``. Returns the
    absolute path of the folder. Raises ``ExportParityError`` if the PyTorch logits differ from
    the JAX logits by more than ``tolerance`` (nothing is left on disk then).
    """
    head_type = head_type_of(model)
    head = model.label_wise_attention
    labels = [str(c) for c in label_space]
    if len(labels) != head.num_labels:
        raise ValueError(f"label_space has {len(labels)} codes but the model has "
                         f"{head.num_labels} outputs; pass the label space it was trained on.")
    if len(set(labels)) != len(labels):
        raise ValueError("label_space has duplicate codes.")
    if descriptions is not None and len(descriptions) != len(labels):
        raise ValueError(f"descriptions has {len(descriptions)} entries for {len(labels)} codes.")
    if flavour not in torch_model.FLAVOURS:
        raise ValueError(f"flavour {flavour!r} is not one of {torch_model.FLAVOURS}.")
    with _export_dir(out_dir, overwrite) as (tmp, final):
        pooler = pooler_for_export(encoder_cfg, encoder_path)
        _write_encoder(model, encoder_cfg, os.path.join(tmp, torch_model.ENCODER_DIR), pooler,
                       tokenizer_dir or encoder_path)
        state = reference_state_dict(model, encoder_cfg, flavour=flavour, pooler=pooler)
        _write_weights(tmp, state, num_labels=len(labels), threshold=threshold, epoch=epoch)
        meta = {
            "format_version": FORMAT_VERSION,
            "family": encoder_cfg.family,
            "flavour": flavour,
            "head_type": head_type,
            "chunk_size": int(model.chunk_size),
            "pad_token_id": int(model.pad_token_id),
            "num_labels": len(labels),
            "hidden_size": int(encoder_cfg.hidden_size),
            "projection_size": int(head.projection_size) if head_type == "laat" else None,
            "scale": float(getattr(head, "scale", 1.0)),
            "mask_padding": bool(head.mask_padding),
            "unmasked_padding": str(model.unmasked_padding),
            "threshold": float(threshold),
            "epoch": int(epoch),
            "icd_version": icd_version,
            # PLM-RR settings (not used by PLM-ICD / PLM-CA).
            "num_candidates": None,
            "description_length": None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "training_config": _jsonable(config_dict) if config_dict is not None else None,
        }
        _write_json(os.path.join(tmp, torch_model.CONFIG_FILE), meta)
        _write_json(os.path.join(tmp, LABELS_FILE), labels)
        if descriptions is not None:
            _write_json(os.path.join(tmp, DESCRIPTIONS_FILE), dict(zip(labels, descriptions)))
        _write_reference_yaml(os.path.join(tmp, YAML_FILE), meta,
                              encoder_dir=os.path.join(final, torch_model.ENCODER_DIR))
        meta["parity_max_abs_diff"] = check_parity(model, encoder_cfg, tmp, tolerance=tolerance,
                                                   seed=seed)
        _write_json(os.path.join(tmp, torch_model.CONFIG_FILE), meta)
    log.info("exported %s (parity max |Δlogit| = %.2e)", final, meta["parity_max_abs_diff"])
    return final


def export_from_workdir(config: Any, workdir: str, export_dir: str | None = None, *,
                        flavour: str = "fork", overwrite: bool = False) -> str:
    """``--mode=export``: the best checkpoint of ``workdir`` -> ``export_dir`` (default
    ``WORKDIR/export``), built and restored exactly as ``train.py`` does.

    The threshold is the one tuned on validation (``best_threshold.json``; 0.5 if the run has
    not finished); the tokenizer shipped is the prepared dataset's ``tokenizer/`` (the one the
    model was trained with), else the encoder folder's. Single-process only: the parameters are
    gathered on this host.
    """
    from medcode_jax import train

    if jax.process_count() != 1:
        raise RuntimeError("export runs in a single process (it gathers all parameters on one "
                           "host); run --mode=export without the multi-host launcher.")
    out_dir = export_dir or os.path.join(workdir, "export")
    if os.path.exists(out_dir) and not overwrite:  # fail before the (slow) set-up
        raise FileExistsError(f"{out_dir} already exists; remove it, choose another "
                              "--export_dir, or pass overwrite=True.")
    run = train.load_trained(config, workdir)
    tokenizer_dir = os.path.join(str(run.ds.path), "tokenizer")
    step = int(run.state.step)
    return export_model(
        run.model(), encoder_cfg=run.encoder_config, encoder_path=config.encoder.path,
        label_space=run.ds.label_space, descriptions=run.ds.descriptions,
        threshold=train.read_threshold(workdir, int(run.state.step)),
        out_dir=out_dir, flavour=flavour,
        tokenizer_dir=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
        config_dict=config.to_dict(), epoch=step // max(run.steps_per_epoch, 1),
        icd_version=run.ds.metadata.get("icd_version"), overwrite=overwrite)


def _write_encoder(model: PLMICD, cfg: EncoderConfig, out: str,
                   pooler: Mapping[str, np.ndarray] | None, tokenizer_src: str | None) -> None:
    """``encoder/``: HF config + weights (with the pooler) + the tokenizer files."""
    hf_io.save_hf_encoder(model.encoder, cfg, out, pooler=pooler)
    copied = []
    if tokenizer_src and os.path.isdir(tokenizer_src):
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_src, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out, name))
                copied.append(name)
    if not copied:
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {tokenizer_src!r}; "
            "pass tokenizer_dir= the prepared dataset's tokenizer/ folder.")


def _write_weights(out: str, state: Mapping[str, np.ndarray], *, num_labels: int,
                   threshold: float, epoch: int) -> None:
    """``model.safetensors`` and the reference trainer's ``best_model.pt``."""
    import safetensors.numpy
    import torch

    safetensors.numpy.save_file(dict(state), os.path.join(out, torch_model.WEIGHTS_FILE),
                                metadata={"format": "pt"})
    checkpoint = {
        "model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
        "db": torch.tensor(float(threshold)),
        "num_classes": int(num_labels),
        "epoch": int(epoch),
    }
    torch.save(checkpoint, os.path.join(out, BEST_MODEL_FILE))


def _write_reference_yaml(path: str, meta: Mapping[str, Any], *, encoder_dir: str) -> None:
    """The reference's ``config.yaml`` (its ``load_trained_model`` reads ``model:``).

    ``model_path`` is the absolute path of ``encoder/`` at export time: edit it if the folder
    moves. The reference passes ``configs`` as keyword arguments to ``PLMICD``.
    """
    import yaml

    configs = {
        "model_path": encoder_dir,
        "chunk_size": meta["chunk_size"],
        "cross_attention": meta["head_type"] == "cross_attention",
        "scale": meta["scale"],
        "mask_input": False,
        "loss": "binary_cross_entropy",
        "lambda_1": 0.0,
    }
    if meta["flavour"] == "fork":
        configs.update(attention_type="label", init_with_descriptions=False,
                       freeze_label_embeddings=False, random_init=False)
    plmrr = meta.get("model_type") == "plmrr"
    if plmrr:
        # The fork re-tokenises the descriptions (truncation at max_desc_len, padded to the
        # longest) when it builds the model; the state dict's buffers then overwrite them.
        configs.update(attention_type="token_level", max_desc_len=meta["max_desc_len"],
                       pooling_temperature=1.0)
    if meta["icd_version"] is not None:
        configs["icd_version"] = meta["icd_version"]
    doc = {"model": {"name": "PLMICD", "autoregressive": False, "configs": configs}}
    if plmrr:
        doc["top_k"] = meta["top_k"]  # the fork's trainer reads it from the top level
    header = ("# Written by medcode_jax.export for the reference project's load_trained_model.\n"
              "# model_path: the exported encoder/ folder (edit it if this folder moves).\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(doc, sort_keys=False))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy (unknown leaves become strings)."""
    return json.loads(json.dumps(obj, default=str))


@contextlib.contextmanager
def _export_dir(out_dir: str, overwrite: bool) -> Iterator[tuple[str, str]]:
    """Yield (temporary folder, final path): the export is written into a temporary sibling of
    ``out_dir`` that replaces it only when the block (parity check included) succeeds, and is
    deleted on any failure — nothing half-written is ever left."""
    final = os.path.abspath(out_dir)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it, choose another export "
                              "directory, or pass overwrite=True.")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
    try:
        yield tmp, final
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is removed only after success."""
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=os.path.basename(final) + ".old-",
                               dir=os.path.dirname(final))
        os.rmdir(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- parity -----------------------------------------------------------------------------------

def parity_inputs(*, vocab_size: int, pad_token_id: int, chunk_size: int,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two documents of 3 chunks: one full, one of 1.5 chunks (its third chunk is all padding)."""
    rng = np.random.default_rng(seed)
    length = 3 * chunk_size
    ids = rng.integers(0, vocab_size - 1, size=(2, length))
    ids = np.where(ids >= pad_token_id, ids + 1, ids)  # never the pad id in real positions
    mask = np.ones((2, length), np.int32)
    mask[1, chunk_size + chunk_size // 2:] = 0
    ids = np.where(mask == 1, ids, pad_token_id)
    return ids.astype(np.int32), mask


def _computes_in_fp32(model: nnx.Module) -> bool:
    """Every parameter and every module's compute dtype is float32."""
    fp32 = jnp.dtype(jnp.float32)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and jnp.dtype(node[...].dtype) != fp32:
            return False
        if isinstance(node, nnx.Module):
            dtype = getattr(node, "dtype", None)
            if dtype is not None and jnp.dtype(dtype) != fp32:
                return False
    return True


def _fp32_model(model: PLMICD, cfg: EncoderConfig) -> PLMICD:
    """``model`` if it already computes in fp32, else an fp32 copy with the same parameters.

    The copy takes our parameters directly (not the exported file), so that a mapping error in
    the export cannot cancel out against the same error in the import.
    """
    if _computes_in_fp32(model):
        return model
    head = model.label_wise_attention
    copy = create_plmicd(
        build_encoder(cfg, rngs=nnx.Rngs(0)), num_labels=head.num_labels,
        head_type=head_type_of(model), chunk_size=model.chunk_size,
        pad_token_id=model.pad_token_id, scale=getattr(head, "scale", 1.0),
        mask_padding=head.mask_padding, unmasked_padding=model.unmasked_padding,
        rngs=nnx.Rngs(0))
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(jax.device_get(x), np.float32)),
                          nnx.state(model, nnx.Param))
    nnx.update(copy, params)
    return copy


def check_parity(model: PLMICD, cfg: EncoderConfig, export_dir: str, *,
                 tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> float:
    """Max |logit difference| between the JAX model and the exported PyTorch model (fp32).

    Raises ``ExportParityError`` if it exceeds ``tolerance``.
    """
    import torch

    ids, mask = parity_inputs(vocab_size=cfg.vocab_size, pad_token_id=model.pad_token_id,
                              chunk_size=model.chunk_size, seed=seed)
    reference = _fp32_model(model, cfg)
    # Unmasked `emc` heads attend to one more chunk of padding than a full batch has: give the
    # JAX model the room for it that the input pipeline reserves (PyTorch pads by itself).
    extra = plm_icd.reserve_tokens(model.label_wise_attention.mask_padding,
                                   model.unmasked_padding) * model.chunk_size
    jax_ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=model.pad_token_id)
    jax_mask = np.pad(mask, ((0, 0), (0, extra)))
    with jax.default_matmul_precision("highest"):
        jax_logits = np.asarray(reference(jnp.asarray(jax_ids), jnp.asarray(jax_mask),
                                          deterministic=True), dtype=np.float32)
    torch_net, _ = torch_model.load_exported(export_dir)
    with torch.no_grad():
        torch_logits = torch_net(torch.from_numpy(ids).long(),
                                 torch.from_numpy(mask).long()).float().numpy()
    diff = float(np.max(np.abs(jax_logits - torch_logits)))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportParityError(
            f"exported PyTorch logits differ from the JAX logits by {diff:.3e} "
            f"(tolerance {tolerance:.1e}) on {ids.shape[0]} documents of {ids.shape[1]} tokens; "
            "the export was not written. This is a bug in the export mapping or in "
            "medcode_jax.torch_model for this encoder family / head type.")
    return diff


# --- PLM-RR -----------------------------------------------------------------------------------
#
# The fork's PLMICD with ``attention_type="token_level"`` holds the whole cascade in one module:
# ``roberta_encoder`` (stage-2 encoder), ``frozen_encoder`` (retriever encoder),
# ``label_wise_attention`` (retriever LabelCrossAttention head) and ``_dynamic_token_attention``
# (re-ranker head + the tokenised descriptions as buffers). Both encoders are built from one
# ``model_path`` and the one ``scale`` setting goes to both heads (the retriever divides its
# scores by it, the re-ranker multiplies by ``scale / sqrt(D)``): what that layout cannot hold is
# refused by ``_check_plmrr_exportable``.

def plmrr_cascade(reranker: PLMRR, retriever: PLMICD, input_ids: jax.Array,
                  attention_mask: jax.Array, *, top_k: int, num_unique: int | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The inference cascade in JAX: retriever logits -> ``jax.lax.top_k`` -> re-ranker (the
    retriever logits as ``candidate_scores``) -> ``[B, C]`` with -1e9 off the candidates.

    Returns ``(logits [B, C] fp32, candidates [B, K] int32, retriever logits [B, C] fp32)``.
    """
    retriever_logits = retriever(input_ids, attention_mask, deterministic=True)
    top_scores, candidates = jax.lax.top_k(retriever_logits, top_k)
    scores = reranker(input_ids, attention_mask, candidates, top_scores, num_unique=num_unique,
                      deterministic=True)
    rows = jnp.arange(candidates.shape[0])[:, None]
    full = jnp.full(retriever_logits.shape, torch_model.NON_CANDIDATE_LOGIT, jnp.float32)
    return full.at[rows, candidates].set(scores.astype(jnp.float32)), candidates, retriever_logits


def _architecture(cfg: EncoderConfig) -> dict[str, Any]:
    """The fields of an encoder config that shape its weights and outputs (not dropout)."""
    skip = {"hf_config", "hidden_dropout", "attention_dropout", "initializer_range"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def _check_plmrr_exportable(reranker: PLMRR, retriever: PLMICD, *, encoder_cfg: EncoderConfig,
                            retriever_encoder_cfg: EncoderConfig, flavour: str) -> None:
    """Refuse, in one error, every setting the fork's PLM-RR layout cannot hold."""
    problems = []
    if flavour != "fork":
        problems.append(f"flavour {flavour!r}: PLM-RR exists only in the fork "
                        "(ngray0/Automatic-Medical-Coding); use flavour='fork'")
    if head_type_of(retriever) != "cross_attention":
        problems.append(f"retriever head {head_type_of(retriever)!r}: the fork's retriever is a "
                        "PLM-CA (cross_attention) head")
    elif float(retriever.label_wise_attention.scale) != 1.0:
        problems.append(f"retriever scale {retriever.label_wise_attention.scale}: the fork "
                        "passes one `scale` to both heads and its re-ranker multiplies its scores "
                        "by scale/sqrt(D) while ours uses 1/sqrt(D); only scale 1.0 is "
                        "representable")
    if getattr(reranker, "fuse_retriever", False) or hasattr(reranker, "fusion_alpha"):
        problems.append("retriever-score fusion (fuse_retriever=True, r + alpha * s): the fork's "
                        "re-ranker has no fusion weight")
    heads = int(getattr(reranker.rerank_attention, "num_heads", 1))
    if heads != 1:
        problems.append(f"num_heads={heads}: the fork's re-ranker is single-head")
    ours, theirs = _architecture(encoder_cfg), _architecture(retriever_encoder_cfg)
    if ours != theirs:
        diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        problems.append("the stage-2 and retriever encoders differ (stage-2 vs retriever: "
                        f"{diff}); the fork builds both from one model_path")
    for name in ("chunk_size", "pad_token_id"):
        if getattr(reranker, name) != getattr(retriever, name):
            problems.append(f"{name} differs: re-ranker {getattr(reranker, name)} vs retriever "
                            f"{getattr(retriever, name)}; the fork uses one")
    if reranker.num_labels != retriever.label_wise_attention.num_labels:
        problems.append(f"the re-ranker's description table has {reranker.num_labels} codes but "
                        f"the retriever scores {retriever.label_wise_attention.num_labels}")
    if problems:
        raise ValueError("cannot export this PLM-RR model in the reference layout:\n  - "
                         + "\n  - ".join(problems))


def _description_buffers(reranker: PLMRR) -> tuple[np.ndarray, np.ndarray]:
    """The description table as the fork's int64 buffers, trimmed to the longest description.

    The fork tokenises with ``padding=True`` (to the longest description), so its buffers are
    ``[C, longest]``; our table may carry more all-padding columns, which change nothing (they
    are masked) and are dropped so that a strict load into the fork fits.
    """
    ids = np.asarray(jax.device_get(reranker.description_ids[...]), dtype=np.int64)
    mask = np.asarray(jax.device_get(reranker.description_mask[...]), dtype=np.int64)
    used = np.nonzero((mask != 0).any(axis=0))[0]
    length = int(used.max()) + 1 if used.size else 1
    return np.ascontiguousarray(ids[:, :length]), np.ascontiguousarray(mask[:, :length])


def plmrr_state_dict(reranker: PLMRR, retriever: PLMICD, cfg: EncoderConfig, *,
                     flavour: str = "fork", pooler: Mapping[str, np.ndarray] | None = None
                     ) -> dict[str, np.ndarray]:
    """The cascade in the fork's ``PLMICD`` (token_level) naming: both encoders (with the pooler
    in "fork"), the retriever head, the re-ranker head and the two description buffers."""
    out = _encoder_entries(reranker.encoder, cfg, torch_model.ENCODER_PREFIX, flavour=flavour,
                           pooler=pooler)
    out.update(_encoder_entries(retriever.encoder, cfg, torch_model.FROZEN_ENCODER_PREFIX,
                                flavour=flavour, pooler=pooler))
    out.update(_table_entries(retriever.label_wise_attention, HEAD_TABLES["cross_attention"],
                              torch_model.HEAD_PREFIX))
    out.update(_table_entries(reranker.rerank_attention, RERANKER_TABLE,
                              torch_model.RERANKER_PREFIX))
    buffers = _description_buffers(reranker)
    for name, value in zip(torch_model.DESCRIPTION_BUFFERS, buffers):
        out[torch_model.RERANKER_PREFIX + name] = value
    return out


def export_plmrr_model(
    reranker: PLMRR,
    retriever: PLMICD,
    *,
    encoder_cfg: EncoderConfig,
    retriever_encoder_cfg: EncoderConfig,
    encoder_path: str | None,
    label_space: Sequence[str],
    descriptions: Sequence[str],
    top_k: int,
    threshold: float,
    out_dir: str,
    flavour: str = "fork",
    tokenizer_dir: str | None = None,
    config_dict: Mapping[str, Any] | None = None,
    epoch: int = 0,
    icd_version: int | None = None,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> str:
    """Write the PLM-RR export folder (stage-2 ``reranker`` + stage-1 ``retriever``) at
    ``out_dir``, atomically, and check parity of the whole cascade with top ``top_k``.

    Same folder as ``export_model`` (``encoder/`` holds the stage-2 encoder) with
    ``model_type: "plmrr"`` in ``config.json``, the fork's token-level ``config.yaml`` (and
    ``top_k`` at its top level, where the fork's trainer reads it) and ``descriptions.json``.
    ``encoder_path``: the pretrained HF folder both encoders started from (pooler, tokenizer).
    Raises ``ValueError`` for what the fork cannot hold (``_check_plmrr_exportable``) and
    ``ExportParityError`` if the PyTorch cascade differs from the JAX one (nothing is left on
    disk then). Returns the absolute path of the folder.
    """
    _check_plmrr_exportable(reranker, retriever, encoder_cfg=encoder_cfg,
                            retriever_encoder_cfg=retriever_encoder_cfg, flavour=flavour)
    labels = [str(c) for c in label_space]
    num_labels = reranker.num_labels
    if len(labels) != num_labels:
        raise ValueError(f"label_space has {len(labels)} codes but the model has {num_labels}; "
                         "pass the label space it was trained on.")
    if len(set(labels)) != len(labels):
        raise ValueError("label_space has duplicate codes.")
    if descriptions is None or len(descriptions) != len(labels):
        raise ValueError(f"descriptions must give one text per code ({len(labels)} codes), got "
                         f"{None if descriptions is None else len(descriptions)}.")
    if not isinstance(top_k, (int, np.integer)) or not 1 <= int(top_k) <= num_labels:
        raise ValueError(f"top_k must be an integer in [1, {num_labels}], got {top_k!r}.")
    top_k = int(top_k)
    with _export_dir(out_dir, overwrite) as (tmp, final):
        pooler = pooler_for_export(encoder_cfg, encoder_path)
        _write_encoder(reranker, encoder_cfg, os.path.join(tmp, torch_model.ENCODER_DIR), pooler,
                       tokenizer_dir or encoder_path)
        state = plmrr_state_dict(reranker, retriever, encoder_cfg, flavour=flavour,
                                 pooler=pooler)
        _write_weights(tmp, state, num_labels=num_labels, threshold=threshold, epoch=epoch)
        head = retriever.label_wise_attention
        desc_length = int(state[torch_model.RERANKER_PREFIX + "description_input_ids"].shape[1])
        meta = {
            "format_version": FORMAT_VERSION,
            "model_type": "plmrr",
            "family": encoder_cfg.family,
            "flavour": flavour,
            "head_type": "cross_attention",  # the retriever's head
            "chunk_size": int(reranker.chunk_size),
            "pad_token_id": int(reranker.pad_token_id),
            "num_labels": num_labels,
            "hidden_size": int(encoder_cfg.hidden_size),
            "projection_size": None,
            "scale": float(head.scale),
            "mask_padding": bool(head.mask_padding),
            "threshold": float(threshold),
            "epoch": int(epoch),
            "icd_version": icd_version,
            "top_k": top_k,
            "num_candidates": top_k,
            "description_length": desc_length,
            "max_desc_len": int(reranker.description_ids[...].shape[1]),
            "num_heads": 1,
            "fuse_retriever": False,
            "non_candidate_logit": torch_model.NON_CANDIDATE_LOGIT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "training_config": _jsonable(config_dict) if config_dict is not None else None,
        }
        _write_json(os.path.join(tmp, torch_model.CONFIG_FILE), meta)
        _write_json(os.path.join(tmp, LABELS_FILE), labels)
        _write_json(os.path.join(tmp, DESCRIPTIONS_FILE),
                    dict(zip(labels, (str(d) for d in descriptions))))
        _write_reference_yaml(os.path.join(tmp, YAML_FILE), meta,
                              encoder_dir=os.path.join(final, torch_model.ENCODER_DIR))
        meta.update(check_plmrr_parity(reranker, retriever, encoder_cfg, retriever_encoder_cfg,
                                       tmp, top_k=top_k, tolerance=tolerance, seed=seed))
        _write_json(os.path.join(tmp, torch_model.CONFIG_FILE), meta)
    log.info("exported PLM-RR %s (parity max |Δlogit| = %.2e)", final,
             meta["parity_max_abs_diff"])
    return final


def _fp32_plmrr(model: PLMRR, cfg: EncoderConfig) -> PLMRR:
    """``model`` if it computes in fp32, else an fp32 copy with the same parameters (as
    ``_fp32_model``)."""
    if _computes_in_fp32(model):
        return model
    copy = create_plmrr(
        build_encoder(cfg, rngs=nnx.Rngs(0)),
        description_ids=np.asarray(jax.device_get(model.description_ids[...])),
        description_mask=np.asarray(jax.device_get(model.description_mask[...])),
        chunk_size=model.chunk_size, pad_token_id=model.pad_token_id,
        num_heads=int(getattr(model.rerank_attention, "num_heads", 1)),
        fuse_retriever=bool(getattr(model, "fuse_retriever", False)), rngs=nnx.Rngs(0))
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(jax.device_get(x), np.float32)),
                          nnx.state(model, nnx.Param))
    nnx.update(copy, params)
    return copy


def check_plmrr_parity(reranker: PLMRR, retriever: PLMICD, cfg: EncoderConfig,
                       retriever_cfg: EncoderConfig, export_dir: str, *, top_k: int,
                       tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> dict[str, float]:
    """Run the JAX cascade (``plmrr_cascade``, fp32) and the exported PyTorch ``PLMRR`` on the
    same padded multi-chunk inputs; raise ``ExportParityError`` if the retriever logits or the
    candidates' logits differ by more than ``tolerance``, or if the top-K sets differ.

    A top-K set may differ only through a near tie at the boundary (the K-th and (K+1)-th JAX
    retriever logits within ``2 * tolerance``): then the PyTorch re-ranker is compared on the JAX
    candidates. Returns ``parity_max_abs_diff`` (candidate logits) and
    ``parity_retriever_max_abs_diff``.
    """
    import torch

    ids, mask = parity_inputs(vocab_size=cfg.vocab_size, pad_token_id=reranker.pad_token_id,
                              chunk_size=reranker.chunk_size, seed=seed)
    with jax.default_matmul_precision("highest"):
        full, cand, ret = plmrr_cascade(_fp32_plmrr(reranker, cfg),
                                        _fp32_model(retriever, retriever_cfg),
                                        jnp.asarray(ids), jnp.asarray(mask), top_k=top_k)
    jax_full, jax_cand, jax_ret = (np.asarray(x) for x in (full, cand, ret))
    net, _ = torch_model.load_exported(export_dir)
    t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
        torch_ret = net.retrieve(t_ids, t_mask).numpy()
        torch_full, torch_cand = net(t_ids, t_mask, return_candidates=True)
        torch_full, torch_cand = torch_full.numpy(), torch_cand.numpy()
    shape = f"{ids.shape[0]} documents of {ids.shape[1]} tokens, K = {top_k}"
    ret_diff = float(np.max(np.abs(jax_ret - torch_ret)))
    if not np.isfinite(ret_diff) or ret_diff > tolerance:
        raise ExportParityError(
            f"exported PyTorch retriever logits differ from the JAX retriever's by "
            f"{ret_diff:.3e} (tolerance {tolerance:.1e}) on {shape}; the export was not written. "
            "This is a bug in the export mapping of frozen_encoder / label_wise_attention.")
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(jax_cand, torch_cand)]
    if all(same):
        diff = float(np.max(np.abs(jax_full - torch_full)))
    else:
        ordered = -np.sort(-jax_ret, axis=-1)
        for b in np.nonzero(~np.asarray(same))[0]:
            gap = (ordered[b, top_k - 1] - ordered[b, top_k]) if top_k < ordered.shape[1] else 0
            if gap > 2 * tolerance:  # retriever logits agree within tolerance: no swap possible
                raise ExportParityError(
                    f"the exported PyTorch model's top-{top_k} candidates differ from the JAX "
                    f"cascade's for document {b} ({sorted(set(torch_cand[b]) ^ set(jax_cand[b]))}"
                    f" in one set only) on {shape}; the export was not written.")
        log.warning("PLM-RR parity: top-%d sets differ by a near tie of retriever logits "
                    "(within %.1e); comparing the re-ranker on the JAX candidates", top_k,
                    tolerance)
        with torch.no_grad():
            scores = net.rerank(t_ids, t_mask, torch.from_numpy(jax_cand).long()).numpy()
        diff = float(np.max(np.abs(np.take_along_axis(jax_full, jax_cand, axis=1) - scores)))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportParityError(
            f"exported PyTorch PLM-RR candidate logits differ from the JAX cascade's by "
            f"{diff:.3e} (tolerance {tolerance:.1e}) on {shape}; the export was not written. "
            "This is a bug in the export mapping or in medcode_jax.torch_model.PLMRR.")
    return {"parity_max_abs_diff": diff, "parity_retriever_max_abs_diff": ret_diff}
