"""The launch scripts (launch/): they parse, their dry runs print the command they would run,
and the medcode_jax.main arguments in it are accepted by main's own flags. No SLURM, gcloud or
network: srun, scontrol and gcloud are stub executables on PATH.

The SLURM tests also hand the environment each task would get to JAX's own cluster detection
(what `jax.distributed.initialize()` without arguments reads) and check the coordinator address,
process count and id, and visible GPUs."""
from __future__ import annotations

import json
import os
import select
import shlex
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "launch", "local.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
TPU = os.path.join(REPO, "launch", "tpu_vm.sh")

# A small server that imports medcode_jax.main once, then for each request (a JSON line:
# argv, config fields to read, environments) forks a child that parses argv with main's flags
# exactly as `python -m medcode_jax.main` would (the config file is loaded and its --config.*
# overrides applied; ml_collections reads them from sys.argv, hence a fresh process each), and
# runs JAX's cluster auto-detection on each environment as jax.distributed.initialize() does
# before connecting (jax/_src/distributed.py: JAX_COORDINATOR_ADDRESS, JAX_LOCAL_DEVICE_IDS, then
# clusters.ClusterEnv.auto_detect_unset_distributed_params). Forking saves the 2-5 s import of
# jax per command checked; no JAX backend is started.
_PROBE_SERVER = r"""
import functools, json, os, sys, traceback
sys.argv = ["medcode_jax.main"]
from absl import flags
from jax._src import clusters
from medcode_jax import main  # defines the flags

def probe(argv, fields, envs):
    sys.argv = ["medcode_jax.main", *argv]
    rest = flags.FLAGS(sys.argv)
    FLAGS = flags.FLAGS
    assert FLAGS.config is not None, "no --config"
    out = {"model_type": FLAGS.config.model.type,  # what main reads first; a missing file raises
           "rest": rest[1:], "workdir": FLAGS.workdir, "mode": FLAGS.mode,
           "multihost": FLAGS.multihost,
           "fields": {f: functools.reduce(getattr, f.split("."), FLAGS.config) for f in fields},
           "jax": []}
    for env in envs:
        os.environ.clear()
        os.environ.update(env)
        ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        ids = [int(i) for i in ids.split(",")] if ids else None
        address, count, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            os.environ.get("JAX_COORDINATOR_ADDRESS"), None, None, ids, None, 300)
        out["jax"].append({"coordinator_address": address, "num_processes": count,
                           "process_id": index, "local_device_ids": list(local or [])})
    return out

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            reply = {"ok": probe(*json.loads(line))}
        except BaseException:
            reply = {"error": traceback.format_exc()}
        os.write(1, (json.dumps(reply) + "\n").encode())
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        os.write(1, (json.dumps({"error": f"probe child died: status {status}"}) + "\n").encode())
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """probe(argv, fields=(), envs=()) -> what medcode_jax.main's flags make of argv (raises
    AssertionError naming argv when main rejects it) and what JAX detects in each env."""
    log = tmp_path_factory.mktemp("probe") / "stderr.txt"
    with open(log, "w", encoding="utf-8") as err:
        server = subprocess.Popen([sys.executable, "-c", _PROBE_SERVER], cwd=REPO, text=True,
                                  env=_env(JAX_PLATFORMS="cpu"), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=err)

    def run(argv: list[str], fields=(), envs=()) -> dict:
        server.stdin.write(json.dumps([argv, list(fields), list(envs)]) + "\n")
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], 120)  # one reply line per request
        line = server.stdout.readline() if ready else ""
        assert line, f"probe server died:\n{log.read_text()[-3000:]}"
        reply = json.loads(line)
        assert "ok" in reply, f"medcode_jax.main rejects {argv}:\n{reply['error'][-3000:]}"
        return reply["ok"]

    yield run
    server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


_LAUNCH_VARS = ("CONFIG", "WORKDIR", "PYTHON", "VENV", "REPO", "PORT", "COORDINATOR_HOST",
                "SRUN_ARGS", "DRY_RUN", "NAME", "ZONE", "PROJECT", "REMOTE_DIR", "REPO_URL",
                "REF", "JAX_SPEC", "EXTRAS", "PIP_ARGS", "SSH_ARGS", "REMOTE_PYTHON",
                "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS",
                "MEDCODE_SLURM_TASK", "NCCL_SOCKET_IFNAME", "TMPDIR")


def _env(bin_dir=None, **extra: str) -> dict[str, str]:
    """This process's environment without launcher/cluster variables, stubs first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_")) and k not in _LAUNCH_VARS}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _stub(bin_dir, name: str, body: str) -> str:
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _forbid(bin_dir, *names: str) -> None:
    """Stubs that fail loudly: a dry run must not call them."""
    for name in names:
        _stub(bin_dir, name, f"#!/bin/sh\necho 'dry run called {name}' >&2\nexit 99\n")


