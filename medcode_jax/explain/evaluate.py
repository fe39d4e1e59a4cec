"""Explanation quality: plausibility, sparsity, distractor and faithfulness metrics.

Semantics follow the reference (`JoakimEdin/explainable-medical-coding`, `eval/*.py`):

* A *row* is one (document, code) pair: the code's attribution scores over the document's word
  tokens (no padding, no [CLS]/[SEP]; the reference drops the first and last token), normalised
  to sum to 1, and the positions (in that same word-token indexing) of the code's evidence.
* Plausibility rows are the gold codes with >= 1 evidence token (the reference explains gold |
  predicted codes, then drops the rows without evidence - the same set).
* Decision boundary: the attribution threshold in linspace(0, 0.1, 101) that maximises the
  micro token F1 on the *validation* rows; test rows are then scored with it (tokens with a
  score strictly above it are "predicted evidence").
* precision / recall / f1: micro over rows (tp, fp, fn summed), eps 1e-11 as the reference.
* auprc: micro precision / recall at boundaries linspace(0, 1, 101), trapezoidal area over
  recall (sklearn.metrics.auc).
* precision@k / recall@k: top-k tokens by score; relevant-in-top-k summed over rows, divided
  by rows x k (precision) and by all evidence tokens (recall).
* iou: per row, the top-|evidence| tokens vs the evidence, |inter| / |union|, mean over rows.
* evidence_span_recall: per row, share of evidence spans (runs of consecutive evidence tokens)
  with >= 1 predicted token; evidence_span_token_recall: predicted tokens / tokens within the
  spans that were hit; both averaged over rows.
* kl_divergence: KL(uniform over the evidence || scores), mean over rows.
* entropy (sparsity): -sum p log2 p / log2(n tokens), mean over rows; no_predictions: share of
  rows whose maximum is below the boundary; attributions_sum_zero: share of all-zero rows.
* distractor metrics (ours, not in the reference): over rows of documents with distractor
  tokens (tokens of negated / family-history / ruled-out mentions, minus the code's own
  evidence): share whose top-1 token is a distractor (and share whose top-1 is evidence), mean
  attribution mass on distractor and on evidence tokens.
* Faithfulness (rows: predicted codes, probability > the model's threshold): words ranked by
  their summed token scores; comprehensiveness masks the top 0, 2, 4, ... 98 words
  (step 2, 100 features, mask token), sufficiency masks all but the top 100, 98, ... words;
  per row mean(p - p_masked) / p (sufficiency clips the deltas to [0, 100] first), then the
  mean over rows.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

EPS = 1e-11
BOUNDARY_GRID = np.linspace(0.0, 0.1, 101)
AUPRC_GRID = np.linspace(0.0, 1.0, 101)
RANKING_KS = (1, 5, 10, 50, 100)
FAITHFULNESS_STEP = 2
FAITHFULNESS_FEATURES = 100


@dataclasses.dataclass
class Row:
    """One (document, code): scores over the word tokens, evidence / distractor positions."""

    scores: np.ndarray                      # [n] float, >= 0
    evidence: np.ndarray                    # int positions into scores
    probability: float = math.nan           # the model's probability of the code
    distractor: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int64))
    doc_id: Any = None
    code: int = -1


# ----------------------------------------------------------------------------- plausibility


def normalise(scores: np.ndarray) -> np.ndarray:
    """The reference's x / (sum(x) + 1e-11)."""
    scores = np.asarray(scores, np.float64)
    return scores / (scores.sum() + EPS)


def error_counts(rows: Sequence[Row], boundary: float) -> np.ndarray:
    """[rows, 3] (tp, fp, fn) of tokens with a score > boundary vs the evidence."""
    out = np.zeros((len(rows), 3), np.int64)
    for i, row in enumerate(rows):
        predicted = np.asarray(row.scores) > boundary
        evidence = np.zeros(predicted.shape, bool)
        evidence[np.asarray(row.evidence, int)] = True
        tp = int(np.sum(predicted & evidence))
        out[i] = (tp, int(np.sum(predicted & ~evidence)), int(evidence.sum()) - tp)
    return out


