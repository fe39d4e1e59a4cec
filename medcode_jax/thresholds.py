"""Decision-threshold tuning from streamed per-threshold counts (training.md §2).

A prediction is ``p > t`` (strict).  The candidates are exactly the float32 values of the PyTorch
reference's ``torch.linspace(0, 1, 100)`` (computed without torch by `torch_linspace_float32`;
``np.linspace(0, 1, 100).astype(float32)`` differs by one ulp at index 67), and float32
probabilities are compared with float32 thresholds as in the reference.  The tuned threshold
maximises micro-F1 over **all** codes and all documents of the split (no code filtering), first
maximum on ties.

Counting is streamed: for every (document, code) the number of candidates strictly below its
probability is a ``searchsorted`` bin; per-code histograms of those bins (``[T + 1, C]`` int64)
give TP/FP/FN at every candidate without keeping the ``N x C`` matrix.
"""

from __future__ import annotations

import numpy as np


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """The float32 values of ``torch.linspace(start, end, steps)`` (default dtype float32).

    Torch computes ``step = (end - start) / (steps - 1)`` in float32, then element ``i`` as
    ``start + step * i`` for ``i < steps // 2`` and ``end - step * (steps - 1 - i)`` for the
    rest, each a fused multiply-add (one rounding to float32).  Here the product and the sum are
    done in float64, where they are exact for grids like ``(0, 1, 100)`` (a float32 step times an
    index < 2**24, plus a float32 bound), then rounded once; the tests compare with torch
    bit for bit.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    lo, hi = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([lo], np.float32)
    step = np.float64((hi - lo) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    values = np.where(i < steps // 2, np.float64(lo) + step * i,
                      np.float64(hi) - step * (steps - 1 - i))
    return values.astype(np.float32)


DEFAULT_THRESHOLDS: np.ndarray = torch_linspace_float32(0.0, 1.0, 100)
F1_EPSILON = 1e-10


def _check_thresholds(thresholds: np.ndarray) -> np.ndarray:
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if thresholds.ndim != 1 or thresholds.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D array, got shape {thresholds.shape}")
    if np.any(np.diff(thresholds) <= 0) or not np.all(np.isfinite(thresholds)):
        raise ValueError("thresholds must be finite and strictly increasing, e.g. "
                         "np.linspace(0, 1, 100)")
    return thresholds


class ThresholdCounter:
    """Streams per-code TP/FP/FN at every candidate threshold.

    Memory: two int64 histograms of shape ``[T + 1, C]`` (100 x 7,942 codes: 13 MB).
    """

    def __init__(self, num_labels: int, thresholds: np.ndarray = DEFAULT_THRESHOLDS):
        self.thresholds = _check_thresholds(thresholds)
        self.num_labels = int(num_labels)
        bins = (self.thresholds.size + 1) * self.num_labels
        self._hist_all = np.zeros(bins, dtype=np.int64)
        self._hist_pos = np.zeros(bins, dtype=np.int64)

    def update(self, probs: np.ndarray, gold: np.ndarray) -> None:
        """Adds a batch: ``probs`` float32 ``[b, C]``, ``gold`` bool ``[b, C]``."""
        num_below = np.searchsorted(self.thresholds, probs, side="left")  # #{t : t < p}
        flat = num_below.astype(np.int64) * self.num_labels + np.arange(self.num_labels)
        size = self._hist_all.size
        self._hist_all += np.bincount(flat.ravel(), minlength=size)
        self._hist_pos += np.bincount(flat[gold], minlength=size)

    def per_code_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(tp, fp, fn)``, each int64 ``[T, C]``: counts at ``p > thresholds[k]``."""
        shape = (self.thresholds.size + 1, self.num_labels)
        # Predicted at candidate k  <=>  more than k candidates lie below p  <=>  bin > k.
        above_all = np.cumsum(self._hist_all.reshape(shape)[::-1], axis=0)[::-1][1:]
        above_pos = np.cumsum(self._hist_pos.reshape(shape)[::-1], axis=0)[::-1][1:]
        support = self._hist_pos.reshape(shape).sum(axis=0)
        return above_pos, above_all - above_pos, support[None, :] - above_pos

    def micro_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(tp, fp, fn)``, each int64 ``[T]``, summed over all codes."""
        tp, fp, fn = self.per_code_counts()
        return tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)


def micro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """ΣTP / (ΣTP + ½(ΣFP + ΣFN) + 1e-10), elementwise over the given totals."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    return tp / (tp + 0.5 * (fp + fn) + F1_EPSILON)


def tune_threshold(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
                   thresholds: np.ndarray = DEFAULT_THRESHOLDS) -> tuple[float, float]:
    """Picks the candidate with the highest micro-F1 (first maximum on ties).

    Args:
        tp, fp, fn: micro counts ``[T]`` over all codes, at each candidate (``p > t``).
        thresholds: the ``[T]`` candidates the counts were taken at.
    Returns:
        ``(best_threshold, best_f1)``.
    """
    thresholds = _check_thresholds(thresholds)
    f1 = micro_f1(tp, fp, fn)
    if f1.shape != thresholds.shape:
        raise ValueError(f"counts have shape {f1.shape} but there are {thresholds.size} "
                         "thresholds; pass the thresholds the counts were taken at")
    best = int(np.argmax(f1))  # argmax returns the first maximum
    return float(thresholds[best]), float(f1[best])


def tune_threshold_from_arrays(probs: np.ndarray, targets: np.ndarray,
                               thresholds: np.ndarray = DEFAULT_THRESHOLDS
                               ) -> tuple[float, float]:
    """Convenience: tunes on a full ``[N, C]`` probability matrix and 0/1 targets."""
    probs = np.asarray(probs, dtype=np.float32)
    counter = ThresholdCounter(probs.shape[1], thresholds)
    counter.update(probs, np.asarray(targets) > 0.5)
    return tune_threshold(*counter.micro_counts(), thresholds=counter.thresholds)
