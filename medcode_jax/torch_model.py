"""Self-contained PyTorch PLM-ICD / PLM-CA that runs an exported folder without JAX.

The export folder (``medcode_jax.export``, spec ``export.md``) holds ``encoder/`` (a Hugging
Face model folder), ``model.safetensors`` (the whole model in the reference project's naming)
and ``config.json`` (model settings). ``load_exported(DIR)`` rebuilds the model here and loads
the weights with ``load_state_dict(strict=True)``: the module's state-dict keys are exactly the
keys of ``model.safetensors``::

    roberta_encoder.<HF base-model key>      (the attribute name is the reference's, any family)
    label_wise_attention.<head parameter>    (the reference's LabelCrossAttention / LabelAttention)

The encoder is ``transformers.AutoModel.from_config(encoder/config.json)`` (weights come from
``model.safetensors``, so they are read once); ``roberta_encoder.pooler.*`` exists in the
``"fork"`` flavour only, as in the fork's ``PLMICD`` (the EMC class drops the pooler).
NeoBERT is not part of ``transformers``: its encoder is ``NeoBERT`` here, written from the
architecture description (spec models.md §2) with the hub checkpoint's parameter names, so the
hub's state dict loads into it strictly (``load_neobert`` reads a hub-style folder).
Attention runs with SDPA when padding is masked and with the eager path otherwise: the two
differ only on chunk rows that are all padding, which the head then attends to.

Forward pass, identical to ``medcode_jax.models.plm_icd.PLMICD``: ids ``[B, T]`` are padded with
the pad id to a multiple of the chunk size c (no extra chunk when T already is one), viewed as
``[B·n, c]`` and encoded row by row (position ids restart in every row: BERT ``0..c-1``,
RoBERTa from the row's non-pad tokens), reshaped to ``[B, n·c, D]`` and passed to the head with
the padded mask. ``mask_padding`` (``config.json``) selects correct padding masking (default)
or the reference's unmasked softmax; with ``mask_padding=False`` logits depend on how much
padding a batch has, exactly as in the reference.

torch and transformers are imported lazily: ``import medcode_jax.torch_model`` works without
them; the classes are created on first use by ``torch_classes()``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import types
from collections.abc import Mapping
from typing import Any

ENCODER_DIR = "encoder"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ENCODER_PREFIX = "roberta_encoder."
HEAD_PREFIX = "label_wise_attention."
FLAVOURS = ("fork", "emc")
HEAD_TYPES = ("cross_attention", "laat")
# Encoder families whose HF base model has a pooler (and takes ``add_pooling_layer``).
POOLER_FAMILIES = ("bert", "roberta")
# Families without a ``transformers`` implementation, built by this module instead.
OWN_FAMILIES = ("neobert",)
# Same large finite negative as ``medcode_jax.models.heads.MASK_VALUE``.
_MASK_VALUE = -0.7 * 3.4028234663852886e38
_REQUIRED_META = ("family", "flavour", "head_type", "chunk_size", "pad_token_id", "num_labels",
                  "scale", "mask_padding")


def read_meta(export_dir: str) -> dict[str, Any]:
    """Read and validate an export folder's ``config.json`` (the model settings)."""
    path = os.path.join(export_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {export_dir!r} is not a medcode_jax export folder "
            "(write one with `python -m medcode_jax.main --mode=export`).")
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; re-export the model.")
    if meta["head_type"] not in HEAD_TYPES:
        raise ValueError(f"{path}: head_type {meta['head_type']!r} is not one of {HEAD_TYPES}.")
    if meta["flavour"] not in FLAVOURS:
        raise ValueError(f"{path}: flavour {meta['flavour']!r} is not one of {FLAVOURS}.")
    return meta


