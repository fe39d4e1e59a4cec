"""Evidence annotations (MDACE layout): read, validate, map character spans to token positions.

API (stable; `data_prep.mimiciv`, `data_prep.mimiciii`, `data_prep.mdace` import it)::

    Annotation                      frozen dataclass: hadm_id, note_id, begin, end, code (as in
                                    the file), code_system (as in the file), kind ("evidence" |
                                    "distractor"), subtype, covered_text, description, type,
                                    source ("<file>: notes[i].annotations[j]"); .label_code
                                    (the code formatted like a label: dotted, data.md table)
    load_annotations(path, *, label_space=None) -> dict[int, list[Annotation]]
        path: a folder of MDACE files (``**/*.json``, one admission per file), one ``.json``
        file, or a JSON-lines file (``.jsonl`` / ``.jsonl.gz``, one admission record per line).
        Validates every record (``validate``); raises EvidenceError naming file + record + fix.
    validate(record, source, *, label_space=None, texts=None) -> list[Annotation]
        one admission record (dict); ``texts`` (note_id -> text) also checks that spans lie
        inside the note and that ``covered_text`` equals ``text[begin:end]``.
    check_against_texts(annotations, texts) -> None   # the ``texts`` part of validate
    encode(tokenizer, texts, max_length) -> list[Encoding]
        batched fast tokenisation (special tokens on, truncated) with offsets; Encoding has
        input_ids int32 [n], offsets int64 [n, 2], special int8 [n], truncated bool
    char_spans_to_token_positions(offsets, spans, *, special=None, truncated=False)
        -> (list[np.ndarray] positions per span, list[str] status per span)
        status: "mapped" | "partly_truncated" | "truncated" | "no_tokens"
    evidence_fields(encoding, annotations, label_index, *, stats=None) -> dict
        the per-example fields: evidence_label_ids int32 [k], evidence_positions int32 [k],
        evidence_kinds int8 [k] (KIND_IDS: 0 evidence, 1 distractor), sorted, no duplicates;
        distractors whose code is not a label get label id -1.
    example_evidence(text, annotations, tokenizer, max_length, label_index, *, stats=None)
        -> (input_ids int32 [n], fields): ``encode`` + ``evidence_fields`` for one text
    EvidenceStats: counters (``as_dict()`` goes into metadata.json ``evidence_counts``)

Spans are half-open ``[begin, end)`` character offsets into the text that is tokenised. A
token belongs to a span when its character range overlaps it; special tokens ([CLS], [SEP],
<s>, </s>) never do; spans (or parts of spans) beyond ``max_length`` are dropped and counted.

Record schema (MDACE; EXPLAIN.md §3)::

    {"hadm_id": int, "notes": [{"note_id", "category", "description",
      "annotations": [{"begin": int, "end": int, "code": str, "code_system": str,
                       "description", "type", "covered_text", "kind"?, "subtype"?}]}]}

``kind`` is optional ("evidence" by default; "distractor": a mention that must not be coded,
e.g. the demo corpus's negated / ruled-out / family-history mentions, ``subtype`` says which).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import codes as codes_lib

KINDS = ("evidence", "distractor")
KIND_IDS = {"evidence": 0, "distractor": 1}
# MDACE's code_system names (and ours) -> our code systems.
_SYSTEM_NAMES = {
    "icd-9-cm": codes_lib.ICD9CM, "icd9cm": codes_lib.ICD9CM, "icd-9": codes_lib.ICD9CM,
    "icd-9-pcs": codes_lib.ICD9PCS, "icd9pcs": codes_lib.ICD9PCS,
    "icd-10-cm": codes_lib.ICD10CM, "icd10cm": codes_lib.ICD10CM, "icd-10": codes_lib.ICD10CM,
    "icd-10-pcs": codes_lib.ICD10PCS, "icd10pcs": codes_lib.ICD10PCS,
}
_ANNOTATION_KEYS = ("begin", "end", "code", "code_system")


class EvidenceError(ValueError):
    """Bad evidence input: the message names the file, the record and the fix."""


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotated span of one note."""
    hadm_id: int
    note_id: str
    begin: int
    end: int
    code: str
    code_system: str
    kind: str = "evidence"
    subtype: str | None = None
    covered_text: str | None = None
    description: str | None = None
    type: str | None = None
    source: str = ""

    @property
    def system(self) -> str | None:
        """Our code system name (icd9cm, icd9pcs, icd10cm, icd10pcs) or None (e.g. CPT)."""
        return normalise_system(self.code_system)

    @property
    def label_code(self) -> str:
        """The code as a label string (dotted per the data.md table; unknown systems as is)."""
        system = self.system
        code = self.code.strip()
        return codes_lib.format_code(code, system) if system else code


