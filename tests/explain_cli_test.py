"""End-to-end: a tiny run (tests/train_test.py's data, encoder and config; its initial state saved
as the best checkpoint instead of training it, which takes minutes on a busy CPU; later calls
reuse that Run instead of rebuilding it, except --mode=predict through main.py), then
--mode=explain on text files (one empty) and shards, --html, --mode=predict evidence, and
--evaluate on batches with synthetic evidence. One bucket (4 x 16 tokens), eval batch 8: few
compiled shapes."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

import utils
from train_test import REPO, _main, synthetic_dataset, tiny_bert_dir, tiny_config

from medcode_jax import train as _train

REAL_LOAD = _train.load_trained
SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "[MASK]")
NOTE = "chest pain <b>fever</b> & cough " + utils.synthetic_text(random.Random(3), 25)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from medcode_jax import checkpointing, train

    root = str(tmp_path_factory.mktemp("explain_assets"))
    assets = {"data": synthetic_dataset(root), "encoder": tiny_bert_dir(root)}
    workdir = str(tmp_path_factory.mktemp("explain_run"))
    run = train.setup(tiny_config(assets))
    train.initialise_weights(run)
    ckpt = checkpointing.Checkpointer(workdir, keep=1, async_save=False)
    progress = {"best_metric": 0.0, "best_step": 0, "bad_evals": 0, "stopped": False}
    ckpt.save(0, run.state, data_state=None, meta=train._meta(run, progress), best=True)
    ckpt.wait()
    ckpt.close()
    with open(os.path.join(workdir, train.THRESHOLD_FILE), "w", encoding="utf-8") as f:
        json.dump({"threshold": 0.0, "step": 0}, f)  # untrained: every top code is "predicted"
    real = train.load_trained
    with pytest.MonkeyPatch.context() as patch:  # setup() compiles for ~15 s: build it once
        patch.setattr(train, "load_trained", lambda config, wd: run if wd == workdir
                      else real(config, wd))
        yield assets, workdir


@pytest.fixture()
def notes(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a_note.txt").write_text(NOTE, encoding="utf-8")
    (folder / "b_empty.txt").write_text("", encoding="utf-8")
    (folder / "c_blank.txt").write_text("  \n\t\n", encoding="utf-8")
    return folder


def _lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def _check_spans(spans, text):
    assert spans, "no evidence"
    for s in spans:
        assert text[s["start"]:s["end"]] == s["text"]
        assert s["text"] not in SPECIAL and s["text"].strip() == s["text"]
    scores = [s["score"] for s in spans]
    assert scores == sorted(scores, reverse=True) and all(x > 0 for x in scores)


def test_explain_text_files_and_html(run_dir, notes, tmp_path):
    from medcode_jax.explain import cli

    assets, workdir = run_dir
    out, page = tmp_path / "expl.jsonl", tmp_path / "expl.html"
    n = cli.explain(tiny_config(assets), workdir, methods="attention,gradient_x_input",
                    input_spec=f"{notes}/*.txt", output=str(out), html=str(page),
                    top_spans=4)
    docs = _lines(out)
    assert n == len(docs) == 4
    assert [d["doc_id"] for d in docs] == ["a_note.txt"] * 2 + ["b_empty.txt", "c_blank.txt"]
    assert [d.get("method") for d in docs[:2]] == ["attention", "gradient_x_input"]
    for d in docs[2:]:
        assert set(d) == {"doc_id", "error"} and d["error"].startswith("empty note")
    for d in docs[:2]:
        assert d["codes"]
        for code in d["codes"]:
            assert code["description"].startswith("code ") and 0 <= code["probability"] <= 1
            assert len(code["evidence"]) <= 4
            _check_spans(code["evidence"], NOTE)
        probs = [c["probability"] for c in d["codes"]]
        assert probs == sorted(probs, reverse=True)
        assert len(d["codes"]) == 5 and all(c["above_threshold"] for c in d["codes"])
    html = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;" in html and "&amp;" in html and "<b>" not in html
    assert "<mark" in html and "empty note" in html and "<script" not in html
    assert not list(tmp_path.glob("*.tmp*"))


def test_explain_shards_gold_codes(run_dir, tmp_path):
    from medcode_jax.explain import cli

    assets, workdir = run_dir
    out = tmp_path / "gold.jsonl"
    cli.explain(tiny_config(assets), workdir, methods="attention", input_spec="shards:test",
                output=str(out), codes="gold", top_spans=3)
    docs = _lines(out)
    assert sorted(d["doc_id"] for d in docs) == list(range(1040, 1048))
    for d in docs:
        for code in d["codes"]:
            for s in code["evidence"]:
                assert 1 <= s["token_start"] < s["token_end"] and s["text"] not in SPECIAL
    with pytest.raises(ValueError, match="--codes=gold needs labels"):
        cli.explain(tiny_config(assets), workdir, methods="attention", input_spec="x/*.txt",
                    output=str(out), codes="gold")


def test_predict_empty_note_and_word_evidence(run_dir, notes, tmp_path, monkeypatch):
    from medcode_jax import predict, train

    assets, workdir = run_dir
    monkeypatch.setattr(train, "load_trained", REAL_LOAD)  # the real restore, once
    common = [f"--config={REPO}/configs/plmca.py:tiny", f"--workdir={workdir}",
              f"--config.data.dir={assets['data']}", f"--config.encoder.path={assets['encoder']}"]
    out = tmp_path / "pred.jsonl"
    _main(common, monkeypatch, mode="predict", input=f"{notes}/*.txt", output=str(out))
    docs = _lines(out)
    assert [d["doc_id"] for d in docs] == ["a_note.txt", "b_empty.txt", "c_blank.txt"]
    assert "codes" not in docs[1] and docs[1]["error"].startswith("empty note")
    assert "codes" not in docs[2]
    for code in docs[0]["codes"]:
        assert len(code["evidence"]) == predict.TOP_TOKENS
        _check_spans(code["evidence"], NOTE)
    monkeypatch.undo()  # back to the fixture's Run
    out3 = tmp_path / "main_explain.jsonl"
    _main(common, monkeypatch, mode="explain", method="attention", input=f"{notes}/*.txt",
          output=str(out3), top_spans=2)
    lines = _lines(out3)
    assert [d["doc_id"] for d in lines] == ["a_note.txt", "b_empty.txt", "c_blank.txt"]
    assert all(len(c["evidence"]) <= 2 for c in lines[0]["codes"])
    out2 = tmp_path / "pred_ig.jsonl"
    predict.predict(tiny_config(assets), workdir, f"{notes}/a_*.txt", str(out2),
                    explain="gradient_x_input")
    (doc,) = _lines(out2)
    assert [c["code"] for c in doc["codes"]] == [c["code"] for c in docs[0]["codes"]]
    for code in doc["codes"]:
        _check_spans(code["evidence"], NOTE)
    out4 = tmp_path / "pred_shards.jsonl"
    assert predict.predict(tiny_config(assets), workdir, "shards:test", str(out4)) == 8
    for d in _lines(out4):
        for code in d["codes"]:
            assert code["evidence"] and all(
                s["text"] not in SPECIAL and s["token_start"] >= 1 for s in code["evidence"])


def test_evaluate_with_synthetic_evidence(run_dir, tmp_path, monkeypatch):
    """Evidence = the first word token of each gold code's row; distractor = the last one."""
    from medcode_jax import predict
    from medcode_jax.explain import cli

    assets, workdir = run_dir
    original = predict.shard_batches

    def with_evidence(run, split, tokenizer):
        keep = 2  # = config.data.max_evidence_codes below; the Run's own config has 0
        for batch in original(run, split, tokenizer):
            b, t = batch["input_ids"].shape
            codes = np.full((b, keep), -1, np.int32)
            evidence = np.zeros((b, keep, t), np.int8)
            distractor = np.zeros((b, t), np.int8)
            for r in np.flatnonzero(batch["valid"]):
                words = np.flatnonzero(batch["token_mask"][r])
                gold = np.flatnonzero(batch["labels"][r])[:keep]
                codes[r, :gold.size] = gold
                for e in range(gold.size):
                    evidence[r, e, words[e:e + 2]] = 1
                distractor[r, words[-1]] = 1
            batch.update(evidence_codes=codes, evidence_mask=evidence, distractor_mask=distractor)
            yield batch

    monkeypatch.setattr(predict, "shard_batches", with_evidence)
    config = tiny_config(assets)
    config.data.max_evidence_codes = 2
    out = tmp_path / "eval.json"
    doc = cli.evaluate(config, workdir, methods="attention,random", split="test",
                       output=str(out), faithfulness_features=4)
    saved = json.loads(out.read_text())
    assert saved["split"] == "test" and set(saved["methods"]) == {"attention", "random"}
    for method, res in doc["methods"].items():
        assert 0 <= res["decision_boundary"] <= 0.1
        allrows = res["all"]
        assert allrows["rows"] > 0
        for key in ("precision", "recall", "f1", "auprc", "iou", "entropy",
                    "evidence_span_recall", "distractor_top1_rate"):
            assert 0 <= allrows[key] <= 1, (method, key)
        faith = res["faithfulness"]
        assert faith["rows"] == 8 * 5 and faith["max_features"] == 4  # 8 docs x top 5 codes
        assert np.isfinite(faith["comprehensiveness"]) and faith["sufficiency"] >= 0
    assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    config.data.max_evidence_codes = 0
    with pytest.raises(ValueError, match="max_evidence_codes"):
        cli.evaluate(config, workdir, methods="attention")


def test_explain_options_from_the_config():
    """config.explain reaches ExplainOptions (0 code_batch = the backend's default); the
    baseline is the mask token, else pad; bad values name config.explain."""
    import types

    from configs import plmicd
    from medcode_jax.explain import cli

    c = plmicd.get_config("demo")
    c.explain.ig_steps, c.explain.occlusion_batch = 8, 32
    with_mask = types.SimpleNamespace(mask_token_id=103)
    opts = cli.explain_options(c, with_mask, 0, ig_batch=4)
    assert (opts.ig_steps, opts.occlusion_batch, opts.ig_batch) == (8, 32, 4)
    assert opts.code_batch is None and opts.baseline_token_id == 103
    assert cli.explain_options(c, types.SimpleNamespace(mask_token_id=None), 1).baseline_token_id == 1
    c.explain.ig_steps = 0
    with pytest.raises(ValueError, match="config.explain: .*ig_steps must be >= 1"):
        cli.explain_options(c, with_mask, 0)
    c.explain.ig_steps = 8
    c.explain.unlock()
    c.explain.ig_stepz = 3
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['ig_stepz'\]"):
        cli.explain_options(c, with_mask, 0)
