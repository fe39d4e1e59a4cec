"""Entry point: `python -m medcode_jax.main --config=configs/plmca.py --workdir=runs/x`.

Modes: train (default; train + final evaluation, resumes from --workdir), eval (the best
checkpoint on --split), predict (--input glob or shards:<split> -> --output JSONL), export (PyTorch folder,
--export_dir), plan (per-device memory of the train step on --plan_devices simulated devices;
medcode_jax.plan), explain (--method evidence spans -> --output JSONL [--html]; with --evaluate:
plausibility / faithfulness / sparsity per method on --input=shards:<split>).
The loop lives in medcode_jax.train, prediction in medcode_jax.predict, explanations in
medcode_jax.explain.cli.
"""
from __future__ import annotations

import logging as std_logging
import os

from medcode_jax import hostmem

# Before JAX (or anything else) starts threads: glibc fixes its arenas when threads first
# allocate. Run as a program only; importing this module changes nothing.
_MALLOC = hostmem.tune_malloc() if __name__ == "__main__" else None

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "predict", "export", "plan", "explain"],
                          "What to do.")
_SPLIT = flags.DEFINE_string("split", "test", "--mode=eval: split to evaluate.")
_INPUT = flags.DEFINE_string("input", None,
                             "--mode=predict/explain: text-file glob or shards:<split>.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=predict/explain: output JSONL path "
                              "(--evaluate: the metrics JSON, default "
                              "<workdir>/explanations_<split>.json).")
_EXPLAIN = flags.DEFINE_string("explain", None, "--mode=predict: explanation method for the "
                               "evidence words (default: the label attention).")
_METHOD = flags.DEFINE_string("method", "attention", "--mode=explain: method(s), comma-"
                              "separated, or 'all' (medcode_jax.explain.methods.METHODS).")
_HTML = flags.DEFINE_string("html", None, "--mode=explain: also write this self-contained "
                            "HTML page of the highlighted notes.")
_CODES = flags.DEFINE_enum("codes", "predicted", ["predicted", "gold"],
                           "--mode=explain: explain the predicted codes (above the threshold) "
                           "or the gold codes (shards input only).")
_TOP_SPANS = flags.DEFINE_integer("top_spans", 10, "--mode=explain: evidence words per code.")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "--mode=explain: evaluate the methods on "
                              "--input=shards:<split> (needs evidence) instead of writing spans.")
_FAITHFULNESS = flags.DEFINE_bool("faithfulness", True, "--mode=explain --evaluate: also "
                                  "comprehensiveness / sufficiency (100 forward passes per "
                                  "predicted code and document).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None,
                                  "--mode=export: output folder (default <workdir>/export).")
_EXPORT_FLAVOUR = flags.DEFINE_enum("export_flavour", "fork", ["fork", "emc"],
                                    "--mode=export: 'fork' keeps the encoder pooler in "
                                    "model.safetensors (ngray0 fork), 'emc' drops it.")
_PLAN_DEVICES = flags.DEFINE_integer(
    "plan_devices", None, "--mode=plan: simulate this many CPU devices (the target mesh's "
    "device count); default: the devices present.")
_PLAN_NUM_LABELS = flags.DEFINE_integer(
    "plan_num_labels", None, "--mode=plan without prepared shards: the label count.")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "yes", "no"],
                               "jax.distributed.initialize(): auto = when a coordinator / SLURM "
                               "/ Open MPI / TPU environment is detected.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process without a launcher: host:port of process 0's "
    "coordinator (default: $JAX_COORDINATOR_ADDRESS); with --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process without a launcher: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process without a launcher: this process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache directory: compiled train / "
    "eval steps are reused by the next run, resume, eval, predict or explain with the same "
    "shapes. Default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/medcode_jax/xla "
    "($XDG_CACHE_HOME honoured); 'none' turns it off.")
CACHE_MAX_BYTES = 4 << 30  # least-recently-used entries are evicted above this



class _QuietLibraries(std_logging.Filter):
    """Drop INFO chatter of Orbax and TFDS (every checkpoint writes a dozen lines); their
    warnings and errors still show."""

    _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in self._NOISY)


def _compilation_cache(flag: str) -> str | None:
    """Point JAX's persistent compilation cache at `flag` (module flag help); returns the
    directory, or None when off. Programs that compile in under a second are not stored.

    A whole run compiles its train and eval steps once per length bucket (on 2 CPU cores
    ~12 s per train-step shape of the 4-layer benchmark model, minutes for RoBERTa-base on a
    GPU host); with the cache the next run with the same shapes skips that."""
    if flag.strip().lower() == "none":
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = flag or jax.config.jax_compilation_cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "medcode_jax", "xla")
    if path != jax.config.jax_compilation_cache_dir:
        try:  # JAX would fail at the first compilation instead
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            logging.warning("XLA compilation cache off: cannot create %s (%s); pass "
                            "--compilation_cache=<writable dir> or none", path, e)
            jax.config.update("jax_compilation_cache_dir", None)
            return None
        jax.config.update("jax_compilation_cache_dir", path)
        if jax.config.jax_compilation_cache_max_size == -1 and _has_filelock():
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path


def _has_filelock() -> bool:
    """JAX's size-bounded cache needs the `filelock` package (a transformers dependency)."""
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True


