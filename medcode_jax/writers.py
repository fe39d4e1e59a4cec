"""Metric writers: TensorBoard (tensorboardX, no TensorFlow) + a JSON-lines log.

Only process 0 writes; other processes get a writer that does nothing. Only numbers and the
config go out — never note text (MIMIC data-use agreement).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax


class MetricWriter:
    """`scalars(step, {...}, prefix)` to TensorBoard and `<workdir>/metrics.jsonl`."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._log = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
            self._log = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def scalars(self, step: int, values: Mapping[str, Any], *, prefix: str) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) or getattr(v, "ndim", None) == 0}
        for key, value in clean.items():
            if math.isfinite(value):  # undefined metrics (NaN) stay in the JSON log only
                tag = key.replace("@", "_at_")  # TensorBoard tags allow no '@'
                self._tb.add_scalar(f"{prefix}/{tag}", value, step)
        record = {"time": time.time(), "step": int(step), "prefix": prefix,
                  **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """For the config only (never note text)."""
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._log.close()
            self.enabled = False


def device_memory() -> dict[str, float]:
    """Bytes in use / peak on the first local device, when the backend reports them (not CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return {}
    out = {}
    for key in ("bytes_in_use", "peak_bytes_in_use"):
        if key in stats:
            out[f"memory_{key}_gib"] = stats[key] / 2**30
    return out
