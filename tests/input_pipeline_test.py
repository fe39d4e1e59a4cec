"""Tests of medcode_jax.input_pipeline: bucketing, padding, sharding over processes, resume."""
from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from data_prep import shards
from medcode_jax import input_pipeline as ip
from shards_test import MAX_LENGTH, NUM_LABELS, synthetic_examples, write_synthetic

CHUNK = 64
BUCKETS = ip.bucket_chunk_counts(MAX_LENGTH, CHUNK, multiple=4)  # (4, 8, 12, 16)
GLOBAL_B = 8
TRAIN_N = 300  # write_synthetic's default train size: 38 steps per epoch, the last one with
# 4 documents and 4 filler rows


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "ds"
    write_synthetic(out)
    return shards.open_dataset(out)


def train_iter(ds, **kwargs):
    kwargs = {"global_batch_size": GLOBAL_B, "chunk_size": CHUNK, "buckets": BUCKETS,
              "seed": 3, **kwargs}
    return ip.make_train_iterator(ds, **kwargs)


def take(it, n):
    return list(itertools.islice(it, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_bucket_chunk_counts():
    assert ip.bucket_chunk_counts(6000, 128) == (8, 16, 24, 32, 40, 48)
    assert ip.bucket_chunk_counts(1024, 128) == (8,)
    assert ip.bucket_chunk_counts(300, 128) == (3,)
    assert ip.bucket_chunk_counts(1000, 64, multiple=4) == (4, 8, 12, 16)
    with pytest.raises(ValueError):
        ip.bucket_chunk_counts(0, 128)


def check_batch(batch, ds, *, local_b):
    """Shapes in the bucket set, dtypes, padding, labels: against the source itself."""
    width = batch["input_ids"].shape[1]
    assert width % CHUNK == 0 and width // CHUNK in BUCKETS
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (local_b, width)
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    assert batch["labels"].shape == (local_b, NUM_LABELS) and batch["labels"].dtype == np.float32
    assert batch["doc_ids"].dtype == np.int64 and batch["lengths"].dtype == np.int32
    assert batch["valid"].dtype == np.bool_
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), batch["lengths"])
    pad = ds.pad_token_id
    for row in range(local_b):
        n = batch["lengths"][row]
        assert np.all(batch["input_ids"][row, n:] == pad)
        assert np.all(batch["attention_mask"][row, :n] == 1)


def test_train_batches_shapes_padding_and_labels(ds):
    src = ds.source("train")
    by_id = {int(src[i]["_id"]): i for i in range(len(src))}
    widths = set()
    for batch in take(train_iter(ds), 12):
        check_batch(batch, ds, local_b=GLOBAL_B)
        np.testing.assert_array_equal(batch["doc_ids"] == -1, ~batch["valid"])
        # the bucket is the smallest holding the longest document of the batch
        need = -(-batch["lengths"].max() // CHUNK)
        assert batch["input_ids"].shape[1] // CHUNK == min(b for b in BUCKETS if b >= need)
        widths.add(batch["input_ids"].shape[1])
        for row, doc in enumerate(batch["doc_ids"]):
            if doc == -1:  # a filler row of the epoch's partial batch
                assert batch["lengths"][row] == 0 and not batch["labels"][row].any()
                continue
            ex = src[by_id[int(doc)]]
            np.testing.assert_array_equal(batch["input_ids"][row, :ex["length"]], ex["input_ids"])
            np.testing.assert_array_equal(np.flatnonzero(batch["labels"][row]), ex["label_ids"])
    assert len(widths) > 1  # buckets actually vary


def test_train_epochs_partition_over_processes_and_reshuffle(ds):
    steps = ip.steps_per_epoch(ds, "train", GLOBAL_B)
    assert steps == -(-TRAIN_N // GLOBAL_B) == 38
    per_proc = [take(train_iter(ds, process_index=p, process_count=2), 2 * steps)
                for p in range(2)]
    epochs = []
    for e in range(2):
        docs = []
        for step in range(e * steps, (e + 1) * steps):
            a, b = per_proc[0][step], per_proc[1][step]
            assert a["input_ids"].shape == b["input_ids"].shape  # same bucket everywhere
            assert a["doc_ids"].shape == (GLOBAL_B // 2,)
            docs += a["doc_ids"].tolist() + b["doc_ids"].tolist()
        real = [d for d in docs if d != -1]
        assert len(real) == len(set(real)) == TRAIN_N  # every document once per epoch
        assert docs.count(-1) == steps * GLOBAL_B - TRAIN_N  # one partial batch
        epochs.append(docs)
    assert epochs[0] != epochs[1]  # reshuffled
    # the two processes together give exactly the single-process global batches
    single = take(train_iter(ds), steps + 3)
    for step, batch in enumerate(single):
        joined = np.concatenate([per_proc[0][step]["doc_ids"], per_proc[1][step]["doc_ids"]])
        np.testing.assert_array_equal(batch["doc_ids"], joined)


def test_train_sorting_reduces_padding(ds):
    batches = take(train_iter(ds), ip.steps_per_epoch(ds, "train", GLOBAL_B))
    real = sum(int(b["lengths"].sum()) for b in batches)
    padded = sum(b["input_ids"].size for b in batches)
    unsorted = take(train_iter(ds, shuffle=False), len(batches))
    padded_unsorted = sum(b["input_ids"].size for b in unsorted)
    assert padded < 0.8 * padded_unsorted and real / padded > 0.6


def test_train_is_deterministic_per_seed(ds):
    assert_batches_equal(take(train_iter(ds), 5), take(train_iter(ds), 5))
    other = take(train_iter(ds, seed=4), 5)
    assert any(not np.array_equal(a["doc_ids"], b["doc_ids"])
               for a, b in zip(other, take(train_iter(ds), 5)))


@pytest.mark.parametrize("k", [5, 35])  # 35: the next batches cross the epoch boundary (38)
def test_restored_iterator_continues_exactly(ds, k):
    m = 6
    it = train_iter(ds, process_index=1, process_count=2)
    take(it, k)
    state = it.get_state()
    expected = take(it, m)
    fresh = train_iter(ds, process_index=1, process_count=2)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, m), expected)


def test_worker_processes_give_the_same_stream(ds):
    want = take(train_iter(ds), 7)
    it = train_iter(ds, worker_count=2)
    try:
        got = take(it, 4)
        state = it.get_state()
    finally:
        it.close()
    assert_batches_equal(got, want[:4])
    resumed = train_iter(ds, worker_count=2)
    try:
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 3), want[4:])
    finally:
        resumed.close()


