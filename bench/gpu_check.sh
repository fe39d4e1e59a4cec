#!/usr/bin/env bash
# GPU check, one GPU, under 10 minutes: bf16 parity, cuDNN attention, JAX vs PyTorch throughput,
# and bench/RESULTS.md with the numbers.
#
#   bash bench/gpu_check.sh                  # from anywhere; uses .venv/bin/python if present
#   PY=python3 bash bench/gpu_check.sh       # an interpreter that has jax[cuda] + CUDA torch
#
# Set-up on a fresh GPU machine. `make venv` (README) builds .venv with the CPU PyTorch wheel the
# Makefile pins and CPU-only jax; these checks need CUDA builds of both in one interpreter:
#
#   make venv
#   .venv/bin/pip install -U "jax[cuda12]"         # skip if jax already sees the GPU (below)
#   .venv/bin/pip install --force-reinstall --no-deps torch==2.13.0 \
#       --index-url https://download.pytorch.org/whl/cu128   # a CUDA build of the pinned torch
#
# or point PY at an environment where jax[cuda] and CUDA torch are already installed (many GPU
# images ship them) after `pip install -e '.[torch,test]'` there. Check with
#   $PY -c "import jax, torch; print(jax.default_backend(), torch.cuda.is_available())"
# which must print "gpu True". This script installs nothing (GPU machines often have no
# network); without CUDA it stops at once and says so.
#
# Steps (each under its own time limit; a failed step is reported and the next still runs):
#   1. bench/bf16_parity.py --cudnn       bf16 parity of every encoder family and head against
#                                         transformers / torch_model (PyTorch bf16 autocast and
#                                         fp32); ModernBERT + NeoBERT cuDNN attention vs the
#                                         explicit-mask path (outputs, gradients)      ~1 min
#   2. bench/throughput.py --preset gpu   PLM-CA train step + inference, JAX vs PyTorch, MFU ~3 min
#   3. bench/rerank_step.py --preset gpu  PLM-RR stage-2 step, JAX vs PyTorch           ~2 min
#   4. bench/RESULTS.md                   device, versions, date, table of the numbers
# Output: bench/results/{bf16_parity,throughput,rerank_step}_gpu.json, bench/results/gpu_check.log,
# bench/RESULTS.md; also copied to $OUT when that is set (the device runner's return folder).
# Exit status: 0 when every step passed, 1 otherwise, 3 when JAX or PyTorch cannot see a GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
PARITY_TIMEOUT="${PARITY_TIMEOUT:-150}"
THROUGHPUT_TIMEOUT="${THROUGHPUT_TIMEOUT:-270}"
RERANK_TIMEOUT="${RERANK_TIMEOUT:-150}"
# PyTorch and JAX share the GPU in one process: no up-front 75 % pool for JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
RESULTS=bench/results
LOG="$RESULTS/gpu_check.log"
mkdir -p "$RESULTS"
rm -f "$RESULTS"/bf16_parity_gpu.json "$RESULTS"/throughput_gpu.json \
      "$RESULTS"/rerank_step_gpu.json "$RESULTS"/gpu_check_status.txt
: > "$LOG"

log() { echo "$@" | tee -a "$LOG"; }

log "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), python: $PY"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader 2>&1 | tee -a "$LOG"
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then
import sys
import jax, torch
print(f"jax {jax.__version__}: backend {jax.default_backend()}, devices {jax.devices()}; "
      f"torch {torch.__version__}: cuda available {torch.cuda.is_available()}")
sys.exit(0 if jax.default_backend() == "gpu" and torch.cuda.is_available() else 3)
EOF
  log "JAX and PyTorch must both see the GPU: see the set-up lines at the top of $0"
  exit 3
fi

status=0
run_step() {  # name, time limit (s), command...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS rc
  log ""
  log "== $name (limit ${limit}s): $*"
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local verdict=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then verdict="timed out"; elif [[ $rc -ne 0 ]]; then verdict="failed (exit $rc)"; fi
  [[ $verdict == ok ]] || status=1
  echo "$name|$verdict|$((SECONDS - start))" >> "$RESULTS/gpu_check_status.txt"
  log "== $name: $verdict in $((SECONDS - start)) s"
}

