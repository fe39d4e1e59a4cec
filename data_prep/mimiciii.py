"""`python -m data_prep.mimiciii`: raw MIMIC-III v1.4 -> prepared shards (mimiciii_full / _50 /
_clean), in the same format as `data_prep.mimiciv` (DESIGN.md §1).

The recipe follows the reference (explainable-medical-coding, data/prepare_mimiciii.py and
data/make_mimiciii_{full,50,clean}.py):

1. Codes (DIAGNOSES_ICD, PROCEDURES_ICD; all ICD-9): drop null codes, add the dot (ICD-9-CM
   `4019 -> 401.9`, `E8889 -> E888.9`; ICD-9 procedures `3893 -> 38.93`), de-duplicate
   (hadm_id, code).
2. Notes (NOTEEVENTS): CATEGORY "Discharge summary" with non-null TEXT; the notes of one
   admission are joined with one space in the order DESCRIPTION descending (the "Report"
   before its "Addendum"s), then CHARTTIME, CHARTDATE (missing first), then ROW_ID.
3. Inner join of the joined notes with the admissions that have codes.
4. Split (inner join on hadm_id): the reference's split file (`mimiciii_<variant>_splits.feather`)
   or Mullenbach et al.'s CAML files (`{train,dev,test}_{full,50}_hadm_ids.csv`).
5. Label space per dataset: full = every code of the split-joined admissions; 50 = the 50
   most frequent codes (admissions counted over all splits, diagnoses and procedures
   together; ties broken by code string); clean = codes in >= 10 admissions, counted per
   column (diagnoses, procedures) over all splits together.
6. target = diagnosis + procedure codes; admissions with an empty target are dropped.
7. Raw text (no cleaning), tokenised with the encoder's tokenizer, truncated to max_length.

The document id `_id` is hadm_id. Note text is never logged.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from data_prep import codes as codes_lib
from data_prep import mimiciv
from data_prep.mimiciv import PrepError

log = logging.getLogger("data_prep.mimiciii")

SPLITS = mimiciv.SPLITS
DISCHARGE_CATEGORY = "Discharge summary"
PHYSIONET_URL = "https://physionet.org/content/mimiciii/1.4/"
REFERENCE_SPLITS = ("https://github.com/JoakimEdin/explainable-medical-coding (data/splits/"
                    "mimiciii_{full,50,clean}_splits.feather)")
CAML_SPLITS = ("https://github.com/jamesmullenbach/caml-mimic (mimicdata/mimic3/"
               "{train,dev,test}_{full,50}_hadm_ids.csv)")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One MIMIC-III dataset: how its label space is chosen and where its split comes from."""
    name: str
    label_rule: str            # "all" | "top_k" | "min_count"
    top_k: int = 0
    min_count: int = 0
    caml: str | None = None    # the CAML split files' infix ("full", "50"), if any

    @property
    def split_file(self) -> str:
        return f"{self.name}_splits.feather"


VARIANTS = {
    "mimiciii_full": Variant("mimiciii_full", "all", caml="full"),
    "mimiciii_50": Variant("mimiciii_50", "top_k", top_k=50, caml="50"),
    "mimiciii_clean": Variant("mimiciii_clean", "min_count", min_count=10),
}

TABLES = {"notes": "NOTEEVENTS", "diagnoses": "DIAGNOSES_ICD", "procedures": "PROCEDURES_ICD",
          "d_diagnoses": "D_ICD_DIAGNOSES", "d_procedures": "D_ICD_PROCEDURES"}
NOTE_COLUMNS = {"ROW_ID": pa.int64(), "SUBJECT_ID": pa.int64(), "HADM_ID": pa.int64(),
                "CHARTDATE": pa.string(), "CHARTTIME": pa.string(), "CATEGORY": pa.string(),
                "DESCRIPTION": pa.string(), "TEXT": pa.string()}
CODE_COLUMNS = {"HADM_ID": pa.int64(), "ICD9_CODE": pa.string()}
DESCRIPTION_COLUMNS = {"ICD9_CODE": pa.string(), "LONG_TITLE": pa.string()}
KIND_OF_TABLE = {"diagnoses": "diagnosis", "procedures": "procedure"}


