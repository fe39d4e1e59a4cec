"""ICD code systems, code formatting (data.md §2 table) and code description tables.

MIMIC-IV stores ICD codes without dots. Codes are formatted per code system so that ICD-9-CM
`3893` (a diagnosis) and ICD-9 procedure `3893` become the distinct labels `389.3` and `38.93`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

ICD9CM = "icd9cm"
ICD9PCS = "icd9pcs"
ICD10CM = "icd10cm"
ICD10PCS = "icd10pcs"
SYSTEMS: tuple[str, ...] = (ICD9CM, ICD9PCS, ICD10CM, ICD10PCS)

Kind = Literal["diagnosis", "procedure"]
KINDS: tuple[Kind, ...] = ("diagnosis", "procedure")

_SYSTEM_BY_VERSION_KIND: dict[tuple[int, str], str] = {
    (9, "diagnosis"): ICD9CM,
    (9, "procedure"): ICD9PCS,
    (10, "diagnosis"): ICD10CM,
    (10, "procedure"): ICD10PCS,
}

_NUMERIC_WITH_DOT = re.compile(r"^\d+\.\d*$")


def code_system(icd_version: int, kind: str) -> str:
    """The code system of MIMIC's (`icd_version`, diagnoses|procedures table) pair."""
    try:
        return _SYSTEM_BY_VERSION_KIND[(int(icd_version), kind)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"no ICD code system for icd_version={icd_version!r}, kind={kind!r}; "
            "icd_version must be 9 or 10 and kind 'diagnosis' or 'procedure'") from None


def systems_for_version(icd_version: int) -> tuple[str, str]:
    """(diagnosis system, procedure system) of an ICD version (9 or 10)."""
    return code_system(icd_version, "diagnosis"), code_system(icd_version, "procedure")


def format_code(code: str, system: str, *, trailing_dot: bool = False) -> str:
    """Insert the dot MIMIC leaves out, per the data.md table.

    ICD-9-CM: `E` codes get a dot after 4 characters if longer than 4, others after 3 if
    longer than 3; ICD-9 procedures after 2 if longer than 2; ICD-10-CM after 3 if longer than
    3; ICD-10-PCS is unchanged. A code that already contains a dot is left alone.
    `trailing_dot` (SIGIR 2023 recipe) gives 3-character ICD-10-CM codes a trailing dot
    (`I10` -> `I10.`).
    """
    if system not in SYSTEMS:
        raise ValueError(f"unknown code system {system!r}; expected one of {SYSTEMS}")
    if "." in code:
        return code
    if system == ICD9CM:
        cut = 4 if code.startswith("E") else 3
    elif system == ICD9PCS:
        cut = 2
    elif system == ICD10CM:
        if trailing_dot and len(code) == 3:
            return code + "."
        cut = 3
    else:
        return code
    return code[:cut] + "." + code[cut:] if len(code) > cut else code


def numeric_artifacts(codes: Iterable[str], system: str) -> list[str]:
    """Codes that look like a number parser mangled them (returned sorted, unique).

    Two signatures: a float rendering such as `4019.0` or `42.0` (digits with a dot where the
    formatting rule would not put one), and, for ICD-9, lost leading zeros: an all-digit ICD-9-CM
    code shorter than 3 characters (`042` read as the integer 42) or ICD-9 procedure code shorter
    than 2. Genuine codes never match either signature.
    """
    min_digits = {ICD9CM: 3, ICD9PCS: 2}.get(system, 0)
    bad = set()
    for code in codes:
        if _NUMERIC_WITH_DOT.match(code):
            if format_code(code.replace(".", ""), system) != code:
                bad.add(code)
        elif code.isdigit() and len(code) < min_digits:
            bad.add(code)
    return sorted(bad)


def description_maps(codes: Iterable[str | None], versions: Iterable[int | None],
                     titles: Iterable[str | None], kind: Kind, *,
                     trailing_dot: bool = False) -> dict[str, dict[str, str]]:
    """Per code system, formatted code -> description, from the columns (`icd_code`,
    `icd_version`, `long_title`) of a `d_icd_diagnoses` / `d_icd_procedures` table.

    Systems are kept apart: ICD-9 `V053` and ICD-10-CM `V053` both format to `V05.3`.
    """
    out: dict[str, dict[str, str]] = {}
    for code, version, title in zip(codes, versions, titles):
        if code is None or version is None:
            continue
        system = code_system(int(version), kind)
        key = format_code(str(code).strip(), system, trailing_dot=trailing_dot)
        out.setdefault(system, {})[key] = "" if title is None else str(title)
    return out


def describe_labels(label_space: list[str], label_systems: list[str],
                    maps: Mapping[str, Mapping[str, str]]) -> tuple[list[str], int]:
    """Descriptions in label order ("" where unknown) and the number of unknown labels.

    `maps` maps a code system to its formatted-code -> description table.
    """
    out = []
    unknown = 0
    for code, system in zip(label_space, label_systems):
        text = maps.get(system, {}).get(code, "")
        unknown += text == ""
        out.append(text)
    return out, unknown
