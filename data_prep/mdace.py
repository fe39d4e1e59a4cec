"""`python -m data_prep.mdace`: MDACE inpatient evidence annotations + MIMIC-III notes ->
prepared shards with evidence (DESIGN.md §1, EXPLAIN.md §3).

Datasets, as the reference builds them (explainable-medical-coding, data/prepare_mdace.py and
data/make_mdace_{icd9_inpatient,icd9_inpatient_code,icd10_inpatient}.py):

- mdace_icd9_inpatient: one document per annotated note (any note category; the reference's
  evaluation keeps only discharge summaries: `--note-categories "Discharge summary"`); targets
  = the note's ICD-9-CM + ICD-9-PCS evidence codes; split MDace-ev-{train,val,test}.csv.
- mdace_icd10_inpatient: the same with the ICD-10 annotations; targets = ICD-10-CM codes only
  (the reference's target_columns); split MDace-ev-*.csv.
- mdace_icd9_inpatient_code: the MIMIC-III admissions of `data_prep.mimiciii` (discharge
  summaries + addenda, all their ICD-9 codes, no evidence) with every MDACE admission replaced by
  its annotated notes as above; split MDace-code-ev-*.csv.

Annotation codes newer than the MIMIC codes are mapped to an older code as the reference's
convert_to_older_icd{9,10}_version does: a code known to MIMIC stays; otherwise its last
character is dropped until a known code is found (not below 3 characters); for ICD-10 a fixed
table comes first (`ICD10_FIXED`), which a found prefix overrides. Known codes: MIMIC-III's
DIAGNOSES_ICD / PROCEDURES_ICD (ICD-9), or MIMIC-IV's (`--mimiciv-dir`, which the reference
uses for mdace_icd9_inpatient and mdace_icd10_inpatient).

Spans are half-open [begin, end) offsets into NOTEEVENTS.TEXT; they are trimmed of leading and
trailing whitespace/punctuation (the reference's trim_annotations) and mapped to token positions
by `data_prep.evidence`. Documents: `_id = hadm_id + k * DOC_ID_NOTE_STRIDE` for the k-th
annotated note of an admission (discharge summaries first, then by note_id), so the discharge
summary of an admission has `_id = hadm_id`; metadata.json `note_ids` maps `_id` -> note_id.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import string
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from data_prep import codes as codes_lib
from data_prep import evidence as ev
from data_prep import mimiciii, mimiciv
from data_prep.mimiciv import PrepError

log = logging.getLogger("data_prep.mdace")

SPLITS = mimiciv.SPLITS
STRIDE = mimiciv.DOC_ID_NOTE_STRIDE
MDACE_URL = "https://github.com/3mcloud/MDACE"


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    icd_version: int
    target_systems: tuple[str, ...]
    split_prefix: str          # MDace-ev | MDace-code-ev
    with_mimic: bool = False   # the _code dataset: all MIMIC-III admissions too


DATASETS = {
    "mdace_icd9_inpatient": Dataset("mdace_icd9_inpatient", 9,
                                    (codes_lib.ICD9CM, codes_lib.ICD9PCS), "MDace-ev"),
    "mdace_icd9_inpatient_code": Dataset("mdace_icd9_inpatient_code", 9,
                                         (codes_lib.ICD9CM, codes_lib.ICD9PCS), "MDace-code-ev",
                                         with_mimic=True),
    "mdace_icd10_inpatient": Dataset("mdace_icd10_inpatient", 10, (codes_lib.ICD10CM,),
                                     "MDace-ev"),
}
# The reference's fixed ICD-10-CM replacements (make_mdace_icd10_inpatient.py).
ICD10_FIXED = {"F32.A": "F32.9", "S02.122A": "S02.19XA", "D75.839": "D75.89",
               "F10.139": "F10.10", "G90.51": "G90.519"}
CODE_PATTERNS = {
    codes_lib.ICD9CM: re.compile(r"(\d{3}|V\d{2}|E\d{3})(\.\d{1,2})?"),
    codes_lib.ICD9PCS: re.compile(r"\d{2}(\.\d{1,2})?"),
    codes_lib.ICD10CM: re.compile(r"[A-Z]\d[0-9A-Z](\.[0-9A-Z]{1,4})?"),
    codes_lib.ICD10PCS: re.compile(r"[0-9A-HJ-NP-Z]{7}"),
}
OTHER_SYSTEMS = {"cpt"}            # known to MDACE (Profee), never targets here
TRIM_CHARS = set(string.punctuation + "\n\t ")


# ------------------------------------------------------------------------------ files


def annotation_dir(mdace_dir: str, icd_version: int) -> str:
    """The Inpatient/ICD-<v> folder of an MDACE checkout (data/, with_text/gold/ or flat)."""
    sub = os.path.join("Inpatient", f"ICD-{icd_version}")
    candidates = [os.path.join(mdace_dir, p, sub) for p in
                  ("data", os.path.join("with_text", "gold"), "", os.path.join("raw", "MDace"),
                   os.path.join("data", "raw", "MDace"))]
    for folder in candidates:
        if os.path.isdir(folder) and any(f.endswith(".json") for _, _, files in os.walk(folder)
                                         for f in files):
            return folder
    raise PrepError(f"missing annotation files: no *.json under {candidates[0]} (nor "
                    f"{candidates[1]}); --mdace-dir must be a checkout of {MDACE_URL} "
                    f"(data/Inpatient/ICD-{icd_version}/1.0/<hadm_id>-ICD-{icd_version}.json)")


def read_split_ids(split_dir: str, prefix: str) -> pd.DataFrame:
    """MDACE's split files `<prefix>-{train,val,test}.csv`: one hadm_id per line, no header."""
    frames = []
    for split in SPLITS:
        path = os.path.join(split_dir, f"{prefix}-{split}.csv")
        if not os.path.isfile(path):
            raise PrepError(f"missing split file {path}; MDACE's splits are in {MDACE_URL} "
                            f"(splits/Inpatient/{prefix}-{{train,val,test}}.csv); pass the "
                            "folder with --split-dir")
        ids = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                value = line.strip().split(",")[0].strip()
                if not value:
                    continue
                if not value.isdigit():
                    raise PrepError(f"{path}, line {n}: {value!r} is not a hadm_id (expected one "
                                    "integer per line, no header)")
                ids.append(int(value))
        frames.append(pd.DataFrame({"_id": np.asarray(ids, np.int64), "split": split}))
    df = pd.concat(frames, ignore_index=True).drop_duplicates()
    clash = df["_id"].duplicated(keep=False)
    if clash.any():
        raise PrepError(f"{split_dir}: hadm_id {df.loc[clash, '_id'].iloc[0]} is in more than "
                        f"one of the {prefix}-*.csv split files")
    return df


