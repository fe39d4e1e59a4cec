"""PLM-ICD (SIGIR 2023 recipe): chunked encoder + LAAT label-wise attention head.

Differences from PLM-CA (training.md §1): LAAT head, warm-up of 2,000 steps, no clipping,
micro-batch 1 x 16 accumulation, patience 6. (The SIGIR text cleaning / 4,000-word truncation
is a data-preparation choice: prepare the shards with the sigir2023 recipe.)
Variants as in configs/plmca.py: "" (real run), "demo", "tiny", plus sharding presets.

Explanation-aware losses (configs/common.LOSS_PRESETS): `configs/plmicd.py:supervised|igr|tm|pgd`
(and `:bce`, the plain baseline) mirror the reference's (explainable-medical-coding)
experiment/mdace_icd9_code/plm_icd[_<loss>].yaml: MDACE inpatient ICD-9 codes (data.dir is a
placeholder: shards prepared with evidence), max length 6000, chunk 128, its PLMICD model — which
there has the *cross-attention* head (`cross_attention: true`), not LAAT — AdamW lr 5e-5 without
weight decay, 10 % warm-up then linear decay, 20 epochs, clipping 1, effective batch 16 (micro
16 / 4 / 4 / 8 for bce+supervised / igr / pgd / tm), early stopping on val mAP, patience 3.
tm fine-tunes a trained model for 1 epoch at lr 1e-5 (set loss.init_workdir to a finished
`:bce` run; the reference's lr schedule there is constant, ours warms up 0 steps and decays
linearly). Combine with the demo: `configs/plmicd.py:demo,supervised` (demo data and recipe,
the loss's settings).
"""
from __future__ import annotations

import ml_collections

from configs import common, plmca


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for `arg` (see configs/plmca.py for the variants)."""
    variant, presets = common.parse_arg(arg)
    c = plmca.get_config(arg)  # same fields, commented in configs/common.py
    c.model.head = "laat"
    c.model.unmasked_padding = "sigir2023"  # with mask_padding=False: the SIGIR collate's padding
    if variant == "demo":
        # LAAT's attention sharpens only through per-code parameters (tanh bounds the shared
        # projection), so on 915 demo notes it stays near uniform for a long time (README,
        # "PLM-ICD on the demo"): small batches for more updates, the head at 10x the encoder's
        # learning rate, 12 epochs.
        c.train.global_batch_size = 4
        c.train.micro_batch_size = 4
        c.train.head_lr_multiplier = 10.0
        c.train.num_epochs = 12
        c.train.patience = 12
        c.train.log_every_steps = 50
    if variant in ("", "icd9"):
        # placeholder: shards prepared with the sigir2023 recipe
        c.data.dir = f"data/mimiciv_{variant or 'icd10'}_sigir"
        c.train.warmup_steps = 2000   # absolute count (SIGIR), overrides warmup_fraction
        c.train.clip_norm = 0.0       # no clipping
        c.train.micro_batch_size = 1  # 1 x 16 accumulation
        c.train.patience = 6
    loss = presets & set(common.LOSS_PRESETS)
    if loss and variant == "":
        mdace_recipe(c, loss.pop())
    return c


MDACE_MICRO_BATCH = {"bce": 16, "supervised": 16, "igr": 4, "pgd": 4, "tm": 8}


def mdace_recipe(c: ml_collections.ConfigDict, loss: str) -> None:
    """The reference's experiment/mdace_icd9_code/plm_icd[_<loss>].yaml (module docstring)."""
    c.data.dir = "data/mdace_icd9_code"  # placeholder: MDACE inpatient ICD-9, with evidence
    c.data.max_length = 6000
    c.data.chunk_size = 128
    c.model.head = "cross_attention"    # the reference's PLMICD: cross_attention: true
    c.model.mask_padding = True         # its cross-attention masks padding
    c.train.global_batch_size = 16
    c.train.micro_batch_size = MDACE_MICRO_BATCH[loss]
    c.train.learning_rate = 5e-5
    c.train.weight_decay = 0.0
    c.train.num_epochs = 20
    c.train.clip_norm = 1.0
    c.train.warmup_steps = -1
    c.train.warmup_fraction = 0.1
    c.train.patience = 3
    if loss == "tm":
        c.train.learning_rate = 1e-5
        c.train.num_epochs = 1
        c.train.warmup_fraction = 0.0
        # placeholder: a finished `configs/plmicd.py:bce` run (the reference's load_model)
        c.loss.init_workdir = "runs/plmicd_mdace_icd9_bce"
        c.loss.baseline_token_id = 50001  # the reference's (RoBERTa-PM vocabulary)
