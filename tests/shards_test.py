"""Tests of data_prep.shards: the prepared-dataset directory (write, read, refuse, compare)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from data_prep import shards
from utils import tiny_tokenizer_dir

NUM_LABELS = 20
MAX_LENGTH = 1000
LABEL_SPACE = [f"C{i:02d}.{i % 7}" for i in range(NUM_LABELS)]


def synthetic_examples(n: int, seed: int, first_id: int = 1000) -> Iterator[dict]:
    """n examples with random lengths 5..MAX_LENGTH and 1..5 random labels (a generator)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        length = int(rng.integers(5, MAX_LENGTH + 1))
        labels = np.sort(rng.choice(NUM_LABELS, int(rng.integers(1, 6)), replace=False))
        yield {"_id": first_id + i, "input_ids": rng.integers(5, 300, length).astype(np.int32),
               "length": length, "label_ids": labels.astype(np.int32)}


def with_evidence(examples: Iterator[dict], seed: int) -> Iterator[dict]:
    """The examples plus evidence triples: up to 6 codes (mostly targets) with 1-8 token
    positions each, 0-3 distractor tokens (label -1 or a label); every 5th example has none
    (no evidence keys at all)."""
    for i, ex in enumerate(examples):
        if i % 5 == 4:
            yield ex
            continue
        rng = np.random.default_rng([seed, i])
        n = int(ex["length"])
        pool = np.union1d(ex["label_ids"], rng.choice(NUM_LABELS, 1))
        codes = rng.choice(pool, min(int(rng.integers(0, 7)), pool.size), replace=False)
        labels, positions, kinds = [], [], []
        for c in codes:
            pos = rng.choice(np.arange(1, n - 1), min(int(rng.integers(1, 9)), n - 2),
                             replace=False)
            labels += [int(c)] * pos.size
            positions += pos.tolist()
            kinds += [0] * pos.size
        for _ in range(int(rng.integers(0, 4))):
            labels.append(int(rng.choice([-1, int(rng.integers(0, NUM_LABELS))])))
            positions.append(int(rng.integers(1, n - 1)))
            kinds.append(1)
        yield {**ex, "evidence_label_ids": np.array(labels, np.int32),
               "evidence_positions": np.array(positions, np.int32),
               "evidence_kinds": np.array(kinds, np.int8)}


def write_synthetic(out: str | os.PathLike, sizes: dict[str, int] | None = None,
                    evidence: bool = False, **kwargs) -> None:
    """A small prepared dataset (train/val/test) written with write_dataset from generators
    (``evidence``: with the triples of ``with_evidence``)."""
    sizes = sizes or {"train": 300, "val": 60, "test": 45}
    splits = {s: synthetic_examples(n, seed, first_id=100_000 * k)
              for k, (s, n), seed in zip(range(1, 4), sizes.items(), (0, 1, 2))}
    if evidence:
        splits = {s: with_evidence(ex, seed) for (s, ex), seed in zip(splits.items(), (0, 1, 2))}
    kwargs.setdefault("tokenizer_dir", tiny_tokenizer_dir("wordpiece"))
    rng = np.random.default_rng(9)
    desc_ids = rng.integers(0, 300, (NUM_LABELS, 64)).astype(np.int32)
    desc_mask = (np.arange(64)[None] < rng.integers(3, 64, NUM_LABELS)[:, None]).astype(np.int8)
    shards.write_dataset(
        out, split_examples=splits,
        metadata={"name": "synthetic", "recipe": "emnlp2024", "icd_version": 10,
                  "max_length": MAX_LENGTH, "prep_config": {"seed": 0}, "evidence": evidence},
        label_space=LABEL_SPACE, descriptions=[f"description {c}" for c in LABEL_SPACE],
        description_ids=desc_ids, description_mask=desc_mask, **kwargs)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "ds"
    write_synthetic(out)
    return out


def test_round_trip_every_field(dataset_dir):
    ds = shards.open_dataset(dataset_dir)
    for split, n, seed, first in (("train", 300, 0, 100_000), ("val", 60, 1, 200_000),
                                  ("test", 45, 2, 300_000)):
        src = ds.source(split)
        assert len(src) == n
        lengths = ds.lengths(split)
        assert lengths.dtype == np.int32 and lengths.shape == (n,)
        for i, want in enumerate(synthetic_examples(n, seed, first_id=first)):
            got = src[i]
            assert int(got["_id"]) == want["_id"]
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
            assert got["input_ids"].dtype == np.int32 and got["label_ids"].dtype == np.int32
            np.testing.assert_array_equal(got["label_ids"], want["label_ids"])
            assert int(got["length"]) == want["length"] == lengths[i]
        assert ds.metadata["counts"][split]["documents"] == n
        assert ds.metadata["counts"][split]["tokens_mean"] == pytest.approx(lengths.mean())
    assert "tensorflow" not in sys.modules  # TFDS wrote and read without TensorFlow


