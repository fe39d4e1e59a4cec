"""The prepared-dataset directory: a TFDS ArrayRecord dataset plus metadata (DESIGN.md §1).

Layout of ``OUT/`` (written as ``OUT.tmp-XXXX/`` beside it, renamed at the end: atomic)::

    metadata.json        dataset identity, counts, tokenizer identity, preparation flags
    label_space.json     JSON list of code strings, index = label id
    descriptions.json    JSON list of description strings in label order
    descriptions.npz     input_ids int32 [C, L], attention_mask int8 [C, L]
    lengths.npz          one int32 array per split: tokens per example, in source order
    tokenizer/           copy of the tokenizer files (when a tokenizer folder was given)
    tfds/medcode_shards/1.0.0/   TFDS ArrayRecord dataset, splits train / val / test

The TFDS dataset is built by a ``tfds.core.GeneratorBasedBuilder`` with
``file_format="array_record"``; TensorFlow is never imported. Examples are written in the order
they are generated (TFDS shuffling is disabled) so that ``lengths.npz`` lines up with
``source(split)[i]``. TFDS cannot write an empty split: an empty split is recorded in
``lengths.npz`` / ``metadata.json`` only, and ``source()`` returns an empty source for it.

Evidence (``metadata["evidence"] is True``, e.g. ``data_prep.mimiciv --evidence``): every
example also has ``evidence_label_ids`` int32 [k], ``evidence_positions`` int32 [k] and
``evidence_kinds`` int8 [k] (``EVIDENCE_KINDS``: 0 evidence, 1 distractor): one triple per
(label, token position, kind), label -1 only for distractors whose code is not a label. These
are extra TFDS features of such datasets only; datasets without them read as before.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds  # TF-free for ArrayRecord; never imports TF

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
BUILDER_NAME = "medcode_shards"
BUILDER_VERSION = "1.0.0"
TFDS_SUBDIR = os.path.join("tfds", BUILDER_NAME, BUILDER_VERSION)
# Shards of at most this many bytes (TFDS picks the count between its minimum and this size).
MAX_SHARD_BYTES = 256 << 20
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
)
EVIDENCE_FIELDS = ("evidence_label_ids", "evidence_positions", "evidence_kinds")
EVIDENCE_KINDS = ("evidence", "distractor")  # kind id = index
_PREP_HINT = "run `python -m data_prep.mimiciv --out DIR ...` (see README) to prepare it"


class DatasetMismatchError(ValueError):
    """The prepared shards do not match the run's configuration."""


# --------------------------------------------------------------------------- tokenizer identity


def tokenizer_identity(tokenizer_dir: str | os.PathLike) -> dict[str, Any]:
    """Identity of a Hugging Face tokenizer folder, as stored in ``metadata.json``.

    ``sha256`` hashes the bytes of the tokenizer files present in the folder (``TOKENIZER_FILES``,
    sorted by name, each prefixed by its name), so it does not depend on the folder's location.
    """
    from transformers import AutoTokenizer

    folder = Path(tokenizer_dir)
    files = sorted(name for name in TOKENIZER_FILES if (folder / name).is_file())
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        digest.update((folder / name).read_bytes())
    tok = AutoTokenizer.from_pretrained(str(folder))
    name = os.path.basename(os.path.normpath(str(getattr(tok, "name_or_path", "") or folder)))
    lower = getattr(tok, "do_lower_case", None)
    if lower is None:
        lower = bool(tok.init_kwargs.get("do_lower_case", False))
    return {
        "name": name,
        "sha256": digest.hexdigest(),
        "pad_token_id": tok.pad_token_id,
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "vocab_size": len(tok),
        "lower_case": bool(lower),
    }


# --------------------------------------------------------------------------- writing


