"""medcode_jax.candidates: selection rules and cascade scores on hand examples, the cache format
(round trip, lookup, atomicity, freshness) and build_cache end to end on the tiny config."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from medcode_jax import candidates as cands


def _multi_hot(rows: list[list[int]], c: int) -> np.ndarray:
    out = np.zeros((len(rows), c), np.float32)
    for i, row in enumerate(rows):
        out[i, row] = 1.0
    return out


# ----------------------------------------------------------------------------- selection


def test_select_train_hand_examples():
    top_ids = np.array([[4, 2, 7, 1, 0],    # gold 7 listed, 9 unlisted
                        [5, 3, 1, 8, 6],    # 4 gold > k=3: listed 3, 1 first, then 0 (by id)
                        [9, 8, 7, 6, 5],    # no gold: pure top 3
                        [2, 5, 6, 0, 1],    # exactly k gold, all listed
                        [1, 3, 5, 7, 9]])   # 4 unlisted gold > k: lowest ids
    labels = _multi_hot([[7, 9], [0, 1, 2, 3], [], [6, 5, 2], [0, 2, 4, 6]], 10)
    got = cands.select_train(top_ids, labels, 3)
    assert got.dtype == np.int32 and got.shape == (5, 3)
    np.testing.assert_array_equal(got, [[7, 9, 4], [3, 1, 0], [9, 8, 7], [2, 5, 6], [0, 2, 4]])


def test_select_train_properties_random():
    rng = np.random.default_rng(0)
    b, c, k_max, k = 64, 40, 12, 6
    top_ids = np.stack([rng.permutation(c)[:k_max] for _ in range(b)])
    labels = (rng.random((b, c)) < rng.random((b, 1)) * 0.3).astype(np.float32)
    got = cands.select_train(top_ids, labels, k)
    for i in range(b):
        row = list(got[i])
        assert len(set(row)) == k
        gold = set(np.flatnonzero(labels[i]))
        rank = {int(code): r for r, code in enumerate(top_ids[i])}
        prio = lambda code: ((0, rank[code]) if code in gold and code in rank else  # noqa: E731
                             (1, code) if code in gold else (2, rank.get(code, 10**9)))
        expected = sorted(gold | set(rank), key=prio)[:k]
        assert row == expected
        if len(gold) <= k:
            assert gold <= set(row)
        non_gold = [x for x in row if x not in gold]
        assert non_gold == [int(x) for x in top_ids[i] if x not in gold][:len(non_gold)]


def test_select_eval_is_pure_top_k():
    top_ids = np.array([[4, 2, 7, 1], [0, 1, 2, 3]])
    got = cands.select_eval(top_ids, 2)
    np.testing.assert_array_equal(got, [[4, 2], [0, 1]])
    assert got.dtype == np.int32
    with pytest.raises(ValueError, match="K_max=4"):
        cands.select_eval(top_ids, 5)
    with pytest.raises(ValueError, match="K_max=4"):
        cands.select_train(top_ids, np.zeros((2, 8)), 5)


def test_unique_count_with_accumulation():
    cand = np.array([[0, 1], [5, 6], [1, 2], [5, 5]])
    assert cands.unique_count(cand, 2) == 3   # micro 0 = rows 0, 2: {0,1,2}; micro 1: {5,6}
    assert cands.unique_count(cand, 1) == 5   # {0,1,2,5,6}
    assert cands.unique_count(cand, 4) == 2   # one row each
    with pytest.raises(ValueError, match="multiple"):
        cands.unique_count(cand, 3)


def test_unique_bucket():
    assert cands.unique_bucket(13, slots_per_micro=600, multiple=8) == 16
    assert cands.unique_bucket(64, slots_per_micro=600, multiple=64) == 64
    assert cands.unique_bucket(599, slots_per_micro=600, multiple=64) == 600
    assert cands.unique_bucket(0, slots_per_micro=10, multiple=8) == 8
    assert cands.unique_bucket(3, slots_per_micro=4, multiple=8) == 4


# ----------------------------------------------------------------------------- scores


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_cascade_probs_order_and_threshold():
    top_ids = np.array([[3, 1, 4, 0]])
    top_logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    candidates = np.array([[1, 3, 5]])        # 5 is not listed (a forced gold code)
    rerank = np.array([[-20.0, 0.5, -200.0]], np.float32)
    p = cands.cascade_probs(rerank, candidates, top_ids, top_logits, 7)
    assert p.dtype == np.float32 and p.shape == (1, 7)
    np.testing.assert_allclose(p[0, [3, 1]], _sig([0.5, -20.0]), rtol=1e-6)
    assert p[0, 5] == np.float32(1e-30)                     # floor: still above non-candidates
    np.testing.assert_allclose(p[0, [4, 0]], 1e-31 * _sig([0.0, -1.0]), rtol=1e-5)
    assert p[0, 2] == 0 and p[0, 6] == 0                    # outside the list
    order = np.argsort(-p[0], kind="stable")
    assert list(order) == [3, 1, 5, 4, 0, 2, 6]
    cand_min = p[0, candidates[0]].min()
    non_cand = np.setdiff1d(np.arange(7), candidates[0])
    assert (p[0, non_cand] < cand_min).all()
    assert list(np.flatnonzero(p[0] > 0.5)) == [3]          # thresholding sees candidates only

    # clip: a very low retriever logit still stays > 0 and ordered above unlisted codes
    p2 = cands.cascade_probs(rerank, candidates, top_ids, np.array([[2.0, 1.0, -50.0, -60.0]]), 7)
    assert p2[0, 4] > 0 and p2[0, 0] > 0 and p2[0, 4] >= p2[0, 0]


def test_cascade_probs_constant_mode():
    top_ids = np.array([[3, 1, 4, 0]])
    top_logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    p = cands.cascade_probs(np.array([[-20.0, 0.5]]), np.array([[1, 3]]), top_ids, top_logits,
                            6, mode="constant")
    expected = np.zeros((1, 6))
    expected[0, [1, 3]] = _sig([-20.0, 0.5])
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        cands.cascade_probs(np.zeros((1, 2)), np.array([[1, 3]]), top_ids, top_logits, 6,
                            mode="other")


def test_retriever_recall_and_coverage():
    top_ids = np.array([[0, 1, 2], [6, 7, 8], [3, 4, 5]])
    labels = [np.array([1, 9]), np.array([], np.int32), np.array([5, 3, 4, 0])]
    got = cands.retriever_recall(top_ids, labels, (1, 2, 3, 5))
    assert set(got) == {f"retriever_{m}@{k}" for m in ("recall", "coverage") for k in (1, 2, 3)}
    assert got["retriever_recall@1"] == pytest.approx((0 + 1 / 4) / 2)
    assert got["retriever_coverage@1"] == pytest.approx(1 / 6)
    assert got["retriever_recall@2"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert got["retriever_coverage@2"] == pytest.approx(3 / 6)
    assert got["retriever_recall@3"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert got["retriever_coverage@3"] == pytest.approx(4 / 6)
    empty = cands.retriever_recall(top_ids, [np.array([], np.int32)] * 3, (2,))
    assert np.isnan(empty["retriever_recall@2"]) and np.isnan(empty["retriever_coverage@2"])


# ----------------------------------------------------------------------------- cache format


def _meta(**over):
    meta = {"num_labels": 10, "retriever": {"workdir": "/w/stage1", "step": 40,
                                             "weights_sha256": "ab" * 32},
            "shards_fingerprint": "cd" * 32}
    meta.update(over)
    return meta


def _splits():
    rng = np.random.default_rng(1)
    out = {}
    for name, ids in (("train", [3, 10, 11, 20]), ("val", [5, 7]), ("test", [])):
        n = len(ids)
        top = np.stack([rng.permutation(10)[:4] for _ in range(n)]) if n else np.zeros((0, 4))
        out[name] = (np.array(ids, np.int64), top.astype(np.int32),
                     -np.sort(-rng.normal(size=(n, 4)), axis=1).astype(np.float32))
    return out


def test_cache_round_trip_and_lookup(tmp_path):
    splits = _splits()
    path = tmp_path / "candidates"
    cands.write_cache(path, splits=splits, meta=_meta())
    assert sorted(os.listdir(tmp_path)) == ["candidates"]
    with open(path / "meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["format_version"] == 1 and meta["k_max"] == 4
    assert meta["splits"] == {"train": 4, "val": 2, "test": 0}
    assert meta["retriever"]["step"] == 40 and "created" in meta
    cache = cands.open_cache(path)
    assert cache.k_max == 4 and cache.num_labels == 10
    assert cache.splits == ("train", "val", "test")
    for name, (doc_ids, ids, logits) in splits.items():
        s = cache.split(name)
        np.testing.assert_array_equal(s.doc_ids, doc_ids)
        np.testing.assert_array_equal(s.ids, ids)
        np.testing.assert_array_equal(s.logits, logits)
        assert s.doc_ids.dtype == np.int64 and s.ids.dtype == np.int32
        assert s.logits.dtype == np.float32
    train = cache.split("train")
    ids, logits = train.lookup(np.array([20, -1, 3, 20]))
    doc_ids, all_ids, all_logits = splits["train"]
    np.testing.assert_array_equal(ids[[0, 2, 3]], all_ids[[3, 0, 3]])
    np.testing.assert_array_equal(ids[1], np.arange(4))
    assert (logits[1] == 0).all()
    np.testing.assert_array_equal(logits[[0, 2, 3]], all_logits[[3, 0, 3]])
    assert ids.dtype == np.int32 and logits.dtype == np.float32
    with pytest.raises(KeyError, match=r"candidates.*'train'.*id 12"):
        train.lookup(np.array([3, 12]))
    ids, _ = cache.split("test").lookup(np.array([-1, -1]))
    np.testing.assert_array_equal(ids, [np.arange(4)] * 2)
    with pytest.raises(KeyError, match="'test'"):
        cache.split("test").lookup(np.array([3]))
    with pytest.raises(KeyError, match="no split 'dev'"):
        cache.split("dev")


def test_cache_refuses_bad_input_and_existing_dir(tmp_path):
    path = tmp_path / "candidates"
    bad = _splits()
    doc_ids, ids, logits = bad["train"]
    bad["train"] = (doc_ids[::-1], ids, logits)
    with pytest.raises(ValueError, match="ascending"):
        cands.write_cache(path, splits=bad, meta=_meta())
    with pytest.raises(ValueError, match="shards_fingerprint"):
        meta = _meta()
        del meta["shards_fingerprint"]
        cands.write_cache(path, splits=_splits(), meta=meta)
    with pytest.raises(ValueError, match="out of range"):
        cands.write_cache(path, splits=_splits(), meta=_meta(num_labels=5))
    assert not path.exists()
    cands.write_cache(path, splits=_splits(), meta=_meta())
    with pytest.raises(FileExistsError, match="delete it"):
        cands.write_cache(path, splits=_splits(), meta=_meta())
    cands.write_cache(path, splits={"val": _splits()["val"]}, meta=_meta(), overwrite=True)
    assert cands.open_cache(path).splits == ("val",)
    assert sorted(os.listdir(tmp_path)) == ["candidates"]


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "candidates"
    real = np.savez
    calls = []

    def failing(file, **arrays):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        real(file, **arrays)

    monkeypatch.setattr(np, "savez", failing)
    with pytest.raises(OSError, match="disk full"):
        cands.write_cache(path, splits=_splits(), meta=_meta())
    assert os.listdir(tmp_path) == []  # neither candidates/ nor its temporary directory


def test_open_cache_errors(tmp_path):
    path = tmp_path / "candidates"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cands.open_cache(path)
    path.mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        cands.open_cache(path)
    cands.write_cache(tmp_path / "c2", splits=_splits(), meta=_meta())
    os.remove(tmp_path / "c2" / "val.npz")
    with pytest.raises(FileNotFoundError, match="val.npz is missing"):
        cands.open_cache(tmp_path / "c2")
    # a pickled (object) array is refused, never unpickled
    cands.write_cache(tmp_path / "c3", splits=_splits(), meta=_meta())
    np.savez(tmp_path / "c3" / "val.npz", doc_ids=np.array([object()], dtype=object),
             ids=np.zeros((2, 4), np.int32), logits=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="val.npz"):
        cands.open_cache(tmp_path / "c3").split("val")
    meta_file = tmp_path / "c3" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 2"):
        cands.open_cache(tmp_path / "c3")


def test_check_fresh_names_each_stale_field(tmp_path):
    path = tmp_path / "candidates"
    cands.write_cache(path, splits=_splits(), meta=_meta())
    cache = cands.open_cache(path)
    good = dict(k=3, num_labels=10, retriever_step=40, weights_sha256="ab" * 32,
                shards_fingerprint="cd" * 32)
    cands.check_fresh(cache, **good)
    cands.check_fresh(cache, **{**good, "k": 4})
    stale = {"k": (5, "k_max"), "num_labels": (11, "num_labels"),
             "retriever_step": (41, "retriever.step"),
             "weights_sha256": ("ef" * 32, "retriever.weights_sha256"),
             "shards_fingerprint": ("00" * 32, "shards_fingerprint")}
    for arg, (value, field) in stale.items():
        with pytest.raises(cands.StaleCacheError) as err:
            cands.check_fresh(cache, **{**good, arg: value})
        msg = str(err.value)
        assert f"- {field}:" in msg and str(value) in msg and "delete" in msg, msg
        assert str(path) in msg and msg.count("\n- ") == 1
    with pytest.raises(cands.StaleCacheError) as err:
        cands.check_fresh(cache, **{**good, "retriever_step": 1, "num_labels": 3})
    assert str(err.value).count("\n- ") == 2


def test_weights_sha256_and_shards_fingerprint(tmp_path):
    import types

    import jax.numpy as jnp
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    h = cands.weights_sha256(state)
    assert h == cands.weights_sha256(nnx.state(model, nnx.Param))
    assert h == cands.weights_sha256(nnx.to_pure_dict(state))
    model.kernel[...] = model.kernel[...].at[0, 0].add(1e-3)
    assert cands.weights_sha256(nnx.state(model, nnx.Param)) != h
    assert cands.weights_sha256({"a": jnp.ones(2)}) != cands.weights_sha256({"b": jnp.ones(2)})

    for name in ("metadata.json", "label_space.json", "descriptions.npz"):
        (tmp_path / name).write_bytes(name.encode())
    ds = types.SimpleNamespace(path=tmp_path)
    f = cands.shards_fingerprint(ds)
    assert f == cands.shards_fingerprint(ds) and len(f) == 64
    (tmp_path / "label_space.json").write_bytes(b"other")
    assert cands.shards_fingerprint(ds) != f


# ----------------------------------------------------------------------------- build_cache


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from train_test import synthetic_dataset, tiny_bert_dir

    root = str(tmp_path_factory.mktemp("assets"))
    return {"data": synthetic_dataset(root), "encoder": tiny_bert_dir(root)}


def test_build_cache_end_to_end(assets, tmp_path):
    import jax
    import jax.numpy as jnp

    from medcode_jax import train
    from train_test import tiny_config

    config = tiny_config(assets, eval_batch_size=12)  # 32 train docs: the last batch has filler
    run = train.setup(config)
    k_max = 5
    out = tmp_path / "w" / "candidates"
    cache = cands.build_cache(run, out, k_max=k_max, retriever_workdir=tmp_path / "stage1")
    assert sorted(os.listdir(tmp_path / "w")) == ["candidates"]
    assert cache.k_max == k_max and cache.num_labels == run.ds.num_labels
    meta = cache.meta
    assert meta["retriever"] == {"workdir": str(tmp_path / "stage1"), "step": 0,
                                 "weights_sha256": cands.run_weights_sha256(run)}
    assert meta["shards_fingerprint"] == cands.shards_fingerprint(run.ds)
    assert meta["splits"] == {"train": 32, "val": 8, "test": 8}
    cands.check_fresh(cache, k=3, num_labels=run.ds.num_labels, retriever_step=0,
                      weights_sha256=cands.run_weights_sha256(run),
                      shards_fingerprint=cands.shards_fingerprint(run.ds))
    for split in ("train", "val", "test"):
        source = run.ds.source(split)
        expected = sorted(int(source[i]["_id"]) for i in range(len(source)))
        assert list(cache.split(split).doc_ids) == expected
        assert cache.split(split).ids.shape == (len(expected), k_max)

    model = run.model()
    width = config.data.max_length
    source = run.ds.source("train")
    for i in (0, 17, 31):
        ex = source[i]
        n = ex["input_ids"].shape[0]
        ids = np.full((1, width), run.ds.pad_token_id, np.int32)
        ids[0, :n] = ex["input_ids"]
        mask = (np.arange(width) < n).astype(np.int32)[None]
        logits = model(jnp.asarray(ids), jnp.asarray(mask), deterministic=True)
        values, top = jax.lax.top_k(logits.astype(jnp.float32), k_max)
        got_ids, got_logits = cache.split("train").lookup(np.array([ex["_id"]]))
        np.testing.assert_array_equal(got_ids, np.asarray(top))
        np.testing.assert_allclose(got_logits, np.asarray(values), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError, match="already exists"):
        cands.build_cache(run, out, k_max=k_max, retriever_workdir=tmp_path / "stage1")
