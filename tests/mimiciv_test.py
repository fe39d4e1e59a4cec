"""Tests for data_prep.mimiciv: each recipe step on tiny hand-made MIMIC-IV files, bad inputs,
and the full CLI into shards."""
from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from utils import tiny_tokenizer_dir

from data_prep import mimiciv
from data_prep.mimiciv import PrepError

TEXT = "chief complaint chest pain history of hypertension discharge diagnosis heart failure"


# ------------------------------------------------------------------------------ fixtures


_NULL = "<<null>>"


def _write(path: str, rows: list[dict] | pd.DataFrame, columns: list[str],
           quote_strings: bool = False) -> str:
    """A gzip CSV. `quote_strings` (the notes, as in PhysioNet's discharge.csv.gz): string
    fields are quoted, so "" is a quoted empty text, while None is an unquoted empty field."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    df = pd.DataFrame(rows, columns=columns)
    if not quote_strings:
        df.to_csv(path, index=False, compression="gzip")
        return path
    text = df.fillna(_NULL).to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        f.write(text.replace(f'"{_NULL}"', ""))
    return path


def write_mimic(root, notes, diagnoses, procedures=(), d_diagnoses=(), d_procedures=(),
                version="2.2", note_version="2.2") -> str:
    """Write the five files in the PhysioNet layout; rows are tuples (see column lists)."""
    root = str(root)
    hosp = os.path.join(root, "mimiciv", version, "hosp")
    _write(os.path.join(root, "mimic-iv-note", note_version, "note", "discharge.csv.gz"),
           [dict(note_id=f"{s}-DS-{i}", subject_id=s, hadm_id=h, note_type="DS", note_seq=i,
                 charttime="2180-01-01 00:00:00", storetime="", text=t)
            for i, (s, h, t) in enumerate(notes)],
           ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
            "storetime", "text"], quote_strings=True)
    for name, rows in (("diagnoses_icd", diagnoses), ("procedures_icd", procedures)):
        _write(os.path.join(hosp, f"{name}.csv.gz"),
               [dict(subject_id=1, hadm_id=h, seq_num=1, icd_code=c, icd_version=v)
                for h, c, v in rows],
               ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"])
    for name, rows in (("d_icd_diagnoses", d_diagnoses), ("d_icd_procedures", d_procedures)):
        _write(os.path.join(hosp, f"{name}.csv.gz"),
               [dict(icd_code=c, icd_version=v, long_title=t) for c, v, t in rows],
               ["icd_code", "icd_version", "long_title"])
    return root


def small_corpus(root, n: int = 24) -> str:
    """n ICD-10 admissions (hadm 100+i, subject i // 2), 4 ICD-9 ones and one ICD-10 admission
    without a note; every code occurs at least twice."""
    notes, diag, proc = [], [], []
    for i in range(n):
        hadm = 100 + i
        notes.append((i // 2, hadm, f"{TEXT} number {i} " * (1 + i % 3)))
        diag += [(hadm, "I5023", 10), (hadm, "I10" if i % 2 else "E119", 10)]
        if i % 3 == 0:
            proc.append((hadm, "0DTJ4ZZ", 10))
    for j in range(4):
        hadm = 900 + j
        notes.append((500 + j, hadm, TEXT))
        diag.append((hadm, "4019", 9))
        proc.append((hadm, "3893", 9))
    diag.append((999, "I10", 10))                    # an admission without a note
    d_diag = [("I5023", 10, "Acute on chronic systolic heart failure"),
              ("I10", 10, "Essential (primary) hypertension"),
              ("4019", 9, "Unspecified essential hypertension")]
    d_proc = [("0DTJ4ZZ", 10, "Resection of appendix")]
    return write_mimic(root, notes, diag, proc, d_diag, d_proc)


@pytest.fixture(scope="module")
def tok_dir():
    return tiny_tokenizer_dir("wordpiece")


# ------------------------------------------------------------------------------ files


def test_find_files_auto_detects_versions_and_nesting(tmp_path):
    root = tmp_path / "physionet.org" / "files"
    write_mimic(root, [(1, 1, TEXT)], [(1, "I10", 10)], version="3.1")
    files = mimiciv.find_files(str(tmp_path))
    assert (files.mimic_version, files.note_version) == ("3.1", "2.2")
    assert files.diagnoses.endswith(os.path.join("mimiciv", "3.1", "hosp", "diagnoses_icd.csv.gz"))
    with pytest.raises(PrepError, match="2.2"):
        mimiciv.find_files(str(root), mimic_version="2.2")


def test_missing_file_names_expected_path(tmp_path):
    root = write_mimic(tmp_path, [(1, 1, TEXT)], [(1, "I10", 10)])
    os.remove(os.path.join(root, "mimiciv", "2.2", "hosp", "procedures_icd.csv.gz"))
    with pytest.raises(PrepError) as e:
        mimiciv.find_files(root)
    assert "procedures_icd.csv.gz" in str(e.value) and "--mimic-dir" in str(e.value)
    with pytest.raises(PrepError, match="mimic-iv-note/ and mimiciv/"):
        mimiciv.find_files(str(tmp_path / "nowhere"))


def test_missing_column_names_file_and_column(tmp_path):
    path = _write(str(tmp_path / "diagnoses_icd.csv.gz"), [dict(hadm_id=1, code="I10",
                                                                icd_version=10)],
                  ["hadm_id", "code", "icd_version"])
    with pytest.raises(PrepError) as e:
        mimiciv.load_codes(path, "diagnosis", Counter())
    assert "diagnoses_icd.csv.gz" in str(e.value) and "icd_code" in str(e.value)


# ------------------------------------------------------------------------------ codes


def test_load_codes_formats_dedupes_and_drops_null(tmp_path):
    path = _write(str(tmp_path / "d.csv.gz"), [
        dict(hadm_id=1, icd_code="4019", icd_version=9),
        dict(hadm_id=1, icd_code="4019", icd_version=9),     # duplicate
        dict(hadm_id=1, icd_code="0389", icd_version=9),     # leading zero survives
        dict(hadm_id=1, icd_code=None, icd_version=9),       # null code
        dict(hadm_id=2, icd_code="I5023", icd_version=10),
        dict(hadm_id=2, icd_code="I10", icd_version=10),
    ], ["hadm_id", "icd_code", "icd_version"])
    dropped = Counter()
    df = mimiciv.load_codes(path, "diagnosis", dropped)
    got = sorted(zip(df["hadm_id"].tolist(), df["code"].tolist(), df["system"].tolist()))
    assert got == [(1, "038.9", "icd9cm"), (1, "401.9", "icd9cm"),
                   (2, "I10", "icd10cm"), (2, "I50.23", "icd10cm")]
    assert dropped["diagnosis_duplicate_code"] == 1
    assert dropped["diagnosis_null_code_or_hadm_id"] == 1
    df = mimiciv.load_codes(path, "diagnosis", Counter(), trailing_dot=True)
    assert "I10." in set(df["code"])
    assert set(mimiciv.select_version(df, "icd10cm")["hadm_id"]) == {2}


def test_already_dotted_codes_merge_with_undotted_ones(tmp_path):
    path = _write(str(tmp_path / "d.csv.gz"), [
        dict(hadm_id=1, icd_code="4019", icd_version=9),
        dict(hadm_id=1, icd_code="401.9", icd_version=9),    # same code, already dotted
        dict(hadm_id=2, icd_code="401.9", icd_version=9),
        dict(hadm_id=2, icd_code="I10", icd_version=10),
    ], ["hadm_id", "icd_code", "icd_version"])
    dropped = Counter()
    df = mimiciv.load_codes(path, "diagnosis", dropped)
    got = sorted(zip(df["hadm_id"].tolist(), df["code"].tolist()))
    assert got == [(1, "401.9"), (2, "401.9"), (2, "I10")]
    assert dropped["diagnosis_duplicate_code"] == 1


@pytest.mark.parametrize("bad", ["4019.0", "42"])
def test_codes_read_as_numbers_are_explained(tmp_path, bad):
    path = _write(str(tmp_path / "diagnoses_icd.csv.gz"),
                  [dict(hadm_id=1, icd_code="4019", icd_version=9),
                   dict(hadm_id=2, icd_code=bad, icd_version=9)],
                  ["hadm_id", "icd_code", "icd_version"])
    with pytest.raises(PrepError) as e:
        mimiciv.load_codes(path, "diagnosis", Counter())
    msg = str(e.value)
    assert "diagnoses_icd.csv.gz" in msg and "icd_code" in msg and bad in msg


def test_bad_icd_version_value(tmp_path):
    path = _write(str(tmp_path / "procedures_icd.csv.gz"),
                  [dict(hadm_id=1, icd_code="3893", icd_version=11)],
                  ["hadm_id", "icd_code", "icd_version"])
    with pytest.raises(PrepError, match="icd_version.*11"):
        mimiciv.load_codes(path, "procedure", Counter())


def test_unparsable_id_names_file(tmp_path):
    path = _write(str(tmp_path / "diagnoses_icd.csv.gz"),
                  [dict(hadm_id="abc", icd_code="I10", icd_version=10)],
                  ["hadm_id", "icd_code", "icd_version"])
    with pytest.raises(PrepError, match="diagnoses_icd.csv.gz"):
        mimiciv.load_codes(path, "diagnosis", Counter())


# ------------------------------------------------------------------------------ notes


def test_load_notes_drops_and_dedupes(tmp_path):
    root = write_mimic(tmp_path, [
        (1, 10, "first note"),
        (1, 10, "first note"),          # duplicate (hadm_id, text)
        (1, 10, "second, different"),   # a second note of the admission: first one kept
        (2, 20, None),                  # null text
        (2, 21, "   \n "),              # empty text
        (3, 30, "no codes for me"),     # admission without codes
        (4, 40, "multi\nline, \"quoted\" text"),
    ], [])
    path = os.path.join(root, "mimic-iv-note", "2.2", "note", "discharge.csv.gz")
    dropped = Counter()
    table, adm = mimiciv.load_notes(path, np.array([10, 20, 21, 40]), dropped)
    assert adm["hadm_id"].tolist() == [10, 40]
    assert adm["subject_id"].tolist() == [1, 4]
    texts = mimiciv.TextColumn(table["text"]).take(adm["row"].to_numpy())
    assert texts == ["first note", "multi\nline, \"quoted\" text"]
    assert dropped == Counter(null_text=1, empty_text=1, duplicate_note=1,
                              extra_note_per_admission=1, note_without_codes_of_version=1)


NOTE_NULLS = [
    (1, 10, ""),                    # quoted empty text: polars (EMC) reads "", pandas NaN
    (1, 11, None),                  # unquoted empty field: null for every reader
    (1, 12, "  "),                  # blank text
    (1, 13, "NA"),                  # quoted "NA": pandas (SIGIR) reads NaN
    (1, 14, "text"),
]


def _notes_path(root) -> str:
    return os.path.join(root, "mimic-iv-note", "2.2", "note", "discharge.csv.gz")


def test_quoted_empty_note_is_empty_text_by_default(tmp_path):
    root = write_mimic(tmp_path, NOTE_NULLS, [])
    dropped = Counter()
    table, adm = mimiciv.load_notes(_notes_path(root), np.arange(10, 15), dropped)
    assert adm["hadm_id"].tolist() == [13, 14]
    assert dropped == Counter(null_text=1, empty_text=2)    # "" and "  " are empty, not null


@pytest.mark.parametrize("compat, kept, null, blank", [("emc", [10, 12, 13, 14], 1, 2),
                                                       ("sigir2023", [12, 14], 3, 1)])
def test_compat_notes_read_nulls_like_the_reference(tmp_path, compat, kept, null, blank):
    """EMC (polars.read_csv): only an unquoted empty field is null, "" and blank texts are
    notes; SIGIR (pandas.read_csv): "" and "NA" are NaN, a blank text is a note."""
    root = write_mimic(tmp_path, NOTE_NULLS + [(1, 14, "other text"), (1, 14, "text")], [])
    dropped, changes = Counter(), Counter()
    table, notes = mimiciv.load_notes(_notes_path(root), np.arange(10, 15), dropped,
                                      compat=compat, changes=changes)
    assert notes["hadm_id"].tolist() == kept + [14]         # all distinct notes are returned
    assert notes["note_index"].tolist() == [0] * len(kept) + [1]
    texts = mimiciv.TextColumn(table["text"]).take(notes["row"].to_numpy())
    assert texts[-2:] == ["text", "other text"]
    assert dropped == Counter(null_text=null, duplicate_note=1)
    assert changes == Counter(blank_text_notes_kept=blank)


def test_text_column_takes_across_chunks():
    column = pa.chunked_array([["a", "b"], [], ["c"], ["d", "e", "f"]])
    assert mimiciv.TextColumn(column).take(np.array([5, 0, 2, 3, 1])) == ["f", "a", "c", "d", "b"]


# ------------------------------------------------------------------------------ splits


def test_split_file_feather_and_csv(tmp_path):
    df = pd.DataFrame({"_id": [1, 2, 3], "split": ["train", "val", "test"]})
    feather.write_feather(df, str(tmp_path / "s.feather"))
    df.to_csv(tmp_path / "s.csv", index=False)
    for name in ("s.feather", "s.csv"):
        got = mimiciv.read_split_file(str(tmp_path / name))
        assert got.to_dict("list") == {"_id": [1, 2, 3], "split": ["train", "val", "test"]}


def test_split_file_errors(tmp_path):
    pd.DataFrame({"_id": [1, 2], "split": ["train", "dev"]}).to_csv(tmp_path / "a.csv",
                                                                    index=False)
    with pytest.raises(PrepError, match="a.csv.*split.*'dev'"):
        mimiciv.read_split_file(str(tmp_path / "a.csv"))
    pd.DataFrame({"hadm_id": [1], "split": ["train"]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(PrepError, match="b.csv.*_id"):
        mimiciv.read_split_file(str(tmp_path / "b.csv"))
    pd.DataFrame({"_id": [1, 1], "split": ["train", "test"]}).to_csv(tmp_path / "c.csv",
                                                                     index=False)
    with pytest.raises(PrepError, match="more than one split"):
        mimiciv.read_split_file(str(tmp_path / "c.csv"))
    with pytest.raises(PrepError, match="does not exist"):
        mimiciv.read_split_file(str(tmp_path / "missing.feather"))


def test_generated_split_is_deterministic_and_patient_level():
    rng = np.random.default_rng(1)
    adm = pd.DataFrame({"hadm_id": np.arange(1000), "subject_id": rng.integers(0, 300, 1000)})
    a, b = mimiciv.make_split(adm, seed=3), mimiciv.make_split(adm, seed=3)
    assert a.equals(b)
    assert not a.equals(mimiciv.make_split(adm, seed=4))
    per_subject = adm.assign(split=a["split"].to_numpy()).groupby("subject_id")["split"].nunique()
    assert per_subject.max() == 1
    n_subjects = adm["subject_id"].nunique()
    by_split = adm.assign(split=a["split"].to_numpy()).groupby("split")["subject_id"].nunique()
    assert by_split["test"] == round(0.15 * n_subjects)
    assert by_split["val"] == round(0.10 * (n_subjects - by_split["test"]))


def test_apply_split_counts_and_zero_match():
    adm = pd.DataFrame({"hadm_id": [1, 2, 3], "subject_id": [1, 1, 2], "row": [0, 1, 2]})
    dropped = Counter()
    out = mimiciv.apply_split(adm, pd.DataFrame({"_id": [1, 3, 7], "split": ["train", "test",
                                                                             "val"]}),
                              dropped, "file:s.feather")
    assert out[["hadm_id", "split"]].values.tolist() == [[1, "train"], [3, "test"]]
    assert dropped["not_in_split"] == 1
    with pytest.raises(PrepError) as e:
        mimiciv.apply_split(adm, pd.DataFrame({"_id": [8, 9], "split": ["train", "test"]}),
                            Counter(), "file:s.feather")
    msg = str(e.value)
    assert "s.feather" in msg and "2 _id" in msg and "3 admissions" in msg


# ------------------------------------------------------------------------------ labels


def _codes(rows):
    return pd.DataFrame(rows, columns=["hadm_id", "code", "system"])


def test_rare_filter_counts_over_all_splits_per_column():
    ids = np.arange(20)
    # A: 6 train + 4 test admissions = 10 -> kept; B: 9 admissions -> dropped.
    diag = _codes([(i, "A00", "icd10cm") for i in list(range(6)) + list(range(14, 18))]
                  + [(i, "B00", "icd10cm") for i in range(9)] + [(99, "A00", "icd10cm")])
    dropped = Counter()
    kept = mimiciv.filter_rare(diag, ids, 10, dropped, "diagnosis")
    assert set(kept["code"]) == {"A00"} and len(kept) == 10     # hadm 99 is not an admission
    assert dropped == Counter(diagnosis_rare_codes=1, diagnosis_rare_code_assignments=9)
    # Counted per column: a procedure column with its own counts.
    proc = _codes([(i, "0DTJ4ZZ", "icd10pcs") for i in range(3)])
    assert len(mimiciv.filter_rare(proc, ids, 3, Counter(), "procedure")) == 3
    assert len(mimiciv.filter_rare(proc, ids, 4, Counter(), "procedure")) == 0


def test_label_space_and_targets():
    diag = _codes([(1, "I50.23", "icd10cm"), (1, "I10", "icd10cm"), (2, "I10", "icd10cm")])
    proc = _codes([(1, "0DTJ4ZZ", "icd10pcs"), (3, "02HV33Z", "icd10pcs")])
    labels, systems = mimiciv.label_space(diag, proc)
    assert labels == ["02HV33Z", "0DTJ4ZZ", "I10", "I50.23"]
    assert systems == ["icd10pcs", "icd10pcs", "icd10cm", "icd10cm"]
    adm = pd.DataFrame({"hadm_id": [1, 2, 3, 4], "split": ["train"] * 4})
    dropped = Counter()
    kept, targets = mimiciv.build_targets(adm, diag, proc, labels, dropped)
    assert kept["hadm_id"].tolist() == [1, 2, 3]
    assert dropped["empty_target"] == 1
    assert {k: v.tolist() for k, v in targets.items()} == {1: [1, 2, 3], 2: [2], 3: [0]}
    assert all(v.dtype == np.int32 for v in targets.values())


# ------------------------------------------------------------------------------ text


def test_sigir_cleaning_exact():
    text = "Pt. Admitted 2/3 w/ CHF (EF 25%);\n  BP 120/80, given 40mg Lasix x2 ___ Café"
    assert mimiciv.clean_text_sigir(text) == "pt admitted w chf ef bp given 40mg lasix x2 caf"
    assert mimiciv.truncate_words("a b  c\nd", 3) == "a b c"
    long = " ".join(["word"] * 4100)
    assert len(mimiciv.prepare_text(long, "sigir2023").split()) == 4000
    assert mimiciv.prepare_text(text, "emnlp2024") == text        # raw: untouched


def test_tokenize_special_tokens_and_truncation(tok_dir):
    tok, _ = mimiciv.load_tokenizer(tok_dir)
    short, long = mimiciv.tokenize(tok, [TEXT, TEXT * 20], max_length=32)
    assert short[0] == tok.cls_token_id and short[-1] == tok.sep_token_id
    assert short.dtype == np.int32 and len(short) < 32
    assert len(long) == 32 and long[0] == tok.cls_token_id and long[-1] == tok.sep_token_id
    assert np.count_nonzero(long == tok.cls_token_id) == 1
    assert np.count_nonzero(long == tok.sep_token_id) == 1
    ids, mask = mimiciv.tokenize_descriptions(tok, ["heart failure", TEXT * 20, ""])
    assert ids.shape == mask.shape == (3, 64) and ids.dtype == np.int32 and mask.dtype == np.int8
    assert ids[0, 0] == tok.cls_token_id and mask[0].sum() < 64 and mask[1].sum() == 64


def test_tokenizer_errors(tmp_path):
    with pytest.raises(PrepError, match="not a folder"):
        mimiciv.load_tokenizer(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------ end to end


def _run(capsys, *argv):
    code = mimiciv.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_end_to_end_into_shards(tmp_path, tok_dir, capsys):
    from data_prep import shards

    root = small_corpus(tmp_path / "raw")
    split = pd.DataFrame({"_id": [100 + i for i in range(24)] + [900, 901, 12345],
                          "split": ["train"] * 16 + ["val"] * 4 + ["test"] * 4
                          + ["train", "test", "val"]})
    feather.write_feather(split, str(tmp_path / "split.feather"))
    out = tmp_path / "icd10"
    code, err = _run(capsys, "--mimic-dir", root, "--out", out, "--tokenizer", tok_dir,
                     "--split-file", tmp_path / "split.feather", "--min-code-count", 2,
                     "--max-length", 16, "--batch-size", 5)
    assert code == 0, err
    ds = shards.open_dataset(out)
    assert ds.label_space == ["0DTJ4ZZ", "E11.9", "I10", "I50.23"]    # ICD-9 codes excluded
    assert ds.metadata["label_systems"] == ["icd10pcs", "icd10cm", "icd10cm", "icd10cm"]
    assert ds.descriptions[0] == "Resection of appendix" and ds.descriptions[1] == ""
    assert ds.description_ids.shape == (4, 64)
    meta = ds.metadata
    assert meta["split_source"] == "file:split.feather" and meta["mimic_version"] == "2.2"
    assert meta["recipe"] == "emnlp2024" and meta["icd_version"] == 10
    assert {s: meta["counts"][s]["documents"] for s in ("train", "val", "test")} == {
        "train": 16, "val": 4, "test": 4}
    assert meta["counts"]["train"]["codes"] == {"icd10cm": 32, "icd10pcs": 6}
    assert meta["train_label_counts"] == [6, 8, 8, 16]
    assert meta["dropped"]["note_without_codes_of_version"] == 4     # the ICD-9 admissions
    assert meta["dropped"]["admission_without_note"] == 1
    assert meta["prep_config"]["min_code_count"] == 2
    assert meta["tokenizer"]["sha256"] == shards.tokenizer_identity(tok_dir)["sha256"]
    src = ds.source("train")
    ex = src[0]
    assert int(ex["_id"]) == 100 and ex["label_ids"].tolist() == [0, 1, 3]
    assert len(ex["input_ids"]) == 16 == int(ex["length"])
    assert ex["input_ids"][0] == meta["tokenizer"]["cls_token_id"]
    assert ex["input_ids"][-1] == meta["tokenizer"]["sep_token_id"]
    # an existing --out is refused (exit 2), not overwritten
    code, err = _run(capsys, "--mimic-dir", root, "--out", out, "--tokenizer", tok_dir)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err


def test_cli_icd9_sigir_generated_split(tmp_path, tok_dir, capsys, caplog):
    root = small_corpus(tmp_path / "raw")
    out = tmp_path / "icd9"
    code, err = _run(capsys, "--mimic-dir", root, "--out", out, "--tokenizer", tok_dir,
                     "--icd-version", 9, "--recipe", "sigir2023", "--min-code-count", 1)
    assert code == 0, err
    assert "NOT be comparable" in caplog.text
    assert TEXT not in caplog.text                       # note text is never logged
    meta = json.loads((out / "metadata.json").read_text())
    assert json.loads((out / "label_space.json").read_text()) == ["38.93", "401.9"]
    assert meta["split_source"] == "generated" and meta["recipe"] == "sigir2023"
    assert sum(meta["counts"][s]["documents"] for s in ("train", "val", "test")) == 4


def test_cli_bad_input_exits_2_without_traceback(tmp_path, tok_dir, capsys):
    root = small_corpus(tmp_path / "raw")
    pd.DataFrame({"_id": [1, 2], "split": ["train", "test"]}).to_csv(tmp_path / "s.csv",
                                                                     index=False)
    code, err = _run(capsys, "--mimic-dir", root, "--out", tmp_path / "o", "--tokenizer",
                     tok_dir, "--split-file", tmp_path / "s.csv")
    assert code == 2 and "s.csv" in err and "none of its 2 _id" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    code, err = _run(capsys, "--mimic-dir", tmp_path, "--out", tmp_path / "o", "--tokenizer",
                     tok_dir)
    assert code == 2 and "--mimic-dir" in err


# ------------------------------------------------------------------------------ --compat


def emc_corpus(root) -> str:
    """ICD-10 dataset fixture for the EMC quirks (hadm: what it exercises)."""
    notes = [(1, 1, "note one, first"), (1, 1, "note one, second"),   # 1: two distinct notes
             (2, 2, "note two"),
             (3, 3, "note three"),          # 3: ICD-9 + ICD-10 diagnoses, ICD-10 procedure
             (4, 4, "note four"),           # 4: ICD-9 diagnosis, ICD-9 + ICD-10 procedures
             (5, 5, ""),                    # 5: quoted-empty text
             (7, 7, "note seven")]          # 7: ICD-9 only: not in the ICD-10 dataset
    diagnoses = [(1, "I10", 10), (2, "I10", 10), (3, "4019", 9), (3, "I5023", 10),
                 (4, "4019", 9), (5, "4019", 9), (7, "4019", 9)]
    procedures = [(3, "0DTJ4ZZ", 10), (4, "3893", 9), (4, "0DTJ4ZZ", 10), (5, "0DTJ4ZZ", 10),
                  (7, "3893", 9)]
    return write_mimic(root, notes, diagnoses, procedures)


def sigir_corpus(root) -> str:
    notes = [(1, 11, "Note eleven, first"), (1, 11, "note eleven, SECOND 12"),  # 2 documents
             (2, 12, "note twelve"),
             (3, 13, "note thirteen"),      # 13: not in the split file, its codes still count
             (4, 14, "note fourteen"), (5, 15, "note fifteen"),
             (6, 16, ""),                   # quoted-empty: NaN for pandas -> no note
             (7, 17, "  \n ")]              # blank: a document (text "" after cleaning)
    diagnoses = [(11, "I10", 10), (12, "I10", 10), (13, "E119", 10), (14, "E119", 10),
                 (15, "E119", 10), (16, "I10", 10), (17, "I10", 10), (17, "4019", 9)]
    return write_mimic(root, notes, diagnoses, [])


def _split_file(path, ids) -> str:
    pd.DataFrame({"_id": ids, "split": ["train"] * len(ids)}).to_csv(path, index=False)
    return str(path)


def _select(root, split, *argv):
    args = mimiciv.parse_args(["--mimic-dir", str(root), "--out", "unused", "--tokenizer", "x",
                               "--split-file", split, *map(str, argv)])
    dropped = Counter()
    sel = mimiciv.select(args, mimiciv.find_files(str(root)), dropped)
    targets = {int(i): [sel.labels[k] for k in sel.targets[h]]
               for i, h in zip(sel.admissions["_id"], sel.admissions["hadm_id"])}
    return sel, targets, dropped


def test_emc_row_weights_follow_the_reference_frame():
    diag = _codes([(3, "401.9", "icd9cm"), (3, "I50.23", "icd10cm"), (4, "401.9", "icd9cm"),
                   (6, "I10", "icd10cm")])
    proc = _codes([(3, "0DTJ4ZZ", "icd10pcs"), (4, "38.93", "icd9pcs"),
                   (4, "0DTJ4ZZ", "icd10pcs"), (5, "0DTJ4ZZ", "icd10pcs")])
    notes = pd.Series([2, 1, 1, 3], index=[3, 4, 5, 6])
    diag_w, proc_w = mimiciv.emc_row_weights(diag, proc, notes, 10)
    # hadm 3 (2 notes) has rows (9, 10pcs), (10, 10pcs) -> x2 notes; hadm 4: (9, 9pcs) is
    # filtered out, (9, 10pcs) kept; hadm 6 (3 notes, no procedures): (10, null)
    assert diag_w.tolist() == [2, 2, 1, 3]
    assert proc_w.tolist() == [4, 0, 1, 1]


def test_compat_emc_counts_rows_keeps_other_version_codes_and_empty_notes(tmp_path):
    root = emc_corpus(tmp_path / "raw")
    split = _split_file(tmp_path / "s.csv", [1, 2, 3, 4, 5, 7])
    sel, targets, dropped = _select(root, split, "--compat", "emc", "--min-code-count", 3)
    # I10: hadm 1 counts twice (two notes) + hadm 2 = 3; 401.9 (ICD-9, other version): hadm 3,
    # 4 and 5 (empty note) = 3; 0DTJ4ZZ: hadm 3 twice (two diagnosis versions) + 4 + 5 = 4;
    # I50.23: 1 (rare); 38.93 is in no kept row.
    assert sel.labels == ["0DTJ4ZZ", "401.9", "I10"]
    assert sel.systems == ["icd10pcs", "icd9cm", "icd10cm"]
    assert targets == {1: ["I10"], 2: ["I10"], 3: ["0DTJ4ZZ", "401.9"],
                       4: ["0DTJ4ZZ", "401.9"], 5: ["0DTJ4ZZ", "401.9"]}
    # one document per _id, the first note in file order; the empty note is a document
    texts = mimiciv.TextColumn(sel.notes["text"]).take(sel.admissions["row"].to_numpy())
    assert texts == ["note one, first", "note two", "note three", "note four", ""]
    assert dropped["diagnosis_rare_codes"] == 1 and dropped["empty_text"] == 0
    assert sel.compat_changes == Counter(
        blank_text_notes_kept=1, admissions_with_several_notes=1,
        # codes in fewer than 3 of these admissions, kept by counting rows: I10 (2 admissions)
        diagnosis_codes_kept_only_by_emc_counting=1, procedure_codes_kept_only_by_emc_counting=0,
        labels_in_two_code_systems=0, extra_documents_of_an_admission=0,
        documents_with_blank_text=1, other_version_labels=1,
        other_version_code_assignments=3, mixed_version_admissions=3)


def test_compat_off_on_the_emc_fixture(tmp_path):
    root = emc_corpus(tmp_path / "raw")
    split = _split_file(tmp_path / "s.csv", [1, 2, 3, 4, 5, 7])
    with pytest.raises(PrepError, match="no admission is left"):
        _select(root, split, "--min-code-count", 3)     # one count per admission: all rare
    sel, targets, dropped = _select(root, split, "--min-code-count", 2)
    assert sel.labels == ["0DTJ4ZZ", "I10"]               # only ICD-10 codes
    assert targets == {1: ["I10"], 2: ["I10"], 3: ["0DTJ4ZZ"], 4: ["0DTJ4ZZ"]}
    assert dropped["empty_text"] == 1 and dropped["extra_note_per_admission"] == 1
    assert dropped["admission_without_note"] == 1 and sel.compat_changes == Counter()


def test_compat_sigir_counts_all_notes_and_keeps_every_note(tmp_path):
    root = sigir_corpus(tmp_path / "raw")
    split = _split_file(tmp_path / "s.csv", [11, 12, 14, 15, 16, 17])
    sel, targets, dropped = _select(root, split, "--compat", "sigir2023", "--min-code-count", 3)
    assert sel.labels == ["E11.9", "I10."]                # I10.: SIGIR's trailing dot
    stride = mimiciv.DOC_ID_NOTE_STRIDE
    assert targets == {11: ["I10."], 11 + stride: ["I10."], 12: ["I10."], 14: ["E11.9"],
                       15: ["E11.9"], 17: ["I10."]}
    assert sel.admissions["hadm_id"].tolist() == [11, 11, 12, 14, 15, 17]
    assert dropped["null_text"] == 1                      # the quoted-empty note of hadm 16
    assert sel.compat_changes == Counter(
        blank_text_notes_kept=1, admissions_with_several_notes=1,
        admissions_counted_outside_split=1,               # hadm 13
        diagnosis_codes_kept_only_by_sigir2023_counting=1,    # E11.9 (I10. has 3 admissions)
        labels_in_two_code_systems=0, extra_documents_of_an_admission=1,
        documents_with_blank_text=1, other_version_labels=0, other_version_code_assignments=0,
        mixed_version_admissions=1)                       # hadm 17 (its ICD-9 code is not used)
    # without --compat: counted once per admission in the split, one note per admission
    with pytest.raises(PrepError, match="no admission is left"):
        _select(root, split, "--recipe", "sigir2023", "--min-code-count", 3)
    sel, targets, dropped = _select(root, split, "--recipe", "sigir2023", "--min-code-count", 2)
    assert sel.labels == ["E11.9", "I10."] and sorted(targets) == [11, 12, 14, 15]
    assert dropped["empty_text"] == 2 and dropped["extra_note_per_admission"] == 1


def test_sigir_document_ids_are_unique_and_decodable():
    docs = pd.DataFrame({"hadm_id": [20_000_001, 20_000_001, 20_000_001, 29_999_999],
                         "note_index": [0, 1, 2, 0]})
    ids = mimiciv.document_ids(docs, "sigir2023")
    assert ids.tolist() == [20_000_001, 120_000_001, 220_000_001, 29_999_999]
    assert (ids % mimiciv.DOC_ID_NOTE_STRIDE).tolist() == docs["hadm_id"].tolist()
    assert mimiciv.document_ids(docs, "emc").tolist() == docs["hadm_id"].tolist()
    with pytest.raises(PrepError, match="hadm_id"):
        mimiciv.document_ids(pd.DataFrame({"hadm_id": [10 ** 9], "note_index": [0]}),
                             "sigir2023")
    with pytest.raises(PrepError, match="notes per admission"):
        mimiciv.document_ids(pd.DataFrame({"hadm_id": [1], "note_index": [22]}), "sigir2023")


@pytest.mark.parametrize("compat", ["emc", "sigir2023"])
def test_cli_compat_records_the_mode(tmp_path, tok_dir, capsys, caplog, compat):
    from data_prep import shards

    caplog.set_level(logging.INFO, logger="data_prep.mimiciv")
    root = (emc_corpus if compat == "emc" else sigir_corpus)(tmp_path / "raw")
    split = _split_file(tmp_path / "s.csv", [1, 2, 3, 4, 5, 7, 11, 12, 14, 15, 16, 17])
    out = tmp_path / "out"
    code, err = _run(capsys, "--mimic-dir", root, "--out", out, "--tokenizer", tok_dir,
                     "--split-file", split, "--min-code-count", 3, "--compat", compat)
    assert code == 0, err
    ds = shards.open_dataset(out)
    meta = ds.metadata
    assert meta["compat"] == meta["prep_config"]["compat"] == compat
    assert meta["recipe"] == mimiciv.COMPAT_MODES[compat]
    assert meta["compat_changes"]["blank_text_notes_kept"] == 1
    assert f"--compat {compat}: documents_with_blank_text = 1" in caplog.text
    ids = [int(ex["_id"]) for ex in ds.source("train")]
    assert len(ids) == len(set(ids)) == meta["counts"]["train"]["documents"]
    if compat == "sigir2023":
        assert sorted(ids) == [11, 12, 14, 15, 17, 11 + mimiciv.DOC_ID_NOTE_STRIDE]
        assert "k * 100000000" in meta["document_ids"]
        assert meta["counts"]["train"]["codes"] == {"icd10cm": 6}
    else:
        assert sorted(ids) == [1, 2, 3, 4, 5] and meta["document_ids"] == "_id = hadm_id"
        assert meta["counts"]["train"]["codes"] == {"icd10cm": 2, "icd10pcs": 3, "icd9cm": 3}
        assert meta["label_systems"] == ["icd10pcs", "icd9cm", "icd10cm"]
        assert min(int(ex["length"]) for ex in ds.source("train")) == 2   # "" -> [CLS] [SEP]


def test_cli_compat_default_off_and_recipe_clash(tmp_path, tok_dir, capsys):
    root = small_corpus(tmp_path / "raw")
    code, err = _run(capsys, "--mimic-dir", root, "--out", tmp_path / "o", "--tokenizer",
                     tok_dir, "--min-code-count", 1)
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert meta["compat"] is None and meta["compat_changes"] == {}
    assert meta["prep_config"]["compat"] is None and meta["recipe"] == "emnlp2024"
    with pytest.raises(SystemExit):
        mimiciv.parse_args(["--mimic-dir", "m", "--out", "o", "--tokenizer", "t",
                            "--compat", "emc", "--recipe", "sigir2023"])
    assert "--compat emc reproduces the emnlp2024 recipe" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --evidence


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    from data_prep import demo_corpus

    out = tmp_path_factory.mktemp("demo_ev") / "raw"
    demo_corpus.generate(out, num_admissions=60, seed=1, words_median=40)
    return out


def _evidence_args(raw, out, tok_dir, *extra):
    return ["--mimic-dir", raw, "--out", out, "--tokenizer", tok_dir,
            "--split-file", raw / "mimiciv_icd10_split.feather", "--min-code-count", 2,
            "--max-length", 256, "--batch-size", 7, *extra]


def test_cli_evidence_end_to_end(demo_raw, tmp_path, tok_dir, capsys):
    from transformers import AutoTokenizer

    from data_prep import evidence as ev
    from data_prep import shards

    out = tmp_path / "icd10"
    code, err = _run(capsys, *_evidence_args(demo_raw, out, tok_dir, "--evidence",
                                             demo_raw / "evidence.jsonl"))
    assert code == 0, err
    ds = shards.open_dataset(out)
    meta = ds.metadata
    assert ds.has_evidence and meta["evidence"] is True
    counts = meta["evidence_counts"]
    docs = sum(meta["counts"][s]["documents"] for s in ("train", "val", "test"))
    assert counts["documents"] == counts["documents_with_annotations"] == docs
    assert counts["annotated_admissions_not_in_dataset"] > 0          # the ICD-9 admissions
    assert counts["evidence_spans_truncated"] > 0 and counts["evidence_spans_mapped"] > 0
    assert counts["evidence_spans_code_not_in_label_space"] > 0      # rare codes filtered
    assert counts["annotations_of_other_notes"] == 0

    tok = AutoTokenizer.from_pretrained(tok_dir)
    notes = pd.read_csv(demo_raw / "mimic-iv-note/2.2/note/discharge.csv.gz", dtype=str,
                        keep_default_na=False, na_values=[""]).dropna(subset=["text"])
    text_of = dict(zip(notes.drop_duplicates("hadm_id")["hadm_id"].astype(int),
                       notes.drop_duplicates("hadm_id")["text"]))
    annotations = ev.load_annotations(demo_raw / "evidence.jsonl")
    index = {c: i for i, c in enumerate(ds.label_space)}
    seen_evidence = seen_distractor = 0
    for split in ("train", "val", "test"):
        src = ds.source(split)
        for i in range(len(src)):
            ex = src[i]
            text = text_of[int(ex["_id"])]
            enc = ev.encode(tok, [text], 256)[0]
            np.testing.assert_array_equal(ex["input_ids"], mimiciv.tokenize(tok, [text], 256)[0])
            np.testing.assert_array_equal(ex["input_ids"], enc.input_ids)
            labels, pos, kinds = ds.evidence(split, i)
            anns = annotations[int(ex["_id"])]
            # every triple's token overlaps an annotated span of that code and kind
            for label, p, kind in zip(labels.tolist(), pos.tolist(), kinds.tolist()):
                s, t = enc.offsets[p]
                assert enc.special[p] == 0 and 0 < p < len(enc.input_ids) - 1
                assert any(a.begin < t and a.end > s and a.kind == ev.KINDS[kind]
                           and index.get(a.label_code, -1) == label for a in anns)
            # evidence codes are targets; every code with evidence before the cut is there
            assert set(labels[kinds == 0].tolist()) <= set(ex["label_ids"].tolist())
            last = enc.offsets[enc.special == 0][:, 1].max()
            want = {index[a.label_code] for a in anns
                    if a.kind == "evidence" and a.label_code in index and a.begin < last}
            assert set(labels[kinds == 0].tolist()) == want
            seen_evidence += int((kinds == 0).sum())
            seen_distractor += int((kinds == 1).sum())
    assert seen_evidence > 100 and seen_distractor > 10


def test_cli_evidence_refusals_and_bad_annotations(demo_raw, tmp_path, tok_dir, capsys):
    from data_prep import evidence as ev

    path = demo_raw / "evidence.jsonl"
    for extra in (("--recipe", "sigir2023"), ("--compat", "sigir2023")):
        with pytest.raises(SystemExit) as exc:
            mimiciv.parse_args([str(a) for a in _evidence_args(
                demo_raw, tmp_path / "x", tok_dir, "--evidence", path, *extra)])
        assert exc.value.code == 2
        assert "--evidence needs --recipe emnlp2024" in capsys.readouterr().err
    # offsets that do not match the note: exit 2, file and record named, nothing written
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["notes"][0]["annotations"][0]["begin"] += 1
    ev.write_jsonl(tmp_path / "bad.jsonl", records)
    code, err = _run(capsys, *_evidence_args(demo_raw, tmp_path / "o", tok_dir, "--evidence",
                                             tmp_path / "bad.jsonl"))
    assert code == 2 and "Traceback" not in err and not (tmp_path / "o").exists()
    assert re.search(r"bad.jsonl: line \d+: notes\[0\].annotations\[0\]: covered_text", err)
    records[1]["notes"][0]["annotations"][1]["begin"] = "12"
    ev.write_jsonl(tmp_path / "bad2.jsonl", records)
    code, err = _run(capsys, *_evidence_args(demo_raw, tmp_path / "o2", tok_dir, "--evidence",
                                             tmp_path / "bad2.jsonl"))
    assert code == 2 and "bad2.jsonl: line 2: notes[0].annotations[1]: begin='12'" in err
    # annotations of another note of the admission are counted, not mapped
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["notes"][0]["note_id"] = "0-DS-0"
    ev.write_jsonl(tmp_path / "other.jsonl", records)
    code, err = _run(capsys, *_evidence_args(demo_raw, tmp_path / "o3", tok_dir, "--evidence",
                                             tmp_path / "other.jsonl"))
    assert code == 0, err
    counts = json.loads((tmp_path / "o3" / "metadata.json").read_text())["evidence_counts"]
    assert counts["annotations_of_other_notes"] > 0 and "evidence_spans" not in counts