def precision_recall_f1(counts: np.ndarray) -> tuple[float, float, float]:
    tp, fp, fn = (float(x) for x in np.asarray(counts).reshape(-1, 3).sum(axis=0))
    precision = tp / (tp + fp + EPS)
    recall = tp / (tp + fn + EPS)
    return precision, recall, 2 * precision * recall / (precision + recall + EPS)


def find_decision_boundary(rows: Sequence[Row], grid: np.ndarray = BOUNDARY_GRID) -> float:
    """The boundary of `grid` maximising micro F1 (first one on ties, as np.argmax)."""
    f1 = [precision_recall_f1(error_counts(rows, b))[2] for b in grid]
    return float(grid[int(np.argmax(f1))])


def auprc(rows: Sequence[Row], grid: np.ndarray = AUPRC_GRID) -> float:
    points = np.array([precision_recall_f1(error_counts(rows, b))[:2] for b in grid])
    precision, recall = points[:, 0], points[:, 1]
    # sklearn.metrics.auc: x must be monotonic; recall falls as the boundary rises.
    area = float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))
    return -area if np.all(np.diff(recall) <= 0) else area


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores (np.argsort(x)[-k:] as the reference)."""
    return np.argsort(np.asarray(scores), kind="stable")[-k:] if k > 0 else np.zeros(0, int)


def precision_recall_at_k(rows: Sequence[Row], k: int) -> tuple[float, float]:
    relevant = sum(len(set(top_k(r.scores, k).tolist()) & set(np.asarray(r.evidence).tolist()))
                   for r in rows)
    possible = sum(len(r.evidence) for r in rows)
    return relevant / max(len(rows) * k, 1), relevant / possible if possible else math.nan


def iou(rows: Sequence[Row]) -> float:
    values = []
    for r in rows:
        evidence = set(np.asarray(r.evidence).tolist())
        top = set(top_k(r.scores, len(evidence)).tolist())
        union = top | evidence
        values.append(len(top & evidence) / len(union) if union else 0.0)
    return float(np.mean(values)) if values else math.nan


def kl_divergence(scores: np.ndarray, evidence: np.ndarray) -> float:
    scores = np.asarray(scores, np.float64)
    target = np.zeros_like(scores)
    target[np.asarray(evidence, int)] = 1.0 / len(evidence)
    return float(np.sum(target * np.log((target + EPS) / (scores + EPS))))


def evidence_spans(evidence: np.ndarray) -> list[np.ndarray]:
    """Runs of consecutive positions (the reference's token_ids2token_id_sequences)."""
    evidence = np.asarray(evidence, int)
    if evidence.size == 0:
        return [evidence]
    breaks = np.flatnonzero(np.diff(evidence) != 1) + 1
    return np.split(evidence, breaks)


def span_recalls(scores: np.ndarray, evidence: np.ndarray, boundary: float
                 ) -> tuple[float, float]:
    """(evidence_span_token_recall, evidence_span_recall) of one row."""
    predicted = set(np.flatnonzero(np.asarray(scores) > boundary).tolist())
    spans = evidence_spans(evidence)
    hit_spans = hit_tokens = tokens_in_hit = 0
    for span in spans:
        inter = predicted & set(span.tolist())
        if inter:
            hit_spans += 1
            tokens_in_hit += len(span)
            hit_tokens += len(inter)
    return hit_tokens / (tokens_in_hit + EPS), hit_spans / (len(spans) + EPS)


def plausibility_metrics(rows: Sequence[Row], boundary: float) -> dict[str, float]:
    if not rows:
        return {"rows": 0}
    counts = error_counts(rows, boundary)
    precision, recall, f1 = precision_recall_f1(counts)
    spans = np.array([span_recalls(r.scores, r.evidence, boundary) for r in rows])
    out = {"rows": len(rows), "decision_boundary": float(boundary), "precision": precision,
           "recall": recall, "f1": f1, "auprc": auprc(rows),
           "average_number_of_predicted_tokens": float((counts[:, 0] + counts[:, 1]).mean()),
           "evidence_span_token_recall": float(spans[:, 0].mean()),
           "evidence_span_recall": float(spans[:, 1].mean())}
    for k in RANKING_KS:
        out[f"precision@{k}"], out[f"recall@{k}"] = precision_recall_at_k(rows, k)
    out["iou"] = iou(rows)
    out["kl_divergence"] = float(np.mean([kl_divergence(r.scores, r.evidence) for r in rows]))
    return out


# ----------------------------------------------------------------------------- sparsity


def normalized_entropy(scores: np.ndarray) -> float:
    """-sum p log2(p + 1e-11) / log2(n) (n = number of tokens; NaN for n < 2)."""
    p = np.asarray(scores, np.float64)
    if p.size < 2:
        return math.nan
    return float(-np.sum(p * np.log2(p + EPS)) / np.log2(p.size))


def sparsity_metrics(rows: Sequence[Row], boundary: float) -> dict[str, float]:
    if not rows:
        return {}
    return {"entropy": float(np.nanmean([normalized_entropy(r.scores) for r in rows])),
            "no_predictions": float(np.mean([np.max(r.scores, initial=0.0) < boundary
                                             for r in rows])),
            "attributions_sum_zero": float(np.mean([np.sum(r.scores) == 0 for r in rows]))}


# ----------------------------------------------------------------------------- distractors


def distractor_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """Rows of documents with distractor tokens (not the code's own evidence tokens)."""
    top1_distractor, top1_evidence, mass_d, mass_e = [], [], [], []
    for r in rows:
        scores = np.asarray(r.scores)
        distractor = np.setdiff1d(np.asarray(r.distractor, int), np.asarray(r.evidence, int))
        if distractor.size == 0 or scores.size == 0 or scores.sum() <= 0:
            continue
        top = int(np.argmax(scores))
        top1_distractor.append(top in set(distractor.tolist()))
        top1_evidence.append(top in set(np.asarray(r.evidence).tolist()))
        mass_d.append(float(scores[distractor].sum() / scores.sum()))
        mass_e.append(float(scores[np.asarray(r.evidence, int)].sum() / scores.sum()))
    if not top1_distractor:
        return {"distractor_rows": 0}
    return {"distractor_rows": len(top1_distractor),
            "distractor_top1_rate": float(np.mean(top1_distractor)),
            "evidence_top1_rate_with_distractors": float(np.mean(top1_evidence)),
            "distractor_mass": float(np.mean(mass_d)),
            "evidence_mass_with_distractors": float(np.mean(mass_e))}


# ----------------------------------------------------------------------------- faithfulness


def word_attributions(scores: np.ndarray, word_of_token: np.ndarray, num_words: int
                      ) -> np.ndarray:
    """Sum token scores per word ([n] tokens -> [num_words]); tokens with word -1 dropped."""
    out = np.zeros(num_words, np.float64)
    word_of_token = np.asarray(word_of_token)
    keep = word_of_token >= 0
    np.add.at(out, word_of_token[keep], np.asarray(scores, np.float64)[keep])
    return out


def perturbation_word_sets(word_scores: np.ndarray, *, descending: bool,
                           step: int = FAITHFULNESS_STEP,
                           max_features: int = FAITHFULNESS_FEATURES) -> list[np.ndarray]:
    """Words to mask at each step (the reference's PermuteDataset, cumulative): descending
    (comprehensiveness) masks the top 0, step, 2 step, ... words; ascending (sufficiency)
    masks the lowest max(W - max_features, 0) + 0, step, ... words."""
    scores = np.asarray(word_scores, np.float64)
    order = np.argsort(-scores if descending else scores, kind="stable")
    sets = []
    for idx in range(math.ceil(max_features / step)):
        start = idx * step
        if not descending:
            start += max(len(order) - max_features, 0)
        sets.append(order[:min(start, len(order))])
    return sets


def comprehensiveness(probability: float, masked: np.ndarray) -> float:
    return float(np.mean(probability - np.asarray(masked, np.float64)) / probability)


def sufficiency(probability: float, masked: np.ndarray) -> float:
    deltas = np.clip(probability - np.asarray(masked, np.float64), 0.0, 100.0)
    return float(np.mean(deltas) / probability)


# ----------------------------------------------------------------------------- batches -> rows


def batch_rows(scores: np.ndarray, codes: np.ndarray, token_mask: np.ndarray,
               probs: np.ndarray, valid: np.ndarray, doc_ids: np.ndarray, *,
               evidence_mask: np.ndarray | None = None,
               distractor_mask: np.ndarray | None = None) -> list[Row]:
    """Host arrays of one batch -> rows. scores [B, K, T], codes [B, K] (-1 = empty),
    token_mask [B, T], probs [B, C], evidence_mask [B, K, T] lined up with codes (then rows
    without evidence are dropped), distractor_mask [B, T]."""
    rows = []
    for b in np.flatnonzero(valid):
        words = np.flatnonzero(token_mask[b])
        distractor = (np.flatnonzero(distractor_mask[b][words]) if distractor_mask is not None
                      else np.zeros(0, np.int64))
        for k in np.flatnonzero(codes[b] >= 0):
            evidence = (np.flatnonzero(evidence_mask[b, k][words]) if evidence_mask is not None
                        else np.zeros(0, np.int64))
            if evidence_mask is not None and evidence.size == 0:
                continue  # evidence truncated away (the reference drops these rows too)
            code = int(codes[b, k])
            doc = doc_ids[b]
            rows.append(Row(scores=normalise(scores[b, k][words]), evidence=evidence,
                            probability=float(probs[b, code]), distractor=distractor,
                            doc_id=doc.item() if isinstance(doc, np.generic) else doc,
                            code=code))
    return rows


def split_rows(rows: Sequence[Row], threshold: float) -> dict[str, list[Row]]:
    """The reference's prediction splits: all, predicted (p > t), not_predicted (p < t)."""
    return {"all": list(rows), "predicted": [r for r in rows if r.probability > threshold],
            "not_predicted": [r for r in rows if r.probability < threshold]}


def method_report(val_rows: Sequence[Row], test_rows: Sequence[Row], threshold: float
                  ) -> dict[str, Any]:
    """Plausibility + sparsity + distractors of one method: boundary tuned on val_rows."""
    if not val_rows:
        raise ValueError("no validation rows with evidence: the decision boundary is tuned on "
                         "the validation split's evidence; prepare it with evidence")
    boundary = find_decision_boundary(val_rows)
    out: dict[str, Any] = {"decision_boundary": boundary}
    for name, rows in split_rows(test_rows, threshold).items():
        out[name] = {**plausibility_metrics(rows, boundary), **sparsity_metrics(rows, boundary),
                     **distractor_metrics(rows)}
    return out


# ----------------------------------------------------------------------------- table / output


TABLE_COLUMNS = ("f1", "precision", "recall", "auprc", "iou", "evidence_span_recall",
                 "recall@5", "entropy", "distractor_top1_rate", "comprehensiveness",
                 "sufficiency")


def format_table(results: dict[str, dict[str, Any]], split: str = "all") -> str:
    """One line per method, metrics x100 (rows of prediction split `split`)."""
    head = f"{'method':<24}" + "".join(f"{c[:12]:>13}" for c in TABLE_COLUMNS)
    lines = [head, "-" * len(head)]
    for method, res in results.items():
        flat = {**res.get(split, {}), **res.get("faithfulness", {})}
        cells = []
        for c in TABLE_COLUMNS:
            v = flat.get(c)
            cells.append(f"{100 * v:>13.2f}" if isinstance(v, (int, float)) and
                         math.isfinite(v) else f"{'-':>13}")
        lines.append(f"{method:<24}" + "".join(cells))
    return "\n".join(lines)


def flat_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"<method>/<split>/<metric>": value} for TensorBoard."""
    out = {}
    for method, res in results.items():
        for part, values in res.items():
            if isinstance(values, dict):
                for key, v in values.items():
                    if isinstance(v, (int, float)):
                        out[f"{method}/{part}/{key}"] = float(v)
            elif isinstance(values, (int, float)):
                out[f"{method}/{part}"] = float(values)
    return out
