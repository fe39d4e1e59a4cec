"""Tests of data_prep.evidence: MDACE-layout reading, validation errors, span -> token mapping."""
from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer
from utils import minilm_dir, tiny_tokenizer_dir

from data_prep import evidence as ev

TEXT = "Patient with acute on chronic heart failure. Denies chest pain. Mother with diabetes."
HF = (TEXT.index("acute"), TEXT.index(" failure") + len(" failure"))       # "acute ... failure"
NEG = (TEXT.index("Denies"), TEXT.index("pain.") + len("pain."))


def _ann(begin, end, code="I50.23", system="ICD-10-CM", **kw):
    return {"begin": begin, "end": end, "code": code, "code_system": system,
            "description": "", "type": "Human", **kw}


def _record(*annotations, hadm_id=123, note_id="1-DS-1"):
    return {"hadm_id": hadm_id, "notes": [{"note_id": note_id, "category": "Discharge summary",
                                           "description": "DS",
                                           "annotations": list(annotations)}]}


def _write(path, record):
    path.write_text(json.dumps(record))
    return path


# --------------------------------------------------------------------------- reading


def test_load_folder_and_jsonl(tmp_path):
    folder = tmp_path / "mdace" / "Inpatient"
    folder.mkdir(parents=True)
    _write(folder / "123.json", _record(_ann(*HF), _ann(*NEG, code="R07.9", kind="distractor",
                                                        subtype="negated")))
    _write(folder / "124.json", _record(_ann(0, 7, code="4019", system="ICD-9-CM"),
                                        hadm_id=124))
    got = ev.load_annotations(tmp_path / "mdace")
    assert sorted(got) == [123, 124]
    a, d = got[123]
    assert (a.begin, a.end, a.kind, a.note_id, a.system) == (*HF, "evidence", "1-DS-1", "icd10cm")
    assert d.kind == "distractor" and d.subtype == "negated"
    assert got[124][0].label_code == "401.9" and got[124][0].system == "icd9cm"
    assert "124.json" in got[124][0].source and "notes[0].annotations[0]" in got[124][0].source
    lines = tmp_path / "ev.jsonl"
    ev.write_jsonl(lines, [_record(_ann(*HF)), _record(_ann(*NEG), hadm_id=5)])
    got = ev.load_annotations(lines)
    assert sorted(got) == [5, 123] and got[5][0].source.endswith("line 2: notes[0].annotations[0]")
    # unknown codes: an error only with a label space, and only for evidence
    ev.load_annotations(lines, label_space=["I50.23", "R07.9"])
    with pytest.raises(ev.EvidenceError, match=r"ev.jsonl: line 1: notes\[0\].annotations\[0\]: "
                                               r"code 'I50.23'.*not in the label space"):
        ev.load_annotations(lines, label_space=["R07.9"])


@pytest.mark.parametrize("record, match", [
    ({"notes": []}, r"missing key\(s\) \['hadm_id'\]"),
    ({"hadm_id": "x1", "notes": []}, "hadm_id 'x1' is not an integer"),
    (_record({"begin": 1, "code": "I10", "code_system": "ICD-10-CM"}),
     r"notes\[0\].annotations\[0\]: missing key\(s\) \['end'\]"),
    (_record(_ann(5, 5)), r"notes\[0\].annotations\[0\]: begin=5 >= end=5"),
    (_record(_ann(0, 3), _ann(9, 4)), r"notes\[0\].annotations\[1\]: begin=9 >= end=4"),
    (_record(_ann("0", 4)), r"annotations\[0\]: begin='0', end=4 must be integer"),
    (_record(_ann(0, 4.0)), r"annotations\[0\]: .*end=4.0 must be integer"),
    (_record(_ann(0, 4, kind="negation")), r"kind 'negation' is not one of"),
    (_record(_ann(0, 4, code="")), r"code '' must be a non-empty string"),
    ({"hadm_id": 1, "notes": [{"annotations": []}]}, r"notes\[0\]: each note needs note_id"),
])
def test_validation_errors_name_file_and_record(tmp_path, record, match):
    path = _write(tmp_path / "bad.json", record)
    with pytest.raises(ev.EvidenceError, match=match) as err:
        ev.load_annotations(path)
    assert str(path) in str(err.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ev.EvidenceError, match="does not exist"):
        ev.load_annotations(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvidenceError, match="no \\*.json"):
        ev.load_annotations(tmp_path / "empty")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ev.EvidenceError, match="x.json: not valid JSON"):
        ev.load_annotations(tmp_path / "x.json")
    (tmp_path / "x.jsonl").write_text(json.dumps(_record()) + "\n[oops\n")
    with pytest.raises(ev.EvidenceError, match="x.jsonl: line 2: not valid JSON"):
        ev.load_annotations(tmp_path / "x.jsonl")
    dup = tmp_path / "dup"
    dup.mkdir()
    _write(dup / "a.json", _record())
    _write(dup / "b.json", _record())
    with pytest.raises(ev.EvidenceError,
                       match=r"b.json: hadm_id 123 was already read from .*a.json"):
        ev.load_annotations(dup)