run_step "bf16 parity + cuDNN attention" "$PARITY_TIMEOUT" "$PY" bench/bf16_parity.py --cudnn
run_step "PLM-CA throughput" "$THROUGHPUT_TIMEOUT" "$PY" bench/throughput.py --preset gpu
run_step "PLM-RR stage-2 step" "$RERANK_TIMEOUT" "$PY" bench/rerank_step.py --preset gpu

log ""
log "== writing bench/RESULTS.md"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
"""bench/RESULTS.md from the JSON files the steps above wrote."""
import json
import os

R = "bench/results"


def load(name):
    path = os.path.join(R, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def ms(x):
    return f"{1e3 * x:.1f} ms"


def gib(x):
    return "n/a" if x is None else f"{x / 2**30:.1f} GiB"


parity, tp, rr = load("bf16_parity_gpu.json"), load("throughput_gpu.json"), load("rerank_step_gpu.json")
steps = []
if os.path.isfile(os.path.join(R, "gpu_check_status.txt")):
    with open(os.path.join(R, "gpu_check_status.txt")) as f:
        steps = [line.rstrip("\n").split("|") for line in f if line.strip()]
first = tp or parity or {}
out = ["# GPU check results", "",
       "Written by `bench/gpu_check.sh` (numbers from `bench/results/*_gpu.json`; targets in "
       "`shared/spec/scale.md` §4).", ""]
if tp:
    d, v = tp["device"], tp["versions"]
    out += [f"- date: {tp['date']}",
            f"- device: {d['jax_device_kind']} (JAX {d['jax_backend']}, PyTorch {d['torch_device']}"
            f" {tp['settings']['torch'].get('device_name', '')})",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
            f"- PyTorch: matmul TF32 {tp['settings']['torch'].get('matmul_allow_tf32')}, cuDNN "
            f"TF32 {tp['settings']['torch'].get('cudnn_allow_tf32')}, bf16 autocast "
            f"{tp['settings']['torch_autocast_bf16']}; JAX compute dtype "
            f"{tp['settings']['jax_dtype']}, parameters fp32", ""]
elif parity:
    out += [f"- date: {parity['date']}", f"- device: {parity['device']['jax_device_kind']}",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in parity["versions"].items()), ""]
elif rr:
    out += [f"- device: JAX {rr['jax_device']}, PyTorch {rr['torch_device']}",
            f"- versions: jax {rr['jax_version']}, torch {rr['torch_version']}", ""]
out += ["| step | result | wall |", "|---|---|---|"]
out += [f"| {name} | {verdict} | {wall} s |" for name, verdict, wall in steps]
out.append("")

