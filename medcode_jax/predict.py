"""`--mode predict`: codes for raw notes (or prepared shards) with evidence words per code.

Input: a glob of UTF-8 text files (one note per file, doc id = file name) or `shards:<split>`
(the prepared dataset of the config). Output JSON lines, one per document:
  {"doc_id", "threshold", "codes": [{"code", "description", "probability", "above_threshold",
                                     "evidence": [{"text", "start", "end", "score"}, ...5]}]}
listing the `train.predictions_top_k` most probable codes (all of them if more are above the
threshold, up to `max_codes`). Evidence: the code's label attention (default) or, with
`explain=METHOD`, that explanation method's scores (medcode_jax.explain.methods), summed per
word, best 5 words; `[start, end)` are character offsets into the file's text (shards input:
`token_start` / `token_end` positions instead). Padding and special tokens are never evidence.
An empty or whitespace-only file gets `{"doc_id", "error": "empty note: ..."}` instead of codes.
The output is written where the user asks (atomically), never to logs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from medcode_jax import input_pipeline
from medcode_jax import sharding as shd
from medcode_jax import train
from medcode_jax.explain import report

TOP_TOKENS = 5  # evidence words per code


def _tokenizer(run: train.Run):
    from transformers import AutoTokenizer

    path = os.path.join(run.ds.path, "tokenizer")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: the prepared dataset keeps the tokenizer "
                                f"it was made with there; re-run data_prep")
    return AutoTokenizer.from_pretrained(path)


@dataclasses.dataclass
class TextGroup:
    """Consecutive files: a padded batch of the non-empty ones (None if all were empty), their
    `Document`s (row order) and, in file order, ("doc", row) / ("error", entry) items."""

    batch: dict[str, np.ndarray] | None
    docs: list[report.Document]
    order: list[tuple[str, object]]


def text_batches(run: train.Run, pattern: str, tokenizer) -> Iterator[TextGroup]:
    """Tokenise text files like the shards (special tokens, max_length), pad to a bucket;
    empty notes become error entries (with a warning) instead of rows."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"--input {pattern!r} matches no file; give a glob of text "
                                f"files or shards:<split>")
    size = run.config.train.eval_batch_size
    docs: list[report.Document] = []
    order: list[tuple[str, object]] = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        doc_id = os.path.basename(name)
        try:
            doc = report.encode_text(tokenizer, text, run.config.data.max_length, doc_id)
        except report.EmptyNoteError as err:
            logging.warning("%s: %s; no codes predicted for it", name, err)
            order.append(("error", {"doc_id": doc_id, "error": str(err)}))
            continue
        order.append(("doc", len(docs)))
        docs.append(doc)
        if len(docs) == size:
            yield TextGroup(pad_documents(run, docs), docs, order)
            docs, order = [], []
    if order:
        yield TextGroup(pad_documents(run, docs) if docs else None, docs, order)


def pad_documents(run: train.Run, docs: list[report.Document]) -> dict[str, np.ndarray]:
    """Documents -> one eval-size batch padded to the run's bucket (filler rows invalid)."""
    c = run.config
    size, chunk = c.train.eval_batch_size, c.data.chunk_size
    longest = max(len(d.input_ids) for d in docs) + run.reserve_tokens
    chunks = next((b for b in run.buckets if b * chunk >= longest), run.buckets[-1])
    width = chunks * chunk
    batch = {"input_ids": np.full((size, width), run.ds.pad_token_id, np.int32),
             "attention_mask": np.zeros((size, width), np.int32),
             "token_mask": np.zeros((size, width), np.int32),
             "valid": np.zeros(size, bool),
             "doc_ids": np.array([d.doc_id for d in docs] + [""] * (size - len(docs)))}
    for row, d in enumerate(docs):
        n = len(d.input_ids)
        batch["input_ids"][row, :n] = d.input_ids
        batch["attention_mask"][row, :n] = 1
        batch["token_mask"][row, :n] = d.token_mask
        batch["valid"][row] = True
    return batch


def shard_documents(tokenizer, host: dict[str, np.ndarray]) -> list[report.Document | None]:
    """Shards batch rows -> Documents (sub-word pieces merged into words; None for filler)."""
    out: list[report.Document | None] = []
    for row in range(host["input_ids"].shape[0]):
        if not host["valid"][row]:
            out.append(None)
            continue
        n = int(host["attention_mask"][row].sum())
        doc_id = host["doc_ids"][row]
        out.append(report.decode_document(
            tokenizer, host["input_ids"][row, :n], host["token_mask"][row, :n],
            doc_id.item() if isinstance(doc_id, np.generic) else doc_id))
    return out


def shard_batches(run: train.Run, split: str, tokenizer) -> Iterator[dict[str, np.ndarray]]:
    """Prepared eval batches of `split` with the word-token mask added."""
    evidence = int(run.config.data.get("max_evidence_codes", 0))
    if evidence > 0 and not run.ds.has_evidence:
        evidence = 0  # predictions / explanations need no evidence; evaluation checks for it
    for batch in train.Evaluator(run).batches(split, max_evidence_codes=evidence):
        batch["token_mask"] = report.special_token_mask(
            tokenizer, batch["input_ids"], batch["attention_mask"]).astype(np.int32)
        yield batch


