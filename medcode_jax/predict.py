"""`--mode predict`: codes for raw notes (or prepared shards) with the label attention's
most-attended tokens per predicted code.

Input: a glob of UTF-8 text files (one note per file, doc id = file name) or `shards:<split>`
(the prepared dataset of the config). Output JSON lines, one per document:
  {"doc_id", "codes": [{"code", "description", "probability", "above_threshold",
                        "top_tokens": [{"token", "position", "weight"}, ...5]}, ...]}
listing the `train.predictions_top_k` most probable codes (all of them if more are above the
threshold, up to `max_codes`). The output is written where the user asks, never to logs.
"""
from __future__ import annotations

import contextlib
import glob
import json
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

TOP_TOKENS = 5


def _tokenizer(run: train.Run):
    from transformers import AutoTokenizer

    path = os.path.join(run.ds.path, "tokenizer")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: the prepared dataset keeps the tokenizer "
                                f"it was made with there; re-run data_prep")
    return AutoTokenizer.from_pretrained(path)


def _text_batches(run: train.Run, pattern: str, tokenizer) -> Iterator[dict[str, np.ndarray]]:
    """Tokenise text files like the shards (special tokens, max_length), pad to a bucket."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"--input {pattern!r} matches no file; give a glob of text "
                                f"files or shards:<split>")
    c = run.config
    size, chunk = c.train.eval_batch_size, c.data.chunk_size
    pad = run.ds.pad_token_id
    for start in range(0, len(files), size):
        group = files[start:start + size]
        ids = []
        for name in group:
            with open(name, encoding="utf-8") as f:
                ids.append(tokenizer(f.read(), truncation=True,
                                     max_length=c.data.max_length)["input_ids"])
        longest = max(len(x) for x in ids) + run.reserve_tokens
        chunks = next((b for b in run.buckets if b * chunk >= longest), run.buckets[-1])
        width = chunks * chunk
        batch = {"input_ids": np.full((size, width), pad, np.int32),
                 "attention_mask": np.zeros((size, width), np.int32),
                 "valid": np.zeros(size, bool), "doc_ids": np.array(
                     [os.path.basename(n) for n in group] + [""] * (size - len(group)))}
        for row, x in enumerate(ids):
            batch["input_ids"][row, :len(x)] = x
            batch["attention_mask"][row, :len(x)] = 1
            batch["valid"][row] = True
        yield batch


def make_predict_step(run: train.Run, num_codes: int):
    """Jitted: top codes, their probabilities and their most-attended token positions."""
    graphdef = run.graphdef

    def step(params, frozen, rest, batch):
        model = nnx.merge(graphdef, params, frozen, rest)
        logits, attention = model(batch["input_ids"], batch["attention_mask"],
                                  deterministic=True, return_attention=True)
        probs, codes = jax.lax.top_k(jax.nn.sigmoid(logits.astype(jnp.float32)), num_codes)
        rows = jnp.take_along_axis(attention, codes[:, :, None], axis=1)  # [B, K, T]
        weights, positions = jax.lax.top_k(rows.astype(jnp.float32), TOP_TOKENS)
        return probs, codes, weights, positions

    out = shd.batch_sharding(run.mesh)
    return jax.jit(step, in_shardings=(run.state_shardings.params, run.state_shardings.frozen,
                                       run.rest_shardings, out), out_shardings=out)


def predict(config: ml_collections.ConfigDict, workdir: str, input_spec: str, output: str,
            max_codes: int = 50) -> int:
    """Write predictions for `input_spec` to `output` (JSONL); returns the document count."""
    run = train.load_trained(config, workdir)
    threshold = train.read_threshold(workdir, int(run.state.step))
    tokenizer = _tokenizer(run)
    num_codes = min(max(config.train.predictions_top_k, 1), max_codes, run.ds.num_labels)
    step = make_predict_step(run, num_codes)
    if input_spec.startswith("shards:"):
        batches = train.Evaluator(run).batches(input_spec.split(":", 1)[1])
    else:
        if jax.process_count() > 1:
            raise ValueError("predicting text files runs on one process; use shards:<split> "
                             "for multi-host prediction")
        batches = _text_batches(run, input_spec, tokenizer)
    count = 0
    writer = jax.process_index() == 0  # only process 0 writes (all take part in the steps)
    if writer:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp"
    with (open(tmp, "w", encoding="utf-8") if writer else contextlib.nullcontext()) as out:
        for batch in batches:
            inputs = input_pipeline.to_global(
                {k: batch[k] for k in ("input_ids", "attention_mask")}, run.mesh)
            outputs = step(run.state.params, run.state.frozen, run.rest, inputs)
            results = [train.host_rows(x) for x in outputs]
            host = {k: train.host_rows(batch[k]) if jax.process_count() > 1 else batch[k]
                    for k in ("input_ids", "valid", "doc_ids")}
            if writer:
                count += _write(out, results, host, run, tokenizer, threshold)
    if writer:
        os.replace(tmp, output)  # never a half-written predictions file
    return count


def _write(out, results, host, run: train.Run, tokenizer, threshold: float) -> int:
    probs, codes, weights, positions = results
    written = 0
    for row in np.flatnonzero(host["valid"]):
        doc_id = host["doc_ids"][row]
        entries = []
        for k in range(codes.shape[1]):
            label = int(codes[row, k])
            pos = positions[row, k]
            tokens = tokenizer.convert_ids_to_tokens([int(i) for i in host["input_ids"][row, pos]])
            entries.append({
                "code": run.ds.label_space[label], "description": run.ds.descriptions[label],
                "probability": round(float(probs[row, k]), 6),
                "above_threshold": bool(probs[row, k] > threshold),
                "top_tokens": [{"token": t, "position": int(p), "weight": round(float(w), 6)}
                               for t, p, w in zip(tokens, pos, weights[row, k])]})
        doc_id = doc_id.item() if isinstance(doc_id, np.generic) else doc_id
        out.write(json.dumps({"doc_id": doc_id, "threshold": threshold, "codes": entries}) + "\n")
        written += 1
    return written