def test_metadata_label_space_descriptions(dataset_dir):
    ds = shards.open_dataset(dataset_dir)
    meta = ds.metadata
    assert meta["format_version"] == shards.FORMAT_VERSION and meta["num_labels"] == NUM_LABELS
    assert meta["name"] == "synthetic" and meta["prep_config"] == {"seed": 0}
    ident = shards.tokenizer_identity(tiny_tokenizer_dir("wordpiece"))
    assert meta["tokenizer"] == ident
    assert ident["pad_token_id"] == 0 and ident["lower_case"] is True
    assert ds.pad_token_id == 0
    # the copied tokenizer folder has the same identity (sha256 does not depend on location)
    assert shards.tokenizer_identity(dataset_dir / "tokenizer")["sha256"] == ident["sha256"]
    want_counts = np.zeros(NUM_LABELS, np.int64)
    for ex in synthetic_examples(300, 0):
        want_counts[ex["label_ids"]] += 1
    assert meta["train_label_counts"] == want_counts.tolist()
    assert ds.label_space == LABEL_SPACE
    assert json.loads((dataset_dir / "label_space.json").read_text()) == LABEL_SPACE
    assert ds.descriptions == [f"description {c}" for c in LABEL_SPACE]
    with np.load(dataset_dir / "descriptions.npz", allow_pickle=False) as npz:
        assert npz["input_ids"].dtype == np.int32 and npz["attention_mask"].dtype == np.int8
        np.testing.assert_array_equal(npz["input_ids"], ds.description_ids)
    assert ds.description_ids.shape == ds.description_mask.shape == (NUM_LABELS, 64)
    assert not list(dataset_dir.parent.glob("ds.tmp-*"))


def other_tokenizer_dir(tmp: Path) -> Path:
    """A copy of the tiny wordpiece tokenizer with one extra vocabulary entry."""
    out = tmp / "other_tokenizer"
    shutil.copytree(tiny_tokenizer_dir("wordpiece"), out)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzzextra"] = len(spec["model"]["vocab"])
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_tokenizer_identity_changes_with_the_files(tmp_path):
    a = shards.tokenizer_identity(tiny_tokenizer_dir("wordpiece"))
    b = shards.tokenizer_identity(other_tokenizer_dir(tmp_path))
    assert a["sha256"] != b["sha256"] and b["vocab_size"] == a["vocab_size"] + 1
    assert b["cls_token_id"] == a["cls_token_id"] == 2 and b["sep_token_id"] == 3


def test_empty_and_missing_splits(tmp_path):
    write_synthetic(tmp_path / "ds", sizes={"train": 20, "val": 0})
    ds = shards.open_dataset(tmp_path / "ds")
    assert ds.splits == ("train", "val")
    assert len(ds.source("val")) == 0 and ds.lengths("val").size == 0
    assert ds.metadata["counts"]["val"]["documents"] == 0
    with pytest.raises(KeyError, match="no split 'test'"):
        ds.source("test")


def test_write_is_atomic_on_error(tmp_path):
    def failing():
        yield from synthetic_examples(10, 0)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        shards.write_dataset(
            tmp_path / "ds", split_examples={"train": failing()}, metadata={"max_length": 1000},
            label_space=LABEL_SPACE, descriptions=[""] * NUM_LABELS,
            description_ids=np.zeros((NUM_LABELS, 64), np.int32),
            description_mask=np.zeros((NUM_LABELS, 64), np.int8), tokenizer_dir=None)
    assert list(tmp_path.iterdir()) == []


