"""A whole PLM-CA training run, JAX trainer against a PyTorch loop, same data, same process.

    python bench/whole_run.py                          # cpu preset, a few minutes on 2 cores
    python bench/whole_run.py --set train_docs=2272 epochs=6 --out bench/results/x.json

``bench/throughput.py`` times one step on one batch; this times what a user waits for: every
step of every epoch with its real batch shapes, the validation pass after each epoch, the
checkpoints, and the final evaluation (best checkpoint, threshold tuned on val, test split).

Data: a prepared dataset written to a temporary directory (``data_prep.shards``) with
MIMIC-like note lengths (log-normal, median ``median_tokens``, clipped to [``min_tokens``,
``max_length``]), C codes, 8-24 codes per note drawn Zipf-like; random token ids.
Model: a random-init RoBERTa (``transformers`` config saved with ``save_pretrained``) with the
PLM-CA cross-attention head, fp32, dropout 0.1 as in RoBERTa (``rerank_step.hf_config``, the
config ``bench/throughput.py`` uses).

- JAX: ``medcode_jax.train.train_and_evaluate`` as ``python -m medcode_jax.main`` runs it
  (``configs/plmca.py`` with this data, encoder, batch and epochs; checkpoints synchronous),
  so the time includes compilation of every bucket shape (a first run: no persistent
  compilation cache unless ``JAX_COMPILATION_CACHE_DIR`` is set; ``medcode_jax.main`` keeps
  one by default, so its next run with the same shapes skips compiling), Orbax saves, metrics
  and writing predictions.
- PyTorch: ``medcode_jax.torch_model``'s PLM-CA around ``transformers``' ``RobertaModel``
  (SDPA attention), trained as the reference trainer does it (train mode, BCE-with-logits
  mean, ``backward``, ``clip_grad_norm_(1.0)``, ``AdamW``, linear warm-up/decay scheduler
  stepped every batch, ``zero_grad``); after each epoch a ``no_grad`` validation pass whose
  probabilities go through the same ``metrics.MetricAccumulator`` as the JAX run's, and a
  ``torch.save`` of the state dict when val mAP improves; at the end the best state dict is
  loaded, the threshold is tuned on val and the test split is scored. The batches are the
  ones the JAX run trains on (``input_pipeline``: length-sorted, bucket-padded, same seed), so
  both do the same arithmetic; the reference's own loader pads each batch to its longest note
  instead, which is never less work. This loop does no logging or progress bars, so it is a
  lower bound on the reference trainer's time.

Both run in this process, PyTorch first, then JAX, on the same threads
(``torch.set_num_threads`` = the CPUs this process may use = XLA's pool) and with the same host
allocator (``medcode_jax.hostmem`` as ``medcode_jax.main`` sets it: glibc's defaults unless
``MEDCODE_JAX_MALLOC=tuned``). Reported: wall time of each whole run, training documents/s
over it, and the time in the training loop vs everything else (JAX: its ``metrics.jsonl``
mean step time x steps, logged once per epoch so that no step waits for the host, which
includes compiling the train step for each new bucket shape and fetching the batches;
PyTorch: each step timed directly, the batch already fetched). Writes ``--out`` (default
``bench/results/whole_run_<preset>.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from medcode_jax import hostmem  # noqa: E402

MALLOC = hostmem.tune_malloc() if __name__ == "__main__" else None  # before any thread starts

import numpy as np  # noqa: E402

import rerank_step  # noqa: E402  (bench/rerank_step.py: hf_config, the Zipf code weights)
from throughput import parse_overrides  # noqa: E402  (bench/throughput.py: --set KEY=VALUE)

PRESETS = {
    # a few minutes for both runs on a 2-core machine
    "cpu": dict(hidden=256, layers=4, heads=4, intermediate=1024, vocab=10000, num_labels=1000,
                train_docs=256, val_docs=64, test_docs=64, median_tokens=600, sigma=0.6,
                min_tokens=100, max_length=2048, chunk=128, bucket_multiple=4, batch=8,
                eval_batch=16, epochs=2, lr=5e-5, seed=0),
}


# --- data and encoder ----------------------------------------------------------------------------

def write_dataset(out: str, p: dict) -> dict:
    """The synthetic prepared dataset; returns its token counts per split."""
    from data_prep import shards

    rng = np.random.default_rng(p["seed"])
    c = p["num_labels"]
    weights = rerank_step._zipf(c)  # noqa: SLF001
    counts = {}

    def examples(split: str, n: int, first_id: int):
        tokens = 0
        for i in range(n):
            length = int(np.clip(round(rng.lognormal(np.log(p["median_tokens"]), p["sigma"])),
                                 p["min_tokens"], p["max_length"]))
            tokens += length
            labels = np.sort(rng.choice(c, int(rng.integers(8, 25)), replace=False, p=weights))
            yield {"_id": first_id + i, "label_ids": labels.astype(np.int32),
                   "input_ids": rng.integers(5, p["vocab"], length).astype(np.int32)}
        counts[split] = tokens

    tokenizer = {"name": "synthetic", "sha256": "0" * 64, "pad_token_id": 1, "cls_token_id": 0,
                 "sep_token_id": 2, "vocab_size": p["vocab"], "lower_case": False}
    shards.write_dataset(
        out, split_examples={"train": examples("train", p["train_docs"], 10_000_000),
                             "val": examples("val", p["val_docs"], 20_000_000),
                             "test": examples("test", p["test_docs"], 30_000_000)},
        metadata={"name": "whole-run bench", "max_length": p["max_length"],
                  "tokenizer": tokenizer},
        label_space=[f"L{i:05d}" for i in range(c)], descriptions=[""] * c,
        description_ids=np.zeros((c, 8), np.int32), description_mask=np.zeros((c, 8), np.int8),
        tokenizer_dir=None)
    return counts


def write_encoder(out: str, p: dict) -> None:
    import torch
    import transformers

    torch.manual_seed(p["seed"])
    model = transformers.RobertaModel(rerank_step.hf_config(p), add_pooling_layer=False)
    model.save_pretrained(out)


def jax_config(p: dict, data_dir: str, encoder_dir: str):
    sys.path.insert(0, REPO)
    from configs import plmca

    c = plmca.get_config("")
    c.data.dir, c.data.max_length = data_dir, p["max_length"]
    c.data.chunk_size, c.data.bucket_multiple = p["chunk"], p["bucket_multiple"]
    c.encoder.path, c.encoder.pretrained = encoder_dir, False
    c.train.global_batch_size = c.train.micro_batch_size = p["batch"]
    c.train.eval_batch_size = p["eval_batch"]
    c.train.num_epochs, c.train.learning_rate = p["epochs"], p["lr"]
    c.train.dtype, c.train.seed = "float32", p["seed"]
    c.train.patience = p["epochs"] + 1
    # one log row per epoch (its window: that epoch's steps, evaluations excluded): no
    # per-step host sync, as in a real run (log_every_steps 50)
    c.train.log_every_steps = -(-p["train_docs"] // p["batch"])
    c.checkpoint.async_save = False
    return c


# --- the two runs --------------------------------------------------------------------------------

def run_jax(p: dict, data_dir: str, encoder_dir: str, workdir: str) -> dict:
    from medcode_jax import train

    config = jax_config(p, data_dir, encoder_dir)
    start = time.perf_counter()
    results = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        train_rows = [r for r in map(json.loads, f) if r["prefix"] == "train"]
    # each row: the mean step time of the window since the previous row (evaluations excluded)
    step_s, previous = 0.0, 0
    for row in train_rows:
        step_s += row["step_time_s"] * (row["step"] - previous)
        previous = row["step"]
    return {"wall_s": wall, "train_steps": previous, "step_time_s": step_s,
            "test_f1_micro": results["test"]["f1_micro"], "test_map": results["test"]["map"]}


def run_torch(p: dict, data_dir: str, encoder_dir: str, workdir: str) -> dict:
    import torch
    import transformers

    from data_prep import shards
    from medcode_jax import input_pipeline, metrics as metrics_lib, steps, torch_model

    start = time.perf_counter()
    torch.manual_seed(p["seed"])
    ds = shards.open_dataset(data_dir)
    buckets = input_pipeline.bucket_chunk_counts(p["max_length"], p["chunk"],
                                                 p["bucket_multiple"])
    classes = torch_model.torch_classes()
    encoder = transformers.AutoModel.from_pretrained(encoder_dir, attn_implementation="sdpa",
                                                     add_pooling_layer=False)
    head = classes.LabelCrossAttention(p["hidden"], p["num_labels"], scale=1.0,
                                       mask_padding=True)
    model = classes.PLMICD(encoder, head, chunk_size=p["chunk"], pad_token_id=1)
    per_epoch = input_pipeline.steps_per_epoch(ds, "train", p["batch"])
    total = per_epoch * p["epochs"]
    warmup = steps.warmup_steps_for(total, warmup_steps=-1, warmup_fraction=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (
        s / max(warmup, 1) if s < warmup else max(0.0, (total - s) / max(total - warmup, 1))))
    batches = input_pipeline.make_train_iterator(
        ds, global_batch_size=p["batch"], chunk_size=p["chunk"], buckets=buckets,
        seed=p["seed"])

    def accumulator():
        return metrics_lib.MetricAccumulator(
            ds.num_labels, label_train_counts=ds.metadata.get("train_label_counts"))

    def evaluate(split: str) -> metrics_lib.MetricAccumulator:
        model.eval()
        acc = accumulator()
        with torch.no_grad():
            for batch in input_pipeline.make_eval_batches(
                    ds, split, global_batch_size=p["eval_batch"], chunk_size=p["chunk"],
                    buckets=buckets):
                logits = model(torch.from_numpy(batch["input_ids"]).long(),
                               torch.from_numpy(batch["attention_mask"]).long())
                acc.update(torch.sigmoid(logits.float()).numpy(), batch["labels"],
                           batch["valid"])
        model.train()
        return acc

    best, best_path, step_s = -1.0, os.path.join(workdir, "best.pt"), 0.0
    model.train()
    for epoch in range(p["epochs"]):
        for _ in range(per_epoch):
            batch = next(batches)
            t0 = time.perf_counter()
            logits = model(torch.from_numpy(batch["input_ids"]).long(),
                           torch.from_numpy(batch["attention_mask"]).long())
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.from_numpy(batch["labels"]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step_s += time.perf_counter() - t0
        with evaluate("val") as acc:
            score = float(acc.finalize(0.5)["map"])
        if score > best:
            best = score
            torch.save(model.state_dict(), best_path)
    model.load_state_dict(torch.load(best_path, weights_only=True))
    with evaluate("val") as acc:
        threshold, _ = acc.tune_threshold()
    with evaluate("test") as acc:
        test = acc.finalize(threshold)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_steps": total, "step_time_s": step_s,
            "test_f1_micro": test["f1_micro"], "test_map": test["map"]}


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override preset fields, e.g. --set epochs=3 train_docs=512")
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--only", choices=("both", "jax", "torch"), default="both")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    p = parse_overrides(args.set, dict(PRESETS[args.preset]))
    out = args.out or os.path.join(REPO, "bench", "results", f"whole_run_{args.preset}.json")

    import jax
    import torch

    torch.set_num_threads(args.torch_threads)
    result = {"what": "whole_run", "preset": args.preset, "settings": p,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": {"jax_backend": jax.default_backend(), "cpus": len(os.sched_getaffinity(0)),
                         "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                         "load_average_1m": os.getloadavg()[0]},
              "versions": {"jax": jax.__version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "host_malloc": MALLOC}
    with tempfile.TemporaryDirectory(prefix="whole_run_") as tmp:
        data_dir, encoder_dir = os.path.join(tmp, "data"), os.path.join(tmp, "encoder")
        tokens = write_dataset(data_dir, p)
        write_encoder(encoder_dir, p)
        result["tokens"] = tokens
        print(f"whole run, preset {args.preset}: {p['train_docs']} train / {p['val_docs']} val / "
              f"{p['test_docs']} test notes (median {p['median_tokens']} tokens, "
              f"{tokens['train'] / p['train_docs']:.0f} mean), batch {p['batch']}, "
              f"{p['epochs']} epochs, RoBERTa {p['layers']} x {p['hidden']}, C={p['num_labels']}, "
              f"fp32; {MALLOC}", flush=True)
        for name, fn in (("torch", run_torch), ("jax", run_jax)):
            if args.only not in ("both", name):
                continue
            workdir = os.path.join(tmp, f"run_{name}")
            os.makedirs(workdir)
            r = fn(p, data_dir, encoder_dir, workdir)
            # the process's peak so far (PyTorch runs first, so JAX's figure is max of both)
            r["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            r["train_docs_per_s"] = p["train_docs"] * p["epochs"] / r["wall_s"]
            r["docs_per_s_in_steps"] = p["train_docs"] * p["epochs"] / r["step_time_s"]
            r["other_s"] = r["wall_s"] - r["step_time_s"]
            result[name] = r
            print(f"{name:5s}: whole run {r['wall_s']:7.1f} s = training loop "
                  f"{r['step_time_s']:6.1f} s + other {r['other_s']:5.1f} s (start-up, "
                  f"validation, checkpoints, final evaluation); {r['train_docs_per_s']:.2f} "
                  f"train docs/s over the run, {r['docs_per_s_in_steps']:.2f} in the loop; "
                  f"test micro-F1 {100 * r['test_f1_micro']:.2f}; process peak RSS "
                  f"{r['peak_rss_gib']:.2f} GiB", flush=True)
    if "jax" in result and "torch" in result:
        for key in ("wall_s", "step_time_s"):
            result[f"ratio_torch_over_jax_{key}"] = result["torch"][key] / result["jax"][key]
        print(f"ratio torch/jax: whole run {result['ratio_torch_over_jax_wall_s']:.2f}x, "
              f"training steps {result['ratio_torch_over_jax_step_time_s']:.2f}x "
              "(> 1: JAX faster)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp_out = out + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
