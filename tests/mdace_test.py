"""Tests for data_prep.mdace on hand-made MDACE-layout JSON files joined with tiny synthetic
MIMIC-III files: targets per dataset, version mapping, splits, evidence spans mapped to the
right tokens, document ids, and each error path."""
from __future__ import annotations

import json
import os

import pytest
from mimiciii_test import note, write_mimic3
from utils import tiny_tokenizer_dir

from data_prep import mdace

DS_A = "patient admitted with heart failure. history of hypertension and venous catheter."
PHYS_A = "chest pain noted on exam, also heart failure"
DS_B = "sepsis and pneumonia were treated"
DS_C = "fever with cough"


def span(text: str, phrase: str, extra: int = 0) -> tuple[int, int]:
    b = text.index(phrase)
    return b, b + len(phrase) + extra


def ann(text, phrase, code, system="ICD-9-CM", extra=0, **kw):
    b, e = span(text, phrase, extra)
    return {"begin": b, "end": e, "code": code, "code_system": system,
            "description": f"desc of {code}", "type": "Human", **kw}


def records9() -> dict[int, dict]:
    return {
        100001: {"hadm_id": 100001, "comment": "", "notes": [
            {"note_id": 11, "category": "Discharge summary", "description": "Report",
             "annotations": [
                 ann(DS_A, "heart failure", "428.0", extra=1),      # trailing '.' trimmed
                 ann(DS_A, "hypertension", "401.9"),
                 ann(DS_A, "venous catheter", "38.93", "ICD-9-PCS")]},
            {"note_id": 12, "category": "Physician", "description": "Intensivist Note",
             "annotations": [ann(PHYS_A, "chest pain", "786.59"),   # -> 786.5 (MIMIC-III)
                             ann(PHYS_A, "heart failure", "428.0")]}]},
        100002: {"hadm_id": 100002, "comment": "", "notes": [
            {"note_id": 21, "category": "Discharge summary", "description": "Report",
             "annotations": [ann(DS_B, "sepsis", "038.9"), ann(DS_B, "pneumonia", "486")]}]},
        100003: {"hadm_id": 100003, "comment": "", "notes": [
            {"note_id": 31, "category": "Discharge summary", "description": "Report",
             "annotations": [ann(DS_C, "fever", "780.60")]}]},
    }


def records10() -> dict[int, dict]:
    return {
        100001: {"hadm_id": 100001, "notes": [
            {"note_id": 11, "category": "Discharge summary", "description": "Report",
             "annotations": [ann(DS_A, "heart failure", "I50.9", "ICD-10-CM"),
                             ann(DS_A, "hypertension", "I10", "ICD-10-CM"),
                             ann(DS_A, "venous catheter", "02HV33Z", "ICD-10-PCS"),
                             ann(DS_A, "history", "401.9", "ICD-9-CM")]}]},
        100002: {"hadm_id": 100002, "notes": [
            {"note_id": 21, "category": "Discharge summary", "description": "Report",
             "annotations": [ann(DS_B, "sepsis", "F32.A", "ICD-10-CM")]}]},
        100003: {"hadm_id": 100003, "notes": [
            {"note_id": 31, "category": "Discharge summary", "description": "Report",
             "annotations": [ann(DS_C, "fever", "R50.9", "ICD-10-CM")]}]},
    }


def write_mdace(root, records: dict[int, dict], version: int = 9,
                splits: dict[str, dict[str, list[int]]] | None = None) -> str:
    folder = os.path.join(str(root), "data", "Inpatient", f"ICD-{version}", "1.0")
    os.makedirs(folder, exist_ok=True)
    for hadm, record in records.items():
        with open(os.path.join(folder, f"{hadm}-ICD-{version}.json"), "w") as f:
            json.dump(record, f)
    splits = splits or {
        "MDace-ev": {"train": [100001], "val": [100002], "test": [100003]},
        "MDace-code-ev": {"train": [100001, 100004], "val": [100002],
                          "test": [100003, 100005]}}
    split_dir = os.path.join(str(root), "splits", "Inpatient")
    os.makedirs(split_dir, exist_ok=True)
    for prefix, parts in splits.items():
        for split, ids in parts.items():
            with open(os.path.join(split_dir, f"{prefix}-{split}.csv"), "w") as f:
                f.write("".join(f"{i}\n" for i in ids))
    return str(root)


