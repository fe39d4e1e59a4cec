"""Every evaluation metric of training.md §3, fed batch by batch on the host (pure NumPy).

Conventions (those of the PyTorch reference, ``medical-coding-reproducibility/src/metrics.py``):

* **Code filtering.** Only the codes that occur in the split's targets ("present" codes) take
  part in every metric except AUC: false positives on absent codes are ignored, macro averages
  run over present codes, ranking metrics rank among present codes only.
* **Documents without gold codes** ("empty" documents) are left out of every code-filtered
  metric (F1/precision/recall counts, exact match, ranking metrics), as the reference's
  ``filter_batch`` drops them.  They take part in AUC and threshold tuning, which the reference
  computes on the full, unfiltered matrices.  Per code system (diagnoses / procedures) the same
  rule applies within the system: only documents with a gold code of that system count.
* **Thresholding** is ``p > t`` (strict).  Ratios carry ``+1e-10`` in the denominator
  (F1, precision, recall); a code never predicted has precision 0.
* **Ranking ties.**  ``map`` is the tie-aware per-document average precision (for every gold
  code: #gold scored ≥ it / #codes scored ≥ it; it equals scikit-learn's
  ``label_ranking_average_precision_score`` and, without ties, the reference's sort-based
  formula).  Top-k metrics (precision@k, recall@k, R-precision, retriever recall@K) order codes
  by descending score and break ties by the lower label id.  When fewer than k codes are
  present, top-k holds all of them and precision@k still divides by k.
* **AUC** (full label space, every document): micro over all (document, code) pairs; macro
  over codes with at least one positive and one negative document.  Ties count ½ (the
  Mann-Whitney statistic, identical to the trapezoidal ROC area of scikit-learn).

Keys of ``MetricAccumulator.finalize`` (raw fractions; ``format_metrics_table`` shows ×100):
``f1_micro f1_macro precision_micro recall_micro precision_macro recall_macro
exact_match_ratio precision@{5,8,15} recall@{5,10,15} precision@recall map auc_micro
auc_macro`` (AUC only with ``compute_auc``), ``never_correct_codes`` (present codes with
TP = 0), counts ``threshold num_docs num_docs_with_codes num_present_codes``; with
``label_train_counts``: ``f1_{micro,macro}_band_{1-10,11-20,21-50,51-500,gt500}`` and
``num_present_codes_band_*`` (bands of training-document counts; codes never seen in training
fall in no band); with ``label_systems``: ``f1_{micro,macro}_{diagnoses,procedures}``,
``never_correct_{diagnoses,procedures}``, ``num_present_codes_{diagnoses,procedures}``; with
``retriever_recall_at``: ``retriever_recall@K`` (per-document |top-K ∩ gold| / |gold| over the
full label space, documents with gold codes).  A figure over an empty set is NaN.

Streaming and memory (MIMIC-IV ICD-10 test: N = 19,802, C = 7,942):

* streamed exactly per batch: per-code TP/FP/FN at the accumulator's threshold (and the
  per-system false positives), per-code support, the per-threshold histograms for tuning
  (``thresholds.ThresholdCounter``, 13 MB), the gold codes as a sparse list.
* ranking metrics, exact match and AUC need the set of present codes of the whole split, known
  only at the end, so the float32 probabilities are kept: in RAM below
  ``max_in_memory_bytes`` (default 256 MB), otherwise appended to an anonymous temporary file
  (629 MB on disk for the test set, deleted when the accumulator is closed or collected) and
  read back through ``np.memmap`` chunk by chunk.  Both paths run the same finalize code.
* ``finalize`` works in row chunks of ``chunk_rows`` documents (default 256: about 60 MB of
  temporaries at C = 7,942); micro AUC sorts blocks of at most 16M scores (64 MB) against the
  sorted positive scores (12 bytes per gold code); macro AUC reads column blocks of at most 16M
  scores.  Nothing holds the ``N x C`` matrix as float64.
"""

from __future__ import annotations