def normalise_system(name: str) -> str | None:
    return _SYSTEM_NAMES.get(str(name).strip().lower())


# --------------------------------------------------------------------------- reading


def _records(path: Path) -> Iterator[tuple[dict, str]]:
    """(record, source) for every admission record under ``path``."""
    if path.is_dir():
        files = sorted(path.glob("**/*.json")) + sorted(path.glob("**/*.jsonl")) + \
            sorted(path.glob("**/*.jsonl.gz"))
        if not files:
            raise EvidenceError(f"{path}: no *.json / *.jsonl files found; --evidence must be a "
                                "folder of MDACE files (one <hadm_id>.json per admission) or a "
                                "JSON-lines file")
        for f in files:
            yield from _records(f)
        return
    if not path.is_file():
        raise EvidenceError(f"evidence file {path} does not exist; give a folder of MDACE JSON "
                            "files, one .json file or a .jsonl file")
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvidenceError(f"{path}: line {lineno}: not valid JSON ({e}); each line "
                                        "must be one admission record") from e
                yield record, f"{path}: line {lineno}"
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvidenceError(f"{path}: not valid JSON ({e}); expected one MDACE admission "
                            "record {\"hadm_id\", \"notes\": [...]}") from e
    yield record, str(path)


def load_annotations(path: str | os.PathLike, *, label_space: Sequence[str] | None = None
                     ) -> dict[int, list[Annotation]]:
    """All annotations under ``path`` (see the module docstring), validated, by hadm_id.

    With ``label_space``, an evidence annotation whose code is not a label is an error."""
    out: dict[int, list[Annotation]] = {}
    seen: dict[int, str] = {}
    for record, source in _records(Path(path)):
        annotations = validate(record, source, label_space=label_space)
        hadm_id = int(record["hadm_id"])
        if hadm_id in seen:
            raise EvidenceError(f"{source}: hadm_id {hadm_id} was already read from "
                                f"{seen[hadm_id]}; give each admission one record")
        seen[hadm_id] = source
        out[hadm_id] = annotations
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(record: Any, source: str, *, label_space: Sequence[str] | None = None,
             texts: Mapping[str, str] | None = None) -> list[Annotation]:
    """Check one admission record; return its annotations (raises EvidenceError)."""
    if not isinstance(record, dict):
        raise EvidenceError(f"{source}: expected a JSON object {{\"hadm_id\", \"notes\"}}, got "
                            f"{type(record).__name__}")
    missing = [k for k in ("hadm_id", "notes") if k not in record]
    if missing:
        raise EvidenceError(f"{source}: missing key(s) {missing}; an MDACE admission record has "
                            "hadm_id (int) and notes (list)")
    hadm = record["hadm_id"]
    if isinstance(hadm, str) and hadm.strip().isdigit():
        hadm = int(hadm)
    if not _is_int(hadm):
        raise EvidenceError(f"{source}: hadm_id {record['hadm_id']!r} is not an integer")
    if not isinstance(record["notes"], list):
        raise EvidenceError(f"{source}: notes must be a list of notes")
    labels = set(label_space) if label_space is not None else None
    out: list[Annotation] = []
    for i, note in enumerate(record["notes"]):
        where = f"{source}: notes[{i}]"
        if not isinstance(note, dict) or "note_id" not in note or "annotations" not in note:
            raise EvidenceError(f"{where}: each note needs note_id and annotations (a list)")
        if not isinstance(note["annotations"], list):
            raise EvidenceError(f"{where}: annotations must be a list")
        note_id = str(note["note_id"])
        for j, a in enumerate(note["annotations"]):
            at = f"{where}.annotations[{j}]"
            if not isinstance(a, dict):
                raise EvidenceError(f"{at}: expected an object with keys {list(_ANNOTATION_KEYS)}")
            missing = [k for k in _ANNOTATION_KEYS if k not in a]
            if missing:
                raise EvidenceError(f"{at}: missing key(s) {missing}; every annotation needs "
                                    f"{list(_ANNOTATION_KEYS)}")
            begin, end = a["begin"], a["end"]
            if not (_is_int(begin) and _is_int(end)):
                raise EvidenceError(f"{at}: begin={begin!r}, end={end!r} must be integer "
                                    "character offsets (not strings or floats)")
            if begin < 0 or begin >= end:
                raise EvidenceError(f"{at}: begin={begin} >= end={end} (or negative); spans are "
                                    "half-open [begin, end) with 0 <= begin < end")
            kind = a.get("kind", "evidence")
            if kind not in KINDS:
                raise EvidenceError(f"{at}: kind {kind!r} is not one of {list(KINDS)}")
            if not isinstance(a["code"], str) or not a["code"].strip():
                raise EvidenceError(f"{at}: code {a['code']!r} must be a non-empty string")
            ann = Annotation(
                hadm_id=int(hadm), note_id=note_id, begin=begin, end=end, code=a["code"],
                code_system=str(a["code_system"]), kind=kind, subtype=a.get("subtype"),
                covered_text=a.get("covered_text"), description=a.get("description"),
                type=a.get("type"), source=at)
            if labels is not None and kind == "evidence" and ann.label_code not in labels:
                raise EvidenceError(
                    f"{at}: code {a['code']!r} ({a['code_system']}, label form "
                    f"{ann.label_code!r}) is not in the label space ({len(labels)} codes); "
                    "fix the code or prepare with a label space that contains it")
            out.append(ann)
    if texts is not None:
        check_against_texts(out, texts)
    return out