def test_train_rejects_bad_configs(ds):
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        train_iter(ds, process_count=3)
    with pytest.raises(ValueError, match="largest bucket 4"):
        train_iter(ds, buckets=(4,))
    with pytest.raises(ValueError, match="fewer than global_batch_size"):
        train_iter(ds, global_batch_size=400)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_every_document_once_longest_first(ds, process_count):
    gb = 16  # 60 val docs: 4 batches, 4 filler rows in the last
    per_proc = [list(ip.make_eval_batches(ds, "val", global_batch_size=gb, chunk_size=CHUNK,
                                          buckets=BUCKETS, process_index=p,
                                          process_count=process_count))
                for p in range(process_count)]
    assert all(len(batches) == 4 for batches in per_proc)
    docs, lengths = [], []
    for step in range(4):
        rows = [batches[step] for batches in per_proc]
        assert len({r["input_ids"].shape for r in rows}) == 1
        for r in rows:
            check_batch(r, ds, local_b=gb // process_count)
        valid = np.concatenate([r["valid"] for r in rows])
        ids = np.concatenate([r["doc_ids"] for r in rows])
        lens = np.concatenate([r["lengths"] for r in rows])
        assert np.all((ids == -1) == ~valid)
        docs += ids[valid].tolist()
        lengths += lens[valid].tolist()
    last = np.concatenate([batches[-1]["valid"] for batches in per_proc])
    assert last.sum() == 60 - 3 * gb and not last[-1]
    for batches in per_proc:
        filler = ~batches[-1]["valid"]
        assert np.all(batches[-1]["attention_mask"][filler] == 0)
        assert np.all(batches[-1]["labels"][filler] == 0)
        assert np.all(batches[-1]["input_ids"][filler] == ds.pad_token_id)
    want = sorted(ex["_id"] for ex in synthetic_examples(60, 1, first_id=200_000))
    assert sorted(docs) == want
    assert lengths == sorted(lengths, reverse=True)


def test_to_global_on_cpu_devices(ds):
    batch = next(train_iter(ds))
    n = 2 if jax.device_count() >= 2 else 1
    mesh = jax.make_mesh((n, 1), ("data", "fsdp"), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    arrays = ip.to_global(batch, mesh)
    for k, v in batch.items():
        assert arrays[k].shape == v.shape
        assert arrays[k].dtype == (np.int32 if v.dtype == np.int64 else v.dtype)  # no x64
        assert arrays[k].sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(arrays[k]), v)
    assert len(arrays["input_ids"].addressable_shards) == n
    if n == 2:
        with pytest.raises(ValueError, match="not divisible by the 2 batch shards"):
            ip.to_global({k: v[:3] for k, v in batch.items()}, mesh)
    with pytest.raises(ValueError, match="not mesh axes"):
        ip.to_global(batch, mesh, data_axes=("batch",))


def test_reserve_tokens_leaves_room_for_the_reference_extra_chunk(ds):
    """Unmasked `emc` heads attend to one more chunk of padding when a batch's longest note is a
    multiple of the chunk size: every batch must be padded past its longest note."""
    batches = take(train_iter(ds, reserve_tokens=1), 12)
    batches += list(ip.make_eval_batches(ds, "val", global_batch_size=GLOBAL_B,
                                         chunk_size=CHUNK, buckets=BUCKETS, reserve_tokens=1))
    for batch in batches:
        longest = batch["lengths"].max()
        assert batch["input_ids"].shape[1] >= longest + 1
        need = -(-(longest + 1) // CHUNK)
        assert batch["input_ids"].shape[1] // CHUNK == min(b for b in BUCKETS if b >= need)


# --------------------------------------------------------------------------- evidence

E = 3  # max_evidence_codes: with_evidence gives documents up to 6 codes, so some are dropped


@pytest.fixture(scope="module")
def ds_ev(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_ev") / "ds"
    write_synthetic(out, sizes={"train": 44, "val": 13}, evidence=True)
    return shards.open_dataset(out)


def expected_evidence(ex, e):
    labels, pos, kinds = (np.asarray(ex.get(k, np.zeros(0, np.int32)), np.int64)
                          for k in shards.EVIDENCE_FIELDS)
    codes = np.unique(labels[(kinds == 0) & (labels >= 0)])
    return codes[:e], max(codes.size - e, 0), labels, pos, kinds


def check_evidence_batch(batch, src, by_id, e):
    b, width = batch["input_ids"].shape
    assert batch["evidence_codes"].shape == (b, e) and batch["evidence_codes"].dtype == np.int32
    assert batch["evidence_mask"].shape == (b, e, width) and batch["evidence_mask"].dtype == np.int8
    assert batch["distractor_mask"].shape == (b, width)
    assert batch["distractor_mask"].dtype == np.int8
    dropped = 0
    for row in range(b):
        doc = int(batch["doc_ids"][row])
        if doc < 0:  # filler
            assert (batch["evidence_codes"][row] == -1).all()
            assert not batch["evidence_mask"][row].any() and not batch["distractor_mask"][row].any()
            continue
        codes, extra, labels, pos, kinds = expected_evidence(src[by_id[doc]], e)
        dropped += extra
        got = batch["evidence_codes"][row]
        np.testing.assert_array_equal(got[:codes.size], codes)
        assert (got[codes.size:] == -1).all()
        for j in range(e):
            want = np.zeros(width, np.int8)
            if j < codes.size:
                want[pos[(kinds == 0) & (labels == codes[j])]] = 1
                assert want.any()
            np.testing.assert_array_equal(batch["evidence_mask"][row, j], want)
        want = np.zeros(width, np.int8)
        want[pos[kinds == 1]] = 1
        np.testing.assert_array_equal(batch["distractor_mask"][row], want)
        assert not batch["distractor_mask"][row, batch["lengths"][row]:].any()
    return dropped


def test_evidence_batch_fields(ds_ev):
    for split in ("train", "val"):
        src = ds_ev.source(split)
        by_id = {int(src[i]["_id"]): i for i in range(len(src))}
        batches = take(train_iter(ds_ev, split=split, max_evidence_codes=E),
                       ip.steps_per_epoch(ds_ev, split, GLOBAL_B))
        batches += list(ip.make_eval_batches(ds_ev, split, global_batch_size=GLOBAL_B,
                                             chunk_size=CHUNK, buckets=BUCKETS,
                                             max_evidence_codes=E))
        assert any((b["doc_ids"] < 0).any() for b in batches)  # filler rows are checked too
        dropped = sum(check_evidence_batch(b, src, by_id, E) for b in batches)
        assert dropped > 0
        # without E the batches are as before
        plain = next(ip.make_eval_batches(ds_ev, split, global_batch_size=GLOBAL_B,
                                          chunk_size=CHUNK, buckets=BUCKETS))
        assert not set(ip.EVIDENCE_KEYS) & set(plain)


def test_evidence_dropped_codes_counted_and_logged_once(ds_ev, caplog):
    import pickle

    src = ds_ev.source("train")
    load = ip._LoadAndPad(src, chunk_size=CHUNK, num_labels=NUM_LABELS,
                          pad_id=ds_ev.pad_token_id, max_evidence_codes=1)
    want = sum(expected_evidence(src[i], 1)[1] for i in range(8))
    with caplog.at_level("WARNING"):
        load((np.arange(8), 16))
        load((np.arange(8), 16))
    assert load.dropped_evidence_codes == 2 * want > 0
    assert caplog.text.count("max_evidence_codes=1") == 1
    assert pickle.loads(pickle.dumps(load)).max_evidence_codes == 1  # for worker processes


def test_evidence_requested_without_evidence_is_refused(ds):
    for make in (lambda: train_iter(ds, max_evidence_codes=2),
                 lambda: ip.make_eval_batches(ds, "val", global_batch_size=GLOBAL_B,
                                              chunk_size=CHUNK, buckets=BUCKETS,
                                              max_evidence_codes=2)):
        with pytest.raises(ValueError, match="max_evidence_codes=2") as err:
            make()
        assert str(ds.path) in str(err.value) and "--evidence" in str(err.value)


def test_evidence_to_global(ds_ev):
    batch = next(train_iter(ds_ev, max_evidence_codes=E))
    n = 2 if jax.device_count() >= 2 else 1
    mesh = jax.make_mesh((n, 1), ("data", "fsdp"), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    arrays = ip.to_global(batch, mesh)
    for k in ip.EVIDENCE_KEYS:
        assert arrays[k].dtype == batch[k].dtype and arrays[k].shape == batch[k].shape
        assert arrays[k].sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(arrays[k]), batch[k])