def test_bad_example_is_named(tmp_path):
    bad = [{"_id": 7, "input_ids": np.arange(5), "label_ids": np.array([NUM_LABELS])}]
    with pytest.raises(ValueError, match=r"split 'train', example #0 \(_id=7\): label id out"):
        shards.write_dataset(
            tmp_path / "ds", split_examples={"train": iter(bad)}, metadata={},
            label_space=LABEL_SPACE, descriptions=[""] * NUM_LABELS,
            description_ids=np.zeros((NUM_LABELS, 64), np.int32),
            description_mask=np.zeros((NUM_LABELS, 64), np.int8), tokenizer_dir=None)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write_synthetic(tmp_path / "ds", sizes={"train": 10})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_synthetic(tmp_path / "ds", sizes={"train": 12})
    assert shards.open_dataset(tmp_path / "ds").lengths("train").size == 10
    write_synthetic(tmp_path / "ds", sizes={"train": 12}, overwrite=True)
    assert len(shards.open_dataset(tmp_path / "ds").source("train")) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.open_dataset(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset.*data_prep.mimiciv"):
        shards.open_dataset(tmp_path / "half")
    (tmp_path / "half" / "metadata.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        shards.open_dataset(tmp_path / "half")


def test_check_compatible_messages(dataset_dir, tmp_path):
    ds = shards.open_dataset(dataset_dir)
    sha = ds.metadata["tokenizer"]["sha256"]
    ds.check_compatible(tokenizer_sha256=sha, label_space=LABEL_SPACE, max_length=MAX_LENGTH)
    other = shards.tokenizer_identity(other_tokenizer_dir(tmp_path))
    with pytest.raises(shards.DatasetMismatchError) as err:
        ds.check_compatible(tokenizer_sha256=other["sha256"], tokenizer_name=other["name"])
    msg = str(err.value)
    assert sha[:12] in msg and other["sha256"][:12] in msg and "--tokenizer" in msg
    assert ds.metadata["tokenizer"]["name"] in msg
    run_labels = LABEL_SPACE[2:] + ["Z99.9", "Z99.8"]
    with pytest.raises(shards.DatasetMismatchError) as err:
        ds.check_compatible(label_space=run_labels, max_length=512)
    msg = str(err.value)
    assert "2 only in the shards" in msg and "'C00.0'" in msg
    assert "2 only in the run" in msg and "'Z99.9'" in msg
    assert "max_length 1000" in msg and "512" in msg
    assert isinstance(err.value, ValueError)


def test_large_split_spills_to_disk_without_tensorflow(tmp_path, monkeypatch):
    """Past TFDS's in-memory limit (1 GB; shrunk here) its shuffler spills buckets to disk,
    which would import TensorFlow; the written order and contents must be unchanged."""
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 20_000)
    write_synthetic(tmp_path / "ds", sizes={"train": 120, "val": 10})
    ds = shards.open_dataset(tmp_path / "ds")
    expected = list(synthetic_examples(120, 0, first_id=100_000))
    source = ds.source("train")
    assert len(source) == 120
    for i in (0, 1, 57, 119):
        assert int(source[i]["_id"]) == expected[i]["_id"]
        np.testing.assert_array_equal(source[i]["input_ids"], expected[i]["input_ids"])
    assert "tensorflow" not in sys.modules


def test_evidence_round_trip(tmp_path, dataset_dir):
    calls = []

    def late():
        calls.append(1)
        return {"evidence_counts": {"spans": 7}}

    write_synthetic(tmp_path / "ev", sizes={"train": 30, "val": 10}, evidence=True,
                    late_metadata=late)
    ds = shards.open_dataset(tmp_path / "ev")
    assert ds.has_evidence and ds.metadata["evidence_counts"] == {"spans": 7} and calls == [1]
    for split, n, seed, first in (("train", 30, 0, 100_000), ("val", 10, 1, 200_000)):
        src = ds.source(split)
        want = list(with_evidence(synthetic_examples(n, seed, first_id=first), seed))
        assert any("evidence_kinds" not in w for w in want)
        for i, w in enumerate(want):
            got = src[i]
            np.testing.assert_array_equal(got["input_ids"], w["input_ids"])
            triples = ds.evidence(split, i)
            for k, arr in zip(shards.EVIDENCE_FIELDS, triples):
                np.testing.assert_array_equal(got[k], arr)
                np.testing.assert_array_equal(arr, w.get(k, np.zeros(0)))
            assert [a.dtype for a in triples] == [np.int32, np.int32, np.int8]
    # a dataset without evidence reads as before, without the keys
    plain = shards.open_dataset(dataset_dir)
    assert not plain.has_evidence and set(plain.source("train")[0]) == {
        "_id", "input_ids", "length", "label_ids"}
    with pytest.raises(ValueError, match="without evidence.*--evidence"):
        plain.evidence("train", 0)


@pytest.mark.parametrize("fields, match", [
    ({"evidence_label_ids": [1], "evidence_positions": [9], "evidence_kinds": [0]},
     r"token positions outside \[0, 5\)"),
    ({"evidence_label_ids": [NUM_LABELS], "evidence_positions": [1], "evidence_kinds": [0]},
     "label ids outside"),
    ({"evidence_label_ids": [-1], "evidence_positions": [1], "evidence_kinds": [0]},
     "evidence .kind 0. with label id -1"),
    ({"evidence_label_ids": [1], "evidence_positions": [1], "evidence_kinds": [2]}, "kinds other"),
    ({"evidence_label_ids": [1, 2], "evidence_positions": [1], "evidence_kinds": [0]},
     "differ in length"),
    ({"evidence_label_ids": [1]}, "not all of"),
])
def test_bad_evidence_is_named(tmp_path, fields, match):
    bad = [{"_id": 7, "input_ids": np.arange(5), "label_ids": np.array([1]), **fields}]
    with pytest.raises(ValueError, match=r"example #0 \(_id=7\).*" + match):
        shards.write_dataset(
            tmp_path / "ds", split_examples={"train": iter(bad)}, metadata={"evidence": True},
            label_space=LABEL_SPACE, descriptions=[""] * NUM_LABELS,
            description_ids=np.zeros((NUM_LABELS, 64), np.int32),
            description_mask=np.zeros((NUM_LABELS, 64), np.int8), tokenizer_dir=None)
