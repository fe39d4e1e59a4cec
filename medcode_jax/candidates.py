"""PLM-RR candidates: the retriever's top-K cache, candidate selection and cascade scores.

Stage 1 (a trained PLM-CA, frozen) is run once in eval mode over every split by
``build_cache``; stage 2 reads each document's top ``K_max`` codes from the cache and never runs
the retriever encoder again (plmrr.md §2).

Cache directory (this module owns the format; ``W/candidates/`` in a PLM-RR work directory)
------------------------------------------------------------------------------------------
Written as ``candidates.tmp-XXXX/`` beside the target and renamed at the end (atomic: a failed
or interrupted build leaves no ``candidates/``, only a temporary directory that can be deleted)::

    meta.json     {"format_version": 1, "k_max": K_max, "num_labels": C,
                   "retriever": {"workdir": ..., "step": ..., "weights_sha256": ...},
                   "shards_fingerprint": ..., "splits": {split: num_docs}, "created": ...}
                  (written last inside the temporary directory)
    <split>.npz   np.savez, read with allow_pickle=False (nothing is ever unpickled):
                    doc_ids  int64   [N]          strictly ascending (the shards' ``_id``)
                    ids      int32   [N, K_max]   code ids, descending retriever logit, ties by
                                                  the lower code id (jax.lax.top_k's order)
                    logits   float32 [N, K_max]   the retriever's logits of those codes

Freshness: ``check_fresh`` compares a cache with the run that wants it (K <= K_max, C, the
retriever checkpoint's step and weight hash, the shards' fingerprint) and raises
``StaleCacheError`` naming every differing field; the fix is to delete ``W/candidates/`` (it is
rebuilt) or to point ``retriever.workdir`` at the run the cache was built from.

Selection rules
---------------
* ``select_train`` (training, gold forcing): every gold code, then the retriever's
  highest-ranked non-gold codes (hard negatives) until K. One priority per (document, code):
  listed gold by retriever rank < unlisted gold by code id < listed non-gold by rank; the K
  codes of lowest priority are kept (so with more than K gold codes, the K the retriever ranks
  highest), in priority order. Vectorised: a ``[b, C]`` priority matrix + ``argpartition``.
* ``select_eval`` (validation, test, inference): the pure top K, no gold forcing.
* ``cascade_probs``: candidates by re-ranker probability, then the other listed codes below
  every candidate, ordered by retriever score; codes outside the list score 0. Thresholds
  (>= 1e-7 in practice) therefore apply to candidates only. ``mode="constant"`` gives the
  reference's scores (non-candidates at logit -1e9, i.e. probability 0) for comparison.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import shards

FORMAT_VERSION = 1
META_FILE = "meta.json"
ARRAYS = ("doc_ids", "ids", "logits")
CASCADE_CANDIDATE_FLOOR = 1e-30       # candidates: max(sigmoid(s), this)
CASCADE_LISTED_SCALE = 1e-31          # listed non-candidates: this * clip(sigmoid(r), 1e-7, 1)
CASCADE_LISTED_CLIP = 1e-7
_REBUILD_HINT = ("delete {path} (the next run rebuilds it from the retriever) or point "
                 "retriever.workdir at the run it was built from")


class StaleCacheError(RuntimeError):
    """The candidate cache was built for another retriever, dataset, K or label space."""


# --------------------------------------------------------------------------- identities


def _host_array(x: Any) -> np.ndarray:
    """A leaf as a host numpy array (gathered across processes when it is not addressable)."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def weights_sha256(params: Any) -> str:
    """sha256 of a model's weights: every leaf as float32 bytes, sorted by path.

    ``params`` is an ``nnx.State`` (or any pytree of arrays). Each leaf contributes its path
    (``"encoder/layers/0/…"``), its shape and its float32 C-order bytes, so renaming or
    reshaping a parameter changes the hash as well. Sharded arrays are gathered first (a
    collective: call it on every process). Use ``run_weights_sha256`` for a whole ``Run``."""
    import jax
    from flax import nnx

    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    named = sorted(("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves)
    digest = hashlib.sha256()
    for name, leaf in named:
        value = np.ascontiguousarray(_host_array(leaf), dtype=np.float32)
        digest.update(f"{name}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def run_weights_sha256(run) -> str:
    """``weights_sha256`` of a ``train.Run``'s trainable and frozen parameters together (the
    model's own paths: freezing a parameter does not change the hash). What ``build_cache``
    records and what ``check_fresh`` should be given."""
    from flax import nnx

    return weights_sha256(nnx.merge_state(run.state.params, run.state.frozen))


def shards_fingerprint(ds) -> str:
    """sha256 of a prepared dataset's metadata.json, label_space.json and descriptions.npz
    (each prefixed by its name): changes whenever the shards are re-prepared."""
    digest = hashlib.sha256()
    for name in ("metadata.json", "label_space.json", "descriptions.npz"):
        digest.update(name.encode() + b"\0")
        digest.update((Path(ds.path) / name).read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def _check_split_arrays(split: str, doc_ids, ids, logits, num_labels: int | None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    doc_ids = np.asarray(doc_ids)
    ids = np.asarray(ids)
    logits = np.asarray(logits)
    where = f"candidate cache split {split!r}"
    if doc_ids.ndim != 1 or ids.ndim != 2 or logits.shape != ids.shape \
            or ids.shape[0] != doc_ids.shape[0]:
        raise ValueError(f"{where}: need doc_ids [N], ids [N, K_max] and logits [N, K_max]; got "
                         f"{doc_ids.shape}, {ids.shape}, {logits.shape}")
    if not (np.issubdtype(doc_ids.dtype, np.integer) or doc_ids.size == 0) \
            or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"{where}: doc_ids and ids must be integers, got {doc_ids.dtype} and "
                         f"{ids.dtype}")
    if doc_ids.size > 1 and not np.all(np.diff(doc_ids) > 0):
        raise ValueError(f"{where}: doc_ids must be strictly ascending (sorted, no duplicates); "
                         "sort the rows by doc id and drop filler rows before writing")
    if num_labels is not None and ids.size and (ids.min() < 0 or ids.max() >= num_labels):
        raise ValueError(f"{where}: code id out of range [0, {num_labels}): "
                         f"min {ids.min()}, max {ids.max()}")
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"{where}: non-finite retriever logits")
    return (doc_ids.astype(np.int64), ids.astype(np.int32), logits.astype(np.float32))


def write_cache(out_dir: str | os.PathLike, *,
                splits: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                meta: Mapping[str, Any], overwrite: bool = False) -> None:
    """Write a candidate cache directory atomically (see the module docstring).

    ``splits`` maps a split name to ``(doc_ids [N], ids [N, K_max], logits [N, K_max])`` with
    doc_ids strictly ascending. ``meta`` must hold ``num_labels``, ``retriever`` (``workdir``,
    ``step``, ``weights_sha256``) and ``shards_fingerprint``; ``format_version``, ``k_max``,
    ``splits`` and ``created`` (when absent) are filled in here. An existing ``out_dir`` is
    refused unless ``overwrite``; on any error nothing is left behind."""
    out = Path(out_dir)
    meta = json.loads(json.dumps(dict(meta)))  # a JSON-clean deep copy
    missing = [k for k in ("num_labels", "retriever", "shards_fingerprint") if k not in meta]
    retriever = meta.get("retriever")
    if isinstance(retriever, dict):
        missing += [f"retriever.{k}" for k in ("workdir", "step", "weights_sha256")
                    if k not in retriever]
    elif retriever is not None:
        missing.append("retriever (must be a dict)")
    if missing:
        raise ValueError(f"candidate cache meta for {out} lacks {missing}; see "
                         "medcode_jax.candidates (build_cache fills them in)")
    if not splits:
        raise ValueError(f"no splits given for the candidate cache {out}")
    num_labels = int(meta["num_labels"])
    checked = {s: _check_split_arrays(s, *arrays, num_labels) for s, arrays in splits.items()}
    widths = {s: a[1].shape[1] for s, a in checked.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"splits disagree on K_max (ids columns): {widths}")
    k_max = next(iter(widths.values()))
    if "k_max" in meta and int(meta["k_max"]) != k_max:
        raise ValueError(f"meta k_max={meta['k_max']} but the ids arrays have {k_max} columns")
    for split in checked:
        if not split or os.sep in split or split.startswith(".") or split == "meta":
            raise ValueError(f"bad split name {split!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"candidate cache {out} already exists; delete it to rebuild it")
    meta.update(format_version=FORMAT_VERSION, k_max=int(k_max),
                splits={s: int(a[0].shape[0]) for s, a in checked.items()})
    meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for split, (doc_ids, ids, logits) in checked.items():
            np.savez(tmp / f"{split}.npz", doc_ids=doc_ids, ids=ids, logits=logits)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        shards.publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- reading


class SplitCandidates:
    """One split of a cache: ``doc_ids [N]`` (ascending), ``ids``/``logits [N, K_max]``."""

    def __init__(self, path: Path, name: str, doc_ids: np.ndarray, ids: np.ndarray,
                 logits: np.ndarray):
        self.path = path
        self.name = name
        self.doc_ids = doc_ids
        self.ids = ids
        self.logits = logits

    @property
    def k_max(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.doc_ids.shape[0])

    def lookup(self, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows for ``doc_ids [b]``: ``(ids [b, K_max] int32, logits [b, K_max] float32)``.

        Doc id -1 (a batch's filler row) gets ``ids = arange(K_max)``, ``logits = 0``; an id
        missing from the split raises ``KeyError``."""
        query = np.asarray(doc_ids).astype(np.int64).reshape(-1)
        filler = query == -1
        pos = np.searchsorted(self.doc_ids, query)
        pos_c = np.minimum(pos, max(len(self) - 1, 0))
        found = (pos < len(self)) & (self.doc_ids[pos_c] == query) if len(self) else \
            np.zeros(query.shape, bool)
        unknown = ~found & ~filler
        if unknown.any():
            bad = query[unknown]
            raise KeyError(
                f"candidate cache {self.path}, split {self.name!r}: no document with id "
                f"{int(bad[0])}" + (f" (and {bad.size - 1} more)" if bad.size > 1 else "")
                + "; the cache was built from other shards: "
                + _REBUILD_HINT.format(path=self.path))
        ids = np.where(filler[:, None], np.arange(self.k_max, dtype=np.int32)[None, :],
                       self.ids[pos_c] if len(self) else 0).astype(np.int32)
        logits = np.where(filler[:, None], np.float32(0),
                          self.logits[pos_c] if len(self) else 0).astype(np.float32)
        return ids, logits


class CandidateCache:
    """A candidate cache directory opened for reading (see ``open_cache``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        hint = _REBUILD_HINT.format(path=self.path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"candidate cache {self.path} does not exist; build it with "
                                    "medcode_jax.candidates.build_cache (the PLM-RR pipeline "
                                    "does so after stage 1)")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a complete candidate cache (no "
                                    f"{META_FILE}); {hint}")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is not valid JSON ({err}); {hint}") from None
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {version!r} is not supported (this "
                             f"code reads version {FORMAT_VERSION}); {hint}")
        for key in ("k_max", "num_labels", "retriever", "shards_fingerprint", "splits"):
            if key not in self.meta:
                raise ValueError(f"{meta_path} lacks field {key!r}; {hint}")
        for split in self.meta["splits"]:
            if not (self.path / f"{split}.npz").is_file():
                raise FileNotFoundError(f"candidate cache {self.path} is incomplete: {split}.npz "
                                        f"is missing; {hint}")
        self._splits: dict[str, SplitCandidates] = {}

    @property
    def k_max(self) -> int:
        return int(self.meta["k_max"])

    @property
    def num_labels(self) -> int:
        return int(self.meta["num_labels"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.meta["splits"])

    def split(self, name: str) -> SplitCandidates:
        """The arrays of split ``name`` (loaded on first use, validated)."""
        if name in self._splits:
            return self._splits[name]
        if name not in self.meta["splits"]:
            raise KeyError(f"candidate cache {self.path} has no split {name!r}; it has "
                           f"{list(self.splits)} (rebuild it with that split)")
        file = self.path / f"{name}.npz"
        hint = _REBUILD_HINT.format(path=self.path)
        try:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in ARRAYS if k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:  # truncated, pickled, …
            raise ValueError(f"cannot read {file} ({err}); {hint}") from None
        missing = [k for k in ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"{file} lacks array(s) {missing}; {hint}")
        doc_ids, ids, logits = arrays["doc_ids"], arrays["ids"], arrays["logits"]
        expected = (int(self.meta["splits"][name]), self.k_max)
        if doc_ids.dtype != np.int64 or ids.dtype != np.int32 or logits.dtype != np.float32 \
                or ids.shape != expected or logits.shape != expected \
                or doc_ids.shape != expected[:1]:
            raise ValueError(
                f"{file}: expected doc_ids int64 {expected[:1]}, ids int32 {expected} and logits "
                f"float32 {expected} (from {META_FILE}), got {doc_ids.dtype} {doc_ids.shape}, "
                f"{ids.dtype} {ids.shape}, {logits.dtype} {logits.shape}; {hint}")
        if doc_ids.size > 1 and not np.all(np.diff(doc_ids) > 0):
            raise ValueError(f"{file}: doc_ids are not strictly ascending; {hint}")
        self._splits[name] = SplitCandidates(self.path, name, doc_ids, ids, logits)
        return self._splits[name]


def open_cache(path: str | os.PathLike) -> CandidateCache:
    """Open a candidate cache directory written by ``write_cache`` / ``build_cache``."""
    return CandidateCache(path)


def check_fresh(cache: CandidateCache, *, k: int, num_labels: int, retriever_step: int,
                weights_sha256: str, shards_fingerprint: str) -> None:
    """Raise ``StaleCacheError`` listing every way ``cache`` does not fit the run: K > K_max,
    another label space size, another retriever checkpoint (step or weights) or other shards."""
    meta = cache.meta
    retriever = meta.get("retriever") or {}
    problems = []
    if int(k) > cache.k_max:
        problems.append(f"k_max: the cache holds the top {cache.k_max} codes per document, the "
                        f"run asks for K = {k} candidates (rebuild with k_max >= {k})")
    checks = (("num_labels", meta.get("num_labels"), int(num_labels)),
              ("retriever.step", retriever.get("step"), int(retriever_step)),
              ("retriever.weights_sha256", retriever.get("weights_sha256"), weights_sha256),
              ("shards_fingerprint", meta.get("shards_fingerprint"), shards_fingerprint))
    for field, cached, current in checks:
        if cached != current:
            problems.append(f"{field}: cache has {cached!r}, the run has {current!r}")
    if problems:
        raise StaleCacheError(
            f"candidate cache {cache.path} (built from retriever {retriever.get('workdir')!r}) "
            f"does not match this run:\n- " + "\n- ".join(problems)
            + "\nFix: " + _REBUILD_HINT.format(path=cache.path))


# --------------------------------------------------------------------------- selection


def _check_k(top_ids: np.ndarray, k: int) -> None:
    if top_ids.ndim != 2:
        raise ValueError(f"top_ids must be [b, K_max], got shape {top_ids.shape}")
    if not 1 <= int(k) <= top_ids.shape[1]:
        raise ValueError(f"k={k} candidates but the cache holds K_max={top_ids.shape[1]} codes "
                         f"per document: need 1 <= k <= K_max (rebuild the cache with a larger "
                         f"k_max)")


def select_train(top_ids: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Training candidates ``[b, k]`` int32: gold forced in, then hard negatives.

    Priority per (document, code), lower first: listed gold (its retriever rank r) <
    unlisted gold (K_max + code id) < listed non-gold (K_max + C + r); other codes are never
    chosen. The k codes of lowest priority are kept, ordered by priority. ``labels`` is the
    ``[b, C]`` multi-hot matrix (> 0 = gold); rows of ``top_ids`` hold distinct codes."""
    top_ids = np.asarray(top_ids)
    labels = np.asarray(labels)
    _check_k(top_ids, k)
    b, k_max = top_ids.shape
    if labels.ndim != 2 or labels.shape[0] != b:
        raise ValueError(f"labels must be [b={b}, C], got {labels.shape}")
    c = labels.shape[1]
    gold = labels > 0
    never = np.int64(2 * (k_max + c) + 1)
    codes = np.arange(c, dtype=np.int64)
    prio = np.where(gold, k_max + codes[None, :], never)
    rank = np.broadcast_to(np.arange(k_max, dtype=np.int64), (b, k_max))
    rows = np.arange(b)[:, None]
    listed_gold = gold[rows, top_ids]
    prio[rows, top_ids] = np.where(listed_gold, rank, k_max + c + rank)
    if k < c:
        part = np.argpartition(prio, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(codes, (b, c))
    order = np.argsort(np.take_along_axis(prio, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int32)


def select_eval(top_ids: np.ndarray, k: int) -> np.ndarray:
    """Evaluation / inference candidates: the pure retriever top k, ``[b, k]`` int32."""
    top_ids = np.asarray(top_ids)
    _check_k(top_ids, k)
    return np.ascontiguousarray(top_ids[:, :k], dtype=np.int32)


def unique_count(candidates: np.ndarray, accum: int) -> int:
    """The largest number of distinct codes in one micro-batch of a global batch ``[G, K]``
    (micro-batch j = rows j, j + accum, … as ``steps._split_micro`` splits it)."""
    cand = np.asarray(candidates)
    g = cand.shape[0]
    if cand.ndim != 2 or accum < 1 or g % accum:
        raise ValueError(f"candidates {cand.shape} must be [G, K] with G a multiple of "
                         f"accum={accum}")
    if cand.size == 0:
        return 0
    micro = cand.reshape(g // accum, accum, -1).swapaxes(0, 1).reshape(accum, -1)
    micro = np.sort(micro, axis=1)
    distinct = 1 + np.count_nonzero(np.diff(micro, axis=1), axis=1)
    return int(distinct.max())


def unique_bucket(count: int, *, slots_per_micro: int, multiple: int) -> int:
    """Static number of description rows for a micro-batch with ``count`` distinct codes:
    ``count`` rounded up to ``multiple`` (few compiled shapes), capped at ``slots_per_micro``
    (micro rows x K, the no-dedup size); at least 1."""
    if multiple < 1 or slots_per_micro < 1:
        raise ValueError(f"multiple={multiple} and slots_per_micro={slots_per_micro} must be >= 1")
    if count > slots_per_micro:
        raise ValueError(f"{count} distinct codes cannot exceed the {slots_per_micro} slots")
    rounded = -(-max(int(count), 1) // multiple) * multiple
    return int(min(rounded, slots_per_micro))


# --------------------------------------------------------------------------- scores


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic in float64 (no overflow warnings, tiny values kept)."""
    x = np.asarray(x, np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def cascade_probs(rerank_logits: np.ndarray, candidates: np.ndarray, top_ids: np.ndarray,
                  top_logits: np.ndarray, num_labels: int, *, mode: str = "cascade"
                  ) -> np.ndarray:
    """Full ``[b, C]`` float32 probabilities from the re-ranker's candidate logits.

    ``cascade``: candidate c -> max(sigmoid(s_c), 1e-30); a listed non-candidate (in
    ``top_ids`` but not a candidate) -> 1e-31 * clip(sigmoid(r), 1e-7, 1), below every
    candidate and ordered by the retriever logit r; codes outside ``top_ids`` -> 0.
    ``constant``: candidates sigmoid(s), every other code 0 (the reference's -1e9 fill)."""
    if mode not in ("cascade", "constant"):
        raise ValueError(f"mode={mode!r}: use 'cascade' or 'constant'")
    s = np.asarray(rerank_logits)
    cand = np.asarray(candidates)
    if s.shape != cand.shape or s.ndim != 2:
        raise ValueError(f"rerank_logits {s.shape} and candidates {cand.shape} must both be "
                         "[b, K]")
    b = s.shape[0]
    rows = np.arange(b)[:, None]
    out = np.zeros((b, int(num_labels)), np.float32)
    probs = _sigmoid(s)
    if mode == "cascade":
        top_ids = np.asarray(top_ids)
        top_logits = np.asarray(top_logits)
        if top_ids.shape != top_logits.shape or top_ids.shape[0] != b:
            raise ValueError(f"top_ids {top_ids.shape} and top_logits {top_logits.shape} must "
                             f"both be [b={b}, K_max]")
        listed = CASCADE_LISTED_SCALE * np.clip(_sigmoid(top_logits), CASCADE_LISTED_CLIP, 1.0)
        out[rows, top_ids] = listed.astype(np.float32)
        probs = np.maximum(probs, CASCADE_CANDIDATE_FLOOR)
    out[rows, cand] = probs.astype(np.float32)
    return out


def retriever_recall(top_ids: np.ndarray, label_ids: Sequence[np.ndarray],
                     ks: Iterable[int]) -> dict[str, float]:
    """Recall of the retriever's lists against the gold codes, per K in ``ks`` (K <= K_max;
    larger K are skipped).

    ``retriever_recall@K``: mean over documents with gold codes of |top-K ∩ gold| / |gold|.
    ``retriever_coverage@K``: pooled, sum |top-K ∩ gold| / sum |gold| (the share of all gold
    (document, code) pairs that the re-ranker can see). NaN when no document has gold codes."""
    top_ids = np.asarray(top_ids)
    if top_ids.ndim != 2 or top_ids.shape[0] != len(label_ids):
        raise ValueError(f"top_ids {top_ids.shape} must be [N, K_max] with N = "
                         f"{len(label_ids)} documents of label_ids")
    n, k_max = top_ids.shape
    ks = [int(k) for k in ks if int(k) <= k_max]
    gold_cols = [np.asarray(g, np.int64).reshape(-1) for g in label_ids]
    counts = np.array([g.size for g in gold_cols], np.int64)
    gold = np.concatenate(gold_cols) if gold_cols else np.zeros(0, np.int64)
    width = int(max(gold.max(initial=-1), top_ids.max(initial=-1))) + 1
    gold_keys = np.unique(np.repeat(np.arange(n, dtype=np.int64), counts) * width + gold)
    gold_row = gold_keys // max(width, 1)
    n_gold = np.bincount(gold_row, minlength=n)
    # rank of each gold code in its document's list (K_max when absent)
    list_keys = np.arange(n, dtype=np.int64)[:, None] * width + top_ids.astype(np.int64)
    order = np.argsort(list_keys, axis=None, kind="stable")
    sorted_keys = list_keys.reshape(-1)[order]
    ranks_flat = np.broadcast_to(np.arange(k_max), (n, k_max)).reshape(-1)[order]
    pos = np.searchsorted(sorted_keys, gold_keys)
    pos_c = np.minimum(pos, max(sorted_keys.size - 1, 0))
    hit = (pos < sorted_keys.size) & (sorted_keys[pos_c] == gold_keys) if sorted_keys.size \
        else np.zeros(gold_keys.shape, bool)
    rank = np.where(hit, ranks_flat[pos_c] if sorted_keys.size else 0, k_max)
    has_gold = n_gold > 0
    out: dict[str, float] = {}
    for k in ks:
        hits = np.bincount(gold_row, weights=rank < k, minlength=n)
        if has_gold.any():
            out[f"retriever_recall@{k}"] = float(np.mean(hits[has_gold] / n_gold[has_gold]))
            out[f"retriever_coverage@{k}"] = float(hits.sum() / n_gold.sum())
        else:
            out[f"retriever_recall@{k}"] = math.nan
            out[f"retriever_coverage@{k}"] = math.nan
    return out


# --------------------------------------------------------------------------- building


def make_topk_step(graphdef, k_max: int):
    """``(params, frozen, rest, batch) -> (logits [B, k_max] fp32, ids [B, k_max] int32)``: the
    retriever in eval mode (deterministic), top k_max by ``jax.lax.top_k`` (ties: lower id)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def step(params, frozen, rest, batch):
        model = nnx.merge(graphdef, params, frozen, rest)
        logits = model(batch["input_ids"], batch["attention_mask"], deterministic=True)
        values, ids = jax.lax.top_k(logits.astype(jnp.float32), k_max)
        return values, ids.astype(jnp.int32)

    return step


def build_cache(run, out_dir: str | os.PathLike, *, k_max: int,
                retriever_workdir: str | os.PathLike,
                splits: Sequence[str] = ("train", "val", "test")) -> CandidateCache:
    """Run the retriever held by ``run`` (a ``train.Run`` with the restored best state) over
    ``splits`` and write its top ``k_max`` codes per document to ``out_dir``.

    Every process runs the same loop (eval batches of ``train.Evaluator.batches``); rows are
    gathered with ``train.host_rows``, filler rows dropped, sorted by doc id; process 0 writes
    the cache atomically while the others wait, then every process opens it (``out_dir`` must
    be on a file system all processes see). meta records the retriever's step, weight hash
    (``run_weights_sha256``) and workdir, and the shards' fingerprint."""
    import jax
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from medcode_jax import input_pipeline, steps, train

    num_labels = run.ds.num_labels
    if not 1 <= k_max <= num_labels:
        raise ValueError(f"k_max={k_max} must be in [1, {num_labels}] (the number of codes)")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"candidate cache {out} already exists; open it with open_cache "
                              f"or delete it to rebuild it")
    step_fn = steps.jit_eval_step(make_topk_step(run.graphdef, k_max), run.state_shardings,
                                  run.rest_shardings, run.mesh)
    evaluator = train.Evaluator(run)
    main = jax.process_index() == 0
    arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for split in splits:
        total = int(run.ds.lengths(split).size)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        with tqdm(total=total, desc=f"retriever top-{k_max} ({split})", unit="doc",
                  disable=not main) as bar:
            for batch in evaluator.batches(split):
                inputs = input_pipeline.to_global(
                    {k: batch[k] for k in steps.EVAL_KEYS}, run.mesh)
                values, ids = step_fn(run.state.params, run.state.frozen, run.rest, inputs)
                valid = train.host_rows(batch["valid"]).astype(bool)
                doc_ids = train.host_rows(batch["doc_ids"]).astype(np.int64)
                parts.append((doc_ids[valid], train.host_rows(ids)[valid],
                              train.host_rows(values)[valid]))
                bar.update(int(valid.sum()))
        if parts:
            doc_ids, ids, logits = (np.concatenate(p) for p in zip(*parts))
        else:
            doc_ids = np.zeros(0, np.int64)
            ids, logits = np.zeros((0, k_max), np.int32), np.zeros((0, k_max), np.float32)
        order = np.argsort(doc_ids, kind="stable")
        doc_ids, ids, logits = doc_ids[order], ids[order], logits[order]
        if doc_ids.size != total or (doc_ids.size > 1 and not np.all(np.diff(doc_ids) > 0)):
            raise RuntimeError(
                f"split {split!r}: the eval batches gave {doc_ids.size} rows "
                f"({np.unique(doc_ids).size} distinct doc ids) for {total} documents; the "
                f"shards at {run.ds.path} must have one unique _id per document")
        arrays[split] = (doc_ids, ids, logits)
    meta = {"num_labels": num_labels,
            "retriever": {"workdir": os.path.abspath(os.fspath(retriever_workdir)),
                          "step": int(run.state.step),
                          "weights_sha256": run_weights_sha256(run)},
            "shards_fingerprint": shards_fingerprint(run.ds)}
    if main:
        write_cache(out, splits=arrays, meta=meta)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"candidates:{out}")
    return open_cache(out)
