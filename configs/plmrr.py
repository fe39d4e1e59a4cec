"""PLM-RR (Gray 2025): a frozen PLM-CA retrieves the top-K codes, a second encoder re-ranks
them by cross-attending from each candidate's description tokens to the note (spec plmrr.md).

`python -m medcode_jax.main --config=configs/plmrr.py --workdir=W` runs the three stages
(`medcode_jax.pipelines`): stage 1 trains the retriever (`config.retriever`, a complete PLM-CA
config) into W/retriever/ (or reuses `--config.retriever.workdir=RUN`), the candidate cache
goes to W/candidates/, stage 2 trains the re-ranker (the top-level fields) into W/reranker/,
then both stages are compared on the test set. Re-running the command continues where it
stopped.

Variants (`--config=configs/plmrr.py:<arg>`, arg = variant[,preset...]):
  ""     MIMIC-IV ICD-10, the spec's recipe: K = 300, descriptions of 64 tokens, micro-batch
         2 x accumulation 8, 20 epochs, patience 6, lr 5e-5, bf16 (paths are placeholders)
  "icd9" the same on MIMIC-IV ICD-9 shards (data/mimiciv_icd9)
  "demo" the synthetic demo corpus (`make demo-data`) with the packaged MiniLM, CPU, minutes
  "tiny" tests only (paths set by the test)
  presets as in configs/plmca.py (sharding: fsdp, fsdp_tp; encoders: modernbert_base, ...);
  they apply to both stages.
"""
from __future__ import annotations

import ml_collections

from configs import common, plmca


def rerank_defaults() -> ml_collections.ConfigDict:
    """The `rerank` section: every field commented."""
    r = ml_collections.ConfigDict()
    # Candidates per document re-ranked in stage 2 (the reference's top_k).
    r.k = 300
    # Candidates cached per document (>= k; clipped to the label space). Codes beyond it have no
    # retriever score in the cascade and tie at the bottom of the ranking.
    r.k_max = 1000
    # Description tokens per code (the reference tokenises with truncation at 64).
    r.description_length = 64
    # Stage-2 encoder initialisation: "pretrained" (encoder.path, the reference) or "retriever"
    # (warm start from the stage-1 encoder; same architecture needed).
    r.encoder_init = "pretrained"
    # Encode each distinct candidate description of a micro-batch once (False: once per
    # (document, candidate) slot, like the reference). Same logits and gradients.
    r.unique_descriptions = True
    # Distinct-description counts are rounded up to a multiple of this (bounded recompilation).
    r.unique_multiple = 64
    # Back-propagate through the description encodings (False: cheaper, descriptions as fixed
    # features of the current encoder).
    r.description_grad = True
    # Add the retriever logit: r_k + alpha * s_k with a learnable alpha (init 0).
    r.fuse_retriever = False
    # Heads of the description -> note cross-attention (the reference has 1).
    r.num_heads = 1
    # Initialisation of the re-ranker's query/key projections: "normal" (the reference,
    # N(0, 0.03): attention starts uniform) or "identity" (a description token starts attending
    # to the note tokens whose encodings resemble it; converges in far fewer steps).
    r.qk_init = "normal"
    # Loss normaliser: "full" = mean over B x C (the reference; non-candidates add nothing),
    # "candidates" = mean over B x K.
    r.loss_normalisation = "full"
    # Scores of non-candidates: "cascade" (below every candidate, ordered by the retriever: no
    # ties in ranking metrics) or "constant" (the reference's -1e9 fill).
    r.score_fill = "cascade"
    # Set by the pipeline: the candidate cache directory (W/candidates).
    r.cache_dir = ""
    return r


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    variant, presets = common.parse_arg(arg)
    c = common.base_config()  # the stage-2 fields; every one is commented in configs/common.py
    c.model.type = "plmrr"    # "plmicd" for PLM-ICD / PLM-CA
    c.rerank = rerank_defaults()
    # Stage 1: a complete PLM-CA config (same variant and presets); its data must be ours.
    c.retriever = plmca.get_config(arg)
    # An existing PLM-CA run directory to reuse as stage 1 ("" = train one in W/retriever).
    c.retriever.workdir = ""
    c.train.micro_batch_size = 2   # 2 x 8 accumulation (the fork's recipe)
    c.train.patience = 6
    if variant == "icd9":
        c.data.dir = "data/mimiciv_icd9"
    elif variant == "demo":
        # Sized for `make demo` in about 20 minutes on 2 CPU cores (stage 1 ~6 min, stage 2
        # ~10 min): 2,000 admissions, notes cut at 512 tokens, batches of 4 documents (more
        # updates per epoch: cross-attention heads leave their uniform-attention plateau after
        # a few hundred updates, whatever the batch size).
        c.data.dir = c.retriever.data.dir
        c.data.max_length = c.retriever.data.max_length
        c.data.bucket_multiple = c.retriever.data.bucket_multiple
        c.encoder.path = c.retriever.encoder.path
        c.encoder.num_layers = c.retriever.encoder.num_layers
        for part in (c, c.retriever):
            part.train.dtype = "float32"
            part.train.global_batch_size = 4
            part.train.micro_batch_size = 4
            part.train.num_epochs = 2
            part.train.learning_rate = 1e-3
            part.train.patience = 3
            part.train.log_every_steps = 25
            part.train.eval_batch_size = 32
        c.rerank.k = 32                  # well below the 384-code label space
        c.rerank.k_max = 128
        c.rerank.description_length = 32
        # Not the reference's choices, made for a CPU budget of a few hundred updates (the
        # reference settings reach a lower validation mAP than the retriever in 2 epochs):
        c.rerank.encoder_init = "retriever"   # warm start from the stage-1 encoder
        c.rerank.fuse_retriever = True        # r + alpha * s: starts from the retriever's order
        c.rerank.qk_init = "identity"         # descriptions attend to similar note tokens at once
        c.rerank.unique_multiple = 32
    elif variant == "tiny":
        common.tiny_overrides(c)
        c.train.micro_batch_size = 4
        c.rerank.k = 4
        c.rerank.k_max = 8
        c.rerank.description_length = 8
        c.rerank.unique_multiple = 16   # one distinct-description bucket: one compiled shape
    common.apply_presets(c, presets)
    return c
