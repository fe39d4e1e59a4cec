"""End-to-end tests of the training loop on the `tiny` config (tiny random BERT, synthetic
shards): train_and_evaluate outputs, exact resume, and main.py --mode eval / predict."""
from __future__ import annotations

import glob
import json
import os
import random
import sys

import jax
import numpy as np
import pytest

import utils
from configs import plmca
from data_prep import shards

NUM_LABELS = 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_bert_dir(root: str) -> str:
    """A 2-layer, hidden-32 random BERT with the tiny wordpiece vocabulary, saved HF-style."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = os.path.join(root, "tiny_bert")
    tok = AutoTokenizer.from_pretrained(utils.tiny_tokenizer_dir("wordpiece"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                     pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(out)
    return out


def synthetic_dataset(root: str, *, docs: int = 48, max_length: int = 64) -> str:
    """~48 tokenised synthetic notes, C=12 codes; code j is assigned when its trigger word
    occurs, so the labels are learnable."""
    import numpy as np
    from transformers import AutoTokenizer

    tok_dir = utils.tiny_tokenizer_dir("wordpiece")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    triggers = utils.WORDS[:NUM_LABELS]
    rng = random.Random(0)
    examples = []
    for i in range(docs):
        text = utils.synthetic_text(rng, rng.randint(5, 45))
        ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
        words = set(text.split())
        labels = [j for j, w in enumerate(triggers) if w in words] or [NUM_LABELS - 1]
        examples.append({"_id": 1000 + i, "input_ids": np.asarray(ids, np.int32),
                         "label_ids": np.asarray(labels, np.int32)})
    codes = [f"A{j:02d}" for j in range(NUM_LABELS)]
    desc = tok([f"code {w}" for w in triggers], padding="max_length", max_length=8,
               truncation=True, return_tensors="np")
    out = os.path.join(root, "data")
    shards.write_dataset(
        out, split_examples={"train": examples[:32], "val": examples[32:40],
                             "test": examples[40:]},
        metadata={"name": "tiny", "recipe": "emnlp2024", "icd_version": 10,
                  "max_length": max_length, "label_systems": ["icd10cm"] * 9 + ["icd10pcs"] * 3},
        label_space=codes, descriptions=[f"code {w}" for w in triggers],
        description_ids=desc["input_ids"].astype(np.int32),
        description_mask=desc["attention_mask"].astype(np.int8), tokenizer_dir=tok_dir)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("assets"))
    return {"data": synthetic_dataset(root), "encoder": tiny_bert_dir(root)}


def tiny_config(assets, **train):
    config = plmca.get_config("tiny")
    config.data.dir = assets["data"]
    config.encoder.path = assets["encoder"]
    for key, value in train.items():
        config.train[key] = value
    return config


def _train_losses(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in records if r["prefix"] == "train"]


def _checkpoint_leaves(workdir: str, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One uninterrupted tiny run (2 epochs x 4 steps)."""
    from medcode_jax import train

    workdir = str(tmp_path_factory.mktemp("run"))
    results = train.train_and_evaluate(tiny_config(assets), workdir)
    return workdir, results


def test_train_and_evaluate_writes_everything(trained, assets):
    workdir, results = trained
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["test"]["f1_micro"] == pytest.approx(results["test"]["f1_micro"])
    for key in ("val", "test", "frequency_baseline_test"):
        assert 0.0 <= saved[key]["f1_micro"] <= 1.0 and 0.0 <= saved[key]["map"] <= 1.0
    assert 0.0 <= saved["threshold"] <= 1.0
    with open(os.path.join(workdir, "label_space.json"), encoding="utf-8") as f:
        assert json.load(f) == [f"A{j:02d}" for j in range(NUM_LABELS)]
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["train"]["global_batch_size"] == 8
    with open(os.path.join(workdir, "predictions_test.jsonl"), encoding="utf-8") as f:
        preds = [json.loads(line) for line in f]
    assert sorted(p["doc_id"] for p in preds) == list(range(1040, 1048))
    assert all(len(p["top_codes"]) == 5 for p in preds)
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.listdir(os.path.join(workdir, "best"))  # the best checkpoint
    losses = _train_losses(workdir)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert all(np.isfinite(l) for _, l in losses)


