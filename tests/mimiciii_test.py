"""Tests for data_prep.mimiciii on tiny hand-made files in MIMIC-III v1.4's layout and column
names (synthetic text only): files and columns, code formatting, the discharge-summary join,
the label space of each dataset variant, splits, and the CLI into shards."""
from __future__ import annotations

import csv
import gzip
import os
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from utils import tiny_tokenizer_dir

from data_prep import mimiciii
from data_prep.mimiciv import PrepError

TEXT = "chief complaint chest pain history of hypertension discharge diagnosis heart failure"
NOTE_HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME",
               "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
CODE_HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"]
D_HEADER = ["ROW_ID", "ICD9_CODE", "SHORT_TITLE", "LONG_TITLE"]
_NULL = "<<null>>"


def _write(path: str, rows: list[list], header: list[str]) -> str:
    """A gzip CSV quoted like PhysioNet's files (strings quoted, None = unquoted empty)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    df = pd.DataFrame(rows, columns=header, dtype=object)
    text = df.fillna(_NULL).to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        f.write(text.replace(f'"{_NULL}"', ""))
    return path


def note(row_id, subject, hadm, text, category="Discharge summary", description="Report",
         chartdate="2150-01-01", charttime=None):
    return [row_id, subject, hadm, chartdate, charttime, None, category, description, None,
            None, text]


def write_mimic3(root, notes, diagnoses, procedures=(), d_diagnoses=(), d_procedures=(),
                 nested: bool = True) -> str:
    """The five files; codes are (hadm, code) pairs, descriptions (code, title) pairs."""
    folder = os.path.join(str(root), "physionet.org", "files", "mimiciii", "1.4") if nested \
        else str(root)
    _write(os.path.join(folder, "NOTEEVENTS.csv.gz"), list(notes), NOTE_HEADER)
    for name, rows in (("DIAGNOSES_ICD", diagnoses), ("PROCEDURES_ICD", procedures)):
        _write(os.path.join(folder, f"{name}.csv.gz"),
               [[i, 1, h, 1, c] for i, (h, c) in enumerate(rows)], CODE_HEADER)
    for name, rows in (("D_ICD_DIAGNOSES", d_diagnoses), ("D_ICD_PROCEDURES", d_procedures)):
        _write(os.path.join(folder, f"{name}.csv.gz"),
               [[i, c, t[:10], t] for i, (c, t) in enumerate(rows)], D_HEADER)
    return str(root)


N = 24
COMMON = ["401.9", "E888.9", "V05.3", "38.93"]


def corpus(root, n: int = N) -> str:
    """n admissions (hadm 100000+i, subject 10 + i // 2). Codes: 4019 everywhere, E8889 in
    every 2nd, V053 in every 3rd, procedure 3893 in every 4th, and three codes of its own per
    admission (100+3i, 101+3i, 102+3i). Admission 0 also has an addendum and a nursing note."""
    notes, diag, proc = [], [], []
    for i in range(n):
        hadm = 100000 + i
        notes.append(note(1000 + i, 10 + i // 2, hadm, f"{TEXT} number {i}"))
        diag.append((hadm, "4019"))
        if i % 2 == 0:
            diag.append((hadm, "E8889"))
        if i % 3 == 0:
            diag.append((hadm, "V053"))
        if i % 4 == 0:
            proc.append((hadm, "3893"))
        diag += [(hadm, str(100 + 3 * i + j)) for j in range(3)]
    notes.append(note(5000, 10, 100000, "addendum text", description="Addendum"))
    notes.append(note(5001, 10, 100000, "nursing text", category="Nursing/other"))
    return write_mimic3(root, notes, diag, proc,
                        d_diagnoses=[("4019", "Unspecified essential hypertension")],
                        d_procedures=[("3893", "Venous catheterization, not elsewhere "
                                               "classified")])


def split_table(n: int = N) -> pd.DataFrame:
    names = ["train"] * (n - 6) + ["val"] * 3 + ["test"] * 3
    return pd.DataFrame({"_id": np.arange(100000, 100000 + n, dtype=np.int64), "split": names})


@pytest.fixture(scope="module")
def tok_dir():
    return tiny_tokenizer_dir("wordpiece")


# ------------------------------------------------------------------------------ files


def test_find_files_nested_and_flat(tmp_path):
    root = corpus(tmp_path / "nested")
    files = mimiciii.find_files(root)
    assert files.version == "1.4" and files.notes.endswith("mimiciii/1.4/NOTEEVENTS.csv.gz")
    flat = write_mimic3(tmp_path / "flat", [note(1, 1, 1, TEXT)], [(1, "4019")], nested=False)
    assert mimiciii.find_files(flat).version == "unknown"


def test_missing_file_names_expected_path(tmp_path):
    root = corpus(tmp_path)
    os.remove(os.path.join(root, "physionet.org/files/mimiciii/1.4/PROCEDURES_ICD.csv.gz"))
    with pytest.raises(PrepError, match=r"PROCEDURES_ICD\.csv\.gz.*physionet"):
        mimiciii.find_files(root)
    with pytest.raises(PrepError, match="not a folder"):
        mimiciii.find_files(str(tmp_path / "nowhere"))


def test_missing_column_names_file_and_column(tmp_path):
    path = _write(str(tmp_path / "DIAGNOSES_ICD.csv.gz"), [[1, 1, 5, 1, "4019"]],
                  ["ROW_ID", "SUBJECT_ID", "hadm_id", "SEQ_NUM", "ICD9_CODE"])
    with pytest.raises(PrepError,
                       match=r"DIAGNOSES_ICD\.csv\.gz: missing column\(s\) \['HADM_ID'\]"):
        mimiciii.load_codes(path, "diagnosis", Counter())


# ------------------------------------------------------------------------------ codes / notes


def test_load_codes_formats_dedupes_and_drops_null(tmp_path):
    path = _write(str(tmp_path / "d.csv.gz"),
                  [[1, 1, 5, 1, "4019"], [2, 1, 5, 2, "4019"], [3, 1, 5, 3, "E8889"],
                   [4, 1, 5, 4, "V053"], [5, 1, 6, 1, "042"], [6, 1, 6, 2, None],
                   [7, 1, None, 1, "4019"]], CODE_HEADER)
    dropped = Counter()
    df = mimiciii.load_codes(path, "diagnosis", dropped)
    assert sorted(zip(df["hadm_id"], df["code"])) == [(5, "401.9"), (5, "E888.9"), (5, "V05.3"),
                                                      (6, "042")]
    assert set(df["system"]) == {"icd9cm"}
    assert dropped["diagnosis_duplicate_code"] == 1
    assert dropped["diagnosis_null_code_or_hadm_id"] == 2
    proc = _write(str(tmp_path / "p.csv.gz"), [[1, 1, 5, 1, "3893"], [2, 1, 5, 2, "01"]],
                  CODE_HEADER)
    assert sorted(mimiciii.load_codes(proc, "procedure", Counter())["code"]) == ["01", "38.93"]


def test_codes_read_as_numbers_are_explained(tmp_path):
    path = _write(str(tmp_path / "DIAGNOSES_ICD.csv.gz"), [[1, 1, 5, 1, "4019.0"]], CODE_HEADER)
    with pytest.raises(PrepError, match=r"DIAGNOSES_ICD\.csv\.gz: column ICD9_CODE.*4019\.0"):
        mimiciii.load_codes(path, "diagnosis", Counter())


def test_discharge_summaries_joined_with_addenda_in_reference_order(tmp_path):
    notes = [
        note(30, 1, 7, "addendum late", description="Addendum", chartdate="2150-01-03"),
        note(31, 1, 7, "addendum early", description="Addendum", chartdate="2150-01-02"),
        note(32, 1, 7, "the report", description="Report", chartdate="2150-01-04"),
        note(33, 1, 7, "a nursing note", category="Nursing/other"),
        note(34, 1, 7, None),                                   # null text: dropped
        note(35, 2, None, "no admission"),                      # null HADM_ID: dropped
        note(36, 2, 8, "second admission"),
    ]
    root = write_mimic3(tmp_path, notes, [(7, "4019")], nested=False)
    dropped = Counter()
    read = mimiciii.read_notes(mimiciii.find_files(root).notes, dropped)
    assert dropped["note_null_text"] == 1 and "a nursing note" not in set(read["text"])
    joined = mimiciii.join_discharge_notes(read, dropped)
    assert joined["hadm_id"].tolist() == [7, 8]
    assert joined.loc[0, "text"] == "the report addendum early addendum late"
    assert joined.loc[0, "note_ids"] == [32, 31, 30]
    assert dropped["note_null_hadm_id"] == 1
    # extra rows by ROW_ID (MDACE's annotated notes of any category) are read too
    read = mimiciii.read_notes(mimiciii.find_files(root).notes, Counter(),
                               row_ids=np.array([33]))
    assert "a nursing note" in set(read["text"])
    assert mimiciii.join_discharge_notes(read, Counter())["text"].tolist()[1] == \
        "second admission"


def test_admissions_need_note_and_codes(tmp_path):
    root = write_mimic3(tmp_path, [note(1, 1, 7, TEXT), note(2, 1, 8, TEXT)],
                        [(7, "4019"), (9, "4019")], nested=False)
    dropped = Counter()
    adm, diag, proc, _ = mimiciii.load_admissions(mimiciii.find_files(root), dropped)
    assert adm["hadm_id"].tolist() == [7]
    assert dropped["admission_note_without_codes"] == 1
    assert dropped["admission_codes_without_note"] == 1


# ------------------------------------------------------------------------------ splits


def test_caml_split_folder_and_reference_feather(tmp_path):
    folder = tmp_path / "caml"
    folder.mkdir()
    for name, ids in (("train", [1, 2]), ("dev", [3]), ("test", [4])):
        (folder / f"{name}_full_hadm_ids.csv").write_text("".join(f"{i}\n" for i in ids))
    table, source = mimiciii.read_splits(str(folder), mimiciii.VARIANTS["mimiciii_full"])
    assert source == "caml:full"
    assert dict(zip(table["_id"], table["split"])) == {1: "train", 2: "train", 3: "val",
                                                       4: "test"}
    with pytest.raises(PrepError, match="test_50_hadm_ids.csv"):
        mimiciii.read_splits(str(folder), mimiciii.VARIANTS["mimiciii_50"])
    with pytest.raises(PrepError, match="mimiciii_clean_splits.feather"):
        mimiciii.read_splits(str(folder), mimiciii.VARIANTS["mimiciii_clean"])
    feather.write_feather(pa.table({"_id": [5], "split": ["test"]}),
                          str(folder / "mimiciii_clean_splits.feather"))
    table, source = mimiciii.read_splits(str(folder), mimiciii.VARIANTS["mimiciii_clean"])
    assert source == "file:mimiciii_clean_splits.feather" and table["_id"].tolist() == [5]
    (folder / "test_full_hadm_ids.csv").write_text("4\nabc\n")
    with pytest.raises(PrepError, match=r"test_full_hadm_ids\.csv, line 2"):
        mimiciii.read_caml_splits(str(folder), "full")


# ------------------------------------------------------------------------------ label space


def _select(tmp_path, dataset, split=True):
    root = corpus(tmp_path / "mimic")
    args = mimiciii.parse_args(["--mimic-dir", root, "--dataset", dataset, "--out",
                                str(tmp_path / "out"), "--tokenizer", "x"])
    if split:
        path = str(tmp_path / "split.feather")
        feather.write_feather(pa.Table.from_pandas(split_table(N - 2), preserve_index=False),
                              path)
        args.split_file = path
    dropped = Counter()
    return mimiciii.select(args, mimiciii.find_files(root), dropped), dropped


def test_full_label_space_is_every_code_of_the_split_admissions(tmp_path):
    sel, dropped = _select(tmp_path, "mimiciii_full")
    # the split holds N - 2 admissions: the last two and their own codes are gone
    assert sel.admissions["hadm_id"].tolist() == list(range(100000, 100000 + N - 2))
    assert dropped["not_in_split"] == 2
    own = {str(100 + 3 * i + j) for i in range(N - 2) for j in range(3)}
    assert set(sel.labels) == set(COMMON) | own and sel.labels == sorted(sel.labels)
    assert sel.systems[sel.labels.index("38.93")] == "icd9pcs"
    t = sel.targets[100000]
    assert [sel.labels[k] for k in t] == sorted(["100", "101", "102", "38.93", "401.9",
                                                 "E888.9", "V05.3"])


def test_clean_keeps_codes_in_at_least_10_admissions(tmp_path):
    sel, dropped = _select(tmp_path, "mimiciii_clean")
    # N - 2 = 22 admissions: 401.9 (22), E888.9 (11) kept; V05.3 (8), 38.93 (6), own (1) not
    assert sel.labels == ["401.9", "E888.9"]
    assert dropped["procedure_rare_codes"] == 1
    assert len(sel.admissions) == N - 2


def test_50_keeps_the_50_most_frequent_codes(tmp_path):
    sel, dropped = _select(tmp_path, "mimiciii_50")
    own = sorted(str(100 + 3 * i + j) for i in range(N - 2) for j in range(3))
    assert len(sel.labels) == 50
    assert set(sel.labels) == set(COMMON) | set(own[:46])        # ties broken by code string
    # admissions whose own codes all fell outside the top 50 still have 401.9
    assert len(sel.admissions) == N - 2
    assert dropped["diagnosis_codes_outside_top_50"] == len(own) - 46


def test_top_k_drops_admissions_left_without_codes():
    diag = pd.DataFrame({"hadm_id": [1, 2, 2, 3], "code": ["a", "a", "b", "c"],
                         "system": "icd9cm"})
    proc = pd.DataFrame({"hadm_id": [3], "code": ["d"], "system": "icd9pcs"})
    dropped = Counter()
    d, p = mimiciii.top_k_codes(diag, proc, np.array([1, 2, 3]), 2, dropped)
    assert sorted(set(d["code"]) | set(p["code"])) == ["a", "b"]
    assert p.empty and dropped["procedure_code_assignments_outside_top_2"] == 1


# ------------------------------------------------------------------------------ CLI


def test_cli_end_to_end_into_shards(tmp_path, tok_dir):
    from data_prep import shards

    root = corpus(tmp_path / "mimic")
    split = str(tmp_path / "split.csv")
    split_table().to_csv(split, index=False)
    out = str(tmp_path / "out")
    rc = mimiciii.main(["--mimic-dir", root, "--dataset", "mimiciii_full", "--out", out,
                        "--tokenizer", tok_dir, "--split-file", split, "--max-length", "512"])
    assert rc == 0
    ds = shards.open_dataset(out)
    meta = ds.metadata
    assert meta["icd_version"] == 9 and meta["name"] == "mimiciii_full"
    assert meta["split_source"] == "file:split.csv" and meta["mimic_version"] == "mimiciii-1.4"
    assert {meta["counts"][s]["documents"] for s in ("val", "test")} == {3}
    assert meta["counts"]["train"]["documents"] == N - 6
    assert set(meta["label_systems"]) == {"icd9cm", "icd9pcs"}
    assert ds.descriptions[ds.label_space.index("401.9")] == "Unspecified essential hypertension"
    assert ds.descriptions[ds.label_space.index("38.93")].startswith("Venous catheterization")
    src = ds.source("train")
    first = src[0]
    assert int(first["_id"]) == 100000
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    expected = tok(f"{TEXT} number 0 addendum text")["input_ids"]
    assert first["input_ids"].tolist() == expected
    codes = {ds.label_space[k] for k in first["label_ids"]}
    assert codes == {"100", "101", "102", "38.93", "401.9", "E888.9", "V05.3"}
    test_ids = {int(ds.source("test")[i]["_id"]) for i in range(3)}
    assert test_ids == {100000 + N - 3, 100000 + N - 2, 100000 + N - 1}


def test_cli_bad_input_exits_2_without_traceback(tmp_path, tok_dir, capsys):
    rc = mimiciii.main(["--mimic-dir", str(tmp_path), "--dataset", "mimiciii_clean", "--out",
                        str(tmp_path / "out"), "--tokenizer", tok_dir])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: missing file") and "NOTEEVENTS.csv.gz" in err
    root = corpus(tmp_path / "mimic")
    bad_split = str(tmp_path / "bad.csv")
    pd.DataFrame({"_id": [1, 2], "split": ["train", "test"]}).to_csv(bad_split, index=False)
    rc = mimiciii.main(["--mimic-dir", root, "--dataset", "mimiciii_full", "--out",
                        str(tmp_path / "out"), "--tokenizer", tok_dir, "--split-file",
                        bad_split])
    assert rc == 2 and "none of its 2 _id values" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