class MedcodeShards(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Pre-tokenised discharge summaries with their label ids.

    The examples come from already-open iterators set on the instance (``split_iterators``),
    so that ``write_dataset`` can stream generators straight into TFDS.
    """

    name = BUILDER_NAME
    VERSION = tfds.core.Version(BUILDER_VERSION)

    def __init__(self, *, split_iterators: Mapping[str, Iterator[tuple[int, dict]]],
                 with_evidence: bool = False, **kwargs):
        self._split_iterators = dict(split_iterators)
        self._with_evidence = with_evidence
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "_id": tfds.features.Scalar(np.int64),
            "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "length": tfds.features.Scalar(np.int32),
            "label_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }
        if self._with_evidence:
            features.update({
                "evidence_label_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "evidence_positions": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "evidence_kinds": tfds.features.Tensor(shape=(None,), dtype=np.int8),
            })
        return tfds.core.DatasetInfo(
            builder=self,
            description="Pre-tokenised MIMIC-IV discharge summaries (medcode_jax).",
            disable_shuffling=True,  # keep generation order: lengths.npz lines up with it
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return self._split_iterators

    def _generate_examples(self):  # the splits come from _split_generators
        raise NotImplementedError


class _SplitStats:
    """Per-split lengths and label counts, gathered while the examples stream past."""

    def __init__(self, split: str, num_labels: int, max_length: int | None,
                 with_evidence: bool = False):
        self.with_evidence = with_evidence
        self.split = split
        self.num_labels = num_labels
        self.max_length = max_length
        self.lengths: list[int] = []
        self.label_counts = np.zeros(num_labels, np.int64)

    def examples(self, examples: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, dict]]:
        """Validate, normalise and key the examples (key = position in the split)."""
        for key, ex in enumerate(examples):
            out = self._check(key, ex)
            self.lengths.append(int(out["length"]))
            self.label_counts[out["label_ids"]] += 1
            yield key, out

    def _check(self, key: int, ex: Mapping[str, Any]) -> dict[str, Any]:
        where = f"split {self.split!r}, example #{key}"
        missing = {"_id", "input_ids", "label_ids"} - set(ex)
        if missing:
            raise ValueError(f"{where}: missing field(s) {sorted(missing)}; "
                             "each example needs _id, input_ids, label_ids (length optional)")
        ids = np.asarray(ex["input_ids"])
        labels = np.asarray(ex["label_ids"])
        if ids.ndim != 1 or labels.ndim != 1:
            raise ValueError(f"{where} (_id={ex['_id']}): input_ids and label_ids must be 1-D, "
                             f"got shapes {ids.shape} and {labels.shape}")
        length = int(ex.get("length", ids.shape[0]))
        if length != ids.shape[0] or length == 0:
            raise ValueError(f"{where} (_id={ex['_id']}): length={length} but input_ids has "
                             f"{ids.shape[0]} tokens (must be equal and > 0)")
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"{where} (_id={ex['_id']}): {length} tokens > max_length "
                             f"{self.max_length} of metadata.json; truncate before writing")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise ValueError(f"{where} (_id={ex['_id']}): label id out of range "
                             f"[0, {self.num_labels}): {labels.tolist()}")
        out = {"_id": np.int64(ex["_id"]), "input_ids": ids.astype(np.int32),
               "length": np.int32(length), "label_ids": np.unique(labels).astype(np.int32)}
        if self.with_evidence:
            out.update(self._check_evidence(f"{where} (_id={ex['_id']})", ex, length))
        return out

    def _check_evidence(self, where: str, ex: Mapping[str, Any], length: int
                        ) -> dict[str, np.ndarray]:
        given = [k for k in EVIDENCE_FIELDS if k in ex]
        if not given:  # a document without annotations
            return {"evidence_label_ids": np.zeros(0, np.int32),
                    "evidence_positions": np.zeros(0, np.int32),
                    "evidence_kinds": np.zeros(0, np.int8)}
        if len(given) != len(EVIDENCE_FIELDS):
            raise ValueError(f"{where}: has {given} but not all of {list(EVIDENCE_FIELDS)}")
        labels, positions, kinds = (np.asarray(ex[k]).reshape(-1) for k in EVIDENCE_FIELDS)
        if not labels.shape == positions.shape == kinds.shape:
            raise ValueError(f"{where}: evidence fields differ in length: {labels.shape}, "
                             f"{positions.shape}, {kinds.shape}")
        bad = []
        if positions.size and (positions.min() < 0 or positions.max() >= length):
            bad.append(f"token positions outside [0, {length})")
        if labels.size and (labels.min() < -1 or labels.max() >= self.num_labels):
            bad.append(f"label ids outside [-1, {self.num_labels})")
        if kinds.size and not np.isin(kinds, (0, 1)).all():
            bad.append("kinds other than 0 (evidence) / 1 (distractor)")
        if np.any((labels < 0) & (kinds == 0)):
            bad.append("evidence (kind 0) with label id -1")
        if bad:
            raise ValueError(f"{where}: bad evidence triples: {'; '.join(bad)}")
        return {"evidence_label_ids": labels.astype(np.int32),
                "evidence_positions": positions.astype(np.int32),
                "evidence_kinds": kinds.astype(np.int8)}


def _peek(examples: Iterable) -> Iterator | None:
    """The iterator with its first item put back, or None when it is empty."""
    it = iter(examples)
    first = next(it, _peek)
    return None if first is _peek else itertools.chain([first], it)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_dataset(out_dir: str | os.PathLike, *, split_examples: Mapping[str, Iterable[dict]],
                  metadata: Mapping[str, Any], label_space: Sequence[str],
                  descriptions: Sequence[str], description_ids: np.ndarray,
                  description_mask: np.ndarray, tokenizer_dir: str | os.PathLike | None,
                  overwrite: bool = False,
                  late_metadata: Callable[[], Mapping[str, Any]] | None = None) -> None:
    """Write a prepared dataset directory atomically (see the module docstring).

    ``split_examples`` maps split names (a subset of train/val/test) to iterables of dicts with
    ``_id``, ``input_ids``, ``label_ids`` (and optionally ``length``); they are consumed once,
    streaming. ``metadata`` is stored in ``metadata.json`` with these keys filled in here:
    ``format_version``, ``num_labels``, ``counts[split]["documents"|"tokens_mean"]``,
    ``train_label_counts`` (when absent), ``tokenizer`` (when absent and ``tokenizer_dir`` is
    given) and ``created`` (when absent). An existing ``out_dir`` is refused unless
    ``overwrite``; on any error nothing is left behind. ``metadata["evidence"] is True``: the
    examples may carry the evidence fields (module docstring; absent = none).
    ``late_metadata()``, if given, is called once every example has been written; its keys
    update ``metadata.json`` (counts gathered while streaming).
    """
    out = Path(out_dir)
    unknown = set(split_examples) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; allowed: {list(SPLITS)}")
    num_labels = len(label_space)
    if len(descriptions) != num_labels or description_ids.shape[0] != num_labels \
            or description_mask.shape != description_ids.shape:
        raise ValueError(
            f"descriptions must be in label order: {num_labels} labels but {len(descriptions)} "
            f"descriptions, description_ids {description_ids.shape}, "
            f"description_mask {description_mask.shape}")
    if list(label_space) != sorted(set(label_space)):
        raise ValueError("label_space must be sorted and without duplicates")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; delete it or pass overwrite=True "
                              "(--overwrite) to replace it")
    meta = json.loads(json.dumps(dict(metadata)))  # a JSON-clean deep copy
    if tokenizer_dir is not None:
        ident = tokenizer_identity(tokenizer_dir)
        given = meta.setdefault("tokenizer", ident)
        if given.get("sha256") != ident["sha256"]:
            raise ValueError(f"metadata['tokenizer'] sha256 {given.get('sha256')} does not match "
                             f"the tokenizer files in {tokenizer_dir} ({ident['sha256']})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_contents(tmp, split_examples, meta, label_space, descriptions,
                        description_ids, description_mask, tokenizer_dir, late_metadata)
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _LocalGfile:
    """The three `tf.io.gfile` calls TFDS's shuffler makes when it spills to disk, on plain files.

    TFDS keeps up to 1 GB of serialised examples in memory while writing a split; beyond that its
    `shuffle._Bucket` writes temporary bucket files through `tf.io.gfile`, which needs TensorFlow
    (a MIMIC-IV-size train split is past that point). Our temporary directory is always local, so
    the builtin file API serves. Installed only for the duration of `_tfds_spill_without_tf()`.
    """

    class errors:  # noqa: N801 - mirrors tf.errors, referenced in the shuffler's except clause
        ResourceExhaustedError = OSError

    class io:  # noqa: N801 - mirrors tf.io
        class gfile:  # noqa: N801 - mirrors tf.io.gfile
            GFile = staticmethod(open)
            exists = staticmethod(os.path.exists)
            remove = staticmethod(os.remove)


@contextlib.contextmanager
def _tfds_spill_without_tf():
    """Let TFDS's shuffler spill buckets to local disk without importing TensorFlow."""
    from tensorflow_datasets.core import shuffle

    previous = shuffle.tf
    shuffle.tf = _LocalGfile
    try:
        yield
    finally:
        shuffle.tf = previous


def _write_contents(tmp: Path, split_examples, meta: dict, label_space, descriptions,
                    description_ids, description_mask, tokenizer_dir,
                    late_metadata=None) -> None:
    num_labels = len(label_space)
    with_evidence = meta.get("evidence") is True
    stats = {s: _SplitStats(s, num_labels, meta.get("max_length"), with_evidence)
             for s in split_examples}
    generators = {}
    for split, examples in split_examples.items():
        it = _peek(stats[split].examples(examples))
        if it is not None:
            generators[split] = it
    if not generators:
        raise ValueError("every split is empty: nothing to write")
    builder = MedcodeShards(split_iterators=generators, data_dir=str(tmp / "tfds"),
                            file_format="array_record", with_evidence=with_evidence)
    with _tfds_spill_without_tf():
        builder.download_and_prepare(
            download_dir=str(tmp / "_downloads"),
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, max_shard_size=MAX_SHARD_BYTES))
    shutil.rmtree(tmp / "_downloads", ignore_errors=True)

    lengths = {s: np.asarray(st.lengths, np.int32) for s, st in stats.items()}
    np.savez(tmp / "lengths.npz", **lengths)
    counts = meta.setdefault("counts", {})
    for split, lens in lengths.items():
        entry = counts.setdefault(split, {})
        entry["documents"] = int(lens.size)
        entry["tokens_mean"] = float(lens.mean()) if lens.size else 0.0
    if "train" in stats:
        meta.setdefault("train_label_counts", stats["train"].label_counts.tolist())
    meta["format_version"] = FORMAT_VERSION
    meta["num_labels"] = num_labels
    meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
    if late_metadata is not None:
        meta.update(json.loads(json.dumps(dict(late_metadata()))))

    _write_json(tmp / "label_space.json", list(label_space))
    _write_json(tmp / "descriptions.json", list(descriptions))
    np.savez(tmp / "descriptions.npz", input_ids=np.asarray(description_ids, np.int32),
             attention_mask=np.asarray(description_mask, np.int8))
    if tokenizer_dir is not None:
        # only the tokenizer files (the folder is often a whole model: no weights in shards)
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy2(os.path.join(tokenizer_dir, name), tmp / "tokenizer" / name)
    _write_json(tmp / "metadata.json", meta)  # last: its presence marks a complete directory


