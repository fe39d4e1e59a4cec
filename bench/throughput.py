"""PLM-CA training and inference throughput: JAX vs the PyTorch reference, same process and device.

    python bench/throughput.py --preset cpu            # 4 x 256, C 1,000, 4 x 1,024 tokens, fp32
    python bench/throughput.py --preset gpu            # RoBERTa-base, C 7,942, MIMIC-like, bf16
    python bench/throughput.py --preset gpu --rerank   # + the PLM-RR stage-2 step (rerank_step.py)
    python bench/throughput.py --preset gpu --set docs=4 --steps 20 --peak-tflops 989

The same padded batch (token ids, mask, multi-hot labels) goes to both implementations, already
on the device (host -> device copies are not timed). Random initialisation on both sides
(timings only; the two models hold different random weights). Every timed call is synchronised
(``jax.block_until_ready`` on the new state and metrics, ``torch.cuda.synchronize``).

- JAX: ``steps.make_train_step`` (the trainer's step: fp32 gradients, BCE mean over B x C,
  ``skip_nonfinite``, dropout on) with ``steps.make_optimizer`` (AdamW without weight decay,
  clip 1.0), ``jax.jit(..., donate_argnums=0)`` as ``medcode_jax/train.py`` jits it; the model
  is ``plm_icd.create_plmicd`` (cross-attention head) around ``encoders.build_encoder``, compute
  dtype bfloat16 in the gpu preset (``config.train.dtype="bfloat16"``), parameters fp32.
  Inference: ``steps.make_eval_step`` (sigmoid probabilities), jitted with ``steps.jit_inference``
  as the trainer jits it (on CPU: without XLA's YNNPACK fusions).
- PyTorch: ``medcode_jax.torch_model``'s ``PLMICD`` + ``LabelCrossAttention`` around a
  ``transformers`` ``RobertaModel`` built from the same random config (SDPA attention, no
  pooler: the EMC reference's PLM-CA), run as the reference trainer runs it: train mode, the
  forward and ``binary_cross_entropy_with_logits`` (mean) under
  ``torch.autocast("cuda", torch.bfloat16)`` in the gpu preset (fp32 weights), ``backward``,
  ``clip_grad_norm_(1.0)``, ``AdamW.step`` (weight decay 0, PyTorch's default implementation),
  ``zero_grad``. Inference: eval mode, ``torch.no_grad``, autocast, sigmoid.
  TF32 for fp32 CUDA matmuls is off (PyTorch's default; ``--tf32`` turns it on),
  ``cudnn.allow_tf32`` True (PyTorch's default), ``cudnn.benchmark`` False; recorded in the JSON.
  CPU: ``torch.set_num_threads(--torch-threads)``, by default the CPUs this process may use,
  which is what XLA's CPU thread pool uses.

Batch: the cpu preset has B documents of exactly ``tokens`` tokens. The gpu preset draws
document lengths from a log-normal (median 2,000 tokens, sigma 0.6, clipped to [100, 6,000],
seed fixed) the way ``input_pipeline`` batches them: a window of ``SORT_WINDOW_BATCHES`` x B
lengths is sorted and cut into batches, and the middle batch is used (a typical training batch;
``--set batch_pick=random`` takes B unsorted draws instead). The batch is padded to the smallest
length bucket of ``input_pipeline.bucket_chunk_counts(max_tokens, chunk, bucket_multiple)``
that holds its longest document (static JAX shapes; the same padded batch for PyTorch).

Model FLOPs (matmuls only, a multiply-add = 2 FLOPs) of one pass over the padded batch of B
documents of T = n·c tokens (n chunks of c tokens), width D, L layers, MLP width I, C codes:

    encoder, per layer and chunk row:  Q, K, V and output projections 8·c·D²
                                       attention scores Q·Kᵀ 2·c²·D, attention·V 2·c²·D
                                       MLP (two matmuls) 4·c·D·I
        F_enc  = B·n·L·(8·c·D² + 4·c²·D + 4·c·D·I)
    head (PLM-CA), per document:       K and V projections 4·T·D²
                                       label scores Q·Kᵀ 2·C·T·D, attention·V 2·C·T·D
        F_head = B·(4·T·D² + 4·C·T·D)
    training step = 3·(F_enc + F_head) (backward = 2 x forward), inference = F_enc + F_head.

Embeddings, norms, softmaxes, the output scorer, the loss and the optimiser are not counted;
padded tokens are (both implementations compute them; ``real_token_fraction`` says how many
are real). One 6,000-token note (47 chunks) at RoBERTa-base sizes and C = 7,942 gives 3.6
TFLOP per training step (scale.md: "≈ 3.5 TFLOP"). MFU = FLOPs / median step time / peak, with
the peak from ``--peak-tflops`` or, for bf16 on an H100 / H200 / GH200, 989 TFLOP/s (dense bf16
tensor cores; A100: 312); not reported on CPU unless ``--peak-tflops`` is given.

Peak device memory: JAX ``device.memory_stats()["peak_bytes_in_use"]`` (process lifetime: the
JAX inference step runs before the train step, so the train figure is the train peak), PyTorch
``torch.cuda.max_memory_allocated`` (reset before each measurement); null on CPU, where neither
backend reports it. On GPU all PyTorch measurements run first and free their memory before JAX
starts, and JAX's up-front allocation of 75 % of the device is turned off
(``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set) so the two never compete for memory.

Prints one line per measurement; writes everything to ``--out`` (default
``bench/results/throughput_<preset>.json``). ``--rerank`` also runs ``bench/rerank_step.py``'s
measurement (its preset of the same name) in this process and adds it under ``"rerank"``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from medcode_jax import hostmem  # noqa: E402

# As `python -m medcode_jax.main` does, before anything starts threads (numpy's BLAS included);
# both implementations run in this process, so both get it (MEDCODE_JAX_MALLOC=tuned: both).
MALLOC = hostmem.tune_malloc() if __name__ == "__main__" else None

import numpy as np  # noqa: E402

import rerank_step  # noqa: E402  (bench/rerank_step.py: hf_config, the stage-2 measurement)

PRESETS = {
    # fits a 2-core machine in about a minute
    "cpu": dict(hidden=256, layers=4, heads=4, intermediate=1024, vocab=10000, num_labels=1000,
                docs=4, tokens=1024, lengths="fixed", max_tokens=1024, chunk=128,
                bucket_multiple=8, bf16=False, steps=5, warmup=2, median_tokens=2000,
                sigma=0.6, min_tokens=100, batch_pick="sorted", seed=0),
    # RoBERTa-base sizes, MIMIC-IV ICD-10 label space, MIMIC-like note lengths
    "gpu": dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=50265, num_labels=7942,
                docs=8, tokens=0, lengths="lognormal", max_tokens=6000, chunk=128,
                bucket_multiple=8, bf16=True, steps=10, warmup=3, median_tokens=2000,
                sigma=0.6, min_tokens=100, batch_pick="sorted", seed=0),
}
# Dense bf16 tensor-core peaks (TFLOP/s) by device-kind substring; MFU uses them for bf16 only.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


# --- batch and FLOPs -----------------------------------------------------------------------------

def document_lengths(p: dict) -> np.ndarray:
    """Token counts of the B documents of the benchmark batch (module docstring)."""
    b = p["docs"]
    if p["lengths"] == "fixed":
        return np.full((b,), p["tokens"], np.int64)
    from medcode_jax import input_pipeline

    window = input_pipeline.SORT_WINDOW_BATCHES
    rng = np.random.default_rng(p["seed"])
    pool = rng.lognormal(np.log(p["median_tokens"]), p["sigma"], size=window * b)
    pool = np.clip(np.round(pool), p["min_tokens"], p["max_tokens"]).astype(np.int64)
    if p["batch_pick"] == "random":
        return pool[:b]
    if p["batch_pick"] != "sorted":
        raise SystemExit(f"batch_pick={p['batch_pick']!r}: use 'sorted' or 'random'")
    return np.sort(pool).reshape(window, b)[window // 2]


def padded_chunks(lengths: np.ndarray, p: dict) -> int:
    """The length bucket (chunk count) the input pipeline pads this batch to."""
    from medcode_jax import input_pipeline

    buckets = input_pipeline.bucket_chunk_counts(p["max_tokens"], p["chunk"],
                                                 p["bucket_multiple"])
    needed = max(1, -(-int(lengths.max()) // p["chunk"]))
    fits = [n for n in buckets if n >= needed]
    if not fits:
        raise SystemExit(f"a document of {lengths.max()} tokens exceeds the largest bucket "
                         f"({max(buckets)} chunks of {p['chunk']}): raise max_tokens")
    return fits[0]


def make_batch(p: dict) -> dict[str, np.ndarray]:
    """Padded ids [B, n·c] (pad id 1), mask, multi-hot labels [B, C] (~15 codes, Zipf-like)."""
    lengths = document_lengths(p)
    width = padded_chunks(lengths, p) * p["chunk"]
    rng = np.random.default_rng(p["seed"] + 1)
    b, c, pad = p["docs"], p["num_labels"], 1
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(3, p["vocab"], size=(b, width)), pad).astype(np.int32)
    labels = np.zeros((b, c), np.float32)
    weights = rerank_step._zipf(c)  # noqa: SLF001
    for row in range(b):
        labels[row, rng.choice(c, size=min(15, c), replace=False, p=weights)] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "valid": np.ones((b,), bool), "lengths": lengths}


def model_flops(p: dict, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """FLOPs of one forward pass over the padded batch (module docstring), by part."""
    b, t = batch["input_ids"].shape
    c, d, i = p["chunk"], p["hidden"], p["intermediate"]
    layers, labels = p["layers"], p["num_labels"]
    rows = b * (t // c)
    encoder = rows * layers * (8 * c * d * d + 4 * c * c * d + 4 * c * d * i)
    head = b * (4 * t * d * d + 4 * labels * t * d)
    return {"encoder_forward": float(encoder), "head_forward": float(head),
            "forward": float(encoder + head), "train_step": 3.0 * (encoder + head)}


# --- timing --------------------------------------------------------------------------------------

def timed(fn, *, steps: int, warmup: int) -> dict:
    """First call (compilation / library warm-up included), ``warmup - 1`` more untimed calls,
    then ``steps`` timed calls (``rerank_step._median_time``); each call must return only when
    the device is done."""
    med, times, first = rerank_step._median_time(fn, steps=steps, warmup=warmup)  # noqa: SLF001
    return {"median_s": med, "times_s": times, "first_s": first, "min_s": min(times)}


# --- PyTorch -------------------------------------------------------------------------------------

def torch_settings(args, device: str) -> dict:
    import torch

    settings = {"threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
        settings.update(matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                        cudnn_benchmark=torch.backends.cudnn.benchmark,
                        device_name=torch.cuda.get_device_name(device))
    else:
        torch.set_num_threads(args.torch_threads)
        settings["threads"] = torch.get_num_threads()
    return settings


def torch_model(p: dict, device: str):
    import torch
    import transformers

    from medcode_jax import torch_model as tm

    torch.manual_seed(0)
    classes = tm.torch_classes()
    encoder = transformers.AutoModel.from_config(
        rerank_step.hf_config(p), attn_implementation="sdpa", add_pooling_layer=False)
    head = classes.LabelCrossAttention(p["hidden"], p["num_labels"], scale=1.0, mask_padding=True)
    with torch.no_grad():
        head.label_representations.normal_(0.0, 0.03)
    return classes.PLMICD(encoder, head, chunk_size=p["chunk"], pad_token_id=1).to(device)


def measure_torch(p: dict, batch: dict, device: str, *, steps: int, warmup: int) -> dict:
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = lambda: torch.autocast(device_type="cuda" if cuda else "cpu",  # noqa: E731
                                      dtype=torch.bfloat16, enabled=p["bf16"])
    ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    mask = torch.from_numpy(batch["attention_mask"]).long().to(device)
    targets = torch.from_numpy(batch["labels"]).to(device)
    model = torch_model(p, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    losses = []

    def train_step():
        with autocast():
            logits = model(ids, mask)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        sync()
        losses.append(loss.detach())

    def infer():
        with torch.no_grad(), autocast():
            probs = torch.sigmoid(model(ids, mask).float())
        sync()
        return probs

    out = {}
    model.train()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    out["train"] = timed(train_step, steps=steps, warmup=warmup)
    out["train"]["loss_first_last"] = [float(losses[0]), float(losses[-1])]
    if cuda:
        out["train"]["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    out["inference"] = timed(infer, steps=steps, warmup=warmup)
    if cuda:
        out["inference"]["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    del model, optimizer, ids, mask, targets
    if cuda:
        torch.cuda.empty_cache()
    return out


# --- JAX -----------------------------------------------------------------------------------------

def jax_peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_jax(p: dict, batch: dict, *, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from medcode_jax import steps as steps_lib
    from medcode_jax.models.encoders import EncoderConfig, build_encoder
    from medcode_jax.models.plm_icd import create_plmicd

    dtype = jnp.bfloat16 if p["bf16"] else jnp.float32
    cfg = EncoderConfig.from_hf_config(rerank_step.hf_config(p).to_dict())
    rngs = nnx.Rngs(params=0, dropout=1)
    encoder = build_encoder(cfg, rngs=rngs, dtype=dtype, param_dtype=jnp.float32)
    model = create_plmicd(encoder, num_labels=p["num_labels"], head_type="cross_attention",
                          chunk_size=p["chunk"], pad_token_id=cfg.pad_token_id, scale=1.0,
                          mask_padding=True, rngs=rngs, dtype=dtype, param_dtype=jnp.float32)
    graphdef, params, frozen, rest = nnx.split(model, nnx.Param, nnx.Param, ...)
    del model, encoder
    tx = steps_lib.make_optimizer(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
    state = steps_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                                 opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    train_step = jax.jit(steps_lib.make_train_step(
        graphdef, tx, optax.constant_schedule(5e-5), accum_steps=1, seed=0, skip_nonfinite=True),
        donate_argnums=(0,))
    eval_step = steps_lib.jit_inference(steps_lib.make_eval_step(graphdef))  # as the trainer
    inputs = {k: jnp.asarray(batch[k]) for k in steps_lib.TRAIN_KEYS}
    eval_inputs = {k: inputs[k] for k in steps_lib.EVAL_KEYS}
    holder = {"state": state}
    losses = []

    def infer():
        s = holder["state"]
        return jax.block_until_ready(eval_step(s.params, s.frozen, rest, eval_inputs))

    def train():
        holder["state"], metrics = train_step(holder["state"], rest, inputs)
        jax.block_until_ready((holder["state"], metrics))
        losses.append(metrics["loss"])

    out = {"inference": timed(infer, steps=steps, warmup=warmup)}
    out["inference"]["peak_memory_bytes"] = jax_peak_memory()
    out["train"] = timed(train, steps=steps, warmup=warmup)
    out["train"]["peak_memory_bytes"] = jax_peak_memory()
    out["train"]["loss_first_last"] = [float(losses[0]), float(losses[-1])]
    out["train"]["skipped_updates"] = int(holder["state"].skipped)
    for part in ("train", "inference"):
        r = out[part]
        r["compile_s"] = max(r["first_s"] - r["median_s"], 0.0)
    del holder, state, params, frozen, rest, inputs, eval_inputs
    return out


# --- PLM-RR stage 2 (bench/rerank_step.py) -------------------------------------------------------

def rerank_torch(preset: str, device: str, *, steps: int | None, warmup: int | None) -> dict:
    """The PyTorch half of rerank_step's measurement; returns what the JAX half needs too."""
    p = dict(rerank_step.PRESETS[preset])
    p["steps"] = steps or p["steps"]
    p["warmup"] = max(1, warmup or p["warmup"])
    batch = rerank_step.make_batch(p)
    model, optimizer = rerank_step.torch_setup(p, batch, device)
    candidates = rerank_step.torch_candidates(model, batch, p, device)
    distinct, bucket = rerank_step.unique_rows(candidates, p)
    med, times, first = rerank_step._median_time(  # noqa: SLF001
        rerank_step.torch_step_fn(model, optimizer, batch, p, device),
        steps=p["steps"], warmup=p["warmup"])
    del model, optimizer
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return {"config": p, "batch": batch, "candidates": candidates, "distinct": int(distinct),
            "num_unique": int(bucket),
            "torch": {"median_s": med, "times_s": times, "first_s": first}}