def test_check_against_texts():
    anns = ev.validate(_record(_ann(*HF, covered_text=TEXT[HF[0]:HF[1]])), "f.json")
    ev.check_against_texts(anns, {"1-DS-1": TEXT})
    with pytest.raises(ev.EvidenceError, match=r"f.json: notes\[0\].annotations\[0\]: span "
                                               r"\[0, 999\) lies outside note '1-DS-1'"):
        ev.validate(_record(_ann(0, 999)), "f.json", texts={"1-DS-1": TEXT})
    with pytest.raises(ev.EvidenceError, match="covered_text 'heart' != the note's text"):
        ev.validate(_record(_ann(0, 5, covered_text="heart")), "f.json", texts={"1-DS-1": TEXT})
    with pytest.raises(ev.EvidenceError, match="note_id '1-DS-1' .* not among the notes"):
        ev.check_against_texts(anns, {"other": TEXT})


# --------------------------------------------------------------------------- token positions


def _tokenizers():
    out = [AutoTokenizer.from_pretrained(tiny_tokenizer_dir("wordpiece")),
           AutoTokenizer.from_pretrained(tiny_tokenizer_dir("bpe"))]
    if minilm_dir():
        out.append(AutoTokenizer.from_pretrained(minilm_dir()))
    return out


@pytest.mark.parametrize("tok", _tokenizers(), ids=lambda t: type(t).__name__ + str(len(t)))
def test_spans_to_tokens_cover_exactly_the_span(tok):
    enc = ev.encode(tok, [TEXT], 512)[0]
    assert enc.input_ids.tolist() == tok(TEXT)["input_ids"] and not enc.truncated
    positions, status = ev.char_spans_to_token_positions(enc.offsets, [HF, NEG],
                                                         special=enc.special)
    assert status == ["mapped", "mapped"]
    for (b, e), pos in zip((HF, NEG), positions):
        assert pos.size and 0 not in pos and len(enc.input_ids) - 1 not in pos  # no specials
        # every token overlaps the span, and the tokens cover all its non-space characters
        assert all(s < e and t > b for s, t in enc.offsets[pos])
        covered = {c for s, t in enc.offsets[pos] for c in range(s, t)}
        assert {c for c in range(b, e) if not TEXT[c].isspace()} <= covered
        outside = np.setdiff1d(np.flatnonzero(enc.special == 0), pos)
        assert all(t <= b or s >= e or (s == t and s == b) for s, t in enc.offsets[outside])
    # a span inside one token maps to that token (overlap counts)
    inside = (TEXT.index("chronic") + 2, TEXT.index("chronic") + 3)
    (pos,), _ = ev.char_spans_to_token_positions(enc.offsets, [inside], special=enc.special)
    assert pos.size == 1 and enc.offsets[pos[0]][0] <= inside[0] < enc.offsets[pos[0]][1]
    # whitespace only: no tokens
    space = (TEXT.index(" heart"), TEXT.index(" heart") + 1)
    (pos,), st = ev.char_spans_to_token_positions(enc.offsets, [space], special=enc.special)
    assert pos.size == 0 and st == ["no_tokens"]