def test_resume_follows_the_same_trajectory(trained, assets, tmp_path):
    """Stopped after 3 steps, then resumed: same batches (losses) and same final params."""
    from medcode_jax import train

    full_dir, _ = trained
    workdir = str(tmp_path / "resumed")
    assert train.train_and_evaluate(tiny_config(assets, max_steps_per_run=3), workdir) is None
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
    train.train_and_evaluate(tiny_config(assets), workdir)
    full, resumed = _train_losses(full_dir), _train_losses(workdir)
    assert [s for s, _ in resumed] == [s for s, _ in full]
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in full], rtol=1e-6)
    for a, b in zip(_checkpoint_leaves(full_dir, 8), _checkpoint_leaves(workdir, 8)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_resume_refuses_another_label_space(trained, assets, tmp_path):
    from data_prep.shards import DatasetMismatchError
    from medcode_jax import train

    workdir, _ = trained
    meta_file = glob.glob(os.path.join(workdir, "checkpoints", "*", "meta", "metadata"))[0]
    other = str(tmp_path / "other")
    import shutil

    shutil.copytree(workdir, other)
    meta_file = meta_file.replace(workdir, other)
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    meta["label_space"] = meta["label_space"][::-1]
    with open(meta_file, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(DatasetMismatchError, match="label spaces differ"):
        train.train_and_evaluate(tiny_config(assets), other)


def test_loading_with_another_head_lr_multiplier_says_which(trained, assets):
    """The optimiser state differs with head_lr_multiplier != 1: a clear error, not Orbax's."""
    from medcode_jax import train

    workdir, _ = trained
    with pytest.raises(ValueError, match="head_lr_multiplier=1.0"):
        train.load_trained(tiny_config(assets, head_lr_multiplier=10.0), workdir)


def _main(argv: list[str], monkeypatch, **later: str) -> None:
    """Run medcode_jax.main in this process: flags parsed once (config overrides are read from
    sys.argv and can be defined only once per process), then `later` flags set by name."""
    from absl import flags

    from medcode_jax import main

    # Another test in this worker may have marked the flags parsed without a --config (grain's
    # multiprocessing does): parse again then.
    if not (flags.FLAGS.is_parsed() and flags.FLAGS["config"].present):
        flags.FLAGS.unparse_flags()
        monkeypatch.setattr(sys, "argv", ["main"] + argv)
        flags.FLAGS(sys.argv)
    else:
        # parsed by an earlier test of this worker (another file's workdir and assets): set
        # this test's flags and config overrides by hand; the config file must be the same
        for arg in argv:
            name, _, value = arg[2:].partition("=")
            if name == "config":
                first = flags.FLAGS["config"].serialize().partition("=")[2]
                assert os.path.realpath(first) == os.path.realpath(value), (first, value)
            elif name.startswith("config."):
                *path, leaf = name.split(".")[1:]
                node = flags.FLAGS.config
                for key in path:
                    node = node[key]
                old = node[leaf]
                node[leaf] = type(old)(value) if old is not None else value
            else:
                flags.FLAGS[name].parse(value)
    for name, value in later.items():
        setattr(flags.FLAGS, name, value)
    main.main(["main"])


def test_main_eval_and_predict(trained, assets, tmp_path, monkeypatch):
    workdir, results = trained
    common = [f"--config={REPO}/configs/plmca.py:tiny", f"--workdir={workdir}",
              f"--config.data.dir={assets['data']}", f"--config.encoder.path={assets['encoder']}"]
    _main(common, monkeypatch, mode="eval", split="test")
    with open(os.path.join(workdir, "metrics_test.json"), encoding="utf-8") as f:
        evaluated = json.load(f)
    assert evaluated["test"]["f1_micro"] == pytest.approx(results["test"]["f1_micro"], abs=1e-6)

    notes = tmp_path / "notes"
    notes.mkdir()
    rng = random.Random(1)
    for i in range(3):
        (notes / f"note{i}.txt").write_text(utils.synthetic_text(rng, 30 + 10 * i))
    out = tmp_path / "pred.jsonl"
    _main(common, monkeypatch, mode="predict", input=f"{notes}/*.txt", output=str(out))
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["doc_id"] for d in docs] == ["note0.txt", "note1.txt", "note2.txt"]
    for doc in docs:
        assert len(doc["codes"]) == 5
        probs = [c["probability"] for c in doc["codes"]]
        assert probs == sorted(probs, reverse=True)
        for code in doc["codes"]:
            assert code["above_threshold"] == (code["probability"] > doc["threshold"])
            assert len(code["evidence"]) == 5 and code["description"].startswith("code ")
            text = (notes / doc["doc_id"]).read_text()
            # evidence = words of the note with character offsets (never special tokens)
            assert all(text[e["start"]:e["end"]] == e["text"] for e in code["evidence"])

    out2 = tmp_path / "pred_shards.jsonl"
    _main(common, monkeypatch, mode="predict", input="shards:test", output=str(out2))
    assert len(out2.read_text().splitlines()) == 8

    export_dir = tmp_path / "export"
    _main(common, monkeypatch, mode="export", export_dir=str(export_dir))
    for name in ("encoder/config.json", "encoder/model.safetensors", "model.safetensors",
                 "best_model.pt", "config.yaml", "target_tokenizer.json", "config.json"):
        assert (export_dir / name).exists(), name
    with open(export_dir / "config.json", encoding="utf-8") as f:
        exported = json.load(f)
    with open(os.path.join(workdir, "best_threshold.json"), encoding="utf-8") as f:
        assert exported["threshold"] == pytest.approx(json.load(f)["threshold"])


def test_dca_initialises_and_freezes_label_queries(assets):
    from medcode_jax import train
    from medcode_jax.models import heads

    config = tiny_config(assets)
    config.model.dca = True
    config.model.freeze_label_queries = True
    run = train.setup(config)
    train.initialise_weights(run)
    model = run.model()
    expected = heads.description_query_init(model.encoder, run.ds.description_ids,
                                            run.ds.description_mask, batch_size=16)
    queries = model.label_wise_attention.label_representations[...]
    np.testing.assert_allclose(np.asarray(queries), np.asarray(expected), rtol=1e-5, atol=1e-6)
    frozen = [jax.tree_util.keystr(k) for k, _ in
              jax.tree_util.tree_flatten_with_path(run.state.frozen)[0]]
    trainable = [jax.tree_util.keystr(k) for k, _ in
                 jax.tree_util.tree_flatten_with_path(run.state.params)[0]]
    assert len(frozen) == 1 and "label_representations" in frozen[0]
    assert not any("label_representations" in k for k in trainable)


def test_threshold_of_another_checkpoint_is_not_used(tmp_path):
    from medcode_jax import train

    assert train.read_threshold(str(tmp_path), step=7) == 0.5  # nothing tuned yet
    (tmp_path / train.THRESHOLD_FILE).write_text(json.dumps({"threshold": 0.31, "step": 7}))
    assert train.read_threshold(str(tmp_path), step=7) == pytest.approx(0.31)
    assert train.read_threshold(str(tmp_path), step=9) == 0.5


def test_patience_counts_epochs_not_evaluations():
    from medcode_jax import train

    # best at the end of epoch 2 (step 20, 10 steps per epoch), patience 3 epochs
    assert not train.patience_exhausted(20, 4, 10, 3)
    assert train.patience_exhausted(20, 5, 10, 3)
    # evaluating every 2 epochs: epochs 4 and 6 after a best at 2 -> stop at 6, not after 3 evals
    assert not train.patience_exhausted(20, 4, 10, 3) and train.patience_exhausted(20, 6, 10, 3)
    assert not train.patience_exhausted(-1, 2, 10, 3)  # no best yet: counts from the start


def test_nonfinite_update_stops_at_its_step_without_waiting_for_a_log_step(assets, tmp_path):
    from medcode_jax import train

    config = tiny_config(assets, skip_nonfinite=False, learning_rate=1e30,
                         log_every_steps=1000, clip_norm=0.0, warmup_fraction=0.0)
    with pytest.raises(FloatingPointError, match=r"at step \d"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_every_step_shape_is_compiled_before_the_first_step(assets, tmp_path, monkeypatch):
    """Two length buckets: `precompile` compiles the train step of both and the eval step of
    every val/test shape, and nothing named `step` compiles after it (the jitted functions
    reuse those executables). `train_buckets` / `eval_buckets` say what the iterators pad to."""
    from medcode_jax import input_pipeline, train

    config = tiny_config(assets, num_epochs=1, precompile_threads=2)
    config.data.bucket_multiple = 2  # buckets of 2 and 4 chunks of 16 tokens
    run = train.setup(config)
    t, c = config.train, config.data
    steps_per_epoch = input_pipeline.steps_per_epoch(run.ds, "train", t.global_batch_size)
    it = input_pipeline.make_train_iterator(
        run.ds, global_batch_size=t.global_batch_size, chunk_size=c.chunk_size,
        buckets=run.buckets, seed=t.seed)
    seen = {next(it)["input_ids"].shape[1] // c.chunk_size for _ in range(steps_per_epoch)}
    planned = input_pipeline.train_buckets(run.ds, global_batch_size=t.global_batch_size,
                                           chunk_size=c.chunk_size, buckets=run.buckets,
                                           seed=t.seed, epoch=0)
    assert set(planned) == seen and len(seen) == 2, (planned, seen)
    eval_planned = set()
    for split in ("val", "test"):
        widths = {b["input_ids"].shape[1] // c.chunk_size for b in input_pipeline.make_eval_batches(
            run.ds, split, global_batch_size=t.eval_batch_size, chunk_size=c.chunk_size,
            buckets=run.buckets)}
        assert set(input_pipeline.eval_buckets(
            run.ds, split, global_batch_size=t.eval_batch_size, chunk_size=c.chunk_size,
            buckets=run.buckets)) == widths
        eval_planned |= widths
    filler = input_pipeline.filler_batch(run.ds, 3, 2, chunk_size=c.chunk_size)
    real = next(it)
    assert {k: v.dtype for k, v in filler.items()} == {k: v.dtype for k, v in real.items()}
    assert filler["input_ids"].shape == (3, 2 * c.chunk_size) and not filler["valid"].any()

    compiled = []  # (after precompile?, function name) of every backend compilation
    state = {"after": False}

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append((state["after"], kwargs.get("fun_name")))

    original = train.precompile

    def precompile_then_mark(*args, **kwargs):
        original(*args, **kwargs)
        state["after"] = True

    monkeypatch.setattr(train, "precompile", precompile_then_mark)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    ahead = [name for after, name in compiled if not after and "step" in name]
    late = [name for after, name in compiled if after and "step" in name]
    assert len(ahead) == len(planned) + len(eval_planned), compiled
    assert late == [], compiled
