"""Wall time and peak RSS of `python -m data_prep.mimiciv` on a synthetic MIMIC-IV corpus.

    python bench/prep_memory.py --num-admissions 20000 --workdir /tmp/prep_bench

Generates the corpus with `python -m data_prep.demo_corpus` (a subprocess, reused when the
folder already holds one), then runs the preparation as a subprocess while polling the RSS of
its whole process tree (psutil) every `--poll` seconds. Prints one line per measurement and
writes them to `--json` (default: bench/results/prep_memory.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd: list[str], poll: float, log_path: str) -> dict[str, float]:
    """Run `cmd` (output to `log_path`): wall seconds, CPU seconds (user + sys, all threads;
    the better measure on a shared machine) and peak RSS of its process tree in GiB."""
    cpu0 = _children_cpu_s()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(ps))
            except psutil.NoSuchProcess:
                break
            time.sleep(poll)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"wall_s": round(wall, 2), "cpu_s": round(_children_cpu_s() - cpu0, 2),
            "peak_rss_gib": round(peak / 2**30, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-admissions", type=int, default=20000)
    p.add_argument("--workdir", default="/tmp/prep_memory_bench")
    p.add_argument("--tokenizer", default="demo:minilm")
    p.add_argument("--icd-version", type=int, default=10, choices=(9, 10))
    p.add_argument("--max-length", type=int, default=6000)
    p.add_argument("--generated-split", action="store_true",
                   help="no --split-file: exercise the generated split")
    p.add_argument("--poll", type=float, default=0.2, help="RSS polling interval (s)")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "prep_memory.json"))
    args = p.parse_args(argv)

    raw = os.path.join(args.workdir, f"raw_{args.num_admissions}")
    out = os.path.join(args.workdir, f"prepared_icd{args.icd_version}_{args.num_admissions}")
    os.makedirs(args.workdir, exist_ok=True)
    results: dict[str, object] = {
        "num_admissions": args.num_admissions, "icd_version": args.icd_version,
        "tokenizer": args.tokenizer, "max_length": args.max_length,
        "cpus": os.cpu_count(), "machine": platform.platform(),
    }
    if not os.path.isdir(os.path.join(raw, "mimiciv")):
        gen = run_measured([sys.executable, "-m", "data_prep.demo_corpus", "--out", raw,
                            "--num-admissions", str(args.num_admissions), "--seed", "0"],
                           args.poll, os.path.join(args.workdir, "demo_corpus.log"))
        results["demo_corpus"] = gen
        print(f"demo_corpus  admissions={args.num_admissions}  wall={gen['wall_s']:.1f}s  "
              f"cpu={gen['cpu_s']:.1f}s  peak_rss={gen['peak_rss_gib']:.2f}GiB", flush=True)
    note = os.path.join(raw, "mimic-iv-note")
    note_files = [os.path.join(d, f) for d, _, fs in os.walk(note) for f in fs
                  if f.startswith("discharge")]
    results["discharge_csv_gz_mib"] = round(os.path.getsize(note_files[0]) / 2**20, 1)

    cmd = [sys.executable, "-m", "data_prep.mimiciv", "--mimic-dir", raw, "--out", out,
           "--overwrite", "--tokenizer", args.tokenizer, "--icd-version", str(args.icd_version),
           "--max-length", str(args.max_length)]
    if not args.generated_split:
        cmd += ["--split-file", os.path.join(raw, f"mimiciv_icd{args.icd_version}_split.feather")]
    prep = run_measured(cmd, args.poll, os.path.join(args.workdir, "prepare.log"))
    with open(os.path.join(out, "metadata.json")) as f:
        meta = json.load(f)
    docs = sum(c["documents"] for c in meta["counts"].values())
    prep["documents"] = docs
    prep["num_labels"] = meta["num_labels"]
    prep["docs_per_s"] = round(docs / prep["wall_s"], 1)
    results["prepare"] = prep
    print(f"prepare      documents={docs}  labels={meta['num_labels']}  "
          f"wall={prep['wall_s']:.1f}s  cpu={prep['cpu_s']:.1f}s  "
          f"peak_rss={prep['peak_rss_gib']:.2f}GiB  "
          f"({prep['docs_per_s']:.0f} docs/s)", flush=True)

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
