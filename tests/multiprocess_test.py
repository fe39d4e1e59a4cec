"""Multi-host for real on one machine (scale.md §2): two processes joined by
`jax.distributed` on localhost (gloo CPU collectives), 2 CPU devices each, started through
`python -m medcode_jax.main --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I` on the tiny PLM-CA config, compared with one process on 4 devices.

One test, three phases, every child a separate OS process (killed on any failure):
  A. the single-process reference (4 devices) runs to the end while the 2-process run trains;
     process 1 pauses right after the checkpoint of step 2 is on disk, process 0 runs into
     step 3 and waits for it in the collective; then process 1 is SIGKILLed (process 0 is
     killed too when it does not die by itself within a few seconds);
  B. the same two commands again (the restart) resume from that checkpoint and finish;
  C. checks: the loss curve (metrics.jsonl: steps 1-2 from the killed run, 3-8 from the
     restart) and the final parameters equal the reference (fp32, 1e-5); the final metrics
     agree; only process 0 wrote TensorBoard and JSON files (every file each process opened for
     writing is recorded by a Python audit hook); both processes wrote their part of every
     Orbax checkpoint (ocdbt.process_0 / ocdbt.process_1), which the restart and this test
     restore.
The pause and the audit hook live in the test's launcher (`_LAUNCHER`), which then runs
`medcode_jax.main` exactly as `python -m` does. All children share one persistent compilation
cache: the restarted process 0 compiles nothing (JAX lets only process 0 write the cache, and
process 1's cache keys differ from process 0's, so process 1 compiles again).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE_STEP = 2          # process 1 stops (and is killed) after the checkpoint of this step
TOTAL_STEPS = 8         # tiny config: 32 train documents / 8 per step x 2 epochs
START_TIMEOUT_S = 420   # a phase on 2 loaded CPU cores; normally well under a minute
# How long process 0 may take to die by itself after process 1 was killed. It waits in the
# step's collective; gloo does not notice the dead peer, the coordination service does after
# its heartbeat timeout (100 s by default: measured 73 s, then SIGABRT), so the test kills it.
GRACE_S = 5

_LAUNCHER = textwrap.dedent('''
    import os, runpy, sys, time

    workdir = os.path.abspath(os.environ["MP_TEST_WORKDIR"]) + os.sep
    record = open(os.environ["MP_TEST_WRITES"], "a", buffering=1, encoding="utf-8")
    # Flags of an open() that writes (the event carries the os-level flags for io.open too).
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def audit(event, args):
        """Record every path under the workdir this process opens for writing / renames to."""
        try:
            if event == "open":
                path, flags = args[0], args[2]
                if not (isinstance(flags, int) and flags & WRITE):
                    return
            elif event == "os.rename":
                path = args[1]
            else:
                return
            if isinstance(path, int):
                return
            path = os.path.abspath(os.fsdecode(os.fspath(path)))
            if path.startswith(workdir):
                record.write(path[len(workdir):] + "\\n")
        except Exception:
            pass

    sys.addaudithook(audit)
    pause = int(os.environ.get("MP_TEST_PAUSE_AFTER_CHECKPOINT", "0"))
    if pause:
        from medcode_jax import checkpointing

        save = checkpointing.Checkpointer.save

        def save_then_pause(self, step, *args, **kwargs):
            save(self, step, *args, **kwargs)
            if step == pause:
                self.wait()
                with open(os.environ["MP_TEST_PAUSED"], "w") as f:
                    f.write(str(step))
                while True:  # until the test kills this process
                    time.sleep(60)

        checkpointing.Checkpointer.save = save_then_pause
    runpy.run_module("medcode_jax.main", run_name="__main__", alter_sys=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Children:
    """Started child processes; every one still alive is SIGKILLed on exit."""

    def __init__(self, root: str):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "w", encoding="utf-8")
        self._logs.append(log)
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *argv], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        with open(os.path.join(self.root, f"{name}.log"), encoding="utf-8",
                  errors="replace") as f:
            return f.read()[-tail:]

    def failure(self, what: str) -> str:
        logs = "\n".join(f"----- {name} (rc {p.poll()}):\n{self.log(name)}"
                         for name, p in self.procs.items())
        return f"{what}\n{logs}"

    def wait(self, names: list[str], timeout: float) -> None:
        """Wait until all `names` have exited with status 0."""
        deadline = time.monotonic() + timeout
        for name in names:
            try:
                rc = self.procs[name].wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(self.failure(f"{name} still running after {timeout:.0f} s"))
            if rc != 0:
                pytest.fail(self.failure(f"{name} exited with status {rc}"))

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)
        for log in self._logs:
            log.close()


def _env(root: str, devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "PYTEST_", "XLA_FLAGS"))}
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_DEFAULT_MATMUL_PRECISION="highest",
        # 2 (4 for the reference) simulated devices per process; -O0 for every run: XLA's CPU
        # compile time (most of this test) drops from ~30 s to ~12 s CPU for the train step.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                  f"--xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="1", **extra)
    return env


def _argv(assets: dict, workdir: str) -> list[str]:
    return [f"--config={REPO}/configs/plmca.py:tiny", f"--workdir={workdir}",
            f"--config.data.dir={assets['data']}", f"--config.encoder.path={assets['encoder']}",
            "--config.checkpoint.every_steps=2"]


def _multihost_argv(assets: dict, workdir: str, port: int, pid: int) -> list[str]:
    return _argv(assets, workdir) + ["--multihost=yes", f"--coordinator_address=127.0.0.1:{port}",
                                     "--num_processes=2", f"--process_id={pid}"]


def _train_losses(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in records if r["prefix"] == "train"]


def _state_leaves(step_dir: str) -> list[np.ndarray]:
    """The TrainState of a checkpoint as numpy arrays, whatever topology wrote it."""
    import orbax.checkpoint as ocp

    path = os.path.join(step_dir, "state")
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)  # a StepMetadata around the tree metadata
    tree = getattr(meta, "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def _assert_complete_checkpoint(step_dir: str) -> None:
    """Finalised (no temporary directory left), both processes' shards present."""
    parent = os.path.dirname(step_dir)
    assert os.path.isdir(step_dir), f"{step_dir} missing: {os.listdir(parent)}"
    assert not [n for n in os.listdir(parent) if "tmp" in n], os.listdir(parent)
    for item in ("state", "data", "meta"):
        assert os.path.isdir(os.path.join(step_dir, item)), os.listdir(step_dir)
    for pid in (0, 1):
        shard_dir = os.path.join(step_dir, "state", f"ocdbt.process_{pid}")
        assert os.path.isdir(shard_dir) and os.listdir(shard_dir), (
            f"process {pid} wrote no part of {step_dir}: {os.listdir(os.path.dirname(shard_dir))}")


