"""Tests for data_prep.demo_corpus: layout, schema, determinism, content statistics, atomicity."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pytest

from data_prep import codes as codes_lib
from data_prep import demo_corpus
from data_prep import evidence as evidence_lib

REPO = Path(__file__).resolve().parents[1]
NOTES = "mimic-iv-note/2.2/note/discharge.csv.gz"
HOSP = "mimiciv/2.2/hosp/"
ALL_FILES = (NOTES, HOSP + "diagnoses_icd.csv.gz", HOSP + "procedures_icd.csv.gz",
             HOSP + "d_icd_diagnoses.csv.gz", HOSP + "d_icd_procedures.csv.gz",
             "mimiciv_icd10_split.feather", "mimiciv_icd9_split.feather")
STOPWORDS = {"with", "without", "other", "unspecified", "from", "classified", "elsewhere", "type",
             "site", "specified", "into", "than", "more", "less"}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"icd_code": str, "text": str, "long_title": str},
                       keep_default_na=False, na_values=[""])


def _digest(root: Path) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in ALL_FILES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    summary = demo_corpus.generate(out, num_admissions=1000, seed=0, words_median=100)
    return out, summary


@pytest.fixture(scope="module")
def tables(corpus) -> dict[str, pd.DataFrame]:
    out, _ = corpus
    return {
        "notes": _read(out / NOTES),
        "dx": _read(out / HOSP / "diagnoses_icd.csv.gz"),
        "px": _read(out / HOSP / "procedures_icd.csv.gz"),
        "d_dx": _read(out / HOSP / "d_icd_diagnoses.csv.gz"),
        "d_px": _read(out / HOSP / "d_icd_procedures.csv.gz"),
    }


def test_layout_columns_and_dtypes(corpus, tables):
    out, summary = corpus
    for f in ALL_FILES:
        assert (out / f).is_file(), f
    notes, dx, px = tables["notes"], tables["dx"], tables["px"]
    assert tuple(notes.columns) == demo_corpus.NOTE_COLUMNS
    assert tuple(dx.columns) == demo_corpus.DIAGNOSES_COLUMNS
    assert tuple(px.columns) == demo_corpus.PROCEDURES_COLUMNS
    for name in ("d_dx", "d_px"):
        assert tuple(tables[name].columns) == demo_corpus.DESCRIPTION_COLUMNS
    for df in (notes, dx, px):
        assert df["subject_id"].dtype == np.int64 and df["hadm_id"].dtype == np.int64
    assert set(notes["note_type"]) == {"DS"}
    assert notes["note_id"].str.fullmatch(r"\d{8}-DS-\d+").all()
    assert (notes["note_id"] == notes["subject_id"].astype(str) + "-DS-"
            + notes["note_seq"].astype(str)).all()
    assert pd.to_datetime(notes["charttime"]).notna().all()
    assert (pd.to_datetime(notes["storetime"]) >= pd.to_datetime(notes["charttime"])).all()
    assert pd.to_datetime(px["chartdate"]).notna().all()
    assert len(notes) == summary["note_rows"]
    for df in (dx, px):
        assert set(df["icd_version"]) == {9, 10}
        codes = df["icd_code"].dropna()
        assert not codes.str.contains(r"\.").any()
    # Full description tables; leading zeros survive (0389 is a string, not 389).
    d_dx = tables["d_dx"]
    assert len(d_dx) > 80_000 and len(tables["d_px"]) > 80_000
    assert d_dx.set_index(["icd_code", "icd_version"]).loc[("0389", 9), "long_title"] == \
        "Unspecified septicemia"
    assert not d_dx["icd_code"].str.contains(r"\.").any()
    # Every assigned code has a description of its own version.
    for df, d in ((dx, d_dx), (px, tables["d_px"])):
        known = set(zip(d["icd_code"], d["icd_version"]))
        coded = df.dropna(subset=["icd_code"])
        assigned = set(zip(coded["icd_code"], coded["icd_version"]))
        assert assigned <= known
    assert any(c.startswith("0") for c in pd.concat([dx, px])["icd_code"].dropna())


def test_determinism(tmp_path):
    """Same seed: byte-identical files, also from another process with another hash seed."""
    demo_corpus.generate(tmp_path / "a", num_admissions=150, seed=7, words_median=60)
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", "--out", str(tmp_path / "b"),
                    "--num-admissions", "150", "--seed", "7", "--words-median", "60"],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "123"},
                   capture_output=True)
    demo_corpus.generate(tmp_path / "c", num_admissions=150, seed=8, words_median=60)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a" / demo_corpus.EVIDENCE_FILE).read_bytes() == \
        (tmp_path / "b" / demo_corpus.EVIDENCE_FILE).read_bytes()
    assert (tmp_path / "a" / "demo_corpus.json").read_bytes() == \
        (tmp_path / "b" / "demo_corpus.json").read_bytes()
    differ = [f for f, h in _digest(tmp_path / "c").items() if h != _digest(tmp_path / "a")[f]]
    assert NOTES in differ and HOSP + "diagnoses_icd.csv.gz" in differ


def test_split_files_patient_level(corpus, tables):
    out, summary = corpus
    codes = pd.concat([tables["dx"], tables["px"]])
    subject_of = dict(zip(codes["hadm_id"], codes["subject_id"]))
    split_of_subject: dict[int, str] = {}
    for version in (10, 9):
        table = feather.read_table(out / demo_corpus.SPLIT_FILES[version])
        assert table.column_names == ["_id", "split"]
        assert str(table.schema.field("_id").type) == "int64"
        assert str(table.schema.field("split").type) == "string"
        df = table.to_pandas()
        assert df["_id"].is_unique and set(df["split"]) == {"train", "val", "test"}
        # Exactly the admissions with a non-null code of this version.
        expected = set(codes.loc[codes["icd_version"] == version].dropna(subset=["icd_code"])["hadm_id"])
        assert set(df["_id"]) == expected
        fractions = df["split"].value_counts(normalize=True)
        assert 0.07 < fractions["test"] < 0.3 and 0.03 < fractions["val"] < 0.2
        assert fractions.to_dict() == pytest.approx(
            {k: v / len(df) for k, v in summary["splits"][f"icd{version}"].items()})
        for hadm, split in zip(df["_id"], df["split"]):
            assert split_of_subject.setdefault(subject_of[hadm], split) == split


def test_every_kind_of_dirt(corpus, tables):
    _, summary = corpus
    notes, dx, px = tables["notes"], tables["dx"], tables["px"]
    dirt = summary["dirt"]
    assert all(v >= 1 for v in dirt.values()), dirt
    assert dx["icd_code"].isna().sum() == dirt["null_code_rows"]
    assert dx.dropna().duplicated(["hadm_id", "icd_code"]).sum() == dirt["duplicate_code_rows"]
    assert notes["text"].isna().sum() == dirt["null_text_note_rows"]
    assert notes.dropna().duplicated(["hadm_id", "text"]).sum() == dirt["duplicate_note_rows"]
    coded, noted = set(dx["hadm_id"]) | set(px["hadm_id"]), set(notes["hadm_id"])
    assert len(coded - noted) == dirt["admissions_without_note"]
    assert len(noted - coded) == dirt["notes_without_codes"]
    versions = dx.dropna().groupby("hadm_id")["icd_version"].nunique()
    assert (versions > 1).sum() == dirt["mixed_version_admissions"]
    # ICD-9 is a minority but a good share.
    per_adm = dx.groupby("hadm_id")["icd_version"].max()
    assert 0.5 < (per_adm == 10).mean() < 0.75


def test_codes_per_note_and_mix(tables):
    dx, px = tables["dx"].dropna(), tables["px"]
    dx = dx.drop_duplicates(["hadm_id", "icd_code"])
    total = len(dx) + len(px)
    admissions = len(set(dx["hadm_id"]) | set(px["hadm_id"]))
    assert 12 <= total / admissions <= 18
    assert 2.3 <= len(dx) / len(px) <= 4.0


def test_long_tailed_code_frequencies(tables):
    dx = tables["dx"].dropna().drop_duplicates(["hadm_id", "icd_code"])
    for version in (9, 10):
        counts = dx.loc[dx["icd_version"] == version, "icd_code"].value_counts()
        assert counts.iloc[0] >= 10 * counts.median()
        assert (counts <= 3).sum() >= 3  # rare codes
        assert len(counts) >= 200


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in STOPWORDS}


def test_evidence_from_descriptions_and_distractors(tables):
    notes = tables["notes"].dropna(subset=["text"]).drop_duplicates("hadm_id")
    text = dict(zip(notes["hadm_id"], notes["text"].str.lower()))
    d = pd.concat([tables["d_dx"], tables["d_px"]])
    desc = dict(zip(zip(d["icd_code"], d["icd_version"]), d["long_title"]))
    codes = pd.concat([tables["dx"], tables["px"]]).dropna(subset=["icd_code"])
    codes = codes[codes["hadm_id"].isin(text)]
    assigned_by_adm = codes.groupby("hadm_id")["icd_code"].apply(set).to_dict()
    vocabulary = codes[["icd_code", "icd_version"]].drop_duplicates().to_numpy().tolist()
    rng = np.random.default_rng(0)
    positive, negative = [], []
    for row in codes.sample(400, random_state=0).itertuples():
        note = text[row.hadm_id]
        words = _content_words(desc[(row.icd_code, row.icd_version)])
        if words:
            positive.append(np.mean([w in note for w in words]))
        code, version = vocabulary[int(rng.integers(len(vocabulary)))]
        words = _content_words(desc[(code, version)])
        if words and code not in assigned_by_adm[row.hadm_id]:
            negative.append(np.mean([w in note for w in words]))
    assert np.mean(positive) > 0.7 and np.mean(negative) < 0.35
    # Paraphrase noise: descriptions are not always copied verbatim.
    verbatim = [desc[(c, v)].lower() in text[h] for h, c, v in
                codes[["hadm_id", "icd_code", "icd_version"]].head(300).itertuples(index=False)]
    assert 0.1 < np.mean(verbatim) < 0.8
    # Distractors (negation, family history, rule-out) in most notes.
    cues = re.compile(r"denies |no evidence of |negative for |ruled out|rule out |r/o |mother with |"
                      r"father with |sister with |brother with |no history of |family history")
    assert np.mean([bool(cues.search(t)) for t in text.values()]) > 0.9
    family = 0
    for hadm, note in text.items():
        for phrase in re.findall(r"mother with (.+?)\.\n?", note):
            family += 1
            assert all(phrase != desc[(c, v)].lower()
                       for c, v in codes.loc[codes["hadm_id"] == hadm,
                                             ["icd_code", "icd_version"]].itertuples(index=False))
    assert family > 0


def test_discharge_summary_shape(tables):
    notes = tables["notes"].dropna(subset=["text"])
    sections = ("Name:  ___", "Unit No:", "Admission Date:", "Chief Complaint:",
                "History of Present Illness:", "Past Medical History:", "Social History:",
                "Family History:", "Physical Exam:", "Pertinent Results:", "Brief Hospital Course:",
                "Discharge Medications:", "Discharge Disposition:", "Discharge Diagnosis:",
                "Followup Instructions:")
    for note in notes["text"].head(50):
        positions = [note.index(s) for s in sections]
        assert positions == sorted(positions)
        assert note.count("___") >= 5


def test_length_distribution(tmp_path):
    demo_corpus.generate(tmp_path / "long", num_admissions=200, seed=3, words_median=1500)
    notes = _read(tmp_path / "long" / NOTES).dropna(subset=["text"])
    words = notes["text"].str.split().str.len()
    assert 1200 < words.median() < 1800
    assert words.max() > 2.5 * words.median()  # long tail
    assert (words > 4600).any()  # beyond ~6k tokens


def test_paraphrase_uses_abbreviations():
    rng = np.random.default_rng(0)
    outputs = {demo_corpus.paraphrase("Essential (primary) hypertension", rng) for _ in range(30)}
    assert any("htn" in o for o in outputs) and len(outputs) > 2
    outputs = {demo_corpus.paraphrase("Chronic kidney disease, stage 3 (moderate)", rng)
               for _ in range(30)}
    assert any("ckd" in o for o in outputs)


def test_atomic_write(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    stale = tmp_path / "corpus.tmp-stale"
    stale.mkdir()
    (stale / "partial").write_text("x")

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_corpus, "_write_descriptions", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        demo_corpus.generate(out, num_admissions=50, seed=0, words_median=30)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tmp-stale"]
    monkeypatch.undo()

    demo_corpus.generate(out, num_admissions=50, seed=0, words_median=30)
    assert all((out / f).is_file() for f in ALL_FILES)
    assert (stale / "partial").is_file()  # someone else's leftovers are not touched
    with pytest.raises(FileExistsError, match="--overwrite"):
        demo_corpus.generate(out, num_admissions=50, seed=1, words_median=30)
    before = _digest(out)
    demo_corpus.generate(out, num_admissions=50, seed=1, words_median=30, overwrite=True)
    assert _digest(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "corpus.tmp-stale"]


def test_cli_and_bad_arguments(tmp_path, capsys):
    demo_corpus.main(["--out", str(tmp_path / "cli"), "--num-admissions", "40", "--seed", "1",
                      "--words-median", "30", "--mimic-version", "3.1"])
    printed = capsys.readouterr().out
    assert "admissions 40" in printed and "dirt:" in printed
    assert (tmp_path / "cli" / "mimic-iv-note/3.1/note/discharge.csv.gz").is_file()
    assert (tmp_path / "cli" / "mimiciv/3.1/hosp/diagnoses_icd.csv.gz").is_file()
    with pytest.raises(ValueError, match="num_admissions"):
        demo_corpus.generate(tmp_path / "x", num_admissions=5, seed=0)
    with pytest.raises(ValueError, match="mimic_version"):
        demo_corpus.generate(tmp_path / "y", num_admissions=50, seed=0, mimic_version="v2")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_evidence_annotations_point_at_the_mentions(corpus, tables):
    """evidence.jsonl (MDACE layout): exact offsets into the kept note, an evidence span for
    every assigned code, distractor sentences of codes not assigned."""
    out, summary = corpus
    annotations = evidence_lib.load_annotations(out / demo_corpus.EVIDENCE_FILE)
    notes = tables["notes"].dropna(subset=["text"])
    first = notes.drop_duplicates("hadm_id")          # the note preparation keeps
    note_of = dict(zip(first["hadm_id"], first["note_id"]))
    text_of = dict(zip(first["note_id"], first["text"]))
    codes = pd.concat([tables["dx"].assign(kind="diagnosis"),
                       tables["px"].assign(kind="procedure")])
    codes = codes.dropna(subset=["icd_code"])
    assigned: dict[int, set[str]] = {}
    for h, c, v, k in codes[["hadm_id", "icd_code", "icd_version", "kind"]].itertuples(index=False):
        system = codes_lib.code_system(v, k)
        assigned.setdefault(h, set()).add((codes_lib.format_code(c, system), system))
    desc = {(c, codes_lib.code_system(v, kind)): t for name, kind in (("d_dx", "diagnosis"),
                                                                     ("d_px", "procedure"))
            for c, v, t in tables[name][["icd_code", "icd_version", "long_title"]].itertuples(
                index=False)}
    assert set(annotations) == set(note_of) & set(assigned)  # every note with codes
    assert summary["evidence"]["admissions"] == len(annotations)
    templates = {kind: [re.compile(re.escape(t).replace(r"\{\}", "(.+)"), re.I) for t in group]
                 for kind, group in demo_corpus._DISTRACTOR_TEMPLATES.items()}
    overlap, n_dis = [], 0
    for hadm, anns in annotations.items():
        evidence_lib.check_against_texts(anns, text_of)   # in the note, covered_text exact
        assert {a.note_id for a in anns} == {note_of[hadm]}
        text = text_of[note_of[hadm]]
        ev = {(a.label_code, a.system) for a in anns if a.kind == "evidence"}
        assert ev == assigned[hadm]
        for a in anns:
            span = text[a.begin:a.end]
            assert span == span.strip() and "\n" not in span
            words = _content_words(a.description)
            assert a.description == desc[(a.code.replace(".", ""), a.system)]
            if a.kind == "evidence":
                if words:
                    overlap.append(np.mean([w in span.lower() for w in words]))
                continue
            n_dis += 1
            assert (a.label_code, a.system) not in assigned[hadm]
            assert a.subtype in templates and (a.subtype == "procedure") == a.system.endswith("pcs")
            # the whole distractor sentence, one of its subtype's templates
            assert any(t.fullmatch(span) for t in templates[a.subtype]), span
            before = text[:a.begin]
            assert before.endswith((" ", "\n")) and text[a.end:a.end + 1] in (" ", "\n")
    assert np.mean(overlap) > 0.7 and n_dis == summary["evidence"]["distractor_spans"]
    assert len(overlap) <= summary["evidence"]["evidence_spans"]