def _bash(script: str, *args: str, env: dict[str, str], check: bool = True, cwd: str = REPO):
    out = subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def _main_args(words: list[str]) -> list[str]:
    """The arguments after `-m medcode_jax.main` in a command line."""
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", "medcode_jax.main"]:
            return words[i + 2:]
    raise AssertionError(f"no `-m medcode_jax.main` in {words}")


def _exports(lines: list[str]) -> dict[str, str]:
    """`export K=V` lines of a dry run -> {K: V} (shell-unquoted)."""
    env = {}
    for line in lines:
        words = shlex.split(line)
        if words and words[0] == "export":
            key, _, value = words[1].partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize("script", [LOCAL, SLURM, TPU])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True, timeout=30)
    with open(script, encoding="utf-8") as f:
        header = f.read(4000)
    assert "Variables" in header  # the header documents what to set
    if script != LOCAL:  # local.sh's dry run is PYTHON=echo
        assert "DRY_RUN=1" in header


def test_the_flag_probe_rejects_what_main_rejects(probe):
    """The probe is not vacuous: unknown flags, unknown config fields, bad enum values and a
    missing --workdir or config file fail; a stray argument (main's UsageError) is reported."""
    ok = ["--config=configs/plmca.py:demo", "--workdir=w"]
    for bad in (ok + ["--config.train.bogus=1"], ok + ["--no_such_flag=1"],
                ok + ["--multihost=maybe"], ok[:1], ["--config=configs/nope.py", "--workdir=w"]):
        with pytest.raises(AssertionError, match="rejects"):
            probe(bad)
    assert probe(ok + ["stray"])["rest"] == ["stray"]
    assert probe(ok)["rest"] == []


# --- local.sh -------------------------------------------------------------------------------

def test_local_dry_run_builds_a_command_main_accepts(probe):
    out = _bash(LOCAL, "--config.train.num_epochs=1", "--mode=eval",
                env=_env(PYTHON="echo", CONFIG="configs/plmca.py:demo"))
    words = out.stdout.split()
    assert words[:2] == ["-m", "medcode_jax.main"]
    parsed = probe(_main_args(words), fields=["train.num_epochs", "model.head"])
    assert parsed["rest"] == [] and parsed["workdir"] == "runs/plmca"
    assert parsed["mode"] == "eval" and parsed["multihost"] == "auto"
    assert parsed["fields"] == {"train.num_epochs": 1, "model.head": "cross_attention"}


# --- slurm_gpu.sbatch -----------------------------------------------------------------------

_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: `scontrol show hostnames LIST` for the lists these tests use
[[ "$1 $2" == "show hostnames" ]] || { echo "unexpected scontrol $*" >&2; exit 9; }
case "$3" in
  'gpu[007-008]') printf 'gpu007\\ngpu008\\n' ;;
  'gpu007') echo gpu007 ;;
  *) echo "unexpected node list $3" >&2; exit 9 ;;