def _multiprocess_env() -> bool:
    """A coordinator address, or a launcher that started several processes of this step.

    SLURM: `SLURM_STEP_NUM_TASKS` (set by srun for the tasks of a step), not `SLURM_NTASKS`,
    which the batch script itself also sees while running as one process. Open MPI: only the
    versions JAX detects (<= 4, `OMPI_MCA_orte_hnp_uri`); Open MPI 5 gets an error naming the
    flags to pass. TPU pod slices are found through the metadata server, which this check cannot
    see: launch/tpu_vm.sh passes --multihost=yes.
    """
    env = os.environ
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 and not env.get("OMPI_MCA_orte_hnp_uri") \
            and not env.get("JAX_COORDINATOR_ADDRESS") and not _COORDINATOR.value:
        raise app.UsageError(
            "Open MPI started several processes but JAX cannot detect Open MPI 5: pass "
            f"--coordinator_address=<host of rank 0>:<port> --num_processes="
            f"{env['OMPI_COMM_WORLD_SIZE']} --process_id=$OMPI_COMM_WORLD_RANK")
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
        handler.addFilter(_QuietLibraries())
    if _MODE.value == "plan":
        _plan()
        return
    cache = _compilation_cache(_COMPILATION_CACHE.value)
    if _MULTIHOST.value == "yes" or (_MULTIHOST.value == "auto" and (
            _multiprocess_env() or (_NUM_PROCESSES.value or 1) > 1)):
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    logging.info("process %d/%d, local devices %s, all devices %d", jax.process_index(),
                 jax.process_count(), jax.local_devices(), jax.device_count())
    if _MALLOC:
        logging.info("%s", _MALLOC)
    logging.info("XLA compilation cache: %s", cache or "off (--compilation_cache=none)")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/plmca.py:demo")
    from medcode_jax import predict, train  # after distributed initialisation

    if config.model.type == "plmrr":
        _plmrr(config)
    elif _MODE.value == "train":
        train.train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == "eval":
        train.evaluate_checkpoint(config, _WORKDIR.value, _SPLIT.value)
    elif _MODE.value == "export":
        from medcode_jax import export

        out = export.export_from_workdir(config, _WORKDIR.value, _EXPORT_DIR.value,
                                         flavour=_EXPORT_FLAVOUR.value)
        logging.info("exported to %s", out)
    elif _MODE.value == "explain":
        _explain(config)
    else:
        if not (_INPUT.value and _OUTPUT.value):
            raise app.UsageError("--mode=predict needs --input and --output")
        count = predict.predict(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value,
                                explain=_EXPLAIN.value)
        logging.info("wrote predictions for %d documents to %s", count, _OUTPUT.value)


def _explain(config) -> None:
    """--mode=explain: evidence spans (JSONL / HTML), or --evaluate on shards:<split>."""
    from medcode_jax.explain import cli

    if _EVALUATE.value:
        if not (_INPUT.value or "").startswith("shards:"):
            raise app.UsageError("--mode=explain --evaluate needs --input=shards:<split> (a "
                                 "dataset prepared with evidence)")
        cli.evaluate(config, _WORKDIR.value, methods=_METHOD.value,
                     split=_INPUT.value.split(":", 1)[1], output=_OUTPUT.value,
                     faithfulness=_FAITHFULNESS.value)
        return
    if not (_INPUT.value and _OUTPUT.value):
        raise app.UsageError("--mode=explain needs --input and --output")
    count = cli.explain(config, _WORKDIR.value, methods=_METHOD.value, input_spec=_INPUT.value,
                        output=_OUTPUT.value, html=_HTML.value, codes=_CODES.value,
                        top_spans=_TOP_SPANS.value)
    logging.info("wrote %d explanation lines to %s", count, _OUTPUT.value)


def _plan() -> None:
    """--mode=plan: compile the train step for the target device count on CPU (no training,
    no distributed start-up) and print its per-device memory."""
    if _PLAN_DEVICES.value:
        # Must happen before JAX initialises a backend: simulated CPU devices only.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", _PLAN_DEVICES.value)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/plmca.py:fsdp")
    from medcode_jax import plan

    result = plan.plan(config, num_labels=_PLAN_NUM_LABELS.value)
    print(plan.format_plan(result), flush=True)
    if _WORKDIR.value:
        os.makedirs(_WORKDIR.value, exist_ok=True)
        plan.write_plan(result, os.path.join(_WORKDIR.value, "plan.json"))


def _plmrr(config) -> None:
    """PLM-RR (configs/plmrr.py): --workdir is the pipeline's root (retriever/, candidates/,
    reranker/)."""
    from medcode_jax import pipelines

    if _MODE.value == "train":
        pipelines.run_plmrr(config, _WORKDIR.value)
    elif _MODE.value == "eval":
        pipelines.evaluate(config, _WORKDIR.value, _SPLIT.value)
    elif _MODE.value == "export":
        out = pipelines.export(config, _WORKDIR.value, _EXPORT_DIR.value,
                               flavour=_EXPORT_FLAVOUR.value)
        logging.info("exported to %s", out)
    elif _MODE.value == "explain":
        raise app.UsageError("--mode=explain supports PLM-ICD / PLM-CA runs; for PLM-RR use "
                             "--mode=predict --explain=METHOD (evidence per re-ranked code), or "
                             "--mode=explain on its retriever's workdir with configs/plmca.py")
    else:
        if not (_INPUT.value and _OUTPUT.value):
            raise app.UsageError("--mode=predict needs --input and --output")
        count = pipelines.predict(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value,
                                  explain=_EXPLAIN.value)
        logging.info("wrote predictions for %d documents to %s", count, _OUTPUT.value)


if __name__ == "__main__":
    app.run(main)