import collections
import math
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from medcode_jax.thresholds import DEFAULT_THRESHOLDS, F1_EPSILON, ThresholdCounter, tune_threshold

PRECISION_AT: tuple[int, ...] = (5, 8, 15)
RECALL_AT: tuple[int, ...] = (5, 10, 15)
RETRIEVER_RECALL_AT: tuple[int, ...] = (8, 15, 50, 100, 200, 300)
# Training-frequency bands (name, lowest count, highest count), both ends inclusive.
FREQUENCY_BANDS: tuple[tuple[str, int, float], ...] = (
    ("1-10", 1, 10), ("11-20", 11, 20), ("21-50", 21, 50), ("51-500", 51, 500),
    ("gt500", 501, math.inf))
SYSTEM_GROUPS: dict[str, str] = {
    "icd10cm": "diagnoses", "icd9cm": "diagnoses",
    "icd10pcs": "procedures", "icd9pcs": "procedures"}
GROUP_NAMES: tuple[str, ...] = ("diagnoses", "procedures")
_BLOCK_VALUES = 1 << 24  # scores per block in the AUC passes (64 MB of float32)


# --------------------------------------------------------------------------- formulas


def _ratio(num, den) -> float:
    """num / (den + 1e-10), averaged when given per-code arrays."""
    return float(np.mean(np.asarray(num, np.float64) / (np.asarray(den, np.float64) + F1_EPSILON)))


def _count_metrics(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, codes: np.ndarray,
                   suffix: str = "", full: bool = True) -> dict[str, float]:
    """F1 (and precision / recall when ``full``) over the codes selected by bool mask ``codes``.

    Micro figures pool the counts, macro figures average per-code ratios; NaN with no code.
    """
    names = ["f1_micro", "f1_macro"]
    if full:
        names += ["precision_micro", "recall_micro", "precision_macro", "recall_macro"]
    if not np.any(codes):
        return {f"{name}{suffix}": math.nan for name in names}
    tp, fp, fn = (x[codes] for x in (tp, fp, fn))
    stp, sfp, sfn = tp.sum(), fp.sum(), fn.sum()
    values = {"f1_micro": _ratio(stp, stp + 0.5 * (sfp + sfn)),
              "f1_macro": _ratio(tp, tp + 0.5 * (fp + fn)),
              "precision_micro": _ratio(stp, stp + sfp), "recall_micro": _ratio(stp, stp + sfn),
              "precision_macro": _ratio(tp, tp + fp), "recall_macro": _ratio(tp, tp + fn)}
    return {f"{name}{suffix}": values[name] for name in names}


def _order_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is descending score (float32), then ascending column.

    Layout: ``row << (32 + b) | (descending-score key) << b | column`` with ``b`` bits for the
    column, so one flat ``np.sort`` orders every row of the block at once, exactly.
    """
    rows, cols = scores.shape
    col_bits = max(1, (cols - 1).bit_length())
    if rows > 1 << (32 - col_bits):
        raise ValueError(f"ranking block of {rows} rows x {cols} codes does not fit 64-bit keys; "
                         "lower chunk_rows")
    bits = (scores + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0
    ascending = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    descending = (~ascending).astype(np.uint64)
    row = np.arange(rows, dtype=np.uint64)[:, None] << np.uint64(32 + col_bits)
    col = np.arange(cols, dtype=np.uint64)[None, :]
    return row | (descending << np.uint64(col_bits)) | col


def _gold_ranks(scores: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Rank statistics of every gold entry of a ``[r, c]`` block (every row has a gold code).

    Returns per gold entry: ``row``, ``rank`` (0-based, ties broken by the lower column),
    ``n_ge`` (#codes scored ≥ it) and ``gold_ge`` (#gold codes scored ≥ it), plus per row
    ``n_gold``.
    """
    rows, cols = scores.shape
    keys = _order_keys(scores)
    flat = np.sort(keys, axis=None)
    gi, gj = np.nonzero(gold)
    gkey = keys[gi, gj]
    base = gi.astype(np.int64) * cols
    col_mask = np.uint64((1 << max(1, (cols - 1).bit_length())) - 1)
    tie_end = gkey | col_mask  # the last possible key of the same row and score
    n_gold = np.bincount(gi, minlength=rows)
    gold_before_row = np.concatenate([[0], np.cumsum(n_gold)[:-1]])
    return {
        "row": gi,
        "rank": np.searchsorted(flat, gkey, side="left") - base,
        "n_ge": np.searchsorted(flat, tie_end, side="right") - base,
        "gold_ge": np.searchsorted(np.sort(gkey), tie_end, side="right") - gold_before_row[gi],
        "n_gold": n_gold,
    }


