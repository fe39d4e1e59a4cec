"""Explanation metrics (medcode_jax.explain.evaluate) on hand examples with hand-computed values,
and the word-span helpers of medcode_jax.explain.report on the tiny offline tokenizers."""
from __future__ import annotations

import math

import numpy as np
import pytest

import utils
from medcode_jax.explain import evaluate as ev
from medcode_jax.explain import report


def row(scores, evidence, **kw):
    return ev.Row(scores=np.asarray(scores, float), evidence=np.asarray(evidence, int), **kw)


def test_error_counts_and_micro_prf():
    rows = [row([0.5, 0.3, 0.15, 0.05], [0, 2]), row([0.05, 0.95], [0])]
    counts = ev.error_counts(rows, 0.1)
    assert counts.tolist() == [[2, 1, 0], [0, 1, 1]]
    p, r, f1 = ev.precision_recall_f1(counts)
    assert p == pytest.approx(0.5) and r == pytest.approx(2 / 3) and f1 == pytest.approx(4 / 7)


def test_decision_boundary_is_the_first_best_f1_on_the_grid():
    # > 0.015 keeps the noise token 0.0155 (F1 0.8); from 0.016 on only the evidence (F1 1)
    rows = [row([0.5, 0.3, 0.0155, 0.01], [0, 1])]
    assert ev.find_decision_boundary(rows) == pytest.approx(0.016)


def test_auprc_by_hand_and_against_sklearn():
    # boundaries < 0.4: P 1/2 R 1; [0.4, 0.6): P 1 R 1; >= 0.6: P 0 R 0 -> one trapezoid of 1/2
    assert ev.auprc([row([0.6, 0.4], [0])]) == pytest.approx(0.5)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(5):
        s = rng.random(20)
        rows.append(row(s / s.sum(), rng.choice(20, 4, replace=False)))
    points = np.array([ev.precision_recall_f1(ev.error_counts(rows, b))[:2]
                       for b in ev.AUPRC_GRID])
    assert ev.auprc(rows) == pytest.approx(sklearn_metrics.auc(points[:, 1], points[:, 0]))


def test_precision_recall_at_k_and_iou():
    rows = [row([0.1, 0.4, 0.2, 0.3], [1, 2]), row([0.9, 0.1], [1])]
    assert ev.precision_recall_at_k(rows, 1) == pytest.approx((1 / 2, 1 / 3))
    assert ev.precision_recall_at_k(rows[:1], 2) == pytest.approx((1 / 2, 1 / 2))
    # row 0: top-2 {1, 3} vs {1, 2}: 1/3; row 1: top-1 {0} vs {1}: 0
    assert ev.iou(rows) == pytest.approx(1 / 6)


def test_kl_divergence_and_span_recalls():
    assert ev.kl_divergence(np.array([0.5, 0.25, 0.25]), np.array([0, 1])) == pytest.approx(
        0.5 * math.log(2), rel=1e-6)
    scores = np.zeros(10)
    scores[[2, 9]] = 0.5
    # spans {1,2,3} (hit: 1 of 3 tokens) and {7,8} (missed)
    token_recall, span_recall = ev.span_recalls(scores, np.array([1, 2, 3, 7, 8]), 0.1)
    assert token_recall == pytest.approx(1 / 3) and span_recall == pytest.approx(1 / 2)
    assert [s.tolist() for s in ev.evidence_spans(np.array([1, 2, 3, 7, 8]))] == [[1, 2, 3],
                                                                                   [7, 8]]