def rerank_jax(state: dict) -> dict:
    p, batch, candidates = state.pop("config"), state.pop("batch"), state.pop("candidates")
    out = {"config": p, **state}
    for name, num_unique in (("jax_per_slot", None), ("jax_unique", state["num_unique"])):
        med, times, first = rerank_step._median_time(  # noqa: SLF001
            rerank_step.jax_step_fn(p, batch, candidates, num_unique),
            steps=p["steps"], warmup=p["warmup"])
        out[name] = {"median_s": med, "times_s": times, "first_s": first,
                     "compile_s": max(first - med, 0.0), "num_unique": num_unique}
    out["slots"] = int(candidates.size)
    for name in ("per_slot", "unique"):
        out[f"ratio_torch_over_jax_{name}"] = (out["torch"]["median_s"]
                                               / out[f"jax_{name}"]["median_s"])
    return out


# --- report --------------------------------------------------------------------------------------

def _gib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def summarise(result: dict, peak_tflops: float | None) -> list[str]:
    """Per-implementation rates (added to ``result``) and the printed lines."""
    batch, flops = result["batch"], result["flops"]
    docs, real = batch["docs"], batch["real_tokens"]
    lines = []
    for part, work in (("train", flops["train_step"]), ("inference", flops["forward"])):
        for impl in ("jax", "torch"):
            r = result[impl][part]
            r["docs_per_s"] = docs / r["median_s"]
            r["real_tokens_per_s"] = real / r["median_s"]
            r["padded_tokens_per_s"] = batch["padded_tokens"] / r["median_s"]
            r["tflops_per_s"] = work / r["median_s"] / 1e12
            r["mfu"] = r["tflops_per_s"] / peak_tflops if peak_tflops else None
            extra = (f", compile {r['compile_s']:.1f} s" if impl == "jax"
                     else f", first call {r['first_s']:.2f} s")
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
            lines.append(
                f"{part:9s} {impl:5s}: median {r['median_s'] * 1e3:8.1f} ms, "
                f"{r['docs_per_s']:7.2f} docs/s, {r['real_tokens_per_s']:9,.0f} tokens/s"
                f"{extra}, peak mem {_gib(r.get('peak_memory_bytes'))}, "
                f"{r['tflops_per_s']:.2f} TFLOP/s{mfu}")
        ratio = result["torch"][part]["median_s"] / result["jax"][part]["median_s"]
        result[f"{part}_ratio_torch_over_jax"] = ratio
        lines.append(f"{part:9s} ratio torch/jax step time: {ratio:.2f}x "
                     f"({'JAX faster' if ratio > 1 else 'PyTorch faster'})")
    if "rerank" in result:
        rr = result["rerank"]
        lines.append(
            f"plm-rr stage-2 step: torch {rr['torch']['median_s'] * 1e3:.1f} ms, jax per-slot "
            f"{rr['jax_per_slot']['median_s'] * 1e3:.1f} ms "
            f"({rr['ratio_torch_over_jax_per_slot']:.2f}x), jax unique (U={rr['num_unique']}) "
            f"{rr['jax_unique']['median_s'] * 1e3:.1f} ms "
            f"({rr['ratio_torch_over_jax_unique']:.2f}x)")
    return lines


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def parse_overrides(pairs: list[str], p: dict) -> dict:
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in p:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(p)}")
        kind = type(p[key])
        p[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset field (e.g. docs=4, layers=2, bf16=false)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first, compilation included (>= 1)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda for the gpu preset, else cpu)")
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch CPU threads (default: the CPUs this process may use, "
                             "as XLA's CPU thread pool)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 in PyTorch fp32 CUDA matmuls (default off)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: known GPUs in bf16; none on CPU)")
    parser.add_argument("--rerank", action="store_true",
                        help="also measure the PLM-RR stage-2 step (bench/rerank_step.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    p = parse_overrides(args.set, dict(PRESETS[args.preset]))
    steps = args.steps or p["steps"]
    warmup = max(1, args.warmup or p["warmup"])
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    out = args.out or os.path.join(REPO, "bench", "results", f"throughput_{args.preset}.json")

    # Before JAX initialises its GPU client: no up-front 75 % pool (PyTorch shares the device).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import flax
    import jax
    import torch
    import transformers

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("the gpu preset needs a CUDA build of PyTorch (and jax[cuda]); "
                         "use --preset cpu here (or --device cpu for a slow smoke run)")
    backend = jax.default_backend()
    if (backend == "gpu") != device.startswith("cuda"):
        print(f"warning: JAX runs on {backend} but PyTorch on {device}: not the same device")
    jax_device = jax.devices()[0]
    peak = args.peak_tflops
    if peak is None and p["bf16"] and backend == "gpu":
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in jax_device.device_kind), None)

    batch = make_batch(p)
    b, width = batch["input_ids"].shape
    real = int(batch["lengths"].sum())
    result = {
        "what": "throughput", "preset": args.preset,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"jax_backend": backend, "jax_device": str(jax_device),
                   "jax_device_kind": jax_device.device_kind, "torch_device": device,
                   "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                   "load_average_1m": os.getloadavg()[0]},
        "versions": {"jax": jax.__version__, "jaxlib": package_version("jaxlib"),
                     "jax_cuda_plugin": package_version("jax-cuda12-plugin")
                     or package_version("jax-cuda13-plugin"), "flax": flax.__version__,
                     "optax": package_version("optax"), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {**p, "steps": steps, "warmup": warmup, "peak_tflops": peak,
                     "jax_dtype": "bfloat16" if p["bf16"] else "float32",
                     "torch_autocast_bf16": p["bf16"],
                     "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
                     "xla_python_client_preallocate": os.environ.get(
                         "XLA_PYTHON_CLIENT_PREALLOCATE"),
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "host_malloc": MALLOC},
        "batch": {"docs": b, "padded_length": width, "chunks_per_doc": width // p["chunk"],
                  "lengths": [int(x) for x in batch["lengths"]], "real_tokens": real,
                  "padded_tokens": b * width, "real_token_fraction": real / (b * width)},
        "flops": model_flops(p, batch),
    }
    result["settings"]["torch"] = torch_settings(args, device)
    head = (f"preset {args.preset}: B={b} x T={width} ({real:,} real tokens, "
            f"{100 * real / (b * width):.0f}%), C={p['num_labels']}, D={p['hidden']} x "
            f"{p['layers']} layers, chunk {p['chunk']}, {'bf16' if p['bf16'] else 'fp32'}; "
            f"jax on {jax_device.device_kind} ({backend}), torch on {device} "
            f"({result['settings']['torch']['threads']} threads); "
            f"{result['flops']['train_step'] / 1e12:.3f} TFLOP/step; {MALLOC}")
    print(head, flush=True)

    # All PyTorch work first (then its memory is released), then JAX.
    result["torch"] = measure_torch(p, batch, device, steps=steps, warmup=warmup)
    print(f"torch done: train {result['torch']['train']['median_s'] * 1e3:.1f} ms/step", flush=True)
    pending = rerank_torch(args.preset, device, steps=args.steps, warmup=args.warmup) \
        if args.rerank else None
    result["jax"] = measure_jax(p, batch, steps=steps, warmup=warmup)
    if pending is not None:
        result["rerank"] = rerank_jax(pending)
    lines = [head] + summarise(result, peak)
    result["lines"] = lines
    for line in lines[1:]:
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