def _hits_at(ranks: dict[str, np.ndarray], k: np.ndarray | int) -> np.ndarray:
    """Per row: the number of gold codes among the top ``k`` (scalar or per-row array)."""
    k_per_gold = k[ranks["row"]] if isinstance(k, np.ndarray) else k
    return np.bincount(ranks["row"], weights=ranks["rank"] < k_per_gold,
                       minlength=ranks["n_gold"].size)


def _mann_whitney(lt_all: np.ndarray, le_all: np.ndarray, pos_sorted: np.ndarray,
                  num_neg: int) -> float:
    """ROC AUC from, per positive score (sorted), the counts of all scores < and ≤ it."""
    if pos_sorted.size == 0 or num_neg == 0:
        return math.nan
    lt_pos = np.searchsorted(pos_sorted, pos_sorted, side="left")
    le_pos = np.searchsorted(pos_sorted, pos_sorted, side="right")
    below = np.sum(lt_all - lt_pos, dtype=np.int64)
    ties = np.sum((le_all - lt_all) - (le_pos - lt_pos), dtype=np.int64)
    return float((below + 0.5 * ties) / (float(pos_sorted.size) * float(num_neg)))


# --------------------------------------------------------------------------- storage


class _ScoreStore:
    """Append-only float32 ``[n, C]`` rows: in RAM up to a size, then in a temporary file."""

    def __init__(self, num_labels: int, max_in_memory_bytes: int, tmp_dir: str | None):
        self._num_labels = num_labels
        self._max_bytes = max_in_memory_bytes
        self._tmp_dir = tmp_dir
        self._parts: list[np.ndarray] = []
        self._file = None
        self._rows = 0
        self._view: np.ndarray | None = None

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def append(self, rows: np.ndarray) -> None:
        self._view = None
        self._rows += rows.shape[0]
        if self._file is None and self._rows * self._num_labels * 4 > self._max_bytes:
            self._file = tempfile.TemporaryFile(prefix="medcode_scores_", dir=self._tmp_dir)
            for part in self._parts:
                part.tofile(self._file)
            self._parts = []
        if self._file is not None:
            np.ascontiguousarray(rows, dtype=np.float32).tofile(self._file)
        else:
            self._parts.append(np.array(rows, dtype=np.float32, copy=True))

    def array(self) -> np.ndarray:
        """All rows as one ``[n, C]`` array (a read-only memmap when on disk)."""
        if self._view is None:
            if self._file is not None:
                self._file.flush()
                self._view = np.memmap(self._file, dtype=np.float32, mode="r",
                                       shape=(self._rows, self._num_labels))
            elif self._parts:
                self._parts = [np.concatenate(self._parts)]
                self._view = self._parts[0]
            else:
                self._view = np.zeros((0, self._num_labels), dtype=np.float32)
        return self._view

    def close(self) -> None:
        self._view = None
        self._parts = []
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- accumulator


