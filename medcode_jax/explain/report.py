"""Token scores -> word evidence spans, and the self-contained HTML report.

Text input: notes are tokenised with offsets (same truncation and special tokens as the
shards), token scores are summed per word (the fast tokenizer's words: whitespace- and
punctuation-delimited) and each word is a character span `[start, end)` of the note text
(`text[start:end] == span["text"]`). Shards input (no text): sub-word pieces are merged into
words and a span gives token positions `[token_start, token_end)` instead.
Padding and special tokens never belong to a word.
"""
from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Sequence

import numpy as np

SCORE_DIGITS = 6
_WORD_STARTS = ("Ġ", "▁", "Ċ")  # byte-level BPE / sentencepiece word-initial markers


@dataclasses.dataclass
class Document:
    """One note as the model sees it, with its words."""

    doc_id: str
    input_ids: np.ndarray                 # [n] int32 (no padding)
    token_mask: np.ndarray                # [n] bool: real word tokens (no special tokens)
    word_of_token: np.ndarray             # [n] int: word index, -1 off words
    word_text: list[str]
    word_start: np.ndarray                # [W] char offsets (text) or token positions
    word_end: np.ndarray                  # [W] exclusive
    text: str | None = None               # the note text (text input only)

    @property
    def num_words(self) -> int:
        return len(self.word_text)


class EmptyNoteError(ValueError):
    """A note with no word tokens (empty or whitespace-only file)."""


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("word spans need a fast (Rust) tokenizer for character offsets; the "
                         "prepared dataset's tokenizer/ folder has no tokenizer.json")


def encode_text(tokenizer, text: str, max_length: int, doc_id: str) -> Document:
    """Tokenise `text` like the shards and map its tokens to character-span words."""
    _check_fast(tokenizer)
    if not text.strip():
        raise EmptyNoteError(f"empty note: {doc_id} has no text (empty or whitespace only)")
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    special = np.asarray(enc["special_tokens_mask"], bool)
    offsets = enc["offset_mapping"]
    word_ids = enc.word_ids()
    word_of_token = np.full(ids.shape, -1, np.int64)
    spans: dict[int, list[int]] = {}
    for t, (w, (s, e)) in enumerate(zip(word_ids, offsets)):
        if special[t] or w is None or e <= s:
            continue
        span = spans.setdefault(w, [s, e, t])
        span[0], span[1] = min(span[0], s), max(span[1], e)
    starts, ends, texts = [], [], []
    index_of = {}
    for w, (s, e, _) in sorted(spans.items(), key=lambda item: item[1][2]):
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e <= s:
            continue  # a whitespace-only piece (byte-level BPE): not a word
        index_of[w] = len(texts)
        starts.append(s), ends.append(e), texts.append(text[s:e])
    for t, w in enumerate(word_ids):
        if not special[t] and w in index_of:
            word_of_token[t] = index_of[w]
    if not texts:
        raise EmptyNoteError(f"empty note: {doc_id} has no word tokens")
    return Document(doc_id=doc_id, input_ids=ids, token_mask=~special, word_of_token=word_of_token,
                    word_text=texts, word_start=np.asarray(starts), word_end=np.asarray(ends),
                    text=text)


def special_token_mask(tokenizer, input_ids: np.ndarray, attention_mask: np.ndarray
                       ) -> np.ndarray:
    """1 on real word tokens of prepared (shards) batches: attended and not a special id (the
    unknown token stands for a word and stays)."""
    special = np.asarray(sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}),
                         np.int64)
    return (np.asarray(attention_mask) > 0) & ~np.isin(input_ids, special)


