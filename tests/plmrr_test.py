"""PLM-RR end to end on the `tiny` config: the three stages through the one training loop,
resume across every stage boundary on the same trajectory, stale-cache refusal, eval / export /
predict through main.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import plmrr
from train_test import synthetic_dataset, tiny_bert_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("assets"))
    return {"data": synthetic_dataset(root), "encoder": tiny_bert_dir(root)}


def tiny_config(assets, **rerank):
    c = plmrr.get_config("tiny")
    for section in (c, c.retriever):
        section.data.dir = assets["data"]
        section.encoder.path = assets["encoder"]
    c.train.num_epochs = 2
    c.retriever.train.num_epochs = 2
    for key, value in rerank.items():
        c.rerank[key] = value
    return c


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """One uninterrupted pipeline run."""
    from medcode_jax import pipelines

    workdir = str(tmp_path_factory.mktemp("plmrr"))
    summary = pipelines.run_plmrr(tiny_config(assets), workdir)
    return workdir, summary


def _strict(constant):
    raise ValueError(f"not strict JSON: {constant}")


def _read(path):
    """Strict JSON: NaN / Infinity are refused, as JavaScript or jq would."""
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=_strict)


def test_pipeline_writes_every_stage_and_the_comparison(finished):
    workdir, summary = finished
    for sub in ("retriever/metrics.json", "candidates/meta.json", "candidates/train.npz",
                "reranker/metrics.json", "metrics.json", "stages.json"):
        assert os.path.isfile(os.path.join(workdir, sub)), sub
    saved = _read(os.path.join(workdir, "metrics.json"))  # strict JSON (no bare NaN)
    assert saved["k"] == 4
    for stage in ("stage1", "stage2"):
        test = saved[stage]["test"]
        assert 0.0 <= test["f1_micro"] <= 1.0 and 0.0 <= test["map"] <= 1.0
        assert "never_correct_codes" in test and "f1_macro_band_1-10" in test
    recall = saved["retriever_recall"]
    for split in ("val", "test"):
        assert recall[split]["retriever_recall@4"] <= recall[split]["retriever_recall@8"] <= 1.0
    assert saved["oracle_test"]["oracle_recall_micro"] == pytest.approx(
        recall["test"]["retriever_coverage@4"])
    assert summary["stage2"]["test"]["f1_micro"] == pytest.approx(
        saved["stage2"]["test"]["f1_micro"])
    meta = _read(os.path.join(workdir, "candidates", "meta.json"))
    assert meta["k_max"] == 8
    assert meta["retriever"]["step"] == _read(
        os.path.join(workdir, "retriever", "metrics.json"))["best_step"]
    # stage 2 logged the share of description slots it encoded (unique-description encoding)
    with open(os.path.join(workdir, "reranker", "metrics.jsonl"), encoding="utf-8") as f:
        train_records = [json.loads(line) for line in f if '"prefix": "train"' in line]
    fractions = [r["descriptions_encoded_fraction"] for r in train_records]
    assert fractions and all(0.0 < x <= 1.0 for x in fractions)
    assert all(r["descriptions_distinct_fraction"] <= r["descriptions_encoded_fraction"]
               for r in train_records)


def test_resume_across_every_stage_boundary_lands_on_the_same_result(assets, finished,
                                                                     tmp_path):
    """Killed after stage 1 (its run is there), mid-cache (a half-written temp directory is
    left behind) and mid-stage 2 (max_steps_per_run stops it): the same command finishes with
    the uninterrupted run's numbers."""
    from medcode_jax import pipelines

    reference_dir, _ = finished
    workdir = str(tmp_path / "w")
    shutil.copytree(os.path.join(reference_dir, "retriever"), os.path.join(workdir, "retriever"))
    os.makedirs(os.path.join(workdir, "candidates.tmp-killed"))  # a killed cache build
    with open(os.path.join(workdir, "candidates.tmp-killed", "train.npz"), "wb") as f:
        f.write(b"half")
    config = tiny_config(assets)
    config.train.max_steps_per_run = 3
    assert pipelines.run_plmrr(config, workdir) is None  # stopped inside stage 2
    assert os.path.isfile(os.path.join(workdir, "candidates", "meta.json"))
    assert not os.path.exists(os.path.join(workdir, "reranker", "metrics.json"))
    early = _read(os.path.join(workdir, "metrics.json"))  # recall is there before stage 2 ends
    assert "retriever_recall@4" in early["retriever_recall"]["val"] and "stage2" not in early
    config.train.max_steps_per_run = 0
    summary = pipelines.run_plmrr(config, workdir)
    reference = _read(os.path.join(reference_dir, "metrics.json"))
    for stage in ("stage1", "stage2"):
        for key in ("f1_micro", "f1_macro", "map", "never_correct_codes"):
            assert summary[stage]["test"][key] == pytest.approx(
                reference[stage]["test"][key], abs=1e-6), (stage, key)
    # the cache is the same one: same retriever checkpoint, same candidates
    for split in ("train", "val", "test"):
        a = np.load(os.path.join(workdir, "candidates", f"{split}.npz"))
        b = np.load(os.path.join(reference_dir, "candidates", f"{split}.npz"))
        np.testing.assert_array_equal(a["ids"], b["ids"])