class MetricAccumulator:
    """Streams one split's predictions; ``finalize`` returns every metric as raw fractions.

    Args:
      num_labels: C, the size of the label space.
      threshold: decision threshold whose per-code counts are streamed (``p > threshold``).
      thresholds: candidate thresholds for tuning (``thresholds.tune_threshold``).
      label_train_counts: per label, the number of training documents; enables the
        frequency-band F1s.
      label_systems: per label, "icd10cm" | "icd10pcs" | "icd9cm" | "icd9pcs"; enables the
        per-system figures (diagnoses vs procedures).
      retriever_recall_at: K values for ``retriever_recall@K`` over the full label space
        (PLM-RR); empty disables it.
      compute_auc: AUC costs two extra passes over the stored scores; off for cheap evals.
      from_logits: ``update`` receives logits and applies a float32 sigmoid.
      max_in_memory_bytes: above this many bytes of stored scores, spill them to disk.
      chunk_rows: documents per block in ``finalize``.
      tmp_dir: where the temporary score file goes (default: the system's temp dir).
    """

    def __init__(self, num_labels: int, *, threshold: float = 0.5,
                 thresholds: np.ndarray = DEFAULT_THRESHOLDS,
                 label_train_counts: Sequence[int] | np.ndarray | None = None,
                 label_systems: Sequence[str] | None = None,
                 retriever_recall_at: Sequence[int] = (),
                 compute_auc: bool = True, from_logits: bool = False,
                 max_in_memory_bytes: int = 256 << 20, chunk_rows: int = 256,
                 tmp_dir: str | None = None):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = int(num_labels)
        self.threshold = float(np.float32(threshold))
        self.retriever_recall_at = tuple(int(k) for k in retriever_recall_at)
        if any(k < 1 for k in self.retriever_recall_at) or chunk_rows < 1:
            raise ValueError(f"retriever_recall_at {self.retriever_recall_at} and chunk_rows "
                             f"{chunk_rows} must be positive")
        self.compute_auc = compute_auc
        self.from_logits = from_logits
        self.chunk_rows = int(chunk_rows)
        self.train_counts = self._per_label(label_train_counts, "label_train_counts", np.int64)
        self.group_masks = self._group_masks(label_systems)
        self.threshold_counter = ThresholdCounter(self.num_labels, thresholds)
        self._store = _ScoreStore(self.num_labels, max_in_memory_bytes, tmp_dir)
        self._gold_cols: list[np.ndarray] = []  # sparse gold codes, row-major
        self._gold_per_row: list[np.ndarray] = []
        self._pos_scores: list[np.ndarray] = []  # scores of gold entries (micro AUC)
        self._support = np.zeros(self.num_labels, dtype=np.int64)
        self._streamed = _zero_counts(self.num_labels, self.group_masks)

    def _per_label(self, values, name: str, dtype) -> np.ndarray | None:
        if values is None:
            return None
        values = np.asarray(values, dtype=dtype)
        if values.shape != (self.num_labels,):
            raise ValueError(f"{name} has shape {values.shape}, expected ({self.num_labels},): "
                             "one entry per label of the label space")
        return values

    def _group_masks(self, label_systems: Sequence[str] | None) -> dict[str, np.ndarray]:
        if label_systems is None:
            return {}
        if len(label_systems) != self.num_labels:
            raise ValueError(f"label_systems has {len(label_systems)} entries, expected "
                             f"{self.num_labels} (one per label)")
        unknown = sorted(set(label_systems) - set(SYSTEM_GROUPS))
        if unknown:
            raise ValueError(f"label_systems holds unknown code systems {unknown}; expected "
                             f"one of {sorted(SYSTEM_GROUPS)}")
        groups = np.array([SYSTEM_GROUPS[s] for s in label_systems])
        return {g: groups == g for g in GROUP_NAMES}

    # ---------------------------------------------------------------- streaming

    def update(self, scores, targets, valid=None) -> None:
        """Adds a batch: scores ``[b, C]`` (probabilities, or logits with ``from_logits``),
        targets ``[b, C]`` in {0, 1}, valid ``[b]`` bool (False marks filler rows)."""
        scores = np.asarray(scores, dtype=np.float32)
        targets = np.asarray(targets)
        expected = (scores.shape[0] if scores.ndim == 2 else -1, self.num_labels)
        if scores.shape != expected or targets.shape != scores.shape:
            raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be "
                             f"[batch, {self.num_labels}]")
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != (scores.shape[0],):
                raise ValueError(f"valid has shape {valid.shape}, expected ({scores.shape[0]},)")
            scores, targets = scores[valid], targets[valid]
        if not np.all(np.isfinite(scores)):
            raise ValueError("scores contain NaN or inf: the model diverged or the batch holds "
                             "uninitialised rows (mark filler rows with `valid`)")
        gold = targets == 1
        if not np.all(gold | (targets == 0)):
            raise ValueError("targets must be multi-hot 0/1; got other values")
        if self.from_logits:
            with np.errstate(over="ignore"):
                scores = np.float32(1.0) / (np.float32(1.0) + np.exp(-scores))
        elif scores.size and (scores.min() < 0 or scores.max() > 1):
            raise ValueError("scores lie outside [0, 1]: pass probabilities, or logits with "
                             "MetricAccumulator(..., from_logits=True)")
        self.threshold_counter.update(scores, gold)
        _add_counts(self._streamed, scores, gold, self.threshold, self.group_masks)
        self._support += gold.sum(axis=0)
        rows, cols = np.nonzero(gold)
        self._gold_cols.append(cols.astype(np.int32))
        self._gold_per_row.append(np.bincount(rows, minlength=gold.shape[0]))
        self._pos_scores.append(scores[rows, cols])
        self._store.append(scores)

    @property
    def num_docs(self) -> int:
        return int(sum(x.size for x in self._gold_per_row))

    def tune_threshold(self) -> tuple[float, float]:
        """The threshold (first max of micro-F1 over all codes and documents) and its F1."""
        return tune_threshold(*self.threshold_counter.micro_counts(),
                              thresholds=self.threshold_counter.thresholds)

    def close(self) -> None:
        """Deletes the temporary score file, if any."""
        self._store.close()

    def __enter__(self) -> MetricAccumulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- finalize

    def finalize(self, threshold: float | None = None) -> dict[str, float]:
        """Every metric (raw fractions and counts) at ``threshold`` (default: the streamed one).

        A threshold other than the constructor's is evaluated exactly from the stored scores.
        Can be called several times.
        """
        t = self.threshold if threshold is None else float(np.float32(threshold))
        scores = self._store.array()
        per_row = (np.concatenate(self._gold_per_row) if self._gold_per_row
                   else np.zeros(0, np.int64))
        indptr = np.concatenate([[0], np.cumsum(per_row)])
        cols = np.concatenate(self._gold_cols) if self._gold_cols else np.zeros(0, np.int32)
        present = self._support > 0
        present_idx = np.flatnonzero(present)
        recount = t != self.threshold
        counts = _zero_counts(self.num_labels, self.group_masks) if recount else self._streamed
        per_doc: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        for start in range(0, scores.shape[0], self.chunk_rows):
            stop = min(start + self.chunk_rows, scores.shape[0])
            block = np.asarray(scores[start:stop])
            gold = _dense_gold(indptr[start:stop + 1], cols, self.num_labels)
            if recount:
                _add_counts(counts, block, gold, t, self.group_masks)
            keep = per_row[start:stop] > 0
            if not keep.any():
                continue
            block, gold = block[keep], gold[keep]
            _add_ranking_values(per_doc, block[:, present_idx], gold[:, present_idx], t)
            if self.retriever_recall_at:
                ranks = _gold_ranks(block, gold)
                for k in self.retriever_recall_at:
                    per_doc[f"retriever_recall@{k}"].append(_hits_at(ranks, k) / ranks["n_gold"])
        num_eval = int(np.count_nonzero(per_row))
        out: dict[str, float] = {"threshold": t, "num_docs": float(scores.shape[0]),
                                 "num_docs_with_codes": float(num_eval),
                                 "num_present_codes": float(present.sum())}
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        out.update(_count_metrics(tp, fp, fn, present))
        ranking_keys = (["exact_match_ratio"] + [f"precision@{k}" for k in PRECISION_AT]
                        + [f"recall@{k}" for k in RECALL_AT] + ["precision@recall", "map"])
        for key in ranking_keys:
            out[key] = _doc_mean(per_doc[key])
        if self.compute_auc:
            pos_sorted = np.sort(np.concatenate(self._pos_scores) if self._pos_scores
                                 else np.zeros(0, np.float32))
            out["auc_micro"] = _micro_auc(scores, pos_sorted)
            out["auc_macro"] = _macro_auc(scores, indptr, cols, self._support)
        if self.train_counts is not None:
            for name, low, high in FREQUENCY_BANDS:
                band = present & (self.train_counts >= low) & (self.train_counts <= high)
                out.update(_count_metrics(tp, fp, fn, band, f"_band_{name}", full=False))
                out[f"num_present_codes_band_{name}"] = float(band.sum())
        never = present & (tp == 0)
        out["never_correct_codes"] = float(never.sum())
        for group, mask in self.group_masks.items():
            codes = present & mask
            out.update(_count_metrics(tp, counts[f"fp_{group}"], fn, codes, f"_{group}",
                                      full=False))
            out[f"never_correct_{group}"] = float((never & mask).sum())
            out[f"num_present_codes_{group}"] = float(codes.sum())
        for k in self.retriever_recall_at:
            out[f"retriever_recall@{k}"] = _doc_mean(per_doc[f"retriever_recall@{k}"])
        return out