def test_normalized_entropy_and_sparsity():
    assert ev.normalized_entropy(np.full(4, 0.25)) == pytest.approx(1.0)
    assert ev.normalized_entropy(np.array([0.5, 0.5, 0, 0])) == pytest.approx(0.5)
    assert ev.normalized_entropy(np.array([1.0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-9)
    rows = [row([0.25] * 4, [0]), row([0.0, 0.0], [0])]
    sp = ev.sparsity_metrics(rows, 0.3)
    assert sp["no_predictions"] == 1.0 and sp["attributions_sum_zero"] == 0.5
    assert sp["entropy"] == pytest.approx(0.5)  # (1 + 0) / 2


def test_distractor_metrics():
    rows = [row([0.1, 0.6, 0.3], [2], distractor=np.array([1])),
            row([0.1, 0.2, 0.7], [2], distractor=np.array([0, 2])),  # 2 is its own evidence
            row([0.5, 0.5], [0])]  # no distractors: not counted
    out = ev.distractor_metrics(rows)
    assert out["distractor_rows"] == 2
    assert out["distractor_top1_rate"] == pytest.approx(0.5)
    assert out["evidence_top1_rate_with_distractors"] == pytest.approx(0.5)
    assert out["distractor_mass"] == pytest.approx((0.6 + 0.1) / 2)
    assert out["evidence_mass_with_distractors"] == pytest.approx((0.3 + 0.7) / 2)


def test_perturbation_sets_and_faithfulness_scores():
    words = np.array([0.1, 0.5, 0.3, 0.05, 0.05])
    comp = ev.perturbation_word_sets(words, descending=True, step=2, max_features=4)
    assert [s.tolist() for s in comp] == [[], [1, 2]]
    suff = ev.perturbation_word_sets(words, descending=False, step=2, max_features=4)
    assert [s.tolist() for s in suff] == [[3], [3, 4, 0]]  # lowest W - 4 = 1, then + 2
    # reference defaults: 50 steps of 2 words out of 100 features
    assert len(ev.perturbation_word_sets(np.ones(7), descending=True)) == 50
    assert ev.comprehensiveness(0.8, np.array([0.8, 0.4])) == pytest.approx(0.25)
    assert ev.sufficiency(0.8, np.array([0.9, 0.4])) == pytest.approx(0.25)  # -0.1 clipped
    np.testing.assert_allclose(
        ev.word_attributions(np.array([0.2, 0.3, 0.5, 0.9]), np.array([0, 0, 1, -1]), 2),
        [0.5, 0.5])


def test_batch_rows_compacts_to_word_tokens_and_drops_rows_without_evidence():
    scores = np.zeros((2, 2, 5))
    scores[0, 0] = [0, 2, 1, 1, 0]
    scores[0, 1] = [0, 1, 1, 1, 0]
    token_mask = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    codes = np.array([[3, 1], [2, -1]])
    evidence = np.zeros((2, 2, 5), int)
    evidence[0, 0, [2, 3]] = 1  # code 3: tokens 2, 3 -> word positions 1, 2
    evidence[1, 0, 1] = 1
    distractor = np.zeros((2, 5), int)
    distractor[0, 1] = 1
    probs = np.tile(np.linspace(0.1, 0.4, 4), (2, 1))
    rows = ev.batch_rows(scores, codes, token_mask, probs, np.array([True, False]),
                         np.array([7, 8]), evidence_mask=evidence, distractor_mask=distractor)
    assert len(rows) == 1  # code 1 has no evidence; document 8 is filler
    r = rows[0]
    np.testing.assert_allclose(r.scores, [0.5, 0.25, 0.25], rtol=1e-9)
    assert r.evidence.tolist() == [1, 2] and r.distractor.tolist() == [0]
    assert (r.doc_id, r.code, r.probability) == (7, 3, pytest.approx(0.4))
    report_ = ev.method_report(rows, rows, threshold=0.5)
    assert report_["all"]["rows"] == 1 and report_["predicted"]["rows"] == 0
    assert "distractor_top1_rate" in report_["all"]
    assert "method" in ev.format_table({"m": report_})


# ----------------------------------------------------------------------------- word spans


def _tok(kind):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(utils.tiny_tokenizer_dir(kind))


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_encode_text_spans_slice_the_text(kind):
    tok = _tok(kind)
    text = "  chest pain, fever\n\nhypertension  left."
    doc = report.encode_text(tok, text, 64, "n1")
    assert all(text[s:e] == w for s, e, w in zip(doc.word_start, doc.word_end, doc.word_text))
    assert all(w.strip() == w and w for w in doc.word_text)
    assert "fever" in doc.word_text and "chest" in doc.word_text  # fever: 4 wordpieces
    special = set(tok.all_special_ids) - {tok.unk_token_id}
    assert not doc.token_mask[[i for i, t in enumerate(doc.input_ids) if t in special]].any()
    assert (doc.word_of_token[~doc.token_mask] == -1).all()
    scores = np.where(doc.token_mask, 1.0, 0.0)
    words = report.word_scores(scores, doc)
    assert words.sum() == pytest.approx(doc.token_mask.sum() - np.sum(
        doc.token_mask & (doc.word_of_token < 0)))
    top = report.spans(words, doc, 3)
    assert len(top) == 3 and all(text[s["start"]:s["end"]] == s["text"] for s in top)
    assert [s["score"] for s in top] == sorted((s["score"] for s in top), reverse=True)


def test_empty_notes_are_refused():
    tok = _tok("wordpiece")
    for text in ("", "  \n\t "):
        with pytest.raises(report.EmptyNoteError, match="empty note"):
            report.encode_text(tok, text, 64, "e.txt")


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_decode_document_merges_pieces(kind):
    tok = _tok(kind)
    ids = np.asarray(tok("chest fever pain")["input_ids"] + [tok.pad_token_id] * 3)
    mask = report.special_token_mask(tok, ids, (np.arange(len(ids)) < len(ids) - 3))
    doc = report.decode_document(tok, ids, mask, 5)
    assert doc.word_text == ["chest", "fever", "pain"]
    assert doc.text is None and doc.word_start[0] == 1  # after [CLS] / <s>
    scores = np.zeros(len(ids))
    scores[doc.word_start[1]:doc.word_end[1]] = 0.2
    spans = report.spans(report.word_scores(scores, doc), doc, 5)
    assert spans[0]["text"] == "fever" and "token_start" in spans[0]
    assert spans[0]["score"] == pytest.approx(0.2 * (doc.word_end[1] - doc.word_start[1]))
    assert len(spans) == 1  # zero-score words are not evidence


def test_html_is_escaped_and_self_contained(tmp_path):
    tok = _tok("wordpiece")
    text = "chest <b>pain</b> & fever"
    doc = report.encode_text(tok, text, 64, "a<b>.txt")
    words = np.zeros((1, doc.num_words))
    words[0, doc.word_text.index("fever")] = 1.0
    entry = {"code": "A01", "description": "x<y", "probability": 0.9,
             "evidence": report.spans(words[0], doc, 5)}
    path = tmp_path / "out.html"
    page = report.HtmlWriter(str(path), "t")
    page.document(doc, "attention", [entry], words)
    page.error("e.txt", "empty note: e.txt")
    page.close()
    html = path.read_text()
    assert "<b>pain</b>" not in html and "&lt;b&gt;pain&lt;/b&gt;" in html
    assert "&amp;" in html and "a&lt;b&gt;.txt" in html and "x&lt;y" in html
    assert "fever</mark>" in html and "<script" not in html and "http" not in html
    assert not list(tmp_path.glob("*.tmp*"))
