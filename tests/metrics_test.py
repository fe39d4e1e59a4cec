"""Metrics and threshold tuning against scikit-learn and hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from medcode_jax import metrics, thresholds

N, C = 61, 29


def _random_split(seed: int = 0, n: int = N, c: int = C, levels: int = 10):
    """Quantised probabilities (ties, values on threshold candidates), empty documents and
    codes absent from the split."""
    rng = np.random.default_rng(seed)
    probs = (rng.integers(0, levels + 1, size=(n, c)) / levels).astype(np.float32)
    targets = (rng.random((n, c)) < 0.15).astype(np.float32)
    targets[rng.choice(n, size=6, replace=False)] = 0  # documents without gold codes
    targets[:, rng.choice(c, size=5, replace=False)] = 0  # codes absent from the split
    return probs, targets


def _feed(acc: metrics.MetricAccumulator, probs, targets, sizes=(1, 7, 3, 13, 2, 20, 64),
          filler: int = 0, seed: int = 1) -> metrics.MetricAccumulator:
    """Feeds uneven batches; ``filler`` garbage rows per batch are marked invalid."""
    rng = np.random.default_rng(seed)
    start, i = 0, 0
    while start < probs.shape[0]:
        stop = min(start + sizes[i % len(sizes)], probs.shape[0])
        p, t = probs[start:stop], targets[start:stop]
        valid = np.ones(stop - start, dtype=bool)
        if filler:
            p = np.concatenate([p, rng.random((filler, p.shape[1]), dtype=np.float32)])
            t = np.concatenate([t, np.ones((filler, t.shape[1]), np.float32)])
            valid = np.concatenate([valid, np.zeros(filler, dtype=bool)])
            # Filler rows land anywhere; real rows keep their order.
            slots = np.concatenate([np.arange(stop - start), rng.uniform(-1, stop - start, filler)])
            order = np.argsort(slots, kind="stable")
            p, t, valid = p[order], t[order], valid[order]
        acc.update(p, t, valid=valid if filler else None)
        start, i = stop, i + 1
    return acc


def _top_hits(scores: np.ndarray, gold: np.ndarray, k: int) -> np.ndarray:
    """|top-k ∩ gold| per row, ties broken by the lower column (independent of the module)."""
    hits = []
    for x, g in zip(scores, gold):
        order = np.lexsort((np.arange(x.size), -x.astype(np.float64)))
        hits.append(g[order[:k]].sum())
    return np.asarray(hits, dtype=np.float64)


def _expected(probs, targets, t):
    """Every code-filtered metric computed independently with scikit-learn / plain NumPy."""
    gold = targets.astype(bool)
    rows = gold.any(axis=1)
    present = gold.any(axis=0)
    y, s = gold[rows][:, present], probs[rows][:, present]
    pred = s > np.float32(t)
    n_gold = y.sum(axis=1)
    exp = {
        "f1_micro": skm.f1_score(y, pred, average="micro", zero_division=0),
        "f1_macro": skm.f1_score(y, pred, average="macro", zero_division=0),
        "precision_micro": skm.precision_score(y, pred, average="micro", zero_division=0),
        "recall_micro": skm.recall_score(y, pred, average="micro", zero_division=0),
        "precision_macro": skm.precision_score(y, pred, average="macro", zero_division=0),
        "recall_macro": skm.recall_score(y, pred, average="macro", zero_division=0),
        "exact_match_ratio": skm.accuracy_score(y, pred),
        "map": skm.label_ranking_average_precision_score(y, s),
        "precision@recall": np.mean([_top_hits(s[i:i + 1], y[i:i + 1], n_gold[i])[0] / n_gold[i]
                                     for i in range(len(y))]),
        "auc_micro": skm.roc_auc_score(gold.ravel(), probs.ravel()),
        "auc_macro": np.mean([skm.roc_auc_score(gold[:, j], probs[:, j])
                              for j in range(gold.shape[1]) if 0 < gold[:, j].sum() < len(gold)]),
        "num_present_codes": present.sum(),
        "num_docs": len(gold),
        "num_docs_with_codes": rows.sum(),
    }
    for k in metrics.PRECISION_AT:
        exp[f"precision@{k}"] = np.mean(_top_hits(s, y, k) / k)
    for k in metrics.RECALL_AT:
        exp[f"recall@{k}"] = np.mean(_top_hits(s, y, k) / n_gold)
    return exp


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_against_sklearn_with_ties_empty_docs_absent_codes(t):
    probs, targets = _random_split()
    acc = _feed(metrics.MetricAccumulator(C, threshold=t), probs, targets)
    got = acc.finalize()
    exp = _expected(probs, targets, t)
    for key, value in exp.items():
        assert got[key] == pytest.approx(value, rel=1e-7, abs=1e-9), key
    # Per-document average precision also equals the mean of scikit-learn's per-row AP.
    gold = targets.astype(bool)
    y, s = gold[gold.any(1)][:, gold.any(0)], probs[gold.any(1)][:, gold.any(0)]
    per_row = np.mean([skm.average_precision_score(yi, si) for yi, si in zip(y, s)])
    assert got["map"] == pytest.approx(per_row, rel=1e-7)


def test_map_without_ties_matches_the_sort_based_formula():
    rng = np.random.default_rng(3)
    probs = rng.random((40, 50), dtype=np.float32)
    targets = (rng.random((40, 50)) < 0.1).astype(np.float32)
    targets[np.arange(40), rng.integers(0, 50, 40)] = 1
    present = targets.any(0)
    s, y = probs[:, present], targets[:, present]
    order = np.argsort(-s, axis=1)
    hits = np.take_along_axis(y, order, axis=1)
    prec = np.cumsum(hits, axis=1) / np.arange(1, s.shape[1] + 1)
    ref = np.mean((prec * hits).sum(1) / hits.sum(1))
    got = _feed(metrics.MetricAccumulator(50, compute_auc=False), probs, targets).finalize()
    assert got["map"] == pytest.approx(ref, rel=1e-7)


def test_streaming_chunking_and_memmap_give_identical_results():
    probs, targets = _random_split(seed=5)
    kwargs = dict(label_train_counts=np.arange(C) * 40, label_systems=["icd10cm", "icd10pcs"] * 14
                  + ["icd10cm"], retriever_recall_at=(3, 8))
    one_shot = metrics.MetricAccumulator(C, **kwargs)
    one_shot.update(probs, targets)
    reference = one_shot.finalize()
    variants = [
        _feed(metrics.MetricAccumulator(C, **kwargs), probs, targets),
        _feed(metrics.MetricAccumulator(C, chunk_rows=4, **kwargs), probs, targets),
        _feed(metrics.MetricAccumulator(C, max_in_memory_bytes=0, **kwargs), probs, targets),
        _feed(metrics.MetricAccumulator(C, max_in_memory_bytes=20 * C * 4, chunk_rows=7,
                                        **kwargs), probs, targets),
    ]
    assert variants[2]._store.on_disk and variants[3]._store.on_disk
    assert not variants[0]._store.on_disk
    for acc in variants:
        np.testing.assert_equal(acc.finalize(), reference)
        acc.close()


def test_valid_mask_ignores_filler_rows():
    probs, targets = _random_split(seed=7)
    clean = _feed(metrics.MetricAccumulator(C), probs, targets).finalize()
    padded = _feed(metrics.MetricAccumulator(C), probs, targets, filler=3).finalize()
    np.testing.assert_equal(padded, clean)


def test_other_threshold_at_finalize_equals_streamed_counts():
    probs, targets = _random_split(seed=9)
    kwargs = dict(label_systems=["icd9cm"] * 20 + ["icd9pcs"] * 9, label_train_counts=[7] * C)
    streamed = _feed(metrics.MetricAccumulator(C, threshold=0.3, **kwargs), probs, targets)
    recount = _feed(metrics.MetricAccumulator(C, threshold=0.5, **kwargs), probs, targets)
    np.testing.assert_equal(recount.finalize(0.3), streamed.finalize())


def test_from_logits_matches_probabilities():
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 3, size=(30, C)).astype(np.float32)
    targets = (rng.random((30, C)) < 0.2).astype(np.float32)
    probs = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    a = _feed(metrics.MetricAccumulator(C, from_logits=True), logits, targets).finalize()
    b = _feed(metrics.MetricAccumulator(C), probs, targets).finalize()
    for key in b:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_retriever_recall_over_full_label_space():
    probs, targets = _random_split(seed=13)
    ks = (1, 4, 50)
    got = _feed(metrics.MetricAccumulator(C, retriever_recall_at=ks, compute_auc=False),
                probs, targets).finalize()
    gold = targets.astype(bool)
    rows = gold.any(1)
    for k in ks:
        exp = np.mean(_top_hits(probs[rows], gold[rows], k) / gold[rows].sum(1))
        assert got[f"retriever_recall@{k}"] == pytest.approx(exp, rel=1e-9), k
    assert got["retriever_recall@50"] == 1.0


def test_hand_example_bands_systems_never_correct():
    systems = ["icd10cm", "icd10cm", "icd10cm", "icd10pcs", "icd10pcs", "icd10cm"]
    probs = np.zeros((5, 6), np.float32)
    targets = np.zeros((5, 6), np.float32)
    probs[0, [0, 1, 3]] = [0.9, 0.7, 0.2]; targets[0, [0, 3]] = 1   # TP c0, FP c1, FN c3
    probs[1, [1, 4]] = [0.6, 0.8]; targets[1, 1] = 1                # TP c1, FP c4
    probs[2, [0, 4]] = [0.6, 0.3]; targets[2, 4] = 1                # FP c0, FN c4
    probs[3] = 0.9                                                  # no gold: left out
    probs[4, [1, 2, 5]] = [0.9, 0.9, 0.6]; targets[4, 1] = 1        # TP c1; c2, c5 absent
    acc = metrics.MetricAccumulator(6, label_train_counts=[5, 15, 30, 100, 1000, 0],
                                    label_systems=systems)
    acc.update(probs, targets)
    got = acc.finalize()
    assert got["num_present_codes"] == 4 and got["num_docs_with_codes"] == 4
    assert got["num_docs"] == 5
    # Per code (TP, FP, FN): c0 (1, 1, 0), c1 (2, 1, 0), c3 (0, 0, 1), c4 (0, 1, 1).
    assert got["f1_micro"] == pytest.approx(3 / 5.5)
    assert got["f1_macro"] == pytest.approx((1 / 1.5 + 2 / 2.5 + 0 + 0) / 4)
    assert got["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 0 + 0) / 4)
    assert got["never_correct_codes"] == 2
    assert got["never_correct_diagnoses"] == 0 and got["never_correct_procedures"] == 2
    # Diagnoses: the FP of c0 is in document 2, which has no diagnosis gold code.
    assert got["f1_micro_diagnoses"] == pytest.approx(3 / 3.5)
    assert got["f1_macro_diagnoses"] == pytest.approx((1 + 2 / 2.5) / 2)
    assert got["f1_micro_procedures"] == 0 and got["num_present_codes_procedures"] == 2
    assert got["f1_micro_band_1-10"] == pytest.approx(1 / 1.5)
    assert got["f1_macro_band_11-20"] == pytest.approx(2 / 2.5)
    assert math.isnan(got["f1_micro_band_21-50"]) and got["num_present_codes_band_21-50"] == 0
    assert got["f1_micro_band_51-500"] == 0 and got["f1_macro_band_gt500"] == 0
    # Only document 4 matches: its false positives are on absent codes, which are ignored.
    assert got["exact_match_ratio"] == pytest.approx(1 / 4)
    # Top-5 among the 4 present codes holds every gold code; precision@5 still divides by 5.
    assert got["precision@5"] == pytest.approx((2 + 1 + 1 + 1) / 5 / 4)
    assert got["recall@5"] == 1.0


def test_no_documents_or_no_gold_codes_give_nan_not_errors():
    empty = metrics.MetricAccumulator(3).finalize()
    assert empty["num_docs"] == 0 and math.isnan(empty["f1_micro"]) and math.isnan(empty["map"])
    acc = metrics.MetricAccumulator(3, retriever_recall_at=(2,))
    acc.update(np.full((2, 3), 0.7, np.float32), np.zeros((2, 3), np.float32))
    got = acc.finalize()
    assert got["num_docs"] == 2 and got["num_present_codes"] == 0
    assert math.isnan(got["auc_micro"]) and math.isnan(got["retriever_recall@2"])


def test_threshold_tuning_hand_example_strict_and_first_maximum():
    cand = np.array([0.0, 0.25, 0.5, 0.75, 1.0], np.float32)
    probs = np.array([[0.5, 0.25, 0.75, 0.0]], np.float32)
    targets = np.array([[1, 0, 1, 0]], np.float32)
    # p > t: t=0 -> {0,1,2} (TP 2, FP 1); 0.25 -> {0,2} (F1 1); 0.5 -> {2}; 0.75, 1 -> {}.
    counter = thresholds.ThresholdCounter(4, cand)
    counter.update(probs, targets.astype(bool))
    tp, fp, fn = counter.micro_counts()
    np.testing.assert_array_equal(tp, [2, 2, 1, 0, 0])
    np.testing.assert_array_equal(fp, [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(fn, [0, 0, 1, 2, 2])
    assert thresholds.tune_threshold(tp, fp, fn, cand) == (0.25, pytest.approx(1.0))
    # Two candidates with the same F1: the first wins.
    best, f1 = thresholds.tune_threshold([1, 1, 0], [1, 1, 0], [0, 0, 1], cand[:3])
    assert best == 0.0 and f1 == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="thresholds"):
        thresholds.tune_threshold(tp, fp, fn, cand[:3])


def test_threshold_tuning_matches_brute_force_over_all_codes_and_docs():
    probs, targets = _random_split(seed=17, levels=99)  # values on the candidates themselves
    acc = _feed(metrics.MetricAccumulator(C), probs, targets)
    best, f1 = acc.tune_threshold()
    assert (best, f1) == thresholds.tune_threshold_from_arrays(probs, targets)
    scores = [skm.f1_score(targets.ravel(), (probs > t).ravel(), zero_division=0)
              for t in thresholds.DEFAULT_THRESHOLDS]
    assert best == float(thresholds.DEFAULT_THRESHOLDS[int(np.argmax(scores))])
    assert f1 == pytest.approx(max(scores), rel=1e-8)
    tp, fp, fn = acc.threshold_counter.per_code_counts()
    k = 37
    pred = probs > thresholds.DEFAULT_THRESHOLDS[k]
    np.testing.assert_array_equal(tp[k], (pred & (targets == 1)).sum(0))
    np.testing.assert_array_equal(fp[k], (pred & (targets == 0)).sum(0))
    np.testing.assert_array_equal(fn[k], (~pred & (targets == 1)).sum(0))


def test_frequency_baseline_and_table():
    probs = metrics.frequency_baseline_probs([2, 0, 4], num_train_docs=4, batch_size=3)
    assert probs.dtype == np.float32 and probs.shape == (3, 3)
    np.testing.assert_array_equal(probs[2], [0.5, 0.0, 1.0])
    table = metrics.format_metrics_table(
        {"stage 1": {"f1_micro": 0.5852, "never_correct_codes": 12.0, "threshold": 0.3},
         "stage 2": {"f1_micro": 0.6}}, keys=["f1_micro", "never_correct_codes", "threshold"])
    lines = table.splitlines()
    assert "58.52" in lines[1] and "60.00" in lines[1]
    assert lines[2].split()[1] == "12" and lines[3].split()[-1] == "-"


def test_bad_inputs_raise_clear_errors():
    acc = metrics.MetricAccumulator(4)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        acc.update(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="0/1"):
        acc.update(np.zeros((2, 4)), np.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 4), np.nan), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="from_logits"):
        acc.update(np.full((2, 4), 3.0), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="label_systems"):
        metrics.MetricAccumulator(2, label_systems=["icd10cm", "icd11"])
    with pytest.raises(ValueError, match="label_train_counts"):
        metrics.MetricAccumulator(2, label_train_counts=[1, 2, 3])
