"""PLM-CA (EMNLP 2024 / Gray 2025 recipe): chunked encoder + label-wise cross-attention head.

Variants (`--config=configs/plmca.py:<arg>`, arg = variant[,sharding preset]):
  ""     the real MIMIC-IV ICD-10 run (data.dir / encoder.path are placeholders: set them)
  "demo" the synthetic demo corpus (`make demo-data`) with the packaged MiniLM, CPU, minutes
  "icd9" the real MIMIC-IV ICD-9 run (placeholder data.dir data/mimiciv_icd9)
  "tiny" tests only (paths set by the test)
  presets: "fsdp" (all devices on the fsdp axis, embed->fsdp), "fsdp_tp" (also tensor rules),
           and encoder presets from configs/encoders.py ("modernbert_base", "neobert", …:
           encoder.path, chunk_size, max_length), e.g. configs/plmca.py:modernbert_base,fsdp
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    variant, presets = common.parse_arg(arg)
    c = common.base_config()  # every field is commented in configs/common.py
    c.model.head = "cross_attention"
    if variant == "demo":
        c.data.dir = "data/demo/icd10"        # written by `make demo-data`
        c.data.max_length = 512               # the Makefile's --max-length (must match)
        c.data.bucket_multiple = 2            # few shapes, little padding on short notes
        c.encoder.path = common.minilm_path()  # real pretrained MiniLM (BERT, 6 layers, D=384)
        c.encoder.num_layers = 1               # its first layer: ~2.3 s per 16-note step, 2 CPUs
        c.encoder.pretrained = True
        c.train.dtype = "float32"             # CPU: bf16 matmuls are slower than fp32
        c.train.num_epochs = 6                # 6 x 58 steps of 16 notes (2,000-admission demo)
        c.train.learning_rate = 1e-3          # small corpus, few steps: a larger peak lr
        c.train.patience = 3
        c.train.log_every_steps = 10
        c.train.eval_batch_size = 32
    elif variant == "tiny":
        common.tiny_overrides(c)
    elif variant == "icd9":
        c.data.dir = "data/mimiciv_icd9"       # placeholder: shards prepared with --icd-version 9
    common.apply_presets(c, presets)
    return c