def test_stale_cache_is_refused_with_the_reason(assets, finished, tmp_path):
    from medcode_jax import candidates, pipelines

    reference_dir, _ = finished
    workdir = str(tmp_path / "w")
    for sub in ("retriever", "candidates"):
        shutil.copytree(os.path.join(reference_dir, sub), os.path.join(workdir, sub))
    meta_path = os.path.join(workdir, "candidates", "meta.json")
    meta = _read(meta_path)
    meta["retriever"]["step"] += 1
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(candidates.StaleCacheError, match="step"):
        pipelines.run_plmrr(tiny_config(assets), workdir)


def test_main_eval_export_and_predict_for_plmrr(assets, finished, tmp_path):
    reference_dir, _ = finished
    workdir = str(tmp_path / "w")
    shutil.copytree(reference_dir, workdir)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("patient admitted with chest pain and fever", encoding="utf-8")
    (notes / "b.txt").write_text("history of hypertension diabetes mellitus", encoding="utf-8")
    overrides = [f"--config.data.dir={assets['data']}", f"--config.encoder.path={assets['encoder']}",
                 f"--config.retriever.data.dir={assets['data']}",
                 f"--config.retriever.encoder.path={assets['encoder']}",
                 "--config.train.num_epochs=2", "--config.retriever.train.num_epochs=2"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")

    def main(*args):
        out = subprocess.run([sys.executable, "-m", "medcode_jax.main",
                              "--config=configs/plmrr.py:tiny", f"--workdir={workdir}",
                              *overrides, *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
        return out

    main("--mode=eval", "--split=val")
    saved = _read(os.path.join(workdir, "reranker", "metrics_val.json"))
    assert saved["val"]["f1_micro"] == pytest.approx(
        _read(os.path.join(workdir, "reranker", "metrics.json"))["val"]["f1_micro"], abs=1e-6)
    predictions = str(tmp_path / "pred.jsonl")
    (notes / "c.txt").write_text("  \n\t ", encoding="utf-8")  # whitespace only
    # evidence from an explanation method of the re-ranker (one compiled program more)
    main("--mode=predict", f"--input={notes}/*.txt", f"--output={predictions}",
         "--explain=attingrad")
    with open(predictions, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["doc_id"] for r in rows] == ["a.txt", "b.txt", "c.txt"]
    assert "codes" not in rows[2] and rows[2]["error"].startswith("empty note")
    for row in rows[:2]:
        text = (notes / row["doc_id"]).read_text(encoding="utf-8")
        assert len(row["codes"]) == 4  # min(predictions_top_k, K)
        assert sorted(e["retriever_rank"] for e in row["codes"]) == [1, 2, 3, 4]
        for entry in row["codes"]:
            assert entry["evidence"] and all(
                text[w["start"]:w["end"]] == w["text"] for w in entry["evidence"]), entry
            # word scores: shares of the note's attribution (rounded), best first
            scores = [w["score"] for w in entry["evidence"]]
            assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.001, entry
    main("--mode=export")
    export_dir = os.path.join(workdir, "export")
    config = _read(os.path.join(export_dir, "config.json"))
    assert config["model_type"] == "plmrr" and config["top_k"] == 4
    assert config["parity_max_abs_diff"] <= 1e-4