def mimic(root) -> str:
    notes = [note(11, 1, 100001, DS_A), note(12, 1, 100001, PHYS_A, category="Physician",
                                               description="Intensivist Note"),
             note(13, 1, 100001, "an addendum", description="Addendum"),
             note(21, 2, 100002, DS_B), note(31, 3, 100003, DS_C),
             note(41, 4, 100004, "plain admission four"),
             note(51, 5, 100005, "plain admission five"),
             note(61, 6, 100006, "not in any split")]
    diag = [(100001, "4280"), (100001, "4019"), (100001, "7865"), (100002, "0389"),
            (100002, "486"), (100003, "7806"), (100004, "25000"), (100005, "4019"),
            (100006, "4019")]
    proc = [(100001, "3893"), (100004, "9904")]
    return write_mimic3(root, notes, diag, proc,
                        d_diagnoses=[("4280", "Congestive heart failure, unspecified")],
                        d_procedures=[("3893", "Venous catheterization")])


@pytest.fixture(scope="module")
def tok_dir():
    return tiny_tokenizer_dir("wordpiece")


def run(tmp_path, tok_dir, dataset="mdace_icd9_inpatient", records=None, version=9,
        extra=(), out="out"):
    root = mimic(tmp_path / "mimic")
    md = write_mdace(tmp_path / "MDACE", records or (records9() if version == 9 else
                                                     records10()), version)
    out = str(tmp_path / out)
    rc = mdace.main(["--mimic-dir", root, "--mdace-dir", md, "--dataset", dataset, "--out", out,
                     "--tokenizer", tok_dir, "--max-length", "128", *extra])
    return rc, out


def examples(ds, split):
    src = ds.source(split)
    return {int(src[i]["_id"]): src[i] for i in range(len(src))}


# ------------------------------------------------------------------------------ units


def test_convert_to_older_version_like_the_reference():
    known = {"250.0", "V49.8", "99.0", "428.0"}
    m = mdace.convert_to_older_version(known, {"250.00", "V49.86", "99.04", "123.45", "428.0"})
    assert m == {"250.00": "250.0", "V49.86": "V49.8", "99.04": "99.0", "428.0": "428.0"}
    # ICD-10: the fixed table first; a prefix found in the known codes overrides it
    assert mdace.convert_to_older_version(set(), {"F32.A"}, mdace.ICD10_FIXED)["F32.A"] == "F32.9"
    assert mdace.convert_to_older_version({"F32"}, {"F32.A"}, mdace.ICD10_FIXED)["F32.A"] == "F32"


def test_trim_span_strips_whitespace_and_punctuation():
    text = "x (heart failure). y"
    assert mdace.trim_span(text, 2, 18) == (3, 16)
    assert mdace.trim_span(text, 17, 18) == (17, 18)       # all punctuation: kept as is


# ------------------------------------------------------------------------------ datasets


