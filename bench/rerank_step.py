"""One PLM-RR stage-2 training step: JAX (the project's train step) vs PyTorch run the fork's way.

    python bench/rerank_step.py --preset cpu          # 2 layers x 128, C 1000, K 64, L 16, fp32
    python bench/rerank_step.py --preset gpu   # RoBERTa-base sizes, C 7942, K 300, L 64, bf16

Same device, same process, same batch (token ids, labels; the candidate sets the PyTorch step's
own retriever selects for that batch are the JAX step's ``candidates``). Random initialisation
on both sides (timings only; the two models hold different random weights).

- PyTorch: ``medcode_jax.torch_model``'s ``PLMRR`` run the way the reference trainer runs it:
  module in train mode (dropout on, also in the frozen retriever encoder), retriever encoder +
  head inside the step under ``no_grad``, gold codes forced into the top K, the K descriptions
  of each document encoded in a Python loop over documents (``reference_style=True``, which also
  builds the [B, K, L, D] context), BCE with logits over the full [B, C] matrix (non-candidates
  at -1e9), backward, clip to norm 1, AdamW step; bf16 autocast in the gpu preset (fp32
  weights), as the fork's ``use_amp``.
- JAX: ``steps.make_train_step(..., io=steps.RerankIO(num_unique=..., full_normalisation=True))``
  jitted with the state donated (the trainer's step; candidates come with the batch, the
  retriever does not run), AdamW without weight decay, clip 1.0; bf16 compute in the gpu preset.
  Measured twice: one description per (document, candidate) slot (``num_unique=None``) and the
  distinct descriptions only (``num_unique=U``, U = ``candidates.unique_bucket`` of the batch's
  distinct-code count).

Prints the median step time of each, the PyTorch / JAX ratio and the unique-description saving;
writes everything to ``--out`` (default ``bench/results/rerank_step_<preset>.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = {
    # fits a 2-core machine in a couple of minutes
    "cpu": dict(hidden=128, layers=2, heads=2, intermediate=512, vocab=2000, num_labels=1000,
                top_k=64, desc_len=16, docs=2, tokens=512, chunk=128, bf16=False, steps=3,
                warmup=1, unique_multiple=16),
    # RoBERTa-base sizes, MIMIC-IV ICD-10 label space, the paper's K and description length
    "gpu": dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=50265,
                num_labels=7942, top_k=300, desc_len=64, docs=2, tokens=2048, chunk=512,
                bf16=True, steps=10, warmup=2, unique_multiple=64),
}


def hf_config(p: dict):
    import transformers

    return transformers.RobertaConfig(
        vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"], intermediate_size=p["intermediate"],
        max_position_embeddings=p["chunk"] + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        type_vocab_size=1, layer_norm_eps=1e-5)


def make_batch(p: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Notes (the second one shorter, padded), a [C, L] description table, multi-hot labels."""
    rng = np.random.default_rng(seed)
    b, t, c, length, pad = p["docs"], p["tokens"], p["num_labels"], p["desc_len"], 1
    ids = rng.integers(3, p["vocab"], size=(b, t))
    mask = np.ones((b, t), np.int32)
    mask[1:, int(t * 0.8):] = 0
    ids = np.where(mask == 1, ids, pad).astype(np.int32)
    desc_lengths = rng.integers(max(4, length // 4), length + 1, size=c)
    desc_mask = (np.arange(length)[None, :] < desc_lengths[:, None]).astype(np.int32)
    desc_ids = np.where(desc_mask == 1, rng.integers(3, p["vocab"], size=(c, length)), pad)
    labels = np.zeros((b, c), np.float32)
    for row in range(b):  # ~15 gold codes per document, frequent codes more likely
        gold = rng.choice(c, size=15, replace=False, p=_zipf(c))
        labels[row, gold] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "description_ids": desc_ids.astype(np.int32), "description_mask": desc_mask}


def _zipf(c: int) -> np.ndarray:
    w = 1.0 / np.arange(1, c + 1)
    return w / w.sum()


def _median_time(fn, *, steps: int, warmup: int) -> tuple[float, list[float], float]:
    """(median seconds, all timings, first call seconds incl. compilation)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, first


# --- PyTorch -----------------------------------------------------------------------------------

def torch_setup(p: dict, batch: dict, device: str):
    import torch
    import transformers

    from medcode_jax import torch_model

    torch.manual_seed(0)
    classes = torch_model.torch_classes()
    cfg = hf_config(p)
    impl = "sdpa"  # transformers' default, what the fork gets from AutoModel.from_pretrained

    def encoder():
        return transformers.AutoModel.from_config(cfg, attn_implementation=impl,
                                                  add_pooling_layer=True)

    reranker = classes.DynamicTokenAttention(p["hidden"], p["num_labels"], p["desc_len"])
    reranker.description_input_ids.copy_(torch.from_numpy(batch["description_ids"]))
    reranker.description_attention_mask.copy_(torch.from_numpy(batch["description_mask"]))
    head = classes.LabelCrossAttention(p["hidden"], p["num_labels"])
    with torch.no_grad():
        head.label_representations.normal_(0.0, 0.03)
    model = classes.PLMRR(encoder(), encoder(), head, reranker, chunk_size=p["chunk"],
                          pad_token_id=1, top_k=p["top_k"]).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    return model, optimizer


def torch_step_fn(model, optimizer, batch: dict, p: dict, device: str):
    import torch

    ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    mask = torch.from_numpy(batch["attention_mask"]).long().to(device)
    targets = torch.from_numpy(batch["labels"]).to(device)
    cuda = device.startswith("cuda")

    def step():
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                            enabled=p["bf16"]):
            logits = model(ids, mask, top_k=p["top_k"], targets=targets, reference_style=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        return loss

    return step


def torch_candidates(model, batch: dict, p: dict, device: str) -> np.ndarray:
    """The candidates the PyTorch step selects for this batch (top K with gold forcing)."""
    import torch

    ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    mask = torch.from_numpy(batch["attention_mask"]).long().to(device)
    targets = torch.from_numpy(batch["labels"]).to(device)
    with torch.no_grad():
        return model.select(model.retrieve(ids, mask), p["top_k"], targets).cpu().numpy()


# --- JAX ---------------------------------------------------------------------------------------

def jax_step_fn(p: dict, batch: dict, candidates: np.ndarray, num_unique: int | None):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from medcode_jax import steps
    from medcode_jax.models.encoders import EncoderConfig, build_encoder
    from medcode_jax.models.reranker import create_plmrr

    dtype = jnp.bfloat16 if p["bf16"] else jnp.float32
    cfg = EncoderConfig.from_hf_config(hf_config(p).to_dict())
    rngs = nnx.Rngs(params=0, dropout=1)
    model = create_plmrr(build_encoder(cfg, rngs=rngs, dtype=dtype),
                         description_ids=batch["description_ids"],
                         description_mask=batch["description_mask"], chunk_size=p["chunk"],
                         pad_token_id=cfg.pad_token_id, rngs=rngs, dtype=dtype)
    graphdef, params, frozen, rest = nnx.split(model, nnx.Param, nnx.Param, ...)
    tx = steps.make_optimizer(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                             opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    io = steps.RerankIO(num_unique=num_unique, full_normalisation=True)
    step = jax.jit(steps.make_train_step(graphdef, tx, optax.constant_schedule(5e-5),
                                         accum_steps=1, seed=0, skip_nonfinite=True, io=io),
                   donate_argnums=(0,))
    inputs = {"input_ids": jnp.asarray(batch["input_ids"]),
              "attention_mask": jnp.asarray(batch["attention_mask"]),
              "labels": jnp.asarray(batch["labels"]),
              "valid": jnp.ones((p["docs"],), bool),
              "candidates": jnp.asarray(candidates, jnp.int32),
              "candidate_scores": jnp.zeros(candidates.shape, jnp.float32)}
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], rest, inputs)
        return float(jax.block_until_ready(metrics["loss"]))

    return run


def unique_rows(candidates: np.ndarray, p: dict) -> tuple[int, int]:
    """(distinct codes in the micro-batch, static U bucket) — the trainer's rule."""
    slots = candidates.size
    try:
        from medcode_jax import candidates as cand_mod
    except ImportError:  # candidates module not there: plain numpy
        count = len(np.unique(candidates))
        return count, min(-(-count // p["unique_multiple"]) * p["unique_multiple"], slots)
    count = cand_mod.unique_count(candidates, 1)
    return count, cand_mod.unique_bucket(count, slots_per_micro=slots,
                                         multiple=p["unique_multiple"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (>= 1)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda for the gpu preset, else cpu)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    p["steps"] = args.steps or p["steps"]
    p["warmup"] = max(1, args.warmup or p["warmup"])
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    out = args.out or os.path.join(REPO, "bench", "results", f"rerank_step_{args.preset}.json")

    import jax
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("the gpu preset needs a CUDA build of PyTorch (and jax[cuda]); "
                         "use --preset cpu here")
    backend = jax.default_backend()
    if (backend == "gpu") != device.startswith("cuda"):
        print(f"warning: JAX runs on {backend} but PyTorch on {device}: not the same device")
    batch = make_batch(p)
    model, optimizer = torch_setup(p, batch, device)
    candidates = torch_candidates(model, batch, p, device)
    distinct, bucket = unique_rows(candidates, p)
    result = {"preset": args.preset, "config": p, "jax_backend": backend,
              "jax_device": str(jax.devices()[0]), "torch_device": device,
              "torch_version": torch.__version__, "jax_version": jax.__version__,
              "platform": platform.platform(), "slots": int(candidates.size),
              "distinct_descriptions": int(distinct), "num_unique": int(bucket)}

    if not args.skip_torch:
        med, times, first = _median_time(torch_step_fn(model, optimizer, batch, p, device),
                                         steps=p["steps"], warmup=p["warmup"])
        result["torch"] = {"median_s": med, "times_s": times, "first_s": first}
    del model, optimizer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    for name, num_unique in (("jax_per_slot", None), ("jax_unique", bucket)):
        med, times, first = _median_time(jax_step_fn(p, batch, candidates, num_unique),
                                         steps=p["steps"], warmup=p["warmup"])
        result[name] = {"median_s": med, "times_s": times, "first_s_with_compile": first,
                        "num_unique": num_unique}

    lines = [f"preset {args.preset}: B={p['docs']} x T={p['tokens']}, C={p['num_labels']}, "
             f"K={p['top_k']}, L={p['desc_len']}, D={p['hidden']} x {p['layers']} layers, "
             f"{'bf16' if p['bf16'] else 'fp32'}, jax on {backend}, torch on {device}"]
    if "torch" in result:
        lines.append(f"torch (reference-style) step: median {result['torch']['median_s']:.3f} s")
    per_slot, unique = result["jax_per_slot"]["median_s"], result["jax_unique"]["median_s"]
    lines.append(f"jax step, per-slot descriptions (U={candidates.size}): median "
                 f"{per_slot:.3f} s")
    lines.append(f"jax step, unique descriptions (U={bucket}, {distinct} distinct): median "
                 f"{unique:.3f} s; saving {100 * (1 - unique / per_slot):.1f}% vs per-slot")
    if "torch" in result:
        result["ratio_torch_over_jax_per_slot"] = result["torch"]["median_s"] / per_slot
        result["ratio_torch_over_jax_unique"] = result["torch"]["median_s"] / unique
        lines.append(f"ratio torch / jax: {result['ratio_torch_over_jax_per_slot']:.2f}x "
                     f"(per-slot), {result['ratio_torch_over_jax_unique']:.2f}x (unique)")
    result["unique_saving"] = 1 - unique / per_slot
    result["lines"] = lines
    for line in lines:
        print(line)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
