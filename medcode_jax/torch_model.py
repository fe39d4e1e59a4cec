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

PLM-RR (``config.json`` ``model_type: "plmrr"``): the fork's ``PLMICD`` with
``attention_type="token_level"``. State-dict keys::

    roberta_encoder.<HF key>                 stage-2 (re-ranking) encoder, notes and descriptions
    frozen_encoder.<HF key>                  stage-1 (retriever) encoder, frozen
    label_wise_attention.<head parameter>    stage-1 LabelCrossAttention head
    _dynamic_token_attention.{q_proj,k_proj,v_proj}.weight, .layernorm.{weight,bias},
      .output_linear.{weight,bias}, buffers .description_input_ids / .description_attention_mask

``PLMRR.forward(input_ids, attention_mask)`` runs the cascade: retriever logits (no grad) ->
``torch.topk(K)`` -> the stage-2 encoder on the note and on the K descriptions of every document
(one batched call; ``reference_style=True`` loops over documents like the fork) -> re-ranker
scores scattered into a ``[B, C]`` matrix filled with -1e9 (the fork's constant fill).

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
FROZEN_ENCODER_PREFIX = "frozen_encoder."
RERANKER_PREFIX = "_dynamic_token_attention."
DESCRIPTION_BUFFERS = ("description_input_ids", "description_attention_mask")
MODEL_TYPES = ("plmicd", "plmrr")
# Score of non-candidate codes in PLM-RR's [B, C] output (the fork's expand_topk_to_full_logits).
NON_CANDIDATE_LOGIT = -1e9
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
_REQUIRED_PLMRR_META = ("top_k", "description_length", "num_heads")


def reference_length(longest: int, chunk_size: int, unmasked_padding: str) -> int:
    """The padded length the reference gives a batch whose longest note has ``longest`` tokens:
    ``emc`` adds c - longest mod c (a whole extra chunk when longest is a multiple of c),
    ``sigir2023`` rounds up to whole chunks; at least one chunk. (The same arithmetic as
    ``medcode_jax.models.plm_icd.reference_length``, repeated so this module imports without
    JAX.)"""
    c = chunk_size
    if unmasked_padding == "emc":
        return (longest // c + 1) * c
    if unmasked_padding == "sigir2023":
        return max(-(-longest // c) * c, c)
    raise ValueError(f"unmasked_padding must be 'emc' or 'sigir2023', got {unmasked_padding!r}; "
                     "fix config.json or re-export the model.")


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
    model_type = meta.setdefault("model_type", "plmicd")  # exports before PLM-RR have none
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of {MODEL_TYPES}.")
    if model_type == "plmrr":
        _check_plmrr_meta(meta, path)
    return meta


def _check_plmrr_meta(meta: Mapping[str, Any], path: str) -> None:
    """The PLM-RR fields of ``config.json``: top_k, description_length, num_heads."""
    missing = [k for k in _REQUIRED_PLMRR_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: PLM-RR export lacks field(s) {missing}; re-export the model.")
    num_labels = meta["num_labels"]
    problems = []
    if not isinstance(meta["top_k"], int) or not 1 <= meta["top_k"] <= num_labels:
        problems.append(f"top_k {meta['top_k']!r} must be an integer in [1, num_labels="
                        f"{num_labels}]")
    if not isinstance(meta["description_length"], int) or meta["description_length"] < 1:
        problems.append(f"description_length {meta['description_length']!r} must be an "
                        "integer >= 1")
    if meta["num_heads"] != 1:
        problems.append(f"num_heads {meta['num_heads']!r}: only the reference's single-head "
                        "re-ranker is supported")
    if meta.get("fuse_retriever"):
        problems.append("fuse_retriever is set: retriever-score fusion has no reference layout")
    if meta["head_type"] != "cross_attention":
        problems.append(f"head_type {meta['head_type']!r}: the PLM-RR retriever head is "
                        "'cross_attention'")
    if problems:
        raise ValueError(f"{path}: invalid PLM-RR settings: " + "; ".join(problems) + ".")


@functools.cache
def torch_classes() -> types.SimpleNamespace:
    """The PyTorch module classes (created on first call; imports torch).

    Returns a namespace with ``LabelCrossAttention``, ``LabelAttention``, ``PLMICD``,
    ``DynamicTokenAttention``, ``PLMRR`` and ``encode_chunks``.
    """
    import torch
    from torch import nn

    def label_softmax(scores: torch.Tensor, mask: torch.Tensor | None,
                      mask_padding: bool, span: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax over tokens of [B, C, L] fp32 scores; padded tokens masked if asked.

        A document without any real token gets an all-zero attention row (as in our JAX head).
        Unmasked, over all positions or those where ``span`` [B, L] is non-zero.
        """
        if not mask_padding and span is not None:
            bias = torch.where((span != 0)[:, None, :], 0.0, _MASK_VALUE).to(scores.dtype)
            return torch.softmax(scores + bias, dim=-1)
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
                    output_attention: bool = False, span: torch.Tensor | None = None):
            keys = self.weights_k(hidden)  # [B, L, D]
            values = self.weights_v(hidden)  # [B, L, D]
            scores = torch.einsum("cd,bld->bcl", self.label_representations, keys) / self.scale
            attention = label_softmax(scores.float(), attention_mask, self.mask_padding, span)
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
                    output_attention: bool = False, span: torch.Tensor | None = None):
            scores = self.second_linear(torch.tanh(self.first_linear(hidden)))  # [B, L, C]
            attention = label_softmax(scores.transpose(1, 2).float(), attention_mask,
                                      self.mask_padding, span)
            pooled = attention.to(hidden.dtype) @ hidden  # [B, C, D]
            logits = (pooled * self.third_linear.weight).sum(-1) + self.third_linear.bias
            return (logits, attention) if output_attention else logits

    class PLMICD(nn.Module):
        """Chunked encoder (``roberta_encoder``) + label-wise head (``label_wise_attention``)."""

        def __init__(self, encoder: nn.Module, head: nn.Module, *, chunk_size: int,
                     pad_token_id: int, unmasked_padding: str = "emc"):
            super().__init__()
            self.roberta_encoder = encoder
            self.label_wise_attention = head
            self.chunk_size = chunk_size
            self.pad_token_id = pad_token_id
            self.unmasked_padding = unmasked_padding

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    output_attention: bool = False):
            """[B, T] ids and mask -> logits [B, C] (, attention [B, C, n·c])."""
            if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
                raise ValueError("input_ids and attention_mask must both be [B, T], got "
                                 f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}.")
            span_length = None
            if not self.label_wise_attention.mask_padding:
                # The reference's padded batch length, which its unmasked head attends over.
                longest = int((attention_mask != 0).sum(-1).max()) if input_ids.numel() else 0
                span_length = reference_length(longest, self.chunk_size, self.unmasked_padding)
            hidden, mask = encode_chunks(self.roberta_encoder, input_ids, attention_mask,
                                         chunk_size=self.chunk_size,
                                         pad_token_id=self.pad_token_id,
                                         min_length=span_length or 0)
            span = None
            if span_length is not None:
                positions = torch.arange(mask.shape[1], device=mask.device)
                span = (positions < span_length).to(mask.dtype)[None, :].expand_as(mask)
            return self.label_wise_attention(hidden, mask, output_attention=output_attention,
                                             span=span)

    def encode_chunks(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      *, chunk_size: int, pad_token_id: int, min_length: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] -> (hidden [B, n·c, D], mask [B, n·c]): pad to whole chunks (at least
        ``min_length`` tokens), encode rows."""
        batch, length = input_ids.shape
        c = chunk_size
        fill = math.ceil(max(length, min_length) / c) * c - length
        ids = nn.functional.pad(input_ids, (0, fill), value=pad_token_id)
        mask = nn.functional.pad(attention_mask, (0, fill), value=0)
        out = encoder(input_ids=ids.reshape(-1, c), attention_mask=mask.reshape(-1, c))
        return out.last_hidden_state.reshape(batch, ids.shape[1], -1), mask

    class DynamicTokenAttention(nn.Module):
        """PLM-RR re-ranker head (the fork's ``DynamicTokenLevelCrossAttention``, same names).

        Per document b and candidate k, with description states E [L, D] (mask m) and note
        states H [T, D]: q = E Wq, k = H Wk, v = H Wv (no biases); A = softmax over note tokens
        of q kᵀ / √D with note padding masked; context A v zeroed on description padding; p = mean
        over the real description tokens; score = w · LayerNorm(p) + b. Buffers hold the
        tokenised descriptions of all C codes ([C, L], int64, right-padded).
        """

        def __init__(self, hidden_size: int, num_labels: int, description_length: int):
            super().__init__()
            d = hidden_size
            self.q_proj = nn.Linear(d, d, bias=False)
            self.k_proj = nn.Linear(d, d, bias=False)
            self.v_proj = nn.Linear(d, d, bias=False)
            self.output_linear = nn.Linear(d, 1)
            self.layernorm = nn.LayerNorm(d, eps=1e-5)
            self.register_buffer("description_input_ids",
                                 torch.zeros(num_labels, description_length, dtype=torch.long))
            self.register_buffer("description_attention_mask",
                                 torch.zeros(num_labels, description_length, dtype=torch.long))
            self.scale = 1.0 / math.sqrt(d)

        def forward(self, x: torch.Tensor, encoded_descriptions: torch.Tensor,
                    description_attention_mask: torch.Tensor,
                    attention_masks: torch.Tensor, *, pool_first: bool = True) -> torch.Tensor:
            """Note x [B, T, D], descriptions [B, K, L, D] with mask [B, K, L], note mask
            [B, T] -> scores [B, K] fp32.

            ``pool_first`` (default): average the attention over description tokens before it
            meets the values (Ā = Σ_l m A / n, p = Ā v: same math, no [B, K, L, D] context);
            ``False`` builds the context like the fork. A document without real tokens gets
            zero attention (p = 0); so does a description without real tokens.
            """
            q = self.q_proj(encoded_descriptions)  # [B, K, L, D]
            keys = self.k_proj(x)  # [B, T, D]
            values = self.v_proj(x)  # [B, T, D]
            scores = torch.einsum("bkld,btd->bklt", q, keys).float() * self.scale
            real = (attention_masks != 0)[:, None, None, :]  # [B, 1, 1, T]
            scores = scores.masked_fill(~real, _MASK_VALUE)
            attention = torch.softmax(scores, dim=-1) * real.any(dim=-1, keepdim=True)
            desc_real = (description_attention_mask != 0).to(attention.dtype)  # [B, K, L]
            count = desc_real.sum(-1).clamp(min=1.0)[..., None]  # [B, K, 1]
            if pool_first:
                pooled_attention = torch.einsum("bklt,bkl->bkt", attention, desc_real) / count
                pooled = torch.einsum("bkt,btd->bkd", pooled_attention.to(values.dtype), values)
            else:
                context = torch.einsum("bklt,btd->bkld", attention.to(values.dtype), values)
                context = context * desc_real[..., None].to(context.dtype)
                pooled = context.sum(dim=2) / count.to(context.dtype)
            y = self.layernorm(pooled.float())
            return (y * self.output_linear.weight[0].float()).sum(-1) + self.output_linear.bias

    class PLMRR(nn.Module):
        """Retrieve-and-re-rank cascade with the fork's attribute names (module docstring)."""

        def __init__(self, encoder: nn.Module, frozen_encoder: nn.Module,
                     retriever_head: nn.Module, reranker: nn.Module, *, chunk_size: int,
                     pad_token_id: int, top_k: int):
            super().__init__()
            self.roberta_encoder = encoder
            self.frozen_encoder = frozen_encoder
            for p in self.frozen_encoder.parameters():
                p.requires_grad_(False)
            self.label_wise_attention = retriever_head
            self._dynamic_token_attention = reranker
            self.chunk_size = chunk_size
            self.pad_token_id = pad_token_id
            self.top_k = top_k

        @property
        def num_labels(self) -> int:
            return int(self._dynamic_token_attention.description_input_ids.shape[0])

        def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """Stage 1 (no gradient): retriever logits [B, C]."""
            with torch.no_grad():
                hidden, mask = encode_chunks(self.frozen_encoder, input_ids, attention_mask,
                                             chunk_size=self.chunk_size,
                                             pad_token_id=self.pad_token_id)
                return self.label_wise_attention(hidden, mask).float()

        def select(self, retriever_logits: torch.Tensor, top_k: int,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
            """Candidate ids [B, K]: the top K by retriever logit (descending), or with
            ``targets`` [B, C] (training) the fork's gold forcing: every gold code (ascending
            id), then the highest-ranked non-gold codes (vectorised, same order as the fork's
            per-document loop; more than K gold codes keep the K smallest ids)."""
            with torch.no_grad():
                top = torch.topk(retriever_logits, k=top_k, dim=-1).indices
                if targets is None:
                    return top
                c = retriever_logits.shape[-1]
                gold = targets != 0
                priority = torch.full_like(retriever_logits, 3.0 * c)
                rank = torch.arange(top_k, device=top.device, dtype=priority.dtype)
                priority.scatter_(1, top, (c + rank).expand_as(top).contiguous())
                ids = torch.arange(c, device=top.device, dtype=priority.dtype).expand_as(priority)
                priority = torch.where(gold, ids, priority)
                return torch.topk(-priority, k=top_k, dim=-1).indices

        def rerank(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   candidates: torch.Tensor, *, reference_style: bool = False) -> torch.Tensor:
            """Stage 2: re-ranker logits [B, K] of ``candidates`` [B, K] (code ids).

            Default: the B·K descriptions are encoded in one call. ``reference_style=True``
            encodes them document by document and builds the [B, K, L, D] context, as the fork.
            """
            hidden, mask = encode_chunks(self.roberta_encoder, input_ids, attention_mask,
                                         chunk_size=self.chunk_size,
                                         pad_token_id=self.pad_token_id)
            table = self._dynamic_token_attention
            batch, k = candidates.shape
            desc_ids = table.description_input_ids[candidates]  # [B, K, L]
            desc_mask = table.description_attention_mask[candidates]
            if reference_style:
                encoded = torch.stack([
                    self.roberta_encoder(input_ids=desc_ids[b],
                                         attention_mask=desc_mask[b]).last_hidden_state
                    for b in range(batch)])
            else:
                encoded = self.roberta_encoder(
                    input_ids=desc_ids.reshape(batch * k, -1),
                    attention_mask=desc_mask.reshape(batch * k, -1),
                ).last_hidden_state.reshape(batch, k, desc_ids.shape[-1], -1)
            return self._dynamic_token_attention(hidden, encoded, desc_mask, mask,
                                                 pool_first=not reference_style)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    top_k: int | None = None, targets: torch.Tensor | None = None,
                    return_candidates: bool = False, reference_style: bool = False):
            """[B, T] ids and mask -> logits [B, C] fp32: re-ranker scores of the top-K
            retriever candidates, -1e9 elsewhere (, candidates [B, K] if asked).

            ``targets`` [B, C] (training only, as in the fork) forces the gold codes in.
            """
            if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
                raise ValueError("input_ids and attention_mask must both be [B, T], got "
                                 f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}.")
            k = self.top_k if top_k is None else int(top_k)
            retriever_logits = self.retrieve(input_ids, attention_mask)
            candidates = self.select(retriever_logits, k,
                                     targets if self.training else None)
            scores = self.rerank(input_ids, attention_mask, candidates,
                                 reference_style=reference_style)
            full = torch.full(retriever_logits.shape, NON_CANDIDATE_LOGIT,
                              dtype=torch.float32, device=scores.device)
            full = full.scatter(1, candidates, scores.float())
            return (full, candidates) if return_candidates else full

    return types.SimpleNamespace(LabelCrossAttention=LabelCrossAttention,
                                 LabelAttention=LabelAttention, PLMICD=PLMICD,
                                 DynamicTokenAttention=DynamicTokenAttention, PLMRR=PLMRR,
                                 encode_chunks=encode_chunks)


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
    """A PyTorch ``PLMICD`` (or ``PLMRR`` for ``model_type: "plmrr"``) with the architecture
    described by ``meta`` (weights random)."""
    classes = torch_classes()
    family = meta["family"]

    def new_encoder():
        # Fully padded chunk rows: transformers' SDPA path returns other values for them than
        # the eager path (and our JAX encoder), which matters only when a head attends to
        # padding.
        return build_encoder(os.path.join(export_dir, ENCODER_DIR), family=family,
                             with_pooler=meta["flavour"] == "fork" and family in POOLER_FAMILIES,
                             attn_implementation="sdpa" if meta["mask_padding"] else "eager")

    encoder = new_encoder()
    hidden = int(encoder.config.hidden_size)
    if meta.get("model_type", "plmicd") == "plmrr":
        # Both encoders share encoder/config.json (the fork builds both from one model_path).
        retriever_head = classes.LabelCrossAttention(hidden, int(meta["num_labels"]),
                                                     scale=float(meta["scale"]),
                                                     mask_padding=bool(meta["mask_padding"]))
        reranker = classes.DynamicTokenAttention(hidden, int(meta["num_labels"]),
                                                 int(meta["description_length"]))
        return classes.PLMRR(encoder, new_encoder(), retriever_head, reranker,
                             chunk_size=int(meta["chunk_size"]),
                             pad_token_id=int(meta["pad_token_id"]), top_k=int(meta["top_k"]))
    if meta["head_type"] == "cross_attention":
        head = classes.LabelCrossAttention(hidden, int(meta["num_labels"]),
                                           scale=float(meta["scale"]),
                                           mask_padding=bool(meta["mask_padding"]))
    else:
        head = classes.LabelAttention(hidden, int(meta["num_labels"]),
                                      projection_size=meta.get("projection_size"),
                                      mask_padding=bool(meta["mask_padding"]))
    return classes.PLMICD(encoder, head, chunk_size=int(meta["chunk_size"]),
                          pad_token_id=int(meta["pad_token_id"]),
                          unmasked_padding=str(meta.get("unmasked_padding", "emc")))


def load_exported(export_dir: str, *, device: str = "cpu"):
    """Rebuild the exported model: returns ``(model in eval mode, meta dict)``.

    ``PLMICD`` for PLM-ICD / PLM-CA exports, ``PLMRR`` for ``model_type: "plmrr"``.

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