def check_against_texts(annotations: Iterable[Annotation], texts: Mapping[str, str]) -> None:
    """Spans inside their note's text and ``covered_text == text[begin:end]`` (when given)."""
    for a in annotations:
        if a.note_id not in texts:
            raise EvidenceError(f"{a.source}: note_id {a.note_id!r} of hadm_id {a.hadm_id} is "
                                "not among the notes given; check note_id against the note file")
        text = texts[a.note_id]
        if a.end > len(text):
            raise EvidenceError(f"{a.source}: span [{a.begin}, {a.end}) lies outside note "
                                f"{a.note_id!r} ({len(text)} characters); the offsets must refer "
                                "to the raw note text")
        if a.covered_text is not None and text[a.begin:a.end] != a.covered_text:
            raise EvidenceError(
                f"{a.source}: covered_text {a.covered_text[:40]!r} != the note's text at "
                f"[{a.begin}, {a.end}) {text[a.begin:a.end][:40]!r}; the offsets must refer to "
                "the same version of the note text")


# --------------------------------------------------------------------------- token positions


@dataclasses.dataclass
class Encoding:
    """One tokenised text: ids, character offsets, special-token flags."""
    input_ids: np.ndarray   # int32 [n]
    offsets: np.ndarray     # int64 [n, 2]
    special: np.ndarray     # int8 [n]
    truncated: bool


def encode(tokenizer, texts: list[str], max_length: int) -> list[Encoding]:
    """Batched fast tokenisation with offsets; same ids as ``mimiciv.tokenize``."""
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False,
                    return_offsets_mapping=True, return_special_tokens_mask=True,
                    return_overflowing_tokens=False, return_length=False)
    out = []
    for k in range(len(texts)):
        ids = np.asarray(enc["input_ids"][k], np.int32)
        offsets = np.asarray(enc["offset_mapping"][k], np.int64).reshape(-1, 2)
        special = np.asarray(enc["special_tokens_mask"][k], np.int8)
        # truncated: some content lies after the last kept token (ignoring trailing spaces)
        content = offsets[special == 0]
        last = int(content[:, 1].max()) if len(content) else 0
        truncated = len(ids) >= max_length and bool(texts[k][last:].strip())
        out.append(Encoding(ids, offsets, special, truncated))
    return out