if tp:
    b, s = tp["batch"], tp["settings"]
    out += ["## PLM-CA throughput (`bench/throughput.py --preset gpu`)", "",
            f"B = {b['docs']} documents, lengths {b['lengths']}"
            + (f" (log-normal, median {s['median_tokens']}, max {s['max_tokens']}, seed "
               f"{s['seed']}, {s['batch_pick']} batch)" if s["lengths"] == "lognormal" else "")
            + ", padded to "
            f"{b['padded_length']} tokens ({100 * b['real_token_fraction']:.0f} % real); "
            f"D = {s['hidden']} x {s['layers']} layers, chunk {s['chunk']}, C = {s['num_labels']}; "
            f"{tp['flops']['train_step'] / 1e12:.2f} TFLOP per train step (formula in "
            f"`bench/throughput.py`), peak {s['peak_tflops'] or 'n/a'} TFLOP/s; median of {s['steps']} "
            "steps.", "",
            "| | JAX | PyTorch | PyTorch / JAX time |", "|---|---|---|---|"]
    j, t = tp["jax"], tp["torch"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    for part in ("train", "inference"):
        jp, tq = j[part], t[part]
        ratio = tp[f"{part}_ratio_torch_over_jax"]
        out += [f"| {part} step, median | {ms(jp['median_s'])} | {ms(tq['median_s'])} | "
                f"**{ratio:.2f}x** |",
                f"| {part} documents/s | {jp['docs_per_s']:.1f} | {tq['docs_per_s']:.1f} | |",
                f"| {part} real tokens/s | {jp['real_tokens_per_s']:,.0f} | "
                f"{tq['real_tokens_per_s']:,.0f} | |",
                f"| {part} TFLOP/s (MFU) | {jp['tflops_per_s']:.1f} ({pct(jp['mfu'])}) | "
                f"{tq['tflops_per_s']:.1f} ({pct(tq['mfu'])}) | |",
                f"| {part} peak device memory | {gib(jp.get('peak_memory_bytes'))} | "
                f"{gib(tq.get('peak_memory_bytes'))} | |",
                f"| {part} compile (JAX) / first call (PyTorch) | {jp['compile_s']:.1f} s | "
                f"{tq['first_s']:.2f} s | |"]
    out.append("")
if rr:
    c = rr["config"]
    out += ["## PLM-RR stage-2 step (`bench/rerank_step.py --preset gpu`)", "",
            f"B = {c['docs']} x {c['tokens']} tokens, K = {c['top_k']}, L = {c['desc_len']}, "
            f"C = {c['num_labels']}, D = {c['hidden']} x {c['layers']} layers, "
            f"{'bf16' if c['bf16'] else 'fp32'}; {rr['distinct_descriptions']} distinct of "
            f"{rr['slots']} descriptions.", "",
            "| PyTorch (reference-style) | JAX per-slot | JAX unique | PyTorch / JAX |",
            "|---|---|---|---|",
            f"| {ms(rr['torch']['median_s'])} | {ms(rr['jax_per_slot']['median_s'])} | "
            f"{ms(rr['jax_unique']['median_s'])} (U = {rr['num_unique']}) | "
            f"**{rr['ratio_torch_over_jax_per_slot']:.2f}x** per-slot, "
            f"**{rr['ratio_torch_over_jax_unique']:.2f}x** unique |", ""]
if parity:
    out += ["## bf16 parity (`bench/bf16_parity.py --cudnn`)", "",
            "Errors against PyTorch fp32, on real tokens (encoders) or logits (heads), "
            "relative to rms(ref): max / rms.", "",
            "| case | JAX fp32 | JAX bf16 | PyTorch bf16 autocast | result |", "|---|---|---|---|---|"]
    f = lambda e: f"{e['max']:.1e} / {e['rms']:.1e}"  # noqa: E731
    for r in parity["results"]:
        verdict = "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"])
        if "jax16" in r:
            out.append(f"| {r['name']} | {f(r['jax32'])} | {f(r['jax16'])} | {f(r['torch16'])} "
                       f"| {verdict} |")
        elif "mask_vs_ref" in r:
            out.append(f"| {r['name']} (cuDNN vs mask; grads rel. L2 {r['grad_rel_l2']:.1e}) | "
                       f"mask: {f(r['mask_vs_ref'])} | cuDNN: {f(r['cudnn_vs_ref'])} | "
                       f"cuDNN-mask: {f(r['cudnn_vs_mask'])} | {verdict} |")
        elif "cudnn_vs_mask" in r:
            pad = r["all_padding_row"]
            out.append(f"| {r['name']} (kernel; grads rel. L2 {r['grad_rel_l2']:.1e}) | | "
                       f"all-padding row max abs {pad['cudnn_abs_max']:.2g} (mask "
                       f"{pad['mask_abs_max']:.2g}) | cuDNN-mask: {f(r['cudnn_vs_mask'])} | "
                       f"{verdict} |")
        else:
            out.append(f"| {r['name']} | | | | {verdict} |")
    out.append("")
with open("bench/RESULTS.md", "w") as fh:
    fh.write("\n".join(out))
print("\n".join(out))
EOF

if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$RESULTS"/*_gpu.json "$LOG" bench/RESULTS.md "$OUT"/ 2>/dev/null || true
fi
log ""
log "gpu_check: $([[ $status -eq 0 ]] && echo 'all steps passed' || echo 'some steps FAILED (see above)')"
exit $status