def decode_document(tokenizer, input_ids: np.ndarray, token_mask: np.ndarray, doc_id
                    ) -> Document:
    """Shards input: merge the word tokens' sub-word pieces into words (positions, no text)."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(token_mask, bool)
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None) or None
    groups: list[list[int]] = []
    previous_word = False
    for t, tok in enumerate(tokens):
        if not mask[t]:
            previous_word = False
            continue
        if prefix:
            continues = tok.startswith(prefix)
        else:
            continues = not tok.startswith(_WORD_STARTS)
        if continues and previous_word:
            groups[-1].append(t)
        else:
            groups.append([t])
        previous_word = True
    word_of_token = np.full(ids.shape, -1, np.int64)
    texts, starts, ends = [], [], []
    for group in groups:
        text = tokenizer.convert_tokens_to_string([tokens[t] for t in group]).strip()
        if not text:
            continue
        word_of_token[group] = len(texts)
        texts.append(text), starts.append(group[0]), ends.append(group[-1] + 1)
    return Document(doc_id=doc_id, input_ids=ids, token_mask=mask, word_of_token=word_of_token,
                    word_text=texts, word_start=np.asarray(starts, np.int64),
                    word_end=np.asarray(ends, np.int64))


def word_scores(scores: np.ndarray, doc: Document) -> np.ndarray:
    """Token scores [K, n] (or [n]) -> word scores [K, W] (sum over each word's tokens)."""
    scores = np.asarray(scores, np.float64)
    squeeze = scores.ndim == 1
    scores = scores.reshape(-1, scores.shape[-1])[:, :doc.input_ids.shape[0]]
    out = np.zeros((scores.shape[0], doc.num_words), np.float64)
    keep = doc.word_of_token >= 0
    np.add.at(out, (slice(None), doc.word_of_token[keep]), scores[:, keep])
    return out[0] if squeeze else out


def spans(word_score: np.ndarray, doc: Document, top: int | None) -> list[dict]:
    """The `top` highest-scoring words (score > 0) as evidence spans, best first."""
    order = np.argsort(-word_score, kind="stable")
    if top is not None:
        order = order[:top]
    out = []
    for w in order:
        if word_score[w] <= 0:
            break
        entry = {"text": doc.word_text[w]}
        if doc.text is not None:
            entry.update(start=int(doc.word_start[w]), end=int(doc.word_end[w]))
        else:
            entry.update(token_start=int(doc.word_start[w]), token_end=int(doc.word_end[w]))
        entry["score"] = round(float(word_score[w]), SCORE_DIGITS)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
details{margin:.6em 0;padding:.3em .6em;border:1px solid #ddd;border-radius:4px}
summary{cursor:pointer;font-weight:600}
.note{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em;line-height:1.6}
mark{background:rgba(230,80,20,var(--a));border-radius:2px;padding:0 1px;color:inherit}
.meta{color:#666;font-size:.9em}.error{color:#a00}
table{border-collapse:collapse;font-size:.85em}td{padding:0 .6em}
"""


class HtmlWriter:
    """Streams one self-contained HTML file (inline CSS, no script, no external asset),
    written to a temporary file and renamed on `close()`."""

    def __init__(self, path: str, title: str):
        self.path = path
        self._tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(self._tmp, "w", encoding="utf-8")
        self._f.write(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                      f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
                      f"<body><h1>{html.escape(title)}</h1>\n")

    def error(self, doc_id: str, message: str) -> None:
        self._f.write(f"<h2>{html.escape(str(doc_id))}</h2><p class=\"error\">"
                      f"{html.escape(message)}</p>\n")

    def document(self, doc: Document, method: str, codes: Sequence[dict],
                 scores: np.ndarray) -> None:
        """`codes`: the JSONL code entries; `scores` [K, W] word scores lined up with them."""
        f = self._f
        f.write(f"<h2>{html.escape(str(doc.doc_id))} <span class=\"meta\">"
                f"({html.escape(method)})</span></h2>\n")
        for i, entry in enumerate(codes):
            chosen = _span_words(entry["evidence"], doc)
            top = max((scores[i, w] for w in chosen), default=0.0)
            f.write(f"<details{' open' if i == 0 else ''}><summary>"
                    f"{html.escape(str(entry['code']))} &mdash; "
                    f"{html.escape(str(entry.get('description', '')))} "
                    f"<span class=\"meta\">p={entry['probability']:.3f}</span></summary>\n")
            f.write("<div class=\"note\">" + _highlight(doc, chosen, scores[i], top)
                    + "</div></details>\n")

    def close(self) -> None:
        self._f.write("</body></html>\n")
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def _span_words(evidence: Sequence[dict], doc: Document) -> set[int]:
    key = "start" if doc.text is not None else "token_start"
    where = {int(s): w for w, s in enumerate(doc.word_start)}
    return {where[e[key]] for e in evidence if e.get(key) in where}


def _highlight(doc: Document, chosen: set[int], score: np.ndarray, top: float) -> str:
    """The note (text input) or its decoded words (shards), escaped, chosen words marked."""
    def mark(w: int, text: str) -> str:
        alpha = 0.15 + 0.85 * float(score[w]) / top if top > 0 else 0.5
        return (f"<mark style=\"--a:{alpha:.2f}\" title=\"{float(score[w]):.4f}\">"
                f"{html.escape(text)}</mark>")

    parts = []
    if doc.text is None:
        for w, text in enumerate(doc.word_text):
            parts.append(mark(w, text) if w in chosen else html.escape(text))
        return " ".join(parts)
    cursor = 0
    for w in sorted(chosen, key=lambda w: doc.word_start[w]):
        s, e = int(doc.word_start[w]), int(doc.word_end[w])
        parts.append(html.escape(doc.text[cursor:s]))
        parts.append(mark(w, doc.text[s:e]))
        cursor = e
    parts.append(html.escape(doc.text[cursor:]))
    return "".join(parts)