@functools.cache
def torch_classes() -> types.SimpleNamespace:
    """The PyTorch module classes (created on first call; imports torch).

    Returns a namespace with ``LabelCrossAttention``, ``LabelAttention`` and ``PLMICD``.
    """
    import torch
    from torch import nn

    def label_softmax(scores: torch.Tensor, mask: torch.Tensor | None,
                      mask_padding: bool) -> torch.Tensor:
        """Softmax over tokens of [B, C, L] fp32 scores; padded tokens masked if asked.

        A document without any real token gets an all-zero attention row (as in our JAX head).
        """
        if not mask_padding or mask is None:
            return torch.softmax(scores, dim=-1)
        real = (mask != 0)[:, None, :]
        bias = torch.where(real, 0.0, _MASK_VALUE).to(scores.dtype)
        probs = torch.softmax(scores + bias, dim=-1)
        return probs * real.any(dim=-1, keepdim=True).to(probs.dtype)

    class LabelCrossAttention(nn.Module):
        """PLM-CA head: A = softmax(Q Kᵀ / scale), logit = w · LayerNorm(A V) + b0.

        Parameters named as the reference's ``LabelCrossAttention``.
        """

        def __init__(self, hidden_size: int, num_labels: int, *, scale: float = 1.0,
                     mask_padding: bool = True):
            super().__init__()
            self.weights_k = nn.Linear(hidden_size, hidden_size, bias=False)
            self.label_representations = nn.Parameter(torch.zeros(num_labels, hidden_size))
            self.weights_v = nn.Linear(hidden_size, hidden_size)
            self.output_linear = nn.Linear(hidden_size, 1)
            self.layernorm = nn.LayerNorm(hidden_size, eps=1e-5)
            self.scale = float(scale)
            self.mask_padding = mask_padding

        def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    output_attention: bool = False):
            keys = self.weights_k(hidden)  # [B, L, D]
            values = self.weights_v(hidden)  # [B, L, D]
            scores = torch.einsum("cd,bld->bcl", self.label_representations, keys) / self.scale
            attention = label_softmax(scores.float(), attention_mask, self.mask_padding)
            mixed = self.layernorm(attention.to(values.dtype) @ values)  # [B, C, D]
            logits = (mixed * self.output_linear.weight[0]).sum(-1) + self.output_linear.bias
            return (logits, attention) if output_attention else logits

    class LabelAttention(nn.Module):
        """LAAT head: A = softmax(tanh(H W1) W2), logit[c] = W3[c] · (Aᵀ H)[c] + b3[c].

        Parameters named as the reference's ``LabelAttention``.
        """

        def __init__(self, hidden_size: int, num_labels: int, *,
                     projection_size: int | None = None, mask_padding: bool = True):
            super().__init__()
            p = hidden_size if projection_size is None else projection_size
            self.first_linear = nn.Linear(hidden_size, p, bias=False)
            self.second_linear = nn.Linear(p, num_labels, bias=False)
            self.third_linear = nn.Linear(hidden_size, num_labels)
            self.mask_padding = mask_padding

        def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    output_attention: bool = False):
            scores = self.second_linear(torch.tanh(self.first_linear(hidden)))  # [B, L, C]
            attention = label_softmax(scores.transpose(1, 2).float(), attention_mask,
                                      self.mask_padding)
            pooled = attention.to(hidden.dtype) @ hidden  # [B, C, D]
            logits = (pooled * self.third_linear.weight).sum(-1) + self.third_linear.bias
            return (logits, attention) if output_attention else logits

    class PLMICD(nn.Module):
        """Chunked encoder (``roberta_encoder``) + label-wise head (``label_wise_attention``)."""

        def __init__(self, encoder: nn.Module, head: nn.Module, *, chunk_size: int,
                     pad_token_id: int):
            super().__init__()
            self.roberta_encoder = encoder
            self.label_wise_attention = head
            self.chunk_size = chunk_size
            self.pad_token_id = pad_token_id

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    output_attention: bool = False):
            """[B, T] ids and mask -> logits [B, C] (, attention [B, C, n·c])."""
            if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
                raise ValueError("input_ids and attention_mask must both be [B, T], got "
                                 f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}.")
            batch, length = input_ids.shape
            c = self.chunk_size
            fill = math.ceil(length / c) * c - length
            ids = nn.functional.pad(input_ids, (0, fill), value=self.pad_token_id)
            mask = nn.functional.pad(attention_mask, (0, fill), value=0)
            out = self.roberta_encoder(input_ids=ids.reshape(-1, c),
                                       attention_mask=mask.reshape(-1, c))
            hidden = out.last_hidden_state.reshape(batch, ids.shape[1], -1)
            return self.label_wise_attention(hidden, mask, output_attention=output_attention)

    return types.SimpleNamespace(LabelCrossAttention=LabelCrossAttention,
                                 LabelAttention=LabelAttention, PLMICD=PLMICD)