def _written(root: str, name: str) -> set[str]:
    path = os.path.join(root, f"writes_{name}.txt")
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from train_test import synthetic_dataset, tiny_bert_dir

    root = str(tmp_path_factory.mktemp("mp_assets"))
    return {"data": synthetic_dataset(root), "encoder": tiny_bert_dir(root)}


@pytest.mark.slow
def test_two_processes_match_one_and_survive_a_kill(assets, tmp_path):
    root = str(tmp_path)
    ref_dir, mp_dir = os.path.join(root, "single"), os.path.join(root, "multi")
    paused = os.path.join(root, "paused")
    children = _Children(root)
    timings = {}
    try:
        # ---- A: reference (1 process, 4 devices) alongside the 2-process run that is killed
        t0 = time.monotonic()
        children.start("single", _argv(assets, ref_dir) + ["--multihost=no"], _env(
            root, 4, MP_TEST_WORKDIR=ref_dir,
            MP_TEST_WRITES=os.path.join(root, "writes_single.txt")))
        port = _free_port()
        for pid in (0, 1):
            extra = {"MP_TEST_PAUSE_AFTER_CHECKPOINT": str(PAUSE_STEP),
                     "MP_TEST_PAUSED": paused} if pid == 1 else {}
            children.start(f"killed_p{pid}", _multihost_argv(assets, mp_dir, port, pid), _env(
                root, 2, MP_TEST_WORKDIR=mp_dir,
                MP_TEST_WRITES=os.path.join(root, f"writes_killed_p{pid}.txt"), **extra))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(paused):
            dead = [n for n in ("killed_p0", "killed_p1") if children.procs[n].poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(children.failure(
                    f"{dead} exited before the checkpoint of step {PAUSE_STEP}" if dead else
                    f"no checkpoint of step {PAUSE_STEP} after {START_TIMEOUT_S} s"))
            time.sleep(0.2)
        timings["to_checkpoint_s"] = time.monotonic() - t0
        ckpt_dir = os.path.join(mp_dir, "checkpoints", str(PAUSE_STEP))
        _assert_complete_checkpoint(ckpt_dir)
        time.sleep(1.0)  # let process 0 run into step PAUSE_STEP + 1 (the collective waits)
        assert children.procs["killed_p0"].poll() is None, children.failure("process 0 died")

        children.kill("killed_p1")  # SIGKILL mid-run
        t_kill = time.monotonic()
        try:
            rc0 = children.procs["killed_p0"].wait(timeout=GRACE_S)
            timings["p0_died_by_itself_after_s"] = time.monotonic() - t_kill
        except subprocess.TimeoutExpired:
            children.kill("killed_p0")
            rc0 = "SIGKILLed by the test"
        timings["p0_exit"] = rc0
        assert [s for s, _ in _train_losses(mp_dir)] == list(range(1, PAUSE_STEP + 1)), (
            children.failure("the killed run logged other steps"))

        # ---- B: restart both with the same commands (a fresh coordinator port)
        t1 = time.monotonic()
        port = _free_port()
        for pid in (0, 1):
            children.start(f"resumed_p{pid}", _multihost_argv(assets, mp_dir, port, pid), _env(
                root, 2, MP_TEST_WORKDIR=mp_dir,
                MP_TEST_WRITES=os.path.join(root, f"writes_resumed_p{pid}.txt")))
        children.wait(["resumed_p0", "resumed_p1"], START_TIMEOUT_S)
        timings["restart_s"] = time.monotonic() - t1
        children.wait(["single"], START_TIMEOUT_S)
        timings["total_s"] = time.monotonic() - t0
        print(f"\nmultiprocess timings: {timings}")
        for pid in (0, 1):
            log = children.log(f"resumed_p{pid}", tail=10**7)
            assert f"process {pid}/2" in log and "all devices 4" in log, log[-2000:]
            assert f"resumed from step {PAUSE_STEP}" in log, log[-2000:]
    finally:
        children.close()

    # ---- C: the same trajectory as one process on 4 devices
    ref, multi = _train_losses(ref_dir), _train_losses(mp_dir)
    assert [s for s, _ in ref] == list(range(1, TOTAL_STEPS + 1))
    assert [s for s, _ in multi] == list(range(1, TOTAL_STEPS + 1))  # one writer, no repeats
    np.testing.assert_allclose([l for _, l in multi], [l for _, l in ref], rtol=1e-5, atol=1e-6)
    for name in (str(TOTAL_STEPS), str(TOTAL_STEPS - 2)):
        _assert_complete_checkpoint(os.path.join(mp_dir, "checkpoints", name))
    final = list(zip(_state_leaves(os.path.join(mp_dir, "checkpoints", str(TOTAL_STEPS))),
                     _state_leaves(os.path.join(ref_dir, "checkpoints", str(TOTAL_STEPS))),
                     strict=True))
    for a, b in final:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    print(f"max |loss diff| {max(abs(a - b) for (_, a), (_, b) in zip(multi, ref)):.2e}, "
          f"max |param diff| {max(float(np.max(np.abs(a - b))) for a, b in final):.2e}")
    (best,) = glob.glob(os.path.join(mp_dir, "best", "*"))
    _assert_complete_checkpoint(best)

    with open(os.path.join(ref_dir, "metrics.json"), encoding="utf-8") as f:
        ref_metrics = json.load(f)
    with open(os.path.join(mp_dir, "metrics.json"), encoding="utf-8") as f:
        mp_metrics = json.load(f)
    assert mp_metrics["best_step"] == ref_metrics["best_step"]
    assert mp_metrics["threshold"] == pytest.approx(ref_metrics["threshold"], abs=1e-6)
    for split in ("val", "test"):
        assert mp_metrics[split].keys() == ref_metrics[split].keys()
        for key, value in ref_metrics[split].items():
            if value is None:
                assert mp_metrics[split][key] is None, (split, key)
            else:
                assert mp_metrics[split][key] == pytest.approx(value, abs=1e-5), (split, key)
    with open(os.path.join(mp_dir, "predictions_test.jsonl"), encoding="utf-8") as f:
        assert sorted(json.loads(line)["doc_id"] for line in f) == list(range(1040, 1048))

    # ---- only process 0 writes TensorBoard / JSON; both write checkpoints
    p0 = _written(root, "killed_p0") | _written(root, "resumed_p0")
    p1 = _written(root, "killed_p1") | _written(root, "resumed_p1")
    outside = sorted(p for p in p1 if p.split(os.sep)[0] not in ("checkpoints", "best"))
    assert not outside, f"process 1 wrote outside the checkpoints: {outside}"
    assert any(p.startswith("checkpoints") for p in p1), sorted(p1)  # its array metadata
    events = [os.path.relpath(p, mp_dir)
              for p in glob.glob(os.path.join(mp_dir, "tensorboard", "events.out.tfevents.*"))]
    assert events and set(events) <= p0, (events, sorted(p0))
    for name in ("metrics.jsonl", "metrics.json", "config.json", "label_space.json",
                 "best_threshold.json", "predictions_test.jsonl"):
        assert os.path.isfile(os.path.join(mp_dir, name)), name
        assert name in p0 or any(p.startswith(name + ".tmp") for p in p0), (name, sorted(p0))