esac
"""

# Runs the command once per task, here, with the variables srun gives each task (block
# distribution: FAKE_TASKS_PER_NODE consecutive ranks per node).
_SRUN = """#!/usr/bin/env bash
set -euo pipefail
while [[ $# -gt 0 && "$1" == -* ]]; do echo "$1" >> "$FAKE_OUT/srun_options"; shift; done
per_node="$FAKE_TASKS_PER_NODE"
export SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_STEP_ID=0
export SLURM_STEP_TASKS_PER_NODE="${per_node}(x$((SLURM_NTASKS / per_node)))"
for ((p = 0; p < SLURM_NTASKS; p++)); do
  SLURM_PROCID=$p SLURM_NODEID=$((p / per_node)) SLURM_LOCALID=$((p % per_node)) "$@"
done
"""

_FAKE_PYTHON = """#!{python}
import json, os, sys
name = "task%s.json" % os.environ.get("SLURM_PROCID", "")
with open(os.path.join(os.environ["FAKE_OUT"], name), "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}, f)
"""


def _slurm_job_env(bin_dir, **extra: str) -> dict[str, str]:
    """What sbatch gives the batch step of a 2-node job (one task per node here)."""
    return _env(bin_dir, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[007-008]",
                SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_SUBMIT_DIR=REPO,
                SLURM_CPUS_PER_TASK="4", **extra)


def test_slurm_dry_run_prints_the_coordinator_and_the_srun_line(tmp_path, probe):
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "scontrol", _SCONTROL)
    _forbid(bin_dir, "srun", "sbatch")
    env = _slurm_job_env(bin_dir, DRY_RUN="1", CONFIG="configs/plmca.py:demo",
                         WORKDIR="/shared/runs/x y", SRUN_ARGS="--gpu-bind=none --mpi=none",
                         NCCL_SOCKET_IFNAME="^lo,docker0")
    lines = _bash(SLURM, "--config.train.num_epochs=2", env=env).stdout.splitlines()
    exports = _exports(lines)
    assert exports["JAX_COORDINATOR_ADDRESS"] == f"gpu007:{61440 + 4242 % 4096}"
    assert exports["REPO"] == REPO and exports["NCCL_DEBUG"] == "WARN"
    assert exports["NCCL_SOCKET_IFNAME"] == "^lo,docker0"
    srun = shlex.split(lines[-1])
    head = ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=4", "--gpu-bind=none", "--mpi=none",
            "env", "MEDCODE_SLURM_TASK=1", "bash", SLURM]
    assert srun[:len(head)] == head
    assert os.path.isabs(srun[len(head)])  # the interpreter: the venv's python, absolute
    args = _main_args(srun)
    assert args[:3] == ["--config=configs/plmca.py:demo", "--workdir=/shared/runs/x y",
                        "--multihost=yes"]
    parsed = probe(args, fields=["train.num_epochs"])
    assert parsed["rest"] == [] and parsed["workdir"] == "/shared/runs/x y"
    assert parsed["multihost"] == "yes" and parsed["fields"] == {"train.num_epochs": 2}

    # PORT and COORDINATOR_HOST override the defaults; scontrol is then not needed.
    _forbid(bin_dir, "scontrol")
    lines = _bash(SLURM, env={**env, "PORT": "12345", "COORDINATOR_HOST": "10.0.0.7"}
                  ).stdout.splitlines()
    assert _exports(lines)["JAX_COORDINATOR_ADDRESS"] == "10.0.0.7:12345"


def test_slurm_script_outside_a_job_says_so(tmp_path):
    bin_dir = tmp_path / "bin"
    _forbid(bin_dir, "srun", "scontrol")
    out = _bash(SLURM, env=_env(bin_dir, DRY_RUN="1"), check=False)
    assert out.returncode != 0 and "not inside a SLURM job" in out.stderr
    out = _bash(SLURM, env=_slurm_job_env(bin_dir, DRY_RUN="1", REPO=str(tmp_path)), check=False)
    assert out.returncode != 0 and "not the medcode_jax checkout" in out.stderr


def test_slurm_job_reaches_jax_as_one_process_per_task(tmp_path, probe):
    """The whole chain with fake srun/scontrol: batch step -> srun -> each task -> python.
    2 nodes, one task per node, 2 GPUs each: JAX must see process 0 and 1 of 2, the coordinator
    on the first node, and both local GPUs in each process."""
    bin_dir, out_dir = tmp_path / "bin", tmp_path / "out"
    out_dir.mkdir()
    _stub(bin_dir, "scontrol", _SCONTROL)
    _stub(bin_dir, "srun", _SRUN)
    fake_python = _stub(bin_dir, "fake-python", _FAKE_PYTHON.format(python=sys.executable))
    env = _slurm_job_env(bin_dir, PYTHON=fake_python, FAKE_OUT=str(out_dir),
                         FAKE_TASKS_PER_NODE="1", CUDA_VISIBLE_DEVICES="0,1",
                         CONFIG="configs/plmca.py:demo", SRUN_ARGS="--mpi=none")
    _bash(SLURM, "--config.train.num_epochs=3", env=env, cwd=str(tmp_path))
    assert (out_dir / "srun_options").read_text().split() == [
        "--kill-on-bad-exit=1", "--cpus-per-task=4", "--mpi=none"]
    tasks = [json.loads((out_dir / f"task{p}.json").read_text()) for p in range(2)]
    assert tasks[0]["argv"] == tasks[1]["argv"]
    assert all(t["cwd"] == REPO for t in tasks)  # relative config paths resolve
    keep = ("SLURM_", "JAX_", "OMPI_", "CUDA_")
    envs = [{k: v for k, v in t["env"].items() if k.startswith(keep)} for t in tasks]
    parsed = probe(_main_args(tasks[0]["argv"]), fields=["train.num_epochs"], envs=envs)
    assert parsed["rest"] == [] and parsed["multihost"] == "yes"
    assert parsed["fields"] == {"train.num_epochs": 3}
    address = f"gpu007:{61440 + 4242 % 4096}"
    assert parsed["jax"] == [
        {"coordinator_address": address, "num_processes": 2, "process_id": p,
         "local_device_ids": [0, 1]} for p in range(2)]


@pytest.mark.parametrize("tasks_per_node, node, local, cuda, expected", [
    ("2", 0, 1, "0,1", "1"),              # one process per GPU
    ("8(x2)", 1, 7, "0,1,2,3,4,5,6,7", "7"),
    ("2(x2)", 1, 1, "0,1,2,3", "2,3"),    # two GPUs per process
    ("1", 0, 0, "0,1,2,3", "0,1,2,3"),   # one process per node
    ("2,1", 1, 0, "0,1", "0,1"),          # uneven nodes: node 1 runs one task
    ("2", 0, 1, "5", "0"),                # SLURM bound one GPU to each task
    ("4", 0, 1, "2,6", "0,1"),            # ... or two
    ("3", 0, 1, "0,1,2,3", None),         # cannot split 4 GPUs between 3 tasks
])
def test_slurm_task_picks_its_gpus(tmp_path, tasks_per_node, node, local, cuda, expected):
    env = _env(tmp_path / "bin", DRY_RUN="1", MEDCODE_SLURM_TASK="1", REPO=REPO,
               JAX_COORDINATOR_ADDRESS="gpu007:1234", SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
               SLURM_NODEID=str(node), SLURM_LOCALID=str(local), SLURM_PROCID="0",
               CUDA_VISIBLE_DEVICES=cuda)
    out = _bash(SLURM, "python", "-m", "medcode_jax.main", "--workdir=w", env=env,
                check=expected is not None, cwd=str(tmp_path))
    if expected is None:
        assert out.returncode != 0 and "cannot be shared evenly" in out.stderr
        return
    lines = out.stdout.splitlines()
    assert _exports(lines) == {"JAX_COORDINATOR_ADDRESS": "gpu007:1234",
                               "JAX_LOCAL_DEVICE_IDS": expected}
    assert shlex.split(lines[-1]) == ["python", "-m", "medcode_jax.main", "--workdir=w"]
    # An explicit JAX_LOCAL_DEVICE_IDS wins.
    out = _bash(SLURM, "python", env={**env, "JAX_LOCAL_DEVICE_IDS": "3"}, cwd=str(tmp_path))
    assert _exports(out.stdout.splitlines())["JAX_LOCAL_DEVICE_IDS"] == "3"


# --- tpu_vm.sh ------------------------------------------------------------------------------

_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def _gcloud_calls(log) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_tpu_run_dry_run_is_the_gcloud_call_and_the_remote_command_is_valid(tmp_path, probe):
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    _stub(bin_dir, "gcloud", _GCLOUD.format(python=sys.executable))
    base = _env(bin_dir, NAME="pod-1", ZONE="us-central2-b", PROJECT="proj",
                CONFIG="configs/plmca.py:demo", WORKDIR="/mnt/shared/runs/a b",
                SSH_ARGS="--internal-ip", FAKE_GCLOUD_LOG=str(log))
    args = ["--config.train.num_epochs=2", "--config.data.dir=/mnt/shared/data"]
    dry = _bash(TPU, "run", *args, env={**base, "DRY_RUN": "1"}).stdout.splitlines()
    assert _gcloud_calls(log) == []  # the dry run called nothing
    _bash(TPU, "run", *args, env=base)
    calls = _gcloud_calls(log)
    assert [shlex.split(line) for line in dry] == [["gcloud", *c] for c in calls]
    (call,) = calls
    assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone=us-central2-b"]
    assert "--project=proj" in call and "--internal-ip" in call and "--worker=all" in call
    command = [a for a in call if a.startswith("--command=")][0][len("--command="):]

    # Run the remote command as a worker's shell would, with a stub venv python in REMOTE_DIR.
    home = tmp_path / "home"
    recorded = home / "argv.json"
    _stub(home / "medcode_jax" / ".venv" / "bin", "python",
          f"#!{sys.executable}\nimport json, sys\n"
          f"json.dump(sys.argv[1:], open({str(recorded)!r}, 'w'))\n")
    subprocess.run(["bash", "-c", command], cwd=home, check=True, timeout=30, env=_env())
    argv = json.loads(recorded.read_text())
    assert argv[:2] == ["-m", "medcode_jax.main"]
    parsed = probe(argv[2:], fields=["train.num_epochs", "data.dir"])
    assert parsed["rest"] == [] and parsed["multihost"] == "yes"
    assert parsed["workdir"] == "/mnt/shared/runs/a b"
    assert parsed["fields"] == {"train.num_epochs": 2, "data.dir": "/mnt/shared/data"}


def test_tpu_setup_copies_the_tree_and_builds_the_venv_on_every_worker(tmp_path):
    bin_dir = tmp_path / "bin"
    _forbid(bin_dir, "gcloud", "tar", "rm")
    env = _env(bin_dir, DRY_RUN="1", NAME="pod-1", ZONE="z", TMPDIR=str(tmp_path),
               EXTRAS="torch", JAX_SPEC="jax[tpu]==0.10.2")
    calls = [shlex.split(line) for line in _bash(TPU, "setup", env=env).stdout.splitlines()]
    archive = str(tmp_path / "medcode_jax-pod-1.tgz")
    tar, scp, unpack, rm, venv = calls
    assert tar[:4] == ["tar", "-C", REPO, "-czf"] and tar[4] == archive
    assert {"--exclude=./.git", "--exclude=./.venv", "--exclude=./data"} <= set(tar)
    assert scp[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                       "pod-1:medcode_jax-src.tgz"]
    assert "--worker=all" in scp and rm == ["rm", "-f", archive]
    for call in (unpack, venv):
        assert call[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
        assert "--worker=all" in call and "--zone=z" in call
    assert "tar -xzf medcode_jax-src.tgz -C medcode_jax" in unpack[-1]
    remote = shlex.split(venv[-1][len("--command="):])
    install = len(remote) - remote[::-1].index("install")  # after the last pip install
    assert remote[install:install + 4] == ["-q", "-e", ".[torch]", "jax[tpu]==0.10.2"]
    assert "venv" in remote

    # With REPO_URL the workers clone (at REF) instead; nothing is copied from here.
    env.update(REPO_URL="https://example.org/medcode_jax.git", REF="v1")
    clone, venv2 = [shlex.split(line) for line in _bash(TPU, "setup", env=env).stdout.splitlines()]
    assert "git clone --quiet https://example.org/medcode_jax.git medcode_jax" in clone[-1]
    assert "fetch --quiet origin v1" in clone[-1] and "--worker=all" in clone
    assert venv2 == venv


def test_tpu_script_requires_name_zone_and_a_known_command(tmp_path):
    bin_dir = tmp_path / "bin"
    _forbid(bin_dir, "gcloud")
    out = _bash(TPU, "run", env=_env(bin_dir, ZONE="z"), check=False)
    assert out.returncode != 0 and "NAME" in out.stderr
    out = _bash(TPU, "launch", env=_env(bin_dir, NAME="n", ZONE="z"), check=False)
    assert out.returncode != 0 and "usage" in out.stderr
    stop = _bash(TPU, "stop", env=_env(bin_dir, NAME="n", ZONE="z", DRY_RUN="1")).stdout
    assert "pkill" in shlex.split(stop)[-1] and "--worker=all" in stop


def test_multihost_auto_detection(monkeypatch):
    """--multihost=auto starts jax.distributed only for several processes of one step: a SLURM
    batch script (SLURM_NTASKS > 1, one process) is not one; Open MPI 5 gets an error."""
    from absl import app, flags

    from medcode_jax import main as entry

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                 "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert not entry._multiprocess_env()
    monkeypatch.setenv("SLURM_NTASKS", "8")  # the batch step of an 8-task job
    assert not entry._multiprocess_env()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # a task started by srun
    assert entry._multiprocess_env()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(app.UsageError, match="--coordinator_address"):
        entry._multiprocess_env()
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1234.0;tcp://10.0.0.1:5000")  # Open MPI <= 4
    assert entry._multiprocess_env()