def build_encoder(encoder_dir: str, *, family: str, with_pooler: bool,
                  attn_implementation: str = "eager"):
    """The base model of ``encoder_dir/config.json``, randomly initialised.

    Weights are loaded afterwards from ``model.safetensors`` (strict). BERT-like families and
    ModernBERT come from ``transformers``; NeoBERT is this module's ``NeoBERT``.
    """
    if family in OWN_FAMILIES:
        return neobert_classes().NeoBERT(read_hf_config(encoder_dir))
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(encoder_dir)
    kwargs = {"add_pooling_layer": with_pooler} if family in POOLER_FAMILIES else {}
    return AutoModel.from_config(config, attn_implementation=attn_implementation, **kwargs)


def read_hf_config(model_dir: str) -> dict[str, Any]:
    """``model_dir/config.json`` as a dict (clear errors for a missing or broken file)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {model_dir!r}: expected a model folder")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_neobert(model_dir: str):
    """A NeoBERT folder in the hub's layout (``config.json`` + ``model.safetensors``, keys
    optionally prefixed ``model.``) -> ``NeoBERT`` in eval mode, loaded strictly.

    Task-head tensors of ``NeoBERTLMHead`` (``decoder.*``) are skipped.
    """
    from safetensors.torch import load_file

    model = neobert_classes().NeoBERT(read_hf_config(model_dir))
    weights = os.path.join(model_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {model_dir!r}")
    state = {k.removeprefix("model."): v for k, v in load_file(weights).items()
             if not k.startswith("decoder.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@functools.cache
def neobert_classes() -> types.SimpleNamespace:
    """PyTorch NeoBERT (created on first call; imports torch): namespace with ``NeoBERT``.

    ``NeoBERT(hf_config: dict)`` takes the hub's ``config.json`` fields; its ``forward(input_ids
    [B, L], attention_mask [B, L] | None)`` returns an object with ``last_hidden_state``.
    Padded keys are masked with a large finite negative, so all-padding rows stay finite.
    """
    import torch
    from torch import nn

    def complex_rotation(length: int, head_dim: int, theta: float) -> torch.Tensor:
        """``[length, head_dim / 2]`` unit complex numbers ``exp(i · p · theta^(-2j/d))``."""
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        return torch.polar(torch.ones_like(angles), angles)

    def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """Interleaved-pair rotary embedding of ``x [B, L, H, d]`` (pairs (2j, 2j+1))."""
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        rotated = torch.view_as_real(pairs * rotation[None, :, None, :])
        return rotated.flatten(-2).to(x.dtype)

    class SwiGLU(nn.Module):
        def __init__(self, dim: int, hidden: int):
            super().__init__()
            self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
            self.w3 = nn.Linear(hidden, dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = self.w12(x).chunk(2, dim=-1)
            return self.w3(nn.functional.silu(x1) * x2)

    class EncoderBlock(nn.Module):
        def __init__(self, dim: int, heads: int, ffn_hidden: int, eps: float):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.wo = nn.Linear(dim, dim, bias=False)
            self.ffn = SwiGLU(dim, ffn_hidden)
            self.attention_norm = nn.RMSNorm(dim, eps=eps)
            self.ffn_norm = nn.RMSNorm(dim, eps=eps)

        def attend(self, x: torch.Tensor, bias: torch.Tensor | None,
                   rotation: torch.Tensor) -> torch.Tensor:
            b, length, dim = x.shape
            per_head = self.qkv(x).view(b, length, self.heads, -1)  # [q_h, k_h, v_h] per head
            q, k, v = per_head.chunk(3, dim=-1)
            q, k = rotate(q, rotation), rotate(k, rotation)
            out = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
            return self.wo(out.transpose(1, 2).reshape(b, length, dim))

        def forward(self, x, bias, rotation):
            x = x + self.attend(self.attention_norm(x), bias, rotation)
            return x + self.ffn(self.ffn_norm(x))

    class NeoBERT(nn.Module):
        """NeoBERT base model with the hub's parameter names (``encoder``,
        ``transformer_encoder.{i}.*``, ``layer_norm``)."""

        rope_theta = 10_000.0

        def __init__(self, hf_config: Mapping[str, Any]):
            super().__init__()
            missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "vocab_size") if k not in hf_config]
            if missing:
                raise ValueError(f"NeoBERT config.json lacks field(s) {missing}")
            self.config = types.SimpleNamespace(**hf_config)
            dim, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
            eps = float(hf_config.get("norm_eps", 1e-6))
            hidden = int(2 * int(hf_config["intermediate_size"]) / 3)
            hidden = 8 * ((hidden + 7) // 8)  # the hub's SwiGLU size rule
            self.max_length = int(hf_config.get("max_length", 1024))
            self.head_dim = dim // heads
            self.encoder = nn.Embedding(int(hf_config["vocab_size"]), dim,
                                        padding_idx=hf_config.get("pad_token_id", 0))
            self.transformer_encoder = nn.ModuleList(
                EncoderBlock(dim, heads, hidden, eps)
                for _ in range(int(hf_config["num_hidden_layers"])))
            self.layer_norm = nn.RMSNorm(dim, eps=eps)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
            length = input_ids.shape[1]
            if length > self.max_length:
                raise ValueError(f"sequence length {length} exceeds max_length {self.max_length}")
            rotation = complex_rotation(length, self.head_dim, self.rope_theta).to(
                input_ids.device)
            x = self.encoder(input_ids)
            bias = None
            if attention_mask is not None:
                keep = (attention_mask != 0)[:, None, None, :]
                bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(
                    ~keep, _MASK_VALUE)
            for block in self.transformer_encoder:
                x = block(x, bias, rotation)
            return types.SimpleNamespace(last_hidden_state=self.layer_norm(x))

    return types.SimpleNamespace(NeoBERT=NeoBERT)


def build_model(export_dir: str, meta: Mapping[str, Any]):
    """A PyTorch ``PLMICD`` with the architecture described by ``meta`` (weights random)."""
    classes = torch_classes()
    family = meta["family"]
    # Fully padded chunk rows: transformers' SDPA path returns other values for them than the
    # eager path (and our JAX encoder), which matters only when the head attends to padding.
    encoder = build_encoder(os.path.join(export_dir, ENCODER_DIR), family=family,
                            with_pooler=meta["flavour"] == "fork" and family in POOLER_FAMILIES,
                            attn_implementation="sdpa" if meta["mask_padding"] else "eager")
    hidden = int(encoder.config.hidden_size)
    if meta["head_type"] == "cross_attention":
        head = classes.LabelCrossAttention(hidden, int(meta["num_labels"]),
                                           scale=float(meta["scale"]),
                                           mask_padding=bool(meta["mask_padding"]))
    else:
        head = classes.LabelAttention(hidden, int(meta["num_labels"]),
                                      projection_size=meta.get("projection_size"),
                                      mask_padding=bool(meta["mask_padding"]))
    return classes.PLMICD(encoder, head, chunk_size=int(meta["chunk_size"]),
                          pad_token_id=int(meta["pad_token_id"]))


def load_exported(export_dir: str, *, device: str = "cpu"):
    """Rebuild the exported model: returns ``(model in eval mode, meta dict)``.

    Reads ``config.json`` and ``model.safetensors`` only (never unpickles ``best_model.pt``);
    the state dict is loaded strictly, so any key mismatch is an error.
    """
    from safetensors.torch import load_file

    meta = read_meta(export_dir)
    weights_path = os.path.join(export_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} not found; re-export the model.")
    model = build_model(export_dir, meta)
    state = load_file(weights_path, device="cpu")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights_path} does not match the model described by {CONFIG_FILE}: "
            f"missing keys {sorted(result.missing_keys)}, unexpected keys "
            f"{sorted(result.unexpected_keys)}; re-export the model.")
    return model.to(device).eval(), meta


def predict(model, input_ids, attention_mask):
    """Probabilities ``sigmoid(logits)`` [B, C] for int ids / mask [B, T] (numpy or torch)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    mask = torch.as_tensor(attention_mask, dtype=torch.long, device=device)
    with torch.no_grad():
        return torch.sigmoid(model(ids, mask).float())