def publish_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not overwrite:  # appeared while we were writing
        raise FileExistsError(f"{out} appeared while writing; not replacing it")
    old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading


class _EmptySource(Sequence):
    """Random-access source of a split that has no examples."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index):
        raise IndexError(f"index {index} out of range: the split is empty")


class PreparedDataset:
    """A prepared dataset directory opened for reading (see ``open_dataset``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not self.path.is_dir():
            raise FileNotFoundError(f"prepared dataset {self.path} does not exist; {_PREP_HINT}")
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a prepared dataset (no metadata.json; an interrupted "
                f"preparation leaves none); {_PREP_HINT}")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {version!r} is not supported (this code reads "
                f"version {FORMAT_VERSION}); re-run data_prep.mimiciv with this version")
        for name in ("label_space.json", "descriptions.json", "descriptions.npz", "lengths.npz"):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path} is incomplete: {name} is missing; "
                                        f"{_PREP_HINT}")
        self.label_space: list[str] = json.loads(
            (self.path / "label_space.json").read_text(encoding="utf-8"))
        self.descriptions: list[str] = json.loads(
            (self.path / "descriptions.json").read_text(encoding="utf-8"))
        with np.load(self.path / "descriptions.npz", allow_pickle=False) as npz:
            self.description_ids: np.ndarray = npz["input_ids"]
            self.description_mask: np.ndarray = npz["attention_mask"]
        with np.load(self.path / "lengths.npz", allow_pickle=False) as npz:
            self._lengths = {name: npz[name] for name in npz.files}
        self._builder = None

    @property
    def num_labels(self) -> int:
        return len(self.label_space)

    @property
    def has_evidence(self) -> bool:
        """Whether the examples carry evidence triples (``metadata["evidence"]``)."""
        return self.metadata.get("evidence") is True

    def evidence(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(label ids int32 [k], token positions int32 [k], kinds int8 [k]) of one example."""
        if not self.has_evidence:
            raise ValueError(f"{self.path} was prepared without evidence; re-run "
                             "data_prep.mimiciv with --evidence PATH")
        ex = self.source(split)[index]
        return tuple(np.asarray(ex[k]) for k in EVIDENCE_FIELDS)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id (from ``metadata['tokenizer']``)."""
        tok = self.metadata.get("tokenizer") or {}
        if tok.get("pad_token_id") is None:
            raise ValueError(f"{self.path}/metadata.json has no tokenizer.pad_token_id")
        return int(tok["pad_token_id"])

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits written (possibly empty ones)."""
        return tuple(s for s in SPLITS if s in self._lengths)

    def _check_split(self, split: str) -> None:
        if split not in self._lengths:
            raise KeyError(f"{self.path} has no split {split!r}; it has {list(self.splits)}")

    def lengths(self, split: str) -> np.ndarray:
        """Tokens per example of ``split`` (int32), in source order."""
        self._check_split(split)
        return self._lengths[split]

    def source(self, split: str) -> Sequence[dict[str, Any]]:
        """Random-access source: ``len()``, ``[i]`` -> {_id, input_ids, length, label_ids}
        (and the ``EVIDENCE_FIELDS`` when ``has_evidence``)."""
        self._check_split(split)
        if self._lengths[split].size == 0:
            return _EmptySource()
        if self._builder is None:
            tfds_dir = self.path / TFDS_SUBDIR
            if not (tfds_dir / "dataset_info.json").is_file():
                raise FileNotFoundError(f"{self.path} is incomplete: {tfds_dir} has no "
                                        f"dataset_info.json; {_PREP_HINT}")
            self._builder = tfds.builder_from_directory(str(tfds_dir))
        return self._builder.as_data_source(split)

    def check_compatible(self, *, tokenizer_sha256: str | None = None,
                         tokenizer_name: str | None = None,
                         label_space: Sequence[str] | None = None,
                         max_length: int | None = None) -> None:
        """Raise ``DatasetMismatchError`` listing every way the shards differ from the run."""
        problems = []
        tok = self.metadata.get("tokenizer") or {}
        if tokenizer_sha256 is not None and tok.get("sha256") != tokenizer_sha256:
            problems.append(
                f"the shards were tokenised with tokenizer {tok.get('name')!r} "
                f"(sha256 {str(tok.get('sha256'))[:12]}…), the run's config uses "
                f"{tokenizer_name or 'a tokenizer'!r} (sha256 {tokenizer_sha256[:12]}…): re-run "
                f"data_prep.mimiciv with --tokenizer pointing at the run's encoder, or point "
                f"config.encoder.path at the encoder these shards were made for")
        if label_space is not None and list(label_space) != self.label_space:
            problems.append(_label_space_diff(self.label_space, list(label_space)))
        if max_length is not None and max_length != self.metadata.get("max_length"):
            problems.append(
                f"the shards were truncated to max_length {self.metadata.get('max_length')}, "
                f"the run's config asks for {max_length}: set config max_length to "
                f"{self.metadata.get('max_length')} or re-run data_prep.mimiciv "
                f"--max-length {max_length}")
        if problems:
            raise DatasetMismatchError(
                f"prepared dataset {self.path} does not match the run:\n- "
                + "\n- ".join(problems))


def _label_space_diff(ours: list[str], theirs: list[str]) -> str:
    only_shards = [c for c in ours if c not in set(theirs)]
    only_run = [c for c in theirs if c not in set(ours)]
    msg = (f"label spaces differ: shards have {len(ours)} codes, the run has {len(theirs)}; "
           f"{len(only_shards)} only in the shards (e.g. {only_shards[:5]}), "
           f"{len(only_run)} only in the run (e.g. {only_run[:5]})")
    if not only_shards and not only_run:
        msg += "; same codes in a different order"
    return msg + ("; use the label space saved with these shards (label_space.json) or "
                  "re-prepare the data")


def open_dataset(path: str | os.PathLike) -> PreparedDataset:
    """Open a prepared dataset directory written by ``write_dataset``."""
    return PreparedDataset(path)
