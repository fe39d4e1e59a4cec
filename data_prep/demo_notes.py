"""Write a few notes of the synthetic demo corpus as text files (one note per file), for
`--mode=predict` / `--mode=explain` on raw text: ``python -m data_prep.demo_notes``.

    python -m data_prep.demo_notes --raw data/demo/raw --split test --count 3 --out data/demo/notes

Files are named ``<hadm_id>.txt``; the notes of `--split` (from the ICD-10 split file) are taken
in split-file order. Only for the synthetic demo corpus: MIMIC notes never belong in loose text
files in a project folder.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow.feather as feather

from data_prep.demo_corpus import SPLIT_FILES, SUMMARY_FILE


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.demo_notes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default="data/demo/raw", help="output folder of data_prep.demo_corpus")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--count", type=int, default=3, help="notes to write")
    p.add_argument("--out", default="data/demo/notes", help="folder for the .txt files")
    args = p.parse_args(argv)
    raw = Path(args.raw)
    if not (raw / SUMMARY_FILE).is_file():
        return _fail(f"--raw {raw} is not a demo corpus (no {SUMMARY_FILE}); run "
                     "`python -m data_prep.demo_corpus --out {raw}` (or `make demo-data`) first")
    notes = sorted(raw.glob("mimic-iv-note/*/note/discharge.csv.gz"))
    if not notes:
        return _fail(f"{raw}: no mimic-iv-note/<version>/note/discharge.csv.gz")
    split = feather.read_table(raw / SPLIT_FILES[10]).to_pandas()
    wanted = split.loc[split["split"] == args.split, "_id"].astype(int).tolist()[:args.count]
    if not wanted:
        return _fail(f"{raw / SPLIT_FILES[10]} has no {args.split!r} admissions")
    texts: dict[int, str] = {}
    csv.field_size_limit(sys.maxsize)
    with gzip.open(notes[-1], "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            hadm = int(row["hadm_id"])
            if hadm in wanted and hadm not in texts and row["text"].strip():
                texts[hadm] = row["text"]
    os.makedirs(args.out, exist_ok=True)
    for hadm in wanted:
        if hadm not in texts:
            continue
        fd, tmp = tempfile.mkstemp(dir=args.out, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(texts[hadm])
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(args.out, f"{hadm}.txt"))
    print(f"wrote {len(texts)} notes of the {args.split} split to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
