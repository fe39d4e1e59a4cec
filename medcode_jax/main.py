"""Entry point: `python -m medcode_jax.main --config=configs/plmca.py --workdir=runs/x`.

Modes: train (default; train + final evaluation, resumes from --workdir), eval (the best
checkpoint on --split), predict (--input glob or shards:<split> -> --output JSONL), export (PyTorch folder,
--export_dir).
The loop lives in medcode_jax.train, prediction in medcode_jax.predict.
"""
from __future__ import annotations

import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"],
                           "What to do.")
_SPLIT = flags.DEFINE_string("split", "test", "--mode=eval: split to evaluate.")
_INPUT = flags.DEFINE_string("input", None, "--mode=predict: text-file glob or shards:<split>.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=predict: output JSONL path.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None,
                                  "--mode=export: output folder (default <workdir>/export).")
_EXPORT_FLAVOUR = flags.DEFINE_enum("export_flavour", "fork", ["fork", "emc"],
                                    "--mode=export: 'fork' keeps the encoder pooler in "
                                    "model.safetensors (ngray0 fork), 'emc' drops it.")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "yes", "no"],
                               "jax.distributed.initialize(): auto = when a coordinator / SLURM "
                               "/ Open MPI / TPU environment is detected.")



class _QuietLibraries(std_logging.Filter):
    """Drop INFO chatter of Orbax and TFDS (every checkpoint writes a dozen lines); their
    warnings and errors still show."""

    _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in self._NOISY)


def _multiprocess_env() -> bool:
    """A coordinator address, or a launcher (SLURM, Open MPI, TPU pod) with several processes."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1")) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
        handler.addFilter(_QuietLibraries())
    if _MULTIHOST.value == "yes" or (_MULTIHOST.value == "auto" and _multiprocess_env()):
        jax.distributed.initialize()
    logging.info("process %d/%d, local devices %s, all devices %d", jax.process_index(),
                 jax.process_count(), jax.local_devices(), jax.device_count())
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
    else:
        if not (_INPUT.value and _OUTPUT.value):
            raise app.UsageError("--mode=predict needs --input and --output")
        count = predict.predict(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value)
        logging.info("wrote predictions for %d documents to %s", count, _OUTPUT.value)


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
    else:
        if not (_INPUT.value and _OUTPUT.value):
            raise app.UsageError("--mode=predict needs --input and --output")
        count = pipelines.predict(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value)
        logging.info("wrote predictions for %d documents to %s", count, _OUTPUT.value)


if __name__ == "__main__":
    app.run(main)
