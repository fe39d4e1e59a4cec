"""grain input pipeline: prepared shards -> length-bucketed, padded numpy batches -> global arrays.

Training (``make_train_iterator``): for every epoch a deterministic *batch plan* is computed from
``(seed, epoch, lengths)`` alone: the documents are permuted, the permutation is cut into
windows of ``SORT_WINDOW_BATCHES`` global batches, each window is sorted by length and cut into
global batches (little padding), and the order of all the epoch's batches is shuffled. An epoch
is ``ceil(documents / global_batch_size)`` steps, as in the reference: every document is seen
once per epoch and the one partial batch is completed with filler rows (``valid=False``,
``doc_ids=-1``), which the loss ignores (it is normalised by the valid rows). Every
row of a global batch is padded to the smallest bucket (chunk count) holding the batch's longest
document, so every process sees the same shape; process ``p`` takes rows
``[p * local_b, (p + 1) * local_b)``. The plan is a ``grain.MapDataset`` over the global step
(infinite), mapped to load + pad, turned into an iterator with threaded prefetch. Its
``get_state()`` / ``set_state()`` restore the exact stream, across epoch boundaries too.

Evaluation (``make_eval_batches``): no shuffle; documents sorted **longest first** (a memory
problem shows on the first batch, and the largest program compiles first), cut into global
batches, the last one completed with filler rows (``valid=False``, ``doc_ids=-1``, all-pad
``input_ids``, all-zero ``attention_mask`` and ``labels``). Every document appears exactly once
over all processes.

Batch fields (process-local rows, DESIGN.md §2): ``input_ids`` int32 [b, n*c],
``attention_mask`` int32 [b, n*c], ``labels`` float32 [b, C], ``doc_ids`` int64 [b],
``lengths`` int32 [b], ``valid`` bool [b].

Evidence (``max_evidence_codes`` E > 0, datasets prepared with evidence; EXPLAIN.md §3):
``evidence_codes`` int32 [b, E] (label ids with >= 1 evidence token, ascending; -1 = empty
slot), ``evidence_mask`` int8 [b, E, n*c] (1 at that code's evidence tokens),
``distractor_mask`` int8 [b, n*c] (1 at the tokens of any distractor span). Filler rows: -1 and
zeros. A document with more than E evidence codes keeps its E smallest label ids; the others
are counted (``dropped_evidence_codes`` of the loader) and a warning is logged once.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

Batch = dict[str, np.ndarray]
EVIDENCE_KEYS = ("evidence_codes", "evidence_mask", "distractor_mask")
log = logging.getLogger(__name__)
# Sort by length inside windows of this many global batches (less padding, still random).
SORT_WINDOW_BATCHES = 50
_READ_THREADS = 8
_PREFETCH_BATCHES = 8  # >= _READ_THREADS, or grain cannot use them all


def bucket_chunk_counts(max_length: int, chunk_size: int, multiple: int = 8) -> tuple[int, ...]:
    """Chunk counts a batch may be padded to: multiples of ``multiple`` up to the chunks
    ``max_length`` needs (rounded up); one bucket when fewer than ``multiple`` are needed.

    >>> bucket_chunk_counts(6000, 128)
    (8, 16, 24, 32, 40, 48)
    """
    if max_length <= 0 or chunk_size <= 0 or multiple <= 0:
        raise ValueError(f"max_length, chunk_size, multiple must be > 0, got "
                         f"{max_length}, {chunk_size}, {multiple}")
    needed = math.ceil(max_length / chunk_size)
    if needed <= multiple:
        return (needed,)
    top = math.ceil(needed / multiple) * multiple
    return tuple(range(multiple, top + 1, multiple))


def _bucket_for(length: int, chunk_size: int, buckets: Sequence[int]) -> int:
    chunks = max(1, math.ceil(length / chunk_size))
    for n in buckets:
        if n >= chunks:
            return n
    raise ValueError(f"a document of {length} tokens needs {chunks} chunks of {chunk_size}, "
                     f"more than the largest bucket {max(buckets)}; use buckets from "
                     f"bucket_chunk_counts(max_length of the shards, chunk_size)")


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"the process count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return global_batch_size // process_count


def steps_per_epoch(ds, split: str, global_batch_size: int) -> int:
    """Training steps in one epoch of ``split``: ceil(documents / global batch) (the last
    batch is completed with filler rows)."""
    return -(-int(ds.lengths(split).size) // global_batch_size)


# --------------------------------------------------------------------------- loading + padding


class _LoadAndPad:
    """Plan entry (doc indices, -1 = filler; chunk count) -> padded process-local batch."""

    def __init__(self, source, *, chunk_size: int, num_labels: int, pad_id: int,
                 max_evidence_codes: int = 0):
        self.source = source
        self.chunk_size = chunk_size
        self.num_labels = num_labels
        self.pad_id = pad_id
        self.max_evidence_codes = max_evidence_codes
        self.dropped_evidence_codes = 0  # in this process (grain workers count their own)
        self._warned = False

    def _evidence(self, batch: Batch, rows: np.ndarray, examples: list) -> None:
        """Add the evidence fields (module docstring) to a padded batch, in place."""
        b, width = batch["input_ids"].shape
        e = self.max_evidence_codes
        codes = np.full((b, e), -1, np.int32)
        mask = np.zeros((b, e, width), np.int8)
        distractors = np.zeros((b, width), np.int8)
        dropped = 0
        for row, ex in zip(rows, examples):
            labels = np.asarray(ex["evidence_label_ids"], np.int64)
            positions = np.asarray(ex["evidence_positions"], np.int64)
            kinds = np.asarray(ex["evidence_kinds"])
            distractors[row, positions[kinds == 1]] = 1
            evidence = (kinds == 0) & (labels >= 0)
            labels, positions = labels[evidence], positions[evidence]
            present = np.unique(labels)
            dropped += max(present.size - e, 0)
            present = present[:e]
            codes[row, :present.size] = present
            keep = np.isin(labels, present)
            mask[row, np.searchsorted(present, labels[keep]), positions[keep]] = 1
        if dropped:
            self.dropped_evidence_codes += dropped
            if not self._warned:
                self._warned = True
                log.warning("a document has more than max_evidence_codes=%d codes with evidence: "
                            "the extra codes (largest label ids; %d in this batch) are left out "
                            "of evidence_codes; raise config.data.max_evidence_codes to keep "
                            "them (counted in dropped_evidence_codes)", e, dropped)
        batch.update(evidence_codes=codes, evidence_mask=mask, distractor_mask=distractors)

    def __call__(self, entry: tuple[np.ndarray, int]) -> Batch:
        indices, chunks = entry
        b, width = len(indices), chunks * self.chunk_size
        input_ids = np.full((b, width), self.pad_id, np.int32)
        mask = np.zeros((b, width), np.int32)
        labels = np.zeros((b, self.num_labels), np.float32)
        doc_ids = np.full((b,), -1, np.int64)
        lengths = np.zeros((b,), np.int32)
        valid = indices >= 0
        rows = np.flatnonzero(valid)
        keys = [int(i) for i in indices[rows]]
        if not keys:  # e.g. a process's share of the last eval batch is all filler
            examples = []
        elif hasattr(self.source, "__getitems__"):  # batched read (ArrayRecord)
            examples = self.source.__getitems__(keys)
        else:
            examples = [self.source[k] for k in keys]
        for row, ex in zip(rows, examples):
            ids = ex["input_ids"]
            n = ids.shape[0]
            input_ids[row, :n] = ids
            mask[row, :n] = 1
            labels[row, ex["label_ids"]] = 1.0
            doc_ids[row] = ex["_id"]
            lengths[row] = n
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                 "doc_ids": doc_ids, "lengths": lengths, "valid": valid}
        if self.max_evidence_codes > 0:
            self._evidence(batch, rows, examples)
        return batch


def _check_evidence(ds, max_evidence_codes: int) -> int:
    """max_evidence_codes as an int; refuse E > 0 on a dataset without evidence."""
    e = int(max_evidence_codes or 0)
    if e < 0:
        raise ValueError(f"max_evidence_codes must be >= 0, got {e}")
    if e and not getattr(ds, "has_evidence", False):
        raise ValueError(
            f"config.data.max_evidence_codes={e} asks for evidence, but the prepared dataset "
            f"{ds.path} has none (metadata.json has no \"evidence\": true); prepare it with "
            f"`python -m data_prep.mimiciv ... --evidence PATH` (MDACE-layout annotations; the "
            f"demo corpus writes evidence.jsonl) or set config.data.max_evidence_codes=0")
    return e


def _read_options() -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)


# --------------------------------------------------------------------------- training


class _TrainPlan:
    """Global step -> (this process's doc indices, chunk count); deterministic, any order."""

    def __init__(self, lengths: np.ndarray, *, global_batch_size: int, chunk_size: int,
                 buckets: Sequence[int], seed: int, shuffle: bool, process_index: int,
                 local_batch_size: int, reserve_tokens: int = 0):
        self.lengths = lengths
        self.reserve_tokens = reserve_tokens
        self.global_batch_size = global_batch_size
        self.chunk_size = chunk_size
        self.buckets = tuple(sorted(buckets))
        self.seed = seed
        self.shuffle = shuffle
        self.rows = slice(process_index * local_batch_size,
                          (process_index + 1) * local_batch_size)
        self.steps_per_epoch = -(-lengths.size // global_batch_size)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # last two epochs
        self._lock = threading.Lock()  # grain maps in several threads

    def __getstate__(self) -> dict[str, Any]:  # picklable for worker processes
        state = dict(self.__dict__, _cache={})
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All global batches of ``epoch``: doc indices [steps, G] and chunk counts [steps]."""
        with self._lock:
            if epoch not in self._cache:
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = self._compute(epoch)
            return self._cache[epoch]

    def _compute(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        g, steps = self.global_batch_size, self.steps_per_epoch
        n = self.lengths.size
        order = np.full(steps * g, -1, np.int64)  # -1: filler rows of the partial batch
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            docs = rng.permutation(n)
            window = SORT_WINDOW_BATCHES * g
            for start in range(0, n, window):
                part = docs[start:start + window]
                docs[start:start + window] = part[np.argsort(self.lengths[part], kind="stable")]
            order[:n] = docs
            batches = order.reshape(steps, g)[rng.permutation(steps)]
        else:
            order[:n] = np.arange(n)
            batches = order.reshape(steps, g)
        longest = np.where(batches >= 0, self.lengths[np.maximum(batches, 0)], 0).max(axis=1)
        chunks = np.array([_bucket_for(int(n) + self.reserve_tokens, self.chunk_size, self.buckets)
                           for n in longest])
        return batches, chunks

    def __call__(self, step: int) -> tuple[np.ndarray, int]:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        batches, chunks = self.epoch_batches(epoch)
        return batches[i, self.rows], int(chunks[i])


def make_train_iterator(ds, *, split: str = "train", global_batch_size: int, chunk_size: int,
                        buckets: Sequence[int], seed: int, process_index: int = 0,
                        process_count: int = 1, shuffle: bool = True,
                        worker_count: int = 0, reserve_tokens: int = 0,
                        max_evidence_codes: int = 0) -> grain.DatasetIterator:
    """Infinite iterator of process-local training batches (see the module docstring).

    ``reserve_tokens``: padding every batch must have beyond its longest document (1 for the
    reference-unmasked ``emc`` mode, ``plm_icd.reserve_tokens``).
    The returned grain ``DatasetIterator`` supports ``get_state()`` / ``set_state()``;
    ``worker_count > 0`` loads batches in that many worker processes (``mp_prefetch``).
    ``shuffle=False``: documents in source order every epoch (no shuffle, no length sorting).
    ``max_evidence_codes`` > 0: batches carry the evidence fields (module docstring).
    """
    local_b = _check_processes(global_batch_size, process_index, process_count)
    max_evidence_codes = _check_evidence(ds, max_evidence_codes)
    lengths = ds.lengths(split)
    if lengths.size < global_batch_size:
        raise ValueError(f"split {split!r} of {ds.path} has {lengths.size} documents, fewer "
                         f"than global_batch_size {global_batch_size}: no full batch")
    _bucket_for(int(lengths.max()) + reserve_tokens, chunk_size, buckets)  # fail now
    plan = _TrainPlan(lengths, global_batch_size=global_batch_size, chunk_size=chunk_size,
                      buckets=buckets, seed=seed, shuffle=shuffle, process_index=process_index,
                      local_batch_size=local_b, reserve_tokens=reserve_tokens)
    load = _LoadAndPad(ds.source(split), chunk_size=chunk_size, num_labels=ds.num_labels,
                       pad_id=ds.pad_token_id, max_evidence_codes=max_evidence_codes)
    dataset = grain.MapDataset.range(sys.maxsize).map(plan).map(load)
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
        iter_ds = dataset.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count))
    else:
        iter_ds = dataset.to_iter_dataset(_read_options())
    return iter(iter_ds)


# --------------------------------------------------------------------------- evaluation


def _eval_plan(lengths: np.ndarray, *, global_batch_size: int, chunk_size: int,
               buckets: Sequence[int], process_index: int,
               local_batch_size: int, reserve_tokens: int = 0) -> list[tuple[np.ndarray, int]]:
    order = np.argsort(-lengths.astype(np.int64), kind="stable")  # longest first
    steps = math.ceil(order.size / global_batch_size)
    padded = np.full(steps * global_batch_size, -1, np.int64)
    padded[: order.size] = order
    batches = padded.reshape(steps, global_batch_size)
    rows = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    plan = []
    for batch in batches:
        longest = int(lengths[batch[batch >= 0]].max())
        plan.append((batch[rows], _bucket_for(longest + reserve_tokens, chunk_size, buckets)))
    return plan


def make_eval_batches(ds, split: str, *, global_batch_size: int, chunk_size: int,
                      buckets: Sequence[int], process_index: int = 0,
                      process_count: int = 1, reserve_tokens: int = 0,
                      max_evidence_codes: int = 0) -> Iterator[Batch]:
    """One pass over ``split``, longest documents first, filler rows in the last batch
    (``reserve_tokens``, ``max_evidence_codes`` as in ``make_train_iterator``)."""
    local_b = _check_processes(global_batch_size, process_index, process_count)
    max_evidence_codes = _check_evidence(ds, max_evidence_codes)
    lengths = ds.lengths(split)
    if lengths.size == 0:
        return iter(())
    plan = _eval_plan(lengths, global_batch_size=global_batch_size, chunk_size=chunk_size,
                      buckets=buckets, process_index=process_index, local_batch_size=local_b,
                      reserve_tokens=reserve_tokens)
    load = _LoadAndPad(ds.source(split), chunk_size=chunk_size, num_labels=ds.num_labels,
                       pad_id=ds.pad_token_id, max_evidence_codes=max_evidence_codes)
    return iter(grain.MapDataset.source(plan).map(load).to_iter_dataset(_read_options()))


# --------------------------------------------------------------------------- shapes ahead


def train_buckets(ds, *, split: str = "train", global_batch_size: int, chunk_size: int,
                  buckets: Sequence[int], seed: int, epoch: int, shuffle: bool = True,
                  reserve_tokens: int = 0) -> tuple[int, ...]:
    """The chunk counts the batches of ``epoch`` are padded to (``make_train_iterator``'s plan
    with the same arguments), ascending: the train-step shapes that epoch compiles."""
    lengths = ds.lengths(split)
    if lengths.size == 0:
        return ()
    plan = _TrainPlan(lengths, global_batch_size=global_batch_size, chunk_size=chunk_size,
                      buckets=buckets, seed=seed, shuffle=shuffle, process_index=0,
                      local_batch_size=global_batch_size, reserve_tokens=reserve_tokens)
    return tuple(sorted({int(n) for n in plan.epoch_batches(epoch)[1]}))


def eval_buckets(ds, split: str, *, global_batch_size: int, chunk_size: int,
                 buckets: Sequence[int], reserve_tokens: int = 0) -> tuple[int, ...]:
    """The chunk counts ``make_eval_batches`` pads the batches of ``split`` to, ascending."""
    lengths = ds.lengths(split)
    if lengths.size == 0:
        return ()
    plan = _eval_plan(lengths, global_batch_size=global_batch_size, chunk_size=chunk_size,
                      buckets=buckets, process_index=0, local_batch_size=global_batch_size,
                      reserve_tokens=reserve_tokens)
    return tuple(sorted({chunks for _, chunks in plan}))


def filler_batch(ds, rows: int, chunks: int, *, chunk_size: int,
                 max_evidence_codes: int = 0) -> Batch:
    """A process-local batch of ``rows`` filler rows padded to ``chunks`` chunks: the fields,
    dtypes and shapes of a real batch of that bucket (to compile its step ahead of time)."""
    load = _LoadAndPad(None, chunk_size=chunk_size, num_labels=ds.num_labels,
                       pad_id=ds.pad_token_id, max_evidence_codes=max_evidence_codes)
    return load((np.full(rows, -1, np.int64), chunks))


# --------------------------------------------------------------------------- host -> device


def to_global(batch: dict[str, Any], mesh, data_axes: Sequence[str] = ("data", "fsdp")):
    """Process-local numpy batch -> one global ``jax.Array`` per field, batch dim sharded
    over ``data_axes`` of ``mesh`` (the one place where host data becomes device data)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    missing = [a for a in data_axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"data axes {missing} are not mesh axes {tuple(mesh.shape)}")
    shards = math.prod(mesh.shape[a] for a in data_axes)
    local_b = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(local_b.values())) != 1:
        raise ValueError(f"batch fields disagree on the batch size: {local_b}")
    global_b = next(iter(local_b.values())) * jax.process_count()
    if global_b % shards:
        raise ValueError(
            f"global batch {global_b} is not divisible by the {shards} batch shards of mesh axes "
            f"{tuple(data_axes)} (mesh {dict(mesh.shape)}); choose a global batch size that is "
            f"a multiple of {shards}")
    sharding = NamedSharding(mesh, PartitionSpec(tuple(data_axes)))
    return {k: jax.make_array_from_process_local_data(sharding, _device_dtype(k, v))
            for k, v in batch.items()}


def _device_dtype(name: str, value: Any) -> np.ndarray:
    """int64 fields (doc_ids) become int32 unless x64 is on; refuse values that would wrap."""
    import jax

    value = np.asarray(value)
    if value.dtype != np.int64 or jax.config.jax_enable_x64:
        return value
    info = np.iinfo(np.int32)
    if value.size and (value.min() < info.min or value.max() > info.max):
        raise ValueError(f"batch field {name!r} has values outside int32 "
                         f"[{value.min()}, {value.max()}]; enable jax_enable_x64")
    return value.astype(np.int32)