def find_split_dir(mdace_dir: str, split_dir: str | None) -> str:
    if split_dir:
        return split_dir
    for sub in (os.path.join("splits", "Inpatient"), os.path.join("splits", "inpatient"),
                os.path.join("splits", "mdace", "inpatient")):
        if os.path.isdir(os.path.join(mdace_dir, sub)):
            return os.path.join(mdace_dir, sub)
    return os.path.join(mdace_dir, "splits", "Inpatient")


def read_label_space(path: str) -> tuple[list[str], list[str] | None, list[str] | None]:
    """(labels, systems or None, descriptions or None) of a prepared dataset folder or a
    label_space.json file."""
    folder = path if os.path.isdir(path) else None
    file = os.path.join(path, "label_space.json") if folder else path
    if not os.path.isfile(file):
        raise PrepError(f"--label-space {path}: no label_space.json; give a prepared dataset "
                        "folder (e.g. the mimiciii_full output) or its label_space.json")
    try:
        with open(file, encoding="utf-8") as f:
            labels = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PrepError(f"{file}: cannot read the label space ({e})") from e
    if not isinstance(labels, list) or not all(isinstance(c, str) for c in labels):
        raise PrepError(f"{file}: expected a JSON list of code strings")
    systems = descriptions = None
    folder = folder or os.path.dirname(file)
    meta_path = os.path.join(folder, "metadata.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            systems = json.load(f).get("label_systems")
    desc_path = os.path.join(folder, "descriptions.json")
    if os.path.isfile(desc_path):
        with open(desc_path, encoding="utf-8") as f:
            descriptions = json.load(f)
    return labels, systems, descriptions


# ------------------------------------------------------------------------------ codes


def convert_to_older_version(known: set[str], codes: set[str],
                             fixed: dict[str, str] | None = None) -> dict[str, str]:
    """The reference's convert_to_older_icd{9,10}_version: code -> code known to MIMIC."""
    mapping = dict(fixed or {})
    for code in sorted(codes):
        if code in known:
            mapping[code] = code
            continue
        shorter = code[:-1]
        while len(shorter) >= 3:
            if shorter in known:
                mapping[code] = shorter
                break
            shorter = shorter[:-1]
    return mapping


def check_code(a: ev.Annotation, icd_version: int, dropped: Counter) -> str | None:
    """The annotation's code system if it is one of the dataset's ICD version, else None
    (counted). Unknown systems and malformed codes are PrepErrors naming file and record."""
    system = a.system
    if system is None:
        if a.code_system.strip().lower() in OTHER_SYSTEMS:
            dropped[f"annotation_{a.code_system.strip().lower()}"] += 1
            return None
        raise PrepError(f"{a.source}: unknown code_system {a.code_system!r} (code {a.code!r}); "
                        "expected ICD-9-CM, ICD-9-PCS, ICD-10-CM, ICD-10-PCS (or CPT)")
    if not CODE_PATTERNS[system].fullmatch(a.label_code):
        raise PrepError(f"{a.source}: code {a.code!r} is not a valid {a.code_system} code; fix "
                        "the annotation file (MDACE codes look like 428.0, 38.93, I50.23, "
                        "0DTJ4ZZ)")
    if not system.startswith(f"icd{icd_version}"):
        dropped[f"annotation_other_icd_version_{system}"] += 1
        return None
    return system


# ------------------------------------------------------------------------------ notes


def trim_span(text: str, begin: int, end: int) -> tuple[int, int]:
    """Strip whitespace and punctuation at both ends of [begin, end) (kept if all of it is)."""
    b, e = begin, end
    while b < e and text[b] in TRIM_CHARS:
        b += 1
    while e > b and text[e - 1] in TRIM_CHARS:
        e -= 1
    return (b, e) if e > b else (begin, end)


@dataclasses.dataclass
class Document:
    hadm_id: int
    note_id: int
    subject_id: int
    category: str
    text: str
    codes: list[tuple[str, str]]           # (code, system), sorted, distinct
    annotations: list[ev.Annotation]       # trimmed, codes mapped (label form)


def build_documents(args: argparse.Namespace, dataset: Dataset,
                    annotations: dict[int, list[ev.Annotation]], notes: pd.DataFrame,
                    known: dict[str, set[str]], dropped: Counter,
                    mapped: dict[str, dict[str, str]]) -> list[Document]:
    """One Document per annotated note with at least one target code."""
    by_row = notes.drop_duplicates("row_id").set_index("row_id")
    categories = None if args.note_categories == ["all"] else set(args.note_categories)
    per_note: dict[tuple[int, int], list[tuple[ev.Annotation, str]]] = defaultdict(list)
    for hadm_id, anns in sorted(annotations.items()):
        for a in anns:
            system = check_code(a, dataset.icd_version, dropped)
            if a.kind != "evidence":
                dropped["annotation_not_evidence"] += 1
                continue
            note_id = int(a.note_id)
            if note_id not in by_row.index:
                raise PrepError(f"{a.source}: note_id {note_id} (hadm_id {hadm_id}) is not in "
                                "NOTEEVENTS (ROW_ID); MDACE needs MIMIC-III v1.4's "
                                "NOTEEVENTS.csv.gz")
            row = by_row.loc[note_id]
            if pd.notna(row["hadm_id"]) and int(row["hadm_id"]) != hadm_id:
                raise PrepError(f"{a.source}: note_id {note_id} belongs to hadm_id "
                                f"{int(row['hadm_id'])} in NOTEEVENTS, not {hadm_id}")
            if system is None:
                continue
            per_note[(hadm_id, note_id)].append((a, system))
    for system, codes in known.items():           # the version mapping, per code system
        ours = {a.label_code for anns in per_note.values() for a, s in anns if s == system}
        fixed = ICD10_FIXED if system == codes_lib.ICD10CM else None
        mapped[system] = convert_to_older_version(codes, ours, fixed) if codes or fixed else {}
    docs = []
    for (hadm_id, note_id), anns in sorted(per_note.items()):
        row = by_row.loc[note_id]
        if categories is not None and row["category"] not in categories:
            dropped["note_category_not_selected"] += 1
            continue
        text = row["text"]
        try:
            ev.check_against_texts([a for a, _ in anns], {str(note_id): text})
        except ev.EvidenceError as e:
            raise PrepError(str(e)) from e
        kept, codes = [], set()
        for a, system in anns:
            if system not in dataset.target_systems:
                dropped[f"annotation_not_target_{system}"] += 1
                continue
            code = mapped.get(system, {}).get(a.label_code, a.label_code)
            if code != a.label_code:
                dropped["annotation_code_mapped_to_older_version"] += 1
            begin, end = trim_span(text, a.begin, a.end) if args.trim else (a.begin, a.end)
            kept.append(dataclasses.replace(
                a, code=code, begin=begin, end=end, covered_text=None,
                description=a.description if code == a.label_code else None))
            codes.add((code, system))
        if not codes:
            dropped["note_without_target_codes"] += 1
            continue
        subject = row["subject_id"]
        docs.append(Document(hadm_id, note_id, int(subject) if pd.notna(subject) else -1,
                             row["category"], text, sorted(codes), kept))
    return docs


def document_ids(docs: Sequence[Document]) -> list[int]:
    """_id per document: hadm_id + k * STRIDE, k = rank among its admission's documents
    (discharge summaries first, then by note_id)."""
    ranks: dict[int, list[Document]] = defaultdict(list)
    for d in docs:
        ranks[d.hadm_id].append(d)
    out = {}
    for hadm_id, group in ranks.items():
        group.sort(key=lambda d: (d.category != mimiciii.DISCHARGE_CATEGORY, d.note_id))
        if not 0 <= hadm_id < STRIDE or (len(group) - 1) * STRIDE + hadm_id >= 2 ** 31:
            raise PrepError(f"hadm_id {hadm_id} with {len(group)} notes: document ids "
                            f"hadm_id + k * {STRIDE} would not fit in int32")
        for k, d in enumerate(group):
            out[id(d)] = hadm_id + k * STRIDE
    return [out[id(d)] for d in docs]


# ------------------------------------------------------------------------------ recipe


def _infer_system(code: str, icd_version: int) -> str:
    if icd_version == 9:
        return codes_lib.ICD9PCS if re.match(r"^\d{2}(\.|$)", code) else codes_lib.ICD9CM
    return codes_lib.ICD10PCS if CODE_PATTERNS[codes_lib.ICD10PCS].fullmatch(code) \
        else codes_lib.ICD10CM


def known_codes(args: argparse.Namespace, dataset: Dataset, files: mimiciii.MimicIIIFiles,
                dropped: Counter) -> tuple[dict[str, set[str]], pd.DataFrame, pd.DataFrame]:
    """Codes known to MIMIC per system (for the version mapping) and MIMIC-III's code frames."""
    diag = mimiciii.load_codes(files.diagnoses, "diagnosis", dropped)
    proc = mimiciii.load_codes(files.procedures, "procedure", dropped)
    if args.mimiciv_dir:
        mfiles = mimiciv.find_files(args.mimiciv_dir)
        d4 = mimiciv.load_codes(mfiles.diagnoses, "diagnosis", Counter())
        p4 = mimiciv.load_codes(mfiles.procedures, "procedure", Counter())
        both = pd.concat([d4, p4])
        known = {s: set(both.loc[both["system"] == s, "code"]) for s in dataset.target_systems}
    elif dataset.icd_version == 9:
        known = {codes_lib.ICD9CM: set(diag["code"]), codes_lib.ICD9PCS: set(proc["code"])}
    else:
        log.warning("ICD-10 annotations are mapped to older codes only with --mimiciv-dir (the "
                    "reference uses MIMIC-IV's ICD-10 codes); without it only the fixed table "
                    "is applied")
        known = {codes_lib.ICD10CM: set()}
    return known, diag, proc


@dataclasses.dataclass
class Selection:
    documents: pd.DataFrame      # _id, hadm_id, note_id (-1: MIMIC-III admission), split, row
    texts: list[str]             # by row
    annotations: list[list[ev.Annotation]]   # by row
    labels: list[str]
    systems: list[str]
    targets: dict[int, np.ndarray]           # _id -> label ids
    mapped: dict[str, dict[str, str]]


def select(args: argparse.Namespace, dataset: Dataset, dropped: Counter) -> Selection:
    ann_dir = annotation_dir(args.mdace_dir, dataset.icd_version)
    try:
        annotations = ev.load_annotations(ann_dir)
    except ev.EvidenceError as e:
        raise PrepError(str(e)) from e
    log.info("%d MDACE admissions under %s", len(annotations), ann_dir)
    split_table = read_split_ids(find_split_dir(args.mdace_dir, args.split_dir),
                                 dataset.split_prefix)
    files = mimiciii.find_files(args.mimic_dir)
    known, diag, proc = known_codes(args, dataset, files, dropped)
    note_ids = np.array(sorted({int(a.note_id) for anns in annotations.values() for a in anns
                                if str(a.note_id).isdigit()}), np.int64)
    bad = [a for anns in annotations.values() for a in anns if not str(a.note_id).isdigit()]
    if bad:
        raise PrepError(f"{bad[0].source}: note_id {bad[0].note_id!r} is not a NOTEEVENTS "
                        "ROW_ID (an integer)")
    notes = mimiciii.read_notes(files.notes, dropped,
                                categories=(mimiciii.DISCHARGE_CATEGORY,) if dataset.with_mimic
                                else (), row_ids=note_ids)
    mapped: dict[str, dict[str, str]] = {}
    docs = build_documents(args, dataset, annotations, notes, known, dropped, mapped)
    rows: list[dict[str, Any]] = []
    texts: list[str] = []
    anns: list[list[ev.Annotation]] = []
    codes: list[list[tuple[str, str]]] = []
    for d, _id in zip(docs, document_ids(docs)):
        rows.append({"_id": _id, "hadm_id": d.hadm_id, "note_id": d.note_id,
                     "subject_id": d.subject_id})
        texts.append(d.text)
        anns.append(d.annotations)
        codes.append(d.codes)
    if dataset.with_mimic:              # all other MIMIC-III admissions, without evidence
        joined = mimiciii.join_discharge_notes(notes, dropped)
        mdace_ids = set(annotations)
        for r in joined.itertuples(index=False):
            if r.hadm_id in mdace_ids:
                continue
            rows.append({"_id": r.hadm_id, "hadm_id": r.hadm_id, "note_id": -1,
                         "subject_id": r.subject_id})
            texts.append(r.text)
            anns.append([])
            codes.append([])
        both = pd.concat([diag, proc])
        both = both[~both["hadm_id"].isin(mdace_ids)]
        per_hadm = {h: list(zip(g["code"], g["system"])) for h, g in both.groupby("hadm_id")}
        for i, r in enumerate(rows):
            if r["note_id"] == -1:
                codes[i] = sorted(set(per_hadm.get(r["hadm_id"], [])))
    documents = pd.DataFrame(rows, columns=["_id", "hadm_id", "note_id", "subject_id"])
    documents["row"] = np.arange(len(documents))
    documents["n_codes"] = [len(c) for c in codes]
    no_codes = documents["n_codes"] == 0
    dropped["admission_without_codes"] += int(no_codes.sum())
    documents = documents[~no_codes]
    merged = documents.merge(split_table, left_on="hadm_id", right_on="_id", how="inner",
                             suffixes=("", "_split")).drop(columns="_id_split")
    dropped["document_not_in_split"] += len(documents) - len(merged)
    if not len(merged):
        raise PrepError(f"no MDACE document is in the {dataset.split_prefix}-*.csv splits; "
                        "check that --split-dir holds MDACE's Inpatient split files")
    documents = merged.sort_values(["split", "_id"], ignore_index=True)

    # label space: given (--label-space) or every target code of the split-joined documents
    if args.label_space:
        labels, systems, _ = read_label_space(args.label_space)
        systems = systems or [_infer_system(c, dataset.icd_version) for c in labels]
    else:
        pairs = {p for r in documents["row"] for p in codes[r]}
        ordered = sorted(pairs)
        labels, systems = [c for c, _ in ordered], [s for _, s in ordered]
        if len(set(labels)) != len(labels):
            raise PrepError("a code belongs to two code systems after formatting")
    index = {c: i for i, c in enumerate(labels)}
    targets: dict[int, np.ndarray] = {}
    keep = []
    for r in documents.to_dict("records"):
        ids = []
        for code, _ in codes[r["row"]]:
            if code in index:
                ids.append(index[code])
                continue
            dropped["code_not_in_label_space"] += 1
            if args.unknown_codes == "error":
                where = next((a.source for a in anns[r["row"]] if a.code == code),
                             f"hadm_id {r['hadm_id']}")
                raise PrepError(f"{where}: code {code!r} is not in the label space "
                                f"{args.label_space}; use --unknown-codes drop to drop such "
                                "codes as the reference does")
        keep.append(bool(ids))
        targets[r["_id"]] = np.unique(np.asarray(ids, np.int32))
    dropped["empty_target"] += keep.count(False)
    documents = documents[np.asarray(keep, bool)].reset_index(drop=True)
    if not len(documents):
        raise PrepError("no document is left: none of the target codes is in the label space")
    return Selection(documents, texts, anns, labels, systems, targets, mapped)


def iter_examples(sel: Selection, part: pd.DataFrame, tokenizer, max_length: int,
                  batch_size: int, stats: ev.EvidenceStats) -> Iterator[dict[str, Any]]:
    """Examples of one split with their evidence fields (data_prep.evidence)."""
    index = {c: i for i, c in enumerate(sel.labels)}
    records = part.to_dict("records")
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        encodings = ev.encode(tokenizer, [sel.texts[r["row"]] for r in batch], max_length)
        for r, enc in zip(batch, encodings):
            anns = [a for a in sel.annotations[r["row"]] if a.code in index]
            fields = (ev.evidence_fields(enc, anns, index, targets=sel.targets[r["_id"]],
                                         stats=stats) if anns else ev.empty_fields())
            yield {"_id": np.int64(r["_id"]), "input_ids": enc.input_ids,
                   "length": np.int32(len(enc.input_ids)),
                   "label_ids": sel.targets[r["_id"]], **fields}


def load_descriptions(args: argparse.Namespace, dataset: Dataset, sel: Selection) -> list[str]:
    """From the --label-space dataset, else MIMIC-III's D_ICD_* (ICD-9) / MIMIC-IV's d_icd_*
    (ICD-10 with --mimiciv-dir), else MDACE's own annotation descriptions."""
    if args.label_space:
        _, _, descriptions = read_label_space(args.label_space)
        if descriptions is not None and len(descriptions) == len(sel.labels):
            return descriptions
    if dataset.icd_version == 9:
        return mimiciii.load_descriptions(mimiciii.find_files(args.mimic_dir), sel.labels,
                                          sel.systems)
    if args.mimiciv_dir:
        return mimiciv.load_descriptions(mimiciv.find_files(args.mimiciv_dir), sel.labels,
                                         sel.systems, trailing_dot=False)
    own = {}
    for anns in sel.annotations:
        for a in anns:
            if a.description:
                own.setdefault(a.code, a.description)
    return [own.get(c, "") for c in sel.labels]


def prepare(args: argparse.Namespace) -> None:
    from data_prep import shards

    if os.path.exists(args.out) and not args.overwrite:
        raise PrepError(f"--out {args.out} already exists; delete it or pass --overwrite")
    dataset = DATASETS[args.dataset]
    tokenizer, tokenizer_dir = mimiciv.load_tokenizer(args.tokenizer)
    dropped: Counter = Counter()
    sel = select(args, dataset, dropped)
    descriptions = load_descriptions(args, dataset, sel)
    description_ids, description_mask = mimiciv.tokenize_descriptions(tokenizer, descriptions)
    stats = ev.EvidenceStats()
    counts: dict[str, dict[str, Any]] = {}
    split_examples = {}
    for split in SPLITS:
        part = sel.documents[sel.documents["split"] == split]
        counts[split] = {"documents": len(part),
                         "codes": mimiciii.code_counts(part, sel.targets, sel.systems,
                                                       key="_id"),
                         "documents_with_evidence": int((part["note_id"] >= 0).sum())}
        split_examples[split] = iter_examples(sel, part, tokenizer, args.max_length,
                                              args.batch_size, stats)
        log.info("%s: %d documents (%d annotated notes)", split, len(part),
                 counts[split]["documents_with_evidence"])
    train = sel.documents.loc[sel.documents["split"] == "train", "_id"].tolist()
    train_counts = np.bincount(np.concatenate([sel.targets[i] for i in train] or [[]])
                               .astype(np.int64), minlength=len(sel.labels))
    annotated = sel.documents[sel.documents["note_id"] >= 0]
    metadata = {
        "format_version": 1, "name": args.name or args.dataset, "dataset": args.dataset,
        "recipe": "emnlp2024", "compat": None, "evidence": True,
        "document_ids": f"_id = hadm_id + k * {STRIDE} for the k-th annotated note of an "
                        "admission (discharge summaries first, then by note_id); MIMIC-III "
                        "admissions without annotations: _id = hadm_id",
        "note_ids": {str(int(i)): int(n) for i, n in zip(annotated["_id"], annotated["note_id"])},
        "icd_version": dataset.icd_version, "max_length": args.max_length,
        "num_labels": len(sel.labels), "label_systems": sel.systems,
        "train_label_counts": train_counts.tolist(),
        "tokenizer": shards.tokenizer_identity(tokenizer_dir),
        "counts": counts, "dropped": {k: int(v) for k, v in sorted(dropped.items())},
        "code_mapping": {s: {k: v for k, v in sorted(m.items()) if k != v}
                         for s, m in sorted(sel.mapped.items())},
        "prep_config": vars(args), "split_source": f"file:{dataset.split_prefix}-*.csv",
        "mimic_version": "mimiciii-1.4",
    }

    shards.write_dataset(args.out, split_examples=split_examples, metadata=metadata,
                         label_space=sel.labels, descriptions=descriptions,
                         description_ids=description_ids, description_mask=description_mask,
                         tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
                         late_metadata=lambda: {"evidence_counts": stats.as_dict()})
    log.info("evidence: %s", stats.as_dict())
    log.info("dropped: %s", dict(sorted(dropped.items())))
    log.info("wrote %s", args.out)


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.mdace",
                                description=__doc__.split("\n")[0])
    p.add_argument("--mimic-dir", required=True,
                   help="MIMIC-III v1.4 folder (NOTEEVENTS.csv.gz, DIAGNOSES_ICD.csv.gz, ...)")
    p.add_argument("--mdace-dir", required=True,
                   help=f"checkout of {MDACE_URL} (data/Inpatient/ICD-9/1.0/*.json, splits/)")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--out", required=True, help="output dataset folder (written atomically)")
    p.add_argument("--tokenizer", required=True,
                   help="local HF fast tokenizer folder, or demo:minilm")
    p.add_argument("--split-dir", default=None,
                   help="folder with MDace-ev-*.csv / MDace-code-ev-*.csv (default: "
                        "<mdace-dir>/splits/Inpatient)")
    p.add_argument("--label-space", default=None,
                   help="prepared dataset folder (or its label_space.json) whose label space "
                        "to use, e.g. the mimiciii_full output the evaluated model was trained "
                        "on (default: every target code of the documents)")
    p.add_argument("--unknown-codes", choices=("drop", "error"), default="drop",
                   help="target codes outside --label-space: drop them, as the reference does "
                        "(default), or stop with an error naming the file and record")
    p.add_argument("--mimiciv-dir", default=None,
                   help="MIMIC-IV root: map annotation codes to MIMIC-IV's codes, as the "
                        "reference does for mdace_icd9_inpatient / mdace_icd10_inpatient "
                        "(default: MIMIC-III's codes)")
    p.add_argument("--note-categories", nargs="+", default=["all"],
                   help='annotated note categories to keep (default: all, as the reference\'s '
                        'datasets; its evaluation uses "Discharge summary")')
    p.add_argument("--no-trim", dest="trim", action="store_false",
                   help="keep spans as annotated (default: strip whitespace/punctuation at the "
                        "ends, like the reference's trim_annotations)")
    p.add_argument("--max-length", type=int, default=6000, help="max tokens per document")
    p.add_argument("--batch-size", type=int, default=64, help="documents per tokeniser call")
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
