"""Input-pipeline throughput: prepared shards -> padded numpy training batches, documents/s.

    python bench/input_pipeline.py                      # builds a MIMIC-like synthetic dataset
    python bench/input_pipeline.py --data data/demo/icd10 --batches 300

Synthetic documents: log-normal lengths (median ~2,000 tokens, clipped to [100, 6,000]),
C = 7,942 labels, ~16 labels per document. Prints one line and writes a JSON file.
The bar (scale.md §4): >= 1,000 documents/s per host.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep import shards
from medcode_jax import input_pipeline as ip


def synthetic_dataset(out: Path, *, num_docs: int, num_labels: int, max_length: int,
                      seed: int) -> None:
    """A prepared dataset with MIMIC-like document lengths and label counts."""
    def examples():
        rng = np.random.default_rng(seed)
        for i in range(num_docs):
            n = int(np.clip(rng.lognormal(np.log(2000), 0.6), 100, max_length))
            labels = np.sort(rng.choice(num_labels, int(rng.integers(8, 25)), replace=False))
            yield {"_id": 20_000_000 + i, "input_ids": rng.integers(5, 50_000, n, np.int32),
                   "label_ids": labels}

    tokenizer = {"name": "synthetic", "sha256": "0" * 64, "pad_token_id": 1, "cls_token_id": 0,
                 "sep_token_id": 2, "vocab_size": 50_265, "lower_case": False}
    shards.write_dataset(
        out, split_examples={"train": examples()},
        metadata={"name": "bench", "max_length": max_length, "tokenizer": tokenizer},
        label_space=[f"L{i:05d}" for i in range(num_labels)], descriptions=[""] * num_labels,
        description_ids=np.zeros((num_labels, 64), np.int32),
        description_mask=np.zeros((num_labels, 64), np.int8), tokenizer_dir=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared dataset dir (default: build a synthetic one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num-docs", type=int, default=4000)
    parser.add_argument("--num-labels", type=int, default=7942)
    parser.add_argument("--max-length", type=int, default=6000)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--worker-count", type=int, default=0)
    parser.add_argument("--out", default="bench/results/input_pipeline.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        write_s = None
        data = args.data
        if data is None:
            data = os.path.join(tmp, "ds")
            start = time.perf_counter()
            synthetic_dataset(Path(data), num_docs=args.num_docs, num_labels=args.num_labels,
                              max_length=args.max_length, seed=0)
            write_s = time.perf_counter() - start
        ds = shards.open_dataset(data)
        buckets = ip.bucket_chunk_counts(ds.metadata["max_length"], args.chunk_size)
        it = ip.make_train_iterator(ds, split=args.split, global_batch_size=args.global_batch_size,
                                    chunk_size=args.chunk_size, buckets=buckets, seed=0,
                                    worker_count=args.worker_count)
        next(it)  # start-up (threads, first epoch plan) is not throughput
        start = time.perf_counter()
        real = padded = 0
        for batch in itertools.islice(it, args.batches):
            real += int(batch["lengths"].sum())
            padded += batch["input_ids"].size
        seconds = time.perf_counter() - start
    docs = args.batches * args.global_batch_size
    result = {
        "what": "input_pipeline", "docs_per_s": docs / seconds, "batches": args.batches,
        "global_batch_size": args.global_batch_size, "chunk_size": args.chunk_size,
        "buckets": list(buckets), "padding_efficiency": real / padded, "seconds": seconds,
        "worker_count": args.worker_count, "num_docs": len(ds.lengths(args.split)),
        "mean_tokens": float(ds.lengths(args.split).mean()), "write_s": write_s,
        "host": platform.node(), "cpus": os.cpu_count(),
    }
    print(f"input_pipeline: {result['docs_per_s']:.0f} docs/s ({docs} docs, "
          f"{args.batches} batches of {args.global_batch_size}, chunk {args.chunk_size}, "
          f"padding efficiency {result['padding_efficiency']:.2f}, "
          f"{os.cpu_count()} CPUs)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