def test_truncation_drops_and_counts():
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir("wordpiece"))
    full = ev.encode(tok, [TEXT], 512)[0]
    # keep [CLS] + the tokens up to (part of) the heart failure mention + [SEP]
    n_keep = int(np.flatnonzero(full.offsets[:, 1] > TEXT.index("heart"))[0]) + 1
    enc = ev.encode(tok, [TEXT], n_keep + 1)[0]
    assert enc.truncated and len(enc.input_ids) == n_keep + 1
    assert enc.input_ids[-1] == tok.sep_token_id
    positions, status = ev.char_spans_to_token_positions(
        enc.offsets, [HF, NEG], special=enc.special, truncated=enc.truncated)
    assert status == ["partly_truncated", "truncated"]
    assert positions[1].size == 0 and positions[0].max() == n_keep - 1
    label_index = {"I50.23": 3, "R07.9": 1}
    anns = ev.validate(_record(_ann(*HF), _ann(*NEG, code="R07.9")), "f")
    stats = ev.EvidenceStats()
    fields = ev.evidence_fields(enc, anns, label_index, stats=stats)
    assert set(fields["evidence_label_ids"].tolist()) == {3}
    assert stats["evidence_spans_partly_truncated"] == 1 and stats["evidence_spans_truncated"] == 1
    # exact fit: not truncated
    exact = ev.encode(tok, [TEXT], len(full.input_ids))[0]
    assert not exact.truncated


def test_evidence_fields_triples():
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir("wordpiece"))
    diabetes = (TEXT.index("Mother"), len(TEXT))
    record = _record(_ann(*HF), _ann(HF[0], HF[0] + 5),                 # overlapping spans
                     _ann(*NEG, code="R07.9", kind="distractor", subtype="negated"),
                     _ann(*diabetes, code="E11.9", kind="distractor", subtype="family"),
                     _ann(0, 7, code="Z99.99"))                        # not a label
    anns = ev.validate(record, "f")
    label_index = {"I50.23": 2, "R07.9": 0}
    stats = ev.EvidenceStats()
    ids, fields = ev.example_evidence(TEXT, anns, tok, 512, label_index, stats=stats)
    enc = ev.encode(tok, [TEXT], 512)[0]
    labels, pos, kinds = (fields[k] for k in ("evidence_label_ids", "evidence_positions",
                                              "evidence_kinds"))
    assert labels.dtype == np.int32 and pos.dtype == np.int32 and kinds.dtype == np.int8
    want_hf, want_neg, want_fam = ev.char_spans_to_token_positions(
        enc.offsets, [HF, NEG, diabetes], special=enc.special)[0]
    np.testing.assert_array_equal(pos[(kinds == 0) & (labels == 2)], want_hf)   # deduplicated
    assert set(labels[kinds == 0].tolist()) == {2}
    np.testing.assert_array_equal(np.sort(pos[(kinds == 1) & (labels == 0)]), want_neg)
    np.testing.assert_array_equal(np.sort(pos[(kinds == 1) & (labels == -1)]), want_fam)
    triples = list(zip(kinds.tolist(), labels.tolist(), pos.tolist()))
    assert triples == sorted(set(triples))
    assert stats["evidence_spans_code_not_in_label_space"] == 1
    assert stats["documents_with_evidence"] == 1 and stats["documents_with_distractors"] == 1
    assert stats["evidence_codes"] == 1 and stats["distractor_spans"] == 2
    empty = ev.evidence_fields(enc, [], label_index)
    assert all(v.size == 0 for v in empty.values())
    assert {k: v.dtype for k, v in empty.items()} == {k: v.dtype for k, v in
                                                      ev.empty_fields().items()}
