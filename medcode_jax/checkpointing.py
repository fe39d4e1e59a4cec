"""Orbax checkpoints: the latest N plus the best one, each a complete resumable snapshot.

Layout under the work directory:
  checkpoints/<step>/{state,data,meta}   latest `keep` snapshots (CheckpointManager, async)
  best/<step>/{state,data,meta}          the best-validation snapshot (its own manager, keeps 1,
                                         so the latest-N policy can never delete it)
`state` is the sharded TrainState (restored onto the shardings of an abstract target),
`data` the input iterator's state (grain get_state(); bytes are base64-wrapped for JSON),
`meta` a JSON dict: epoch, patience counter, best metric / step / threshold, label space and
tokenizer identity (checked on resume).
"""
from __future__ import annotations

import base64
import os
from typing import Any

import orbax.checkpoint as ocp

_BYTES = "__bytes_b64__"


def _to_json(data_state: Any) -> Any:
    if isinstance(data_state, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(data_state)).decode("ascii")}
    return data_state


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict) and set(obj) == {_BYTES}:
        return base64.b64decode(obj[_BYTES])
    return obj


class Checkpointer:
    """Latest-N and best checkpoint managers of one work directory."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        if keep < 1:
            raise ValueError(f"config.checkpoint.keep must be >= 1, got {keep}")
        def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
            return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), name),
                                         options=options)
        self.latest = manager("checkpoints", keep)
        self.best = manager("best", 1)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def save(self, step: int, state: Any, *, data_state: Any, meta: dict,
             best: bool = False) -> None:
        """Save to the latest-N manager and, with `best`, to the best manager first (a crash
        between the two leaves the best one newer, which the resumed run re-derives)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(_to_json(data_state)),
                                  meta=ocp.args.JsonSave(meta))
        if best and step not in self.best.all_steps():
            self.best.save(step, args=args)
        if step not in self.latest.all_steps():
            self.latest.save(step, args=args)

    def restore(self, abstract_state: Any, *, best: bool = False,
                step: int | None = None) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of `step` (default: newest) of the latest or best manager.

        `abstract_state` is a pytree of ShapeDtypeStructs with shardings (the restore target)."""
        mgr = self.best if best else self.latest
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no {'best' if best else ''} checkpoint in "
                                    f"{mgr.directory}; train first (--mode=train)")
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], _from_json(out["data"]), dict(out["meta"])

    def restore_meta(self, *, best: bool = False) -> dict | None:
        """The JSON metadata of the newest checkpoint, or None when there is none."""
        mgr = self.best if best else self.latest
        step = mgr.latest_step()
        if step is None:
            return None
        return dict(mgr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.best.wait_until_finished()
        self.latest.wait_until_finished()

    def close(self) -> None:
        self.best.close()
        self.latest.close()