def test_icd9_inpatient_targets_splits_and_evidence_tokens(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    from data_prep import shards

    rc, out = run(tmp_path, tok_dir)
    assert rc == 0
    ds = shards.open_dataset(out)
    meta = ds.metadata
    assert meta["evidence"] is True and meta["icd_version"] == 9
    assert ds.label_space == ["038.9", "38.93", "401.9", "428.0", "486", "780.6", "786.5"]
    assert meta["code_mapping"]["icd9cm"] == {"780.60": "780.6", "786.59": "786.5"}
    assert ds.descriptions[ds.label_space.index("428.0")] == \
        "Congestive heart failure, unspecified"
    train = examples(ds, "train")
    # one document per annotated note; the discharge summary keeps _id = hadm_id
    assert set(train) == {100001, 100001 + mdace.STRIDE}
    assert meta["note_ids"] == {"100001": 11, str(100001 + mdace.STRIDE): 12, "100002": 21,
                                "100003": 31}
    assert set(examples(ds, "val")) == {100002} and set(examples(ds, "test")) == {100003}
    ex = train[100001]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc = tok(DS_A, return_offsets_mapping=True)
    assert ex["input_ids"].tolist() == enc["input_ids"]    # raw note text, not the addendum
    assert {ds.label_space[k] for k in ex["label_ids"]} == {"428.0", "401.9", "38.93"}

    def expected(phrase):
        b, e = span(DS_A, phrase)
        return {i for i, (s, t) in enumerate(enc["offset_mapping"]) if t > s and s < e and t > b}

    got = {}
    for label, pos, kind in zip(ex["evidence_label_ids"], ex["evidence_positions"],
                                ex["evidence_kinds"]):
        assert kind == 0
        got.setdefault(ds.label_space[label], set()).add(int(pos))
    assert got == {"428.0": expected("heart failure"), "401.9": expected("hypertension"),
                   "38.93": expected("venous catheter")}
    period = DS_A.index("heart failure") + len("heart failure")
    assert not any(s == period for s, _ in (enc["offset_mapping"][p] for p in got["428.0"]))
    phys = train[100001 + mdace.STRIDE]
    assert {ds.label_space[k] for k in phys["label_ids"]} == {"786.5", "428.0"}
    assert meta["evidence_counts"]["evidence_spans"] == 8


def test_note_categories_filter(tmp_path, tok_dir):
    from data_prep import shards

    rc, out = run(tmp_path, tok_dir, extra=("--note-categories", "Discharge summary"))
    assert rc == 0
    ds = shards.open_dataset(out)
    assert set(examples(ds, "train")) == {100001}
    assert ds.metadata["dropped"]["note_category_not_selected"] == 1


def test_icd9_code_dataset_adds_mimic_admissions(tmp_path, tok_dir):
    from data_prep import shards

    rc, out = run(tmp_path, tok_dir, dataset="mdace_icd9_inpatient_code")
    assert rc == 0
    ds = shards.open_dataset(out)
    train, test = examples(ds, "train"), examples(ds, "test")
    assert set(train) == {100001, 100001 + mdace.STRIDE, 100004}
    assert set(test) == {100003, 100005}
    # the MIMIC-III admission: discharge text, all its codes, no evidence
    assert {ds.label_space[k] for k in train[100004]["label_ids"]} == {"250.00", "99.04"}
    assert train[100004]["evidence_positions"].size == 0
    assert train[100001]["evidence_positions"].size > 0
    assert "100006" not in ds.metadata["note_ids"]
    assert ds.metadata["dropped"]["document_not_in_split"] == 1      # 100006


def test_icd10_targets_diagnoses_only(tmp_path, tok_dir):
    from data_prep import shards

    rc, out = run(tmp_path, tok_dir, dataset="mdace_icd10_inpatient", version=10)
    assert rc == 0
    ds = shards.open_dataset(out)
    assert ds.label_space == ["F32.9", "I10", "I50.9", "R50.9"]
    assert set(ds.metadata["label_systems"]) == {"icd10cm"}
    dropped = ds.metadata["dropped"]
    assert dropped["annotation_not_target_icd10pcs"] == 1
    assert dropped["annotation_other_icd_version_icd9cm"] == 1
    assert ds.descriptions[ds.label_space.index("I10")] == "desc of I10"
    assert ds.descriptions[ds.label_space.index("F32.9")] == ""       # mapped: not F32.A's


def test_label_space_from_a_prepared_dataset(tmp_path, tok_dir):
    from data_prep import shards

    space = tmp_path / "space"
    space.mkdir()
    (space / "label_space.json").write_text(json.dumps(["038.9", "401.9", "428.0"]))
    rc, out = run(tmp_path, tok_dir, extra=("--label-space", str(space)))
    assert rc == 0
    ds = shards.open_dataset(out)
    assert ds.label_space == ["038.9", "401.9", "428.0"]
    assert ds.metadata["label_systems"] == ["icd9cm"] * 3
    assert set(examples(ds, "test")) == set()                # 780.6 unknown: empty target
    assert ds.metadata["dropped"]["code_not_in_label_space"] >= 4
    rc, _ = run(tmp_path, tok_dir, extra=("--label-space", str(space), "--unknown-codes",
                                          "error"), out="out2")
    assert rc == 2


# ------------------------------------------------------------------------------ errors


def _error(tmp_path, tok_dir, capsys, records=None, **kw) -> str:
    rc, out = run(tmp_path, tok_dir, records=records, **kw)
    assert rc == 2
    assert not os.path.exists(out)
    return capsys.readouterr().err


def test_missing_annotation_files(tmp_path, tok_dir, capsys):
    root = mimic(tmp_path / "mimic")
    (tmp_path / "MDACE").mkdir()
    rc = mdace.main(["--mimic-dir", root, "--mdace-dir", str(tmp_path / "MDACE"), "--dataset",
                     "mdace_icd9_inpatient", "--out", str(tmp_path / "o"), "--tokenizer",
                     tok_dir])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing annotation files" in err and "Inpatient/ICD-9" in err


def test_missing_split_file(tmp_path, tok_dir, capsys):
    md = write_mdace(tmp_path / "MDACE", records9(), splits={"MDace-ev": {"train": [1]}})
    rc = mdace.main(["--mimic-dir", mimic(tmp_path / "mimic"), "--mdace-dir", md, "--dataset",
                     "mdace_icd9_inpatient", "--out", str(tmp_path / "o"), "--tokenizer",
                     tok_dir])
    assert rc == 2 and "MDace-ev-val.csv" in capsys.readouterr().err


def test_span_outside_the_note(tmp_path, tok_dir, capsys):
    records = records9()
    records[100002]["notes"][0]["annotations"][1]["end"] = len(DS_B) + 5
    err = _error(tmp_path, tok_dir, capsys, records)
    assert "100002-ICD-9.json: notes[0].annotations[1]" in err and "outside note" in err


def test_note_not_in_noteevents(tmp_path, tok_dir, capsys):
    records = records9()
    records[100003]["notes"][0]["note_id"] = 999
    err = _error(tmp_path, tok_dir, capsys, records)
    assert "100003-ICD-9.json: notes[0].annotations[0]" in err and "note_id 999" in err
    assert "NOTEEVENTS" in err


def test_note_of_another_admission(tmp_path, tok_dir, capsys):
    records = records9()
    records[100003]["notes"][0]["note_id"] = 21
    err = _error(tmp_path, tok_dir, capsys, records)
    assert "belongs to hadm_id 100002" in err


@pytest.mark.parametrize("field,value,message", [
    ("code_system", "SNOMED", "unknown code_system 'SNOMED'"),
    ("code", "42X.0", "is not a valid ICD-9-CM code"),
])
def test_unknown_codes_name_file_and_record(tmp_path, tok_dir, capsys, field, value, message):
    records = records9()
    records[100002]["notes"][0]["annotations"][0][field] = value
    err = _error(tmp_path, tok_dir, capsys, records)
    assert "100002-ICD-9.json: notes[0].annotations[0]" in err and message in err


def test_bad_json_record_names_file(tmp_path, tok_dir, capsys):
    records = records9()
    records[100002]["notes"][0]["annotations"][0]["begin"] = "3"
    err = _error(tmp_path, tok_dir, capsys, records)
    assert "100002-ICD-9.json: notes[0].annotations[0]" in err


def test_mimiciv_codes_for_the_version_mapping(tmp_path, tok_dir):
    from mimiciv_test import write_mimic

    from data_prep import shards

    iv = write_mimic(tmp_path / "iv", [(1, 5, "text")],
                     [(5, c, 9) for c in ("78060", "78659", "4280", "4019", "0389", "486")],
                     [(5, "3893", 9)])
    rc, out = run(tmp_path, tok_dir, extra=("--mimiciv-dir", iv))
    assert rc == 0
    ds = shards.open_dataset(out)
    assert ds.metadata["code_mapping"] == {"icd9cm": {}, "icd9pcs": {}}
    assert {"780.60", "786.59"} <= set(ds.label_space)