def char_spans_to_token_positions(offsets: np.ndarray, spans: Sequence[tuple[int, int]], *,
                                  special: np.ndarray | None = None, truncated: bool = False
                                  ) -> tuple[list[np.ndarray], list[str]]:
    """Token positions overlapping each half-open character span.

    ``offsets`` [n, 2]: the fast tokenizer's offset_mapping of exactly the tokenised text
    (after truncation); ``special`` [n]: 1 on special tokens (without it, tokens with an empty
    character range count as special; with it, such a non-special token, e.g. byte-level BPE's
    lone space, belongs to a span when its position lies strictly inside the span).
    ``truncated``: the text went on past the last token.
    Returns the positions (int32, sorted) per span and a status per span: "mapped",
    "partly_truncated" (the span runs past the last kept token), "truncated" (it lies wholly
    after it) or "no_tokens" (e.g. whitespace only).
    """
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    wide = ends > starts
    # tokens with an empty range that are not special (byte-level BPE's lone "Ġ" with
    # trimmed offsets): inside a span when their position lies strictly inside it
    point = ~wide & (np.asarray(special) == 0) if special is not None else np.zeros_like(wide)
    if special is not None:
        wide &= np.asarray(special) == 0
    real = wide | point
    last_end = int(ends[real].max()) if real.any() else 0
    positions, status = [], []
    for begin, end in spans:
        hit = np.flatnonzero((wide & (starts < end) & (ends > begin))
                             | (point & (starts > begin) & (starts < end))).astype(np.int32)
        positions.append(hit)
        if truncated and begin >= last_end:
            status.append("truncated")
        elif not hit.size:
            status.append("no_tokens")
        elif truncated and end > last_end:
            status.append("partly_truncated")
        else:
            status.append("mapped")
    return positions, status


class EvidenceStats(Counter):
    """Counters of the evidence mapping (all ints); ``as_dict()`` for metadata.json."""

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items())}


def evidence_fields(encoding: Encoding, annotations: Sequence[Annotation],
                    label_index: Mapping[str, int], *, targets: Iterable[int] | None = None,
                    stats: EvidenceStats | None = None) -> dict[str, np.ndarray]:
    """Per-example evidence triples (label id, token position, kind) of one tokenised note.

    Evidence of a code that is not a label is dropped (counted); distractors keep label -1
    when their code is not a label. ``targets`` (the document's label ids) only counts
    evidence codes that are not among them.
    """
    stats = EvidenceStats() if stats is None else stats
    spans = [(a.begin, a.end) for a in annotations]
    positions, status = char_spans_to_token_positions(
        encoding.offsets, spans, special=encoding.special, truncated=encoding.truncated)
    target_set = set(int(t) for t in targets) if targets is not None else None
    triples: set[tuple[int, int, int]] = set()
    codes_seen: set[int] = set()
    for a, pos, st in zip(annotations, positions, status):
        label = label_index.get(a.label_code, -1)
        stats[f"{a.kind}_spans"] += 1
        if a.kind == "evidence" and label < 0:
            stats["evidence_spans_code_not_in_label_space"] += 1
            continue
        stats[f"{a.kind}_spans_{st}"] += 1
        if not pos.size:
            continue
        stats[f"{a.kind}_tokens"] += int(pos.size)
        if a.kind == "evidence":
            if target_set is not None and label not in target_set:
                stats["evidence_spans_code_not_in_targets"] += 1
            codes_seen.add(label)
        kind = KIND_IDS[a.kind]
        triples.update((label, int(p), kind) for p in pos.tolist())
    stats["evidence_codes"] += len(codes_seen)
    stats["documents_with_evidence"] += int(bool(codes_seen))
    stats["documents_with_distractors"] += int(any(t[2] == 1 for t in triples))
    arr = np.array(sorted(triples, key=lambda t: (t[2], t[0], t[1])), np.int64).reshape(-1, 3)
    return {"evidence_label_ids": arr[:, 0].astype(np.int32),
            "evidence_positions": arr[:, 1].astype(np.int32),
            "evidence_kinds": arr[:, 2].astype(np.int8)}


def empty_fields() -> dict[str, np.ndarray]:
    """The evidence fields of a document without annotations."""
    return {"evidence_label_ids": np.zeros(0, np.int32),
            "evidence_positions": np.zeros(0, np.int32),
            "evidence_kinds": np.zeros(0, np.int8)}


def example_evidence(text: str, annotations: Sequence[Annotation], tokenizer, max_length: int,
                     label_index: Mapping[str, int], *, stats: EvidenceStats | None = None
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Tokenise one text and map its annotations: (input_ids int32 [n], evidence fields)."""
    encoding = encode(tokenizer, [text], max_length)[0]
    return encoding.input_ids, evidence_fields(encoding, annotations, label_index, stats=stats)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Admission records as JSON lines (deterministic: sorted keys, no spaces)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