def _zero_counts(num_labels: int, group_masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = ["tp", "fp", "fn"] + [f"fp_{g}" for g in group_masks]
    return {n: np.zeros(num_labels, dtype=np.int64) for n in names}


def _add_counts(counts: dict[str, np.ndarray], scores: np.ndarray, gold: np.ndarray, t: float,
                group_masks: Mapping[str, np.ndarray]) -> None:
    """Per-code TP/FP/FN at ``p > t`` over documents with a gold code; per-system FP over
    documents with a gold code of that system."""
    has_gold = gold.any(axis=1)
    pred = (scores > np.float32(t)) & has_gold[:, None]
    counts["tp"] += np.count_nonzero(pred & gold, axis=0)
    false_pos = pred & ~gold
    counts["fp"] += np.count_nonzero(false_pos, axis=0)
    counts["fn"] += np.count_nonzero(~pred & gold, axis=0)
    for group, mask in group_masks.items():
        in_group = (gold & mask).any(axis=1)
        counts[f"fp_{group}"] += np.count_nonzero(false_pos & in_group[:, None], axis=0)


def _add_ranking_values(per_doc: dict[str, list[np.ndarray]], scores: np.ndarray,
                        gold: np.ndarray, t: float) -> None:
    """Appends each document's exact match and ranking metrics (present codes only).

    Values are kept per document and averaged once at the end, so the result does not depend
    on how the documents were split into batches or chunks.
    """
    per_doc["exact_match_ratio"].append(np.all((scores > np.float32(t)) == gold, axis=1))
    ranks = _gold_ranks(scores, gold)
    n_gold = ranks["n_gold"]
    for k in PRECISION_AT:
        per_doc[f"precision@{k}"].append(_hits_at(ranks, k) / k)
    for k in RECALL_AT:
        per_doc[f"recall@{k}"].append(_hits_at(ranks, k) / n_gold)
    per_doc["precision@recall"].append(_hits_at(ranks, n_gold) / n_gold)
    precision_at_gold = ranks["gold_ge"] / ranks["n_ge"]
    per_doc["map"].append(np.bincount(ranks["row"], weights=precision_at_gold,
                                      minlength=n_gold.size) / n_gold)


def _doc_mean(values: list[np.ndarray]) -> float:
    """Mean over documents of per-document values; NaN when there are none."""
    if not values:
        return math.nan
    return float(np.mean(np.concatenate(values), dtype=np.float64))


def _dense_gold(indptr: np.ndarray, cols: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows ``indptr[0]..`` of the sparse gold matrix as a dense bool block."""
    rows = indptr.size - 1
    gold = np.zeros((rows, num_labels), dtype=bool)
    row_ids = np.repeat(np.arange(rows), np.diff(indptr))
    gold[row_ids, cols[indptr[0]:indptr[-1]]] = True
    return gold


def _micro_auc(scores: np.ndarray, pos_sorted: np.ndarray) -> float:
    """Micro ROC AUC over all (document, code) pairs, exact, in sorted blocks of scores."""
    lt_all = np.zeros(pos_sorted.size, dtype=np.int64)
    le_all = np.zeros(pos_sorted.size, dtype=np.int64)
    rows = max(1, _BLOCK_VALUES // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], rows):
        block = np.sort(np.asarray(scores[start:start + rows]), axis=None)
        lt_all += np.searchsorted(block, pos_sorted, side="left")
        le_all += np.searchsorted(block, pos_sorted, side="right")
    return _mann_whitney(lt_all, le_all, pos_sorted, scores.size - pos_sorted.size)


def _macro_auc(scores: np.ndarray, indptr: np.ndarray, cols: np.ndarray,
               support: np.ndarray) -> float:
    """Mean per-code ROC AUC over codes with at least one positive and one negative."""
    num_docs, num_labels = scores.shape
    codes = np.flatnonzero((support > 0) & (support < num_docs))
    if codes.size == 0:
        return math.nan
    doc_of_entry = np.repeat(np.arange(num_docs), np.diff(indptr))
    by_code = np.argsort(cols, kind="stable")
    code_start = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=num_labels))])
    width = max(1, _BLOCK_VALUES // max(1, num_docs))
    aucs = []
    for first in range(0, num_labels, width):
        block = np.ascontiguousarray(scores[:, first:first + width])
        ordered = np.sort(block, axis=0)
        for c in codes[(codes >= first) & (codes < first + width)]:
            docs = doc_of_entry[by_code[code_start[c]:code_start[c + 1]]]
            pos = np.sort(block[docs, c - first])
            column = ordered[:, c - first]
            aucs.append(_mann_whitney(np.searchsorted(column, pos, side="left"),
                                      np.searchsorted(column, pos, side="right"),
                                      pos, num_docs - pos.size))
    return float(np.mean(aucs))


# --------------------------------------------------------------------------- helpers


def frequency_baseline_probs(train_label_counts: Sequence[int] | np.ndarray,
                             num_train_docs: int, batch_size: int) -> np.ndarray:
    """float32 ``[batch_size, C]``: every document scores each code by its training frequency."""
    if num_train_docs < 1:
        raise ValueError(f"num_train_docs must be >= 1, got {num_train_docs}")
    freq = np.asarray(train_label_counts, dtype=np.float64) / float(num_train_docs)
    if freq.ndim != 1 or np.any(freq < 0) or np.any(freq > 1):
        raise ValueError("train_label_counts must be a 1-D list of per-label document counts "
                         f"between 0 and num_train_docs={num_train_docs}")
    return np.broadcast_to(freq.astype(np.float32), (batch_size, freq.size)).copy()


def _is_count(key: str) -> bool:
    return key.startswith(("num_", "never_correct")) or key == "threshold"


def format_metrics_table(results: Mapping[str, Mapping[str, float]],
                         keys: Sequence[str] | None = None) -> str:
    """A text table, one column per run (e.g. ``{"retriever": m1, "re-ranker": m2}``).

    Fractions are shown ×100 with two decimals; counts and the threshold as they are.
    ``keys`` picks and orders the rows (default: every key of the first run, in order).
    """
    names = list(results)
    if not names:
        return ""
    if keys is None:
        keys = list(results[names[0]])
    width = max([len(k) for k in keys] + [6])
    col = max([len(n) for n in names] + [8])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names)]
    for key in keys:
        cells = []
        for name in names:
            value = results[name].get(key)
            if value is None:
                cells.append(f"{'-':>{col}}")
            elif key == "threshold":
                cells.append(f"{value:>{col}.4f}")
            elif _is_count(key):
                cells.append(f"{value:>{col}.0f}")
            else:
                cells.append(f"{100.0 * value:>{col}.2f}")
        lines.append(f"{key:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
