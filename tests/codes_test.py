"""Tests for data_prep.codes: the data.md formatting table, code systems, descriptions."""
import pytest

from data_prep import codes


@pytest.mark.parametrize("code,system,expected", [
    ("4019", "icd9cm", "401.9"),
    ("V053", "icd9cm", "V05.3"),
    ("E8889", "icd9cm", "E888.9"),
    ("042", "icd9cm", "042"),
    ("E888", "icd9cm", "E888"),       # E code of 4 characters: no dot
    ("0389", "icd9cm", "038.9"),      # leading zero kept
    ("3893", "icd9pcs", "38.93"),
    ("38", "icd9pcs", "38"),
    ("I5023", "icd10cm", "I50.23"),
    ("I10", "icd10cm", "I10"),
    ("0DTJ4ZZ", "icd10pcs", "0DTJ4ZZ"),
    ("401.9", "icd9cm", "401.9"),      # already dotted: left alone
    ("38.93", "icd9pcs", "38.93"),
    ("I50.23", "icd10cm", "I50.23"),
])
def test_format_code_table(code, system, expected):
    assert codes.format_code(code, system) == expected


def test_trailing_dot_only_for_three_character_icd10cm():
    assert codes.format_code("I10", "icd10cm", trailing_dot=True) == "I10."
    assert codes.format_code("I5023", "icd10cm", trailing_dot=True) == "I50.23"
    assert codes.format_code("042", "icd9cm", trailing_dot=True) == "042"
    assert codes.format_code("0DTJ4ZZ", "icd10pcs", trailing_dot=True) == "0DTJ4ZZ"


def test_format_code_unknown_system():
    with pytest.raises(ValueError, match="icd11"):
        codes.format_code("I10", "icd11")


def test_code_systems():
    assert codes.code_system(9, "diagnosis") == "icd9cm"
    assert codes.code_system(9, "procedure") == "icd9pcs"
    assert codes.code_system(10, "diagnosis") == "icd10cm"
    assert codes.code_system(10, "procedure") == "icd10pcs"
    assert codes.systems_for_version(10) == ("icd10cm", "icd10pcs")
    with pytest.raises(ValueError, match="icd_version=11"):
        codes.code_system(11, "diagnosis")


def test_numeric_artifacts():
    assert codes.numeric_artifacts(["4019.0", "42", "0389", "V053", "401.9"], "icd9cm") == [
        "4019.0", "42"]
    assert codes.numeric_artifacts(["3893.0", "3893", "38.93", "5"], "icd9pcs") == ["3893.0", "5"]
    assert codes.numeric_artifacts(["I10", "0DTJ4ZZ"], "icd10cm") == []
    assert codes.numeric_artifacts(["2100939.0"], "icd10pcs") == ["2100939.0"]


def test_descriptions_keep_systems_apart():
    maps = codes.description_maps(["V053", "V053", "I10"], [9, 10, 10],
                                  ["need vaccination", "pedal cyclist", "hypertension"],
                                  "diagnosis", trailing_dot=True)
    assert maps == {"icd9cm": {"V05.3": "need vaccination"},
                    "icd10cm": {"V05.3": "pedal cyclist", "I10.": "hypertension"}}
    texts, unknown = codes.describe_labels(["I10.", "V05.3", "Z99.9"],
                                           ["icd10cm", "icd9cm", "icd10cm"], maps)
    assert texts == ["hypertension", "need vaccination", ""]
    assert unknown == 1