# ------------------------------------------------------------------------------ files


@dataclasses.dataclass(frozen=True)
class MimicIIIFiles:
    """The five PhysioNet MIMIC-III files and the version folder they were found in."""
    notes: str
    diagnoses: str
    procedures: str
    d_diagnoses: str
    d_procedures: str
    version: str


def _candidate_dirs(mimic_dir: str) -> list[str]:
    """Folders that may hold the CSVs: the folder itself, then mimiciii/<version>/ under it or
    under physionet.org/files/ (newest version first)."""
    out = [mimic_dir]
    for base in (mimic_dir, os.path.join(mimic_dir, "physionet.org", "files"),
                 os.path.join(mimic_dir, "files")):
        folder = os.path.join(base, "mimiciii")
        if os.path.isdir(folder):
            versions = sorted((d for d in os.listdir(folder) if re.fullmatch(r"\d+(\.\d+)*", d)),
                              key=lambda v: tuple(int(p) for p in v.split(".")), reverse=True)
            out += [os.path.join(folder, v) for v in versions] + [folder]
    return out


def _find_table(folder: str, name: str) -> str | None:
    for candidate in (name + ".csv.gz", name + ".csv"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def find_files(mimic_dir: str) -> MimicIIIFiles:
    """Locate NOTEEVENTS, DIAGNOSES_ICD, PROCEDURES_ICD, D_ICD_DIAGNOSES, D_ICD_PROCEDURES
    (.csv.gz or .csv) under `mimic_dir` (the folder holding them, or a folder above it as
    `wget -r` leaves it: physionet.org/files/mimiciii/1.4/)."""
    if not os.path.isdir(mimic_dir):
        raise PrepError(f"--mimic-dir {mimic_dir} is not a folder; give the folder holding "
                        f"NOTEEVENTS.csv.gz etc. (MIMIC-III v1.4 from {PHYSIONET_URL})")
    folder = next((d for d in _candidate_dirs(mimic_dir)
                   if _find_table(d, TABLES["notes"]) or _find_table(d, TABLES["diagnoses"])),
                  mimic_dir)
    found = {}
    for key, name in TABLES.items():
        path = _find_table(folder, name)
        if path is None:
            raise PrepError(f"missing file: expected {os.path.join(folder, name)}.csv.gz (or "
                            f".csv); --mimic-dir must point at the MIMIC-III v1.4 folder holding "
                            f"{', '.join(v + '.csv.gz' for v in TABLES.values())} (download: "
                            f"{PHYSIONET_URL})")
        found[key] = path
    base = os.path.basename(os.path.normpath(folder))
    version = base if re.fullmatch(r"\d+(\.\d+)*", base) else "unknown"
    return MimicIIIFiles(**found, version=version)


SCHEMA = "PhysioNet MIMIC-III v1.4 (upper-case column names)"


def csv_options(path: str, columns: dict[str, pa.DataType], **convert: Any
                ) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    """mimiciv's CSV options with the MIMIC-III schema named in its errors."""
    return mimiciv._csv_options(path, columns, schema=SCHEMA, url=PHYSIONET_URL, **convert)


def read_table(path: str, columns: dict[str, pa.DataType]) -> pa.Table:
    return mimiciv.read_table(path, columns, schema=SCHEMA, url=PHYSIONET_URL)


# ------------------------------------------------------------------------------ codes


def load_codes(path: str, kind: codes_lib.Kind, dropped: Counter) -> pd.DataFrame:
    """Recipe step 1 for one table. Returns hadm_id (int64), code (formatted str), system."""
    system = codes_lib.code_system(9, kind)
    table = read_table(path, CODE_COLUMNS)
    valid = pc.and_(pc.is_valid(table["ICD9_CODE"]), pc.is_valid(table["HADM_ID"]))
    dropped[f"{kind}_null_code_or_hadm_id"] += table.num_rows - (pc.sum(valid).as_py() or 0)
    table = table.filter(valid)
    raw = pc.utf8_trim_whitespace(table["ICD9_CODE"]).to_pylist()
    distinct = sorted(set(raw))
    bad = codes_lib.numeric_artifacts(distinct, system)
    if bad:
        raise PrepError(
            f"{path}: column ICD9_CODE has {len(bad)} value(s) that look like numbers (e.g. "
            f"{bad[:5]}): floats such as '4019.0' or lost leading zeros such as '42' for '042'. "
            "The file was probably re-saved by a tool that parsed ICD9_CODE as a number; use "
            f"the original PhysioNet file ({PHYSIONET_URL})")
    formatted = {c: codes_lib.format_code(c, system) for c in distinct}
    df = pd.DataFrame({"hadm_id": table["HADM_ID"].to_numpy(),
                       "code": [formatted[c] for c in raw], "system": system})
    before = len(df)
    df = df.drop_duplicates(subset=["hadm_id", "code"], ignore_index=True)
    dropped[f"{kind}_duplicate_code"] += before - len(df)
    return df


def load_descriptions(files: MimicIIIFiles, labels: Sequence[str],
                      systems: Sequence[str]) -> list[str]:
    """LONG_TITLE of D_ICD_DIAGNOSES / D_ICD_PROCEDURES in label order ("" where unknown)."""
    maps: dict[str, dict[str, str]] = {}
    for kind, path in (("diagnosis", files.d_diagnoses), ("procedure", files.d_procedures)):
        t = read_table(path, DESCRIPTION_COLUMNS)
        codes = t["ICD9_CODE"].to_pylist()
        maps.update(codes_lib.description_maps(codes, [9] * len(codes),
                                               t["LONG_TITLE"].to_pylist(), kind))
    descriptions, unknown = codes_lib.describe_labels(list(labels), list(systems), maps)
    if unknown:
        log.warning("%d of %d labels have no description in D_ICD_* (left empty)", unknown,
                    len(labels))
    return descriptions


# ------------------------------------------------------------------------------ notes


def read_notes(path: str, dropped: Counter, *, categories: Sequence[str] = (DISCHARGE_CATEGORY,),
               row_ids: np.ndarray | None = None) -> pd.DataFrame:
    """Stream NOTEEVENTS, keeping rows whose CATEGORY is in `categories` or whose ROW_ID is in
    `row_ids`, with non-null TEXT. Returns a frame with columns row_id, subject_id, hadm_id
    (nullable Int64), chartdate, charttime, category, description, text."""
    options = csv_options(path, NOTE_COLUMNS, null_values=[""], quoted_strings_can_be_null=False)
    category_set = pa.array(list(categories), pa.string())
    id_set = pa.array(np.unique(row_ids) if row_ids is not None else [], pa.int64())
    batches: list[pa.RecordBatch] = []
    raw = pa.OSFile(path)
    stream = pa.CompressedInputStream(raw, "gzip") if path.endswith(".gz") else raw
    try:
        reader = pacsv.open_csv(stream, *options)
        with tqdm(desc="reading NOTEEVENTS", unit="B", unit_scale=True,
                  total=os.path.getsize(path), disable=None) as bar:
            for batch in reader:
                bar.update(raw.tell() - bar.n)
                wanted = pc.or_(pc.fill_null(pc.is_in(batch["CATEGORY"], value_set=category_set),
                                             False),
                                pc.fill_null(pc.is_in(batch["ROW_ID"], value_set=id_set), False))
                has_text = pc.is_valid(batch["TEXT"])
                dropped["note_null_text"] += int(pc.sum(pc.cast(pc.and_(
                    wanted, pc.invert(has_text)), pa.int64())).as_py() or 0)
                batches.append(batch.filter(pc.and_(wanted, has_text)))
    except pa.ArrowInvalid as e:
        raise PrepError(f"{path}: cannot parse ({e}); ROW_ID, SUBJECT_ID, HADM_ID must be "
                        "integers and TEXT a quoted string as in the PhysioNet file") from e
    finally:
        stream.close()
    table = pa.Table.from_batches(batches, schema=pa.schema(NOTE_COLUMNS))
    return pd.DataFrame({
        "row_id": table["ROW_ID"].to_numpy(zero_copy_only=False),
        "subject_id": table["SUBJECT_ID"].to_pandas().astype("Int64"),
        "hadm_id": table["HADM_ID"].to_pandas().astype("Int64"),
        "chartdate": table["CHARTDATE"].to_pylist(),
        "charttime": table["CHARTTIME"].to_pylist(),
        "category": table["CATEGORY"].to_pylist(),
        "description": table["DESCRIPTION"].to_pylist(),
        "text": table["TEXT"].to_pylist()})


def join_discharge_notes(notes: pd.DataFrame, dropped: Counter) -> pd.DataFrame:
    """Recipe step 2: one row per admission with its discharge summaries joined by a space
    (reference order: DESCRIPTION descending, CHARTTIME, CHARTDATE with missing first,
    ROW_ID). Returns hadm_id, subject_id, text, note_ids (list of ROW_IDs, joined order)."""
    ds = notes[notes["category"] == DISCHARGE_CATEGORY]
    no_hadm = ds["hadm_id"].isna()
    dropped["note_null_hadm_id"] += int(no_hadm.sum())
    ds = ds[~no_hadm]
    if not len(ds):
        return pd.DataFrame({"hadm_id": pd.Series(dtype="int64"),
                             "subject_id": pd.Series(dtype="int64"),
                             "text": pd.Series(dtype=object), "note_ids": pd.Series(dtype=object)})
    ds = sort_notes(ds)
    groups: dict[tuple[int, int], tuple[list[str], list[int]]] = {}
    for subject, hadm, text, row_id in zip(ds["subject_id"].tolist(), ds["hadm_id"].tolist(),
                                           ds["text"].tolist(), ds["row_id"].tolist()):
        texts, ids = groups.setdefault((int(hadm), subject), ([], []))
        texts.append(text)
        ids.append(int(row_id))
    keys = sorted(groups, key=lambda k: (k[0], -1 if k[1] is pd.NA else k[1]))
    out = pd.DataFrame({
        "hadm_id": np.asarray([k[0] for k in keys], np.int64),
        "subject_id": pd.array([k[1] for k in keys], dtype="Int64"),
        "text": [" ".join(groups[k][0]) for k in keys],
        "note_ids": [groups[k][1] for k in keys]})
    if not out["subject_id"].isna().any():
        out["subject_id"] = out["subject_id"].astype("int64")
    dropped["addenda_joined"] += len(ds) - len(out)
    return out


def sort_notes(notes: pd.DataFrame) -> pd.DataFrame:
    """The reference's note order: hadm_id, DESCRIPTION descending, CHARTTIME, CHARTDATE, ROW_ID
    (polars' default: missing values first, whatever the direction)."""
    keys = {"k_hadm": notes["hadm_id"].astype("int64")}
    ascending = [True]
    for column, asc in (("description", False), ("charttime", True), ("chartdate", True)):
        present = notes[column].notna()
        keys[f"k_{column}_present"] = present.astype(int)
        keys[f"k_{column}"] = notes[column].where(present, "")
        ascending += [True, asc]
    keys["k_row"] = notes["row_id"]
    ascending.append(True)
    order = pd.DataFrame(keys, index=notes.index).sort_values(
        list(keys), ascending=ascending, kind="mergesort").index
    return notes.loc[order]


# ------------------------------------------------------------------------------ splits


def read_caml_splits(folder: str, infix: str) -> pd.DataFrame:
    """Mullenbach et al.'s `{train,dev,test}_<infix>_hadm_ids.csv` (one hadm_id per line)."""
    frames = []
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        path = os.path.join(folder, f"{name}_{infix}_hadm_ids.csv")
        if not os.path.isfile(path):
            raise PrepError(f"missing split file {path}; the CAML split folder needs "
                            f"train_{infix}_hadm_ids.csv, dev_{infix}_hadm_ids.csv and "
                            f"test_{infix}_hadm_ids.csv ({CAML_SPLITS})")
        ids = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                value = line.strip().split(",")[0].strip()
                if not value:
                    continue
                if not value.isdigit():
                    if n == 1:
                        continue            # a header line
                    raise PrepError(f"{path}, line {n}: {value!r} is not a hadm_id (expected "
                                    "one integer per line)")
                ids.append(int(value))
        frames.append(pd.DataFrame({"_id": np.asarray(ids, np.int64), "split": split}))
    df = pd.concat(frames, ignore_index=True).drop_duplicates()
    clash = df["_id"].duplicated(keep=False)
    if clash.any():
        raise PrepError(f"{folder}: hadm_id {df.loc[clash, '_id'].iloc[0]} is in more than one "
                        "of the CAML split files")
    return df


def read_splits(path: str, variant: Variant) -> tuple[pd.DataFrame, str]:
    """A split file (.feather / .csv with _id, split) or a folder holding the reference's
    `<dataset>_splits.feather` or the CAML files. Returns (split table, source label)."""
    if os.path.isdir(path):
        feather_path = os.path.join(path, variant.split_file)
        if os.path.isfile(feather_path):
            return mimiciv.read_split_file(feather_path), f"file:{variant.split_file}"
        if variant.caml is None:
            raise PrepError(f"--split-file {path}: no {variant.split_file} in this folder; "
                            f"{variant.name} uses the reference's own split ({REFERENCE_SPLITS})")
        if not os.path.isfile(os.path.join(path, f"train_{variant.caml}_hadm_ids.csv")):
            raise PrepError(f"--split-file {path}: the folder holds neither {variant.split_file} "
                            f"({REFERENCE_SPLITS}) nor train/dev/test_{variant.caml}_hadm_ids.csv "
                            f"({CAML_SPLITS})")
        return read_caml_splits(path, variant.caml), f"caml:{variant.caml}"
    return mimiciv.read_split_file(path), f"file:{os.path.basename(path)}"


# ------------------------------------------------------------------------------ labels


def top_k_codes(diagnoses: pd.DataFrame, procedures: pd.DataFrame, admission_ids: np.ndarray,
                k: int, dropped: Counter) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The k most frequent codes (admissions counted over all splits, both tables together;
    ties broken by code string), as in the reference's keep_top_k_codes."""
    diagnoses = diagnoses[diagnoses["hadm_id"].isin(admission_ids)]
    procedures = procedures[procedures["hadm_id"].isin(admission_ids)]
    counts = pd.concat([diagnoses["code"], procedures["code"]]).value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    keep = {code for code, _ in ranked[:k]}
    if len(ranked) > k and ranked[k - 1][1] == ranked[k][1]:
        log.warning("top-%d codes: a tie at count %d was broken by code string", k,
                    ranked[k][1])
    out = []
    for kind, codes in (("diagnosis", diagnoses), ("procedure", procedures)):
        mask = codes["code"].isin(keep).to_numpy()
        dropped[f"{kind}_codes_outside_top_{k}"] += int(codes.loc[~mask, "code"].nunique())
        dropped[f"{kind}_code_assignments_outside_top_{k}"] += int((~mask).sum())
        out.append(codes[mask].reset_index(drop=True))
    return out[0], out[1]


def apply_label_rule(variant: Variant, diagnoses: pd.DataFrame, procedures: pd.DataFrame,
                     admission_ids: np.ndarray, dropped: Counter
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Recipe step 5: restrict the codes to the dataset's label space rule."""
    if variant.label_rule == "top_k":
        return top_k_codes(diagnoses, procedures, admission_ids, variant.top_k, dropped)
    if variant.label_rule == "min_count":
        return tuple(mimiciv.filter_rare(codes, admission_ids, variant.min_count, dropped, kind)
                     for kind, codes in (("diagnosis", diagnoses), ("procedure", procedures)))
    return (diagnoses[diagnoses["hadm_id"].isin(admission_ids)].reset_index(drop=True),
            procedures[procedures["hadm_id"].isin(admission_ids)].reset_index(drop=True))


# ------------------------------------------------------------------------------ recipe


@dataclasses.dataclass
class Selection:
    """The outcome of recipe steps 1-6 (everything but tokenisation)."""
    admissions: pd.DataFrame        # hadm_id, subject_id, text, note_ids, split (by hadm_id)
    diagnoses: pd.DataFrame         # hadm_id, code, system (after the label rule)
    procedures: pd.DataFrame
    labels: list[str]
    systems: list[str]
    targets: dict[int, np.ndarray]  # hadm_id -> sorted int32 label ids
    split_source: str


def load_admissions(files: MimicIIIFiles, dropped: Counter, *,
                    extra_row_ids: np.ndarray | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Recipe steps 1-3. Returns (admissions with joined discharge text and codes, diagnoses,
    procedures, all notes read: discharge summaries and the `extra_row_ids` rows)."""
    diagnoses = load_codes(files.diagnoses, "diagnosis", dropped)
    procedures = load_codes(files.procedures, "procedure", dropped)
    notes = read_notes(files.notes, dropped, row_ids=extra_row_ids)
    joined = join_discharge_notes(notes, dropped)
    code_ids = np.union1d(diagnoses["hadm_id"].unique(), procedures["hadm_id"].unique())
    has_codes = joined["hadm_id"].isin(code_ids)
    dropped["admission_note_without_codes"] += int((~has_codes).sum())
    admissions = joined[has_codes].reset_index(drop=True)
    dropped["admission_codes_without_note"] += len(code_ids) - len(admissions)
    log.info("%d admissions have a discharge summary and ICD-9 codes", len(admissions))
    return admissions, diagnoses, procedures, notes


def select(args: argparse.Namespace, files: MimicIIIFiles, dropped: Counter) -> Selection:
    """Recipe steps 1-6 for `args.dataset`."""
    variant = VARIANTS[args.dataset]
    split_table = split_source = None
    if args.split_file:
        split_table, split_source = read_splits(args.split_file, variant)
    admissions, diagnoses, procedures, _ = load_admissions(files, dropped)
    if split_table is None:
        log.warning("\n%s\nNo --split-file given: making a deterministic patient-level split "
                    "(seed %d; test 15%%, val 10%% of the rest). Results will NOT be comparable "
                    "with published numbers. Published splits: %s; %s\n%s", "!" * 78, args.seed,
                    REFERENCE_SPLITS, CAML_SPLITS, "!" * 78)
        split_table, split_source = mimiciv.make_split(admissions, args.seed), "generated"
    admissions = mimiciv.apply_split(admissions, split_table, dropped, split_source)
    ids = admissions["hadm_id"].to_numpy()
    diagnoses, procedures = apply_label_rule(variant, diagnoses, procedures, ids, dropped)
    labels, systems = mimiciv.label_space(diagnoses, procedures)
    admissions, targets = mimiciv.build_targets(admissions, diagnoses, procedures, labels,
                                                dropped)
    if not len(admissions):
        raise PrepError(f"no admission is left for {variant.name} after the split join and the "
                        "label rule; check that the split file belongs to MIMIC-III")
    return Selection(admissions, diagnoses, procedures, labels, systems, targets, split_source)


def code_counts(documents: pd.DataFrame, targets: dict[int, np.ndarray],
                systems: Sequence[str], key: str = "hadm_id") -> dict[str, int]:
    """Code assignments per code system over `documents`."""
    labels = [targets[h] for h in documents[key].tolist()]
    per_label = np.bincount(np.concatenate(labels or [np.zeros(0, np.int32)]).astype(np.int64),
                            minlength=len(systems))
    out: Counter = Counter()
    for system, n in zip(systems, per_label.tolist()):
        out[system] += n
    return {k: int(v) for k, v in sorted(out.items()) if v}


def text_column(texts: Sequence[str]) -> mimiciv.TextColumn:
    return mimiciv.TextColumn(pa.chunked_array([pa.array(list(texts), pa.large_string())]))


def prepare(args: argparse.Namespace) -> None:
    """Run the whole recipe and write the dataset (raises PrepError on bad input)."""
    from data_prep import shards

    if os.path.exists(args.out) and not args.overwrite:
        raise PrepError(f"--out {args.out} already exists; delete it or pass --overwrite")
    files = find_files(args.mimic_dir)
    log.info("MIMIC-III %s under %s", files.version, os.path.dirname(files.notes))
    tokenizer, tokenizer_dir = mimiciv.load_tokenizer(args.tokenizer)
    dropped: Counter = Counter()
    sel = select(args, files, dropped)
    descriptions = load_descriptions(files, sel.labels, sel.systems)
    description_ids, description_mask = mimiciv.tokenize_descriptions(tokenizer, descriptions)

    texts = text_column(sel.admissions["text"])
    rows = np.arange(len(sel.admissions))
    counts: dict[str, dict[str, Any]] = {}
    split_examples = {}
    for split in SPLITS:
        mask = (sel.admissions["split"] == split).to_numpy()
        part = sel.admissions[mask]
        counts[split] = {"documents": len(part),
                         "codes": code_counts(part, sel.targets, sel.systems)}
        split_examples[split] = mimiciv.iter_examples(
            texts, rows[mask], part["hadm_id"].to_numpy(), sel.targets, tokenizer,
            recipe="emnlp2024", max_length=args.max_length, batch_size=args.batch_size,
            desc=f"tokenising {split}")
        log.info("%s: %d documents, code assignments %s", split, len(part),
                 counts[split]["codes"])
    train = sel.admissions.loc[sel.admissions["split"] == "train", "hadm_id"].tolist()
    train_counts = np.bincount(np.concatenate([sel.targets[i] for i in train] or [[]])
                               .astype(np.int64), minlength=len(sel.labels))
    log.info("%d labels (%s)", len(sel.labels), dict(Counter(sel.systems)))
    log.info("dropped: %s", dict(sorted(dropped.items())))
    variant = VARIANTS[args.dataset]
    metadata = {
        "format_version": 1,
        "name": args.name or args.dataset,
        "dataset": args.dataset,
        "recipe": "emnlp2024", "compat": None,
        "label_rule": dataclasses.asdict(variant),
        "document_ids": "_id = hadm_id",
        "icd_version": 9, "max_length": args.max_length,
        "num_labels": len(sel.labels), "label_systems": sel.systems,
        "train_label_counts": train_counts.tolist(),
        "tokenizer": shards.tokenizer_identity(tokenizer_dir),
        "counts": counts, "dropped": {k: int(v) for k, v in sorted(dropped.items())},
        "prep_config": {**vars(args), "mimic_version": files.version},
        "split_source": sel.split_source, "mimic_version": f"mimiciii-{files.version}",
    }
    shards.write_dataset(args.out, split_examples=split_examples, metadata=metadata,
                         label_space=sel.labels, descriptions=descriptions,
                         description_ids=description_ids, description_mask=description_mask,
                         tokenizer_dir=tokenizer_dir, overwrite=args.overwrite)
    log.info("wrote %s", args.out)


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.mimiciii",
                                description=__doc__.split("\n")[0])
    p.add_argument("--mimic-dir", required=True,
                   help="MIMIC-III v1.4 folder holding NOTEEVENTS.csv.gz etc. (or a folder above "
                        "it: physionet.org/files/mimiciii/1.4/)")
    p.add_argument("--dataset", required=True, choices=sorted(VARIANTS))
    p.add_argument("--out", required=True, help="output dataset folder (written atomically)")
    p.add_argument("--tokenizer", required=True,
                   help="local HF fast tokenizer folder, or demo:minilm")
    p.add_argument("--split-file", default=None,
                   help="the reference's mimiciii_<variant>_splits.feather (or any .feather/.csv "
                        "with _id, split), or a folder holding it or the CAML "
                        "{train,dev,test}_{full,50}_hadm_ids.csv files")
    p.add_argument("--max-length", type=int, default=6000, help="max tokens per document")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated split")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokeniser call")
    p.add_argument("--name", default=None, help="dataset name (default: --dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    if args.max_length < 2:
        p.error("--max-length must be at least 2 (room for the special tokens)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 with a one-paragraph message on bad input."""
    return mimiciv.run_cli(parse_args, prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