def make_predict_step(run: train.Run, num_codes: int):
    """Jitted: top codes, their probabilities and their label-attention rows [B, K, T]."""
    graphdef = run.graphdef

    def step(params, frozen, rest, batch):
        model = nnx.merge(graphdef, params, frozen, rest)
        logits, attention = model(batch["input_ids"], batch["attention_mask"],
                                  deterministic=True, return_attention=True)
        probs, codes = jax.lax.top_k(jax.nn.sigmoid(logits.astype(jnp.float32)), num_codes)
        rows = jnp.take_along_axis(attention, codes[:, :, None], axis=1)  # [B, K, T]
        return probs, codes, rows.astype(jnp.float32)

    out = shd.batch_sharding(run.mesh)
    return jax.jit(step, in_shardings=(run.state_shardings.params, run.state_shardings.frozen,
                                       run.rest_shardings, out), out_shardings=out)


def evidence(scores: np.ndarray, doc: report.Document, top: int) -> list[list[dict]]:
    """Token scores [K, T] of one row -> per code the `top` best words (special tokens and
    padding zeroed, the rest renormalised to sum to 1 before summing per word)."""
    n = len(doc.input_ids)
    s = np.asarray(scores, np.float64)[:, :n] * doc.token_mask[None, :]
    s = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-30)
    words = report.word_scores(s, doc)
    return [report.spans(words[k], doc, top) for k in range(words.shape[0])]


def predict(config: ml_collections.ConfigDict, workdir: str, input_spec: str, output: str,
            max_codes: int = 50, explain: str | None = None) -> int:
    """Write predictions for `input_spec` to `output` (JSONL); returns the document count
    (error entries of empty notes included). `explain`: an explanation method for the
    evidence instead of the label attention."""
    run = train.load_trained(config, workdir)
    threshold = train.read_threshold(workdir, int(run.state.step))
    tokenizer = _tokenizer(run)
    num_codes = min(max(config.train.predictions_top_k, 1), max_codes, run.ds.num_labels)
    step = make_predict_step(run, num_codes)
    explain_fn = None
    if explain:
        from medcode_jax.explain import cli

        explain_fn = cli.compile_method(run, explain, tokenizer)
    groups = input_groups(run, input_spec, tokenizer)
    count = 0
    key = jax.random.key(config.train.seed)
    with jsonl_output(output) as out:
        for index, group in enumerate(groups):
            results = None
            if group.batch is not None:
                batch = group.batch
                inputs = input_pipeline.to_global(
                    {k: batch[k] for k in ("input_ids", "attention_mask", "token_mask")},
                    run.mesh)
                probs, codes, rows = step(run.state.params, run.state.frozen, run.rest,
                                          {k: inputs[k] for k in ("input_ids", "attention_mask")})
                if explain_fn is not None:
                    rows = explain_fn(inputs, codes, jax.random.fold_in(key, index))
                results = [train.host_rows(x) for x in (probs, codes, rows)]
                group = with_documents(group, tokenizer)
            if out is not None:  # process 0 writes (all take part in the steps)
                count += write_group(out, group, threshold,
                                     lambda row, doc: _entries(results, row, doc, run, threshold))
    return count


def input_groups(run: train.Run, input_spec: str, tokenizer) -> Iterator[TextGroup]:
    """`--input`: text files (a glob; one process) or shards:<split>, as TextGroups."""
    if input_spec.startswith("shards:"):
        return (TextGroup(b, [], []) for b in
                shard_batches(run, input_spec.split(":", 1)[1], tokenizer))
    if jax.process_count() > 1:
        raise ValueError("predicting text files runs on one process; use shards:<split> for "
                         "multi-host prediction")
    return text_batches(run, input_spec, tokenizer)


@contextlib.contextmanager
def jsonl_output(output: str) -> Iterator:
    """On process 0 a temporary file renamed to `output` when the block succeeds (never a
    half-written predictions file; removed on error); None on the other processes."""
    if jax.process_index() != 0:
        yield None
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def with_documents(group: TextGroup, tokenizer) -> TextGroup:
    """A group of shards rows (no Documents yet) with its valid rows decoded into Documents;
    a group of text files as it is."""
    if group.docs or group.batch is None:
        return group
    host = {k: train.host_rows(group.batch[k]) if jax.process_count() > 1 else group.batch[k]
            for k in ("input_ids", "attention_mask", "token_mask", "valid", "doc_ids")}
    return TextGroup(group.batch, shard_documents(tokenizer, host),
                     [("doc", row) for row in np.flatnonzero(host["valid"])])


def write_group(out, group: TextGroup, threshold: float, entries) -> int:
    """One JSON line per item of `group.order`, in input order: an empty note's error entry as
    it is, a document as {"doc_id", "threshold", "codes": entries(row, doc)}."""
    for kind, item in group.order:
        if kind == "error":
            line = item
        else:
            doc = group.docs[int(item)]
            line = {"doc_id": doc.doc_id, "threshold": threshold,
                    "codes": entries(int(item), doc)}
        out.write(json.dumps(line) + "\n")
    return len(group.order)


def _entries(results, row: int, doc: report.Document, run: train.Run,
             threshold: float) -> list[dict]:
    probs, codes, rows = results
    words = evidence(rows[row], doc, TOP_TOKENS)
    return [{"code": run.ds.label_space[int(label)],
             "description": run.ds.descriptions[int(label)],
             "probability": round(float(p), 6), "above_threshold": bool(p > threshold),
             "evidence": w} for label, p, w in zip(codes[row], probs[row], words)]
