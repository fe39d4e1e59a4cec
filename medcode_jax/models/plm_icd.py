"""PLM-ICD / PLM-CA: a chunked pretrained encoder followed by a label-wise attention head.

Chunked encoding (spec `models.md` §1): token ids [B, T] (T a multiple of the chunk size c; the
input pipeline pads every batch to a bucket of n·c tokens) are viewed as [B·n, c], encoded
independently (the encoder restarts position ids in every row), and reshaped back to
[B, n·c, D]; the head attends over all n·c positions with the [B, n·c] mask. The encoding is
the module-level `chunked_encode`, shared with PLM-RR (`reranker.PLMRR`).

Attribute names: `encoder` (any module with the contract
`encoder(input_ids [N, c] int32, attention_mask [N, c], *, deterministic) -> [N, c, D]`) and
`label_wise_attention` (the head; the reference's name, so head parameter paths match its state
dict). A chunk that is all padding is passed to the encoder with an all-zero mask: the encoder
must return finite values for it (its outputs are masked out by the head).

Unmasked heads (`mask_padding=False`, the references' published numbers) attend to padding, so
their logits depend on how far a batch is padded. The references pad a batch to its longest
note L, then to whole chunks: `sigir2023` (medical-coding-reproducibility's collate) to
ceil(L / c)·c; `emc` (explainable-medical-coding's `split_input_into_chunks`) adds
c - L mod c tokens, i.e. one more whole chunk of padding when L is already a multiple of c.
Our batches are padded to length buckets instead, so in that mode the head attends to the
positions `reference_span` gives (the reference's padded length), not to the whole bucket; the
input pipeline reserves room for the extra `emc` chunk (`reserve_tokens`).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from medcode_jax.models.heads import Dtype, LabelAttention, LabelCrossAttention

HeadType = Literal["cross_attention", "laat"]
UnmaskedPadding = Literal["emc", "sigir2023"]
UNMASKED_PADDINGS = ("emc", "sigir2023")


def _check_unmasked_padding(value: str, caller: str) -> None:
    if value not in UNMASKED_PADDINGS:
        raise ValueError(
            f"{caller}: unmasked_padding must be one of {UNMASKED_PADDINGS} (how the reference "
            f"pads a batch to whole chunks), got {value!r}."
        )


def reference_length(longest, chunk_size: int, unmasked_padding: str):
    """The padded length the reference gives a batch whose longest note has `longest` tokens
    (a Python int or a traced integer): `emc` longest + c - longest mod c, `sigir2023`
    ceil(longest / c)·c."""
    c = chunk_size
    if unmasked_padding == "emc":
        return (longest // c + 1) * c
    return -(-longest // c) * c


def reserve_tokens(mask_padding: bool, unmasked_padding: str) -> int:
    """Extra tokens a batch's bucket must hold beyond its longest note: 1 for the unmasked
    `emc` mode (room for its extra padding chunk), else 0."""
    return 1 if (not mask_padding and unmasked_padding == "emc") else 0


def reference_span(attention_mask: jax.Array, chunk_size: int, unmasked_padding: str
                   ) -> jax.Array:
    """[B, T] mask of the positions t < reference_length(longest real note of the batch).

    Positions beyond T do not exist: the caller must pad the batch far enough (`reserve_tokens`)
    for the result to be the reference's.
    """
    _check_unmasked_padding(unmasked_padding, "reference_span")
    longest = jnp.max(jnp.sum((attention_mask != 0).astype(jnp.int32), axis=-1))
    length = jnp.maximum(reference_length(longest, chunk_size, unmasked_padding), chunk_size)
    positions = jnp.arange(attention_mask.shape[-1], dtype=jnp.int32)
    span = (positions < length).astype(jnp.int32)[None, :]
    return jnp.broadcast_to(span, attention_mask.shape)


class PLMICD(nnx.Module):
    """Chunked encoder + label-wise attention head -> logits [B, C] (fp32)."""

    def __init__(
        self,
        encoder: nnx.Module,
        head: LabelCrossAttention | LabelAttention,
        *,
        chunk_size: int,
        pad_token_id: int,
        encoder_batch_size: int | None = None,
        unmasked_padding: UnmaskedPadding = "emc",
    ):
        """`encoder_batch_size`: if set, encode the B·n chunk rows that many at a time in a
        `lax.scan` (bounds activation memory; off by default). `unmasked_padding`: which
        reference's batch padding an unmasked head sees (module docstring)."""
        _check_unmasked_padding(unmasked_padding, "PLMICD")
        if chunk_size < 1:
            raise ValueError(f"PLMICD: chunk_size must be >= 1, got {chunk_size}.")
        if encoder_batch_size is not None and encoder_batch_size < 1:
            raise ValueError(
                f"PLMICD: encoder_batch_size must be >= 1 or None, got {encoder_batch_size}."
            )
        self.encoder = encoder
        self.label_wise_attention = head
        self.chunk_size = chunk_size
        self.pad_token_id = pad_token_id
        self.encoder_batch_size = encoder_batch_size
        self.unmasked_padding = unmasked_padding

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """input_ids, attention_mask [B, T] -> (hidden [B, T, D], attention_mask [B, T])."""
        return chunked_encode(
            self.encoder, input_ids, attention_mask, chunk_size=self.chunk_size,
            pad_token_id=self.pad_token_id, deterministic=deterministic,
            encoder_batch_size=self.encoder_batch_size, caller="PLMICD",
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool = True,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """[B, T] -> logits [B, C] fp32 (, label attention [B, C, T] fp32)."""
        hidden, mask = self.encode(input_ids, attention_mask, deterministic=deterministic)
        head = self.label_wise_attention
        span = None
        if not head.mask_padding:
            span = reference_span(mask, self.chunk_size, self.unmasked_padding)
        return head(hidden, mask, return_attention=return_attention, span=span)

    # --- explanation hooks (docs/EXPLAIN.md §1) ------------------------------------------------
    # The encoder must also provide `word_embed`, `embed` and `encode_embeddings` (every family
    # in medcode_jax.models does). `__call__ == from_embeddings(embed(ids, mask), mask)`.

    def _rows(self, x: jax.Array, caller: str) -> tuple[int, int, int]:
        if x.ndim < 2:
            raise ValueError(f"PLMICD.{caller}: expected [B, T, ...], got shape {x.shape}.")
        batch, length = x.shape[:2]
        if length % self.chunk_size != 0:
            raise ValueError(
                f"PLMICD.{caller}: sequence length {length} is not a multiple of chunk_size "
                f"{self.chunk_size}; pad the batch to a whole number of chunks."
            )
        return batch, length, length // self.chunk_size

    def word_embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] -> raw word-embedding table rows [B, T, Dw] (no position / norm)."""
        batch, length, n = self._rows(input_ids, "word_embed")
        out = self.encoder.word_embed(input_ids.reshape(batch * n, self.chunk_size))
        return out.reshape(batch, length, out.shape[-1])

    def embed(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True,
        word_embeds: jax.Array | None = None,
    ) -> jax.Array:
        """[B, T] -> the encoder embedding block's output per chunk, de-chunked: [B, T, D] (the
        reference's "chunked embedding"). `word_embeds` [B, T, Dw] replaces the word lookup."""
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"PLMICD.embed: input_ids {input_ids.shape} and attention_mask "
                f"{attention_mask.shape} must both be [B, T]."
            )
        batch, length, n = self._rows(input_ids, "embed")
        rows, c = batch * n, self.chunk_size
        words = None
        if word_embeds is not None:
            if word_embeds.shape[:2] != input_ids.shape:
                raise ValueError(
                    f"PLMICD.embed: word_embeds {word_embeds.shape} must be [B, T, Dw] for "
                    f"input_ids {input_ids.shape}."
                )
            words = word_embeds.reshape(rows, c, word_embeds.shape[-1])
        emb = self.encoder.embed(
            input_ids.reshape(rows, c), deterministic=deterministic, word_embeds=words
        )
        return emb.reshape(batch, length, emb.shape[-1])

    def from_embeddings(
        self, emb: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """emb [B, T, D] (from `embed`), mask [B, T] -> logits [B, C] (, label attn [B, C, T]).

        With `encoder_batch_size` the chunk rows go through the encoder layers that many at a
        time in a `lax.scan`, as in `__call__`."""
        batch, length, n = self._rows(emb, "from_embeddings")
        if attention_mask.shape != emb.shape[:2]:
            raise ValueError(
                f"PLMICD.from_embeddings: attention_mask {attention_mask.shape} must be [B, T] = "
                f"{emb.shape[:2]}."
            )
        rows, c = batch * n, self.chunk_size
        hidden = encode_embedding_rows(
            self.encoder, emb.reshape(rows, c, emb.shape[-1]), attention_mask.reshape(rows, c),
            deterministic=deterministic, batch_size=self.encoder_batch_size,
        )
        hidden = hidden.reshape(batch, length, hidden.shape[-1])
        head = self.label_wise_attention
        span = None
        if not head.mask_padding:
            span = reference_span(attention_mask, self.chunk_size, self.unmasked_padding)
        return head(hidden, attention_mask, return_attention=return_attention, span=span)

    def self_attentions(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B, T] -> the encoder's head-mean self-attention probabilities per layer and chunk,
        [L, B, T/c, c, c] fp32 (deterministic; computed explicitly, all chunk rows at once)."""
        batch, _, n = self._rows(input_ids, "self_attentions")
        rows, c = batch * n, self.chunk_size
        ids = input_ids.reshape(rows, c)
        mask = attention_mask.reshape(rows, c)
        x = self.encoder.embed(ids, deterministic=True)
        _, probs = self.encoder.encode_embeddings(
            x, ids, mask, deterministic=True, return_attentions=True
        )  # [L, rows, H, c, c]
        probs = jnp.mean(probs.astype(jnp.float32), axis=2)
        return probs.reshape(probs.shape[0], batch, n, c, c)


def encode_embedding_rows(
    encoder: nnx.Module,
    x: jax.Array,
    mask: jax.Array,
    *,
    deterministic: bool,
    batch_size: int | None = None,
) -> jax.Array:
    """Embedding-block outputs [N, c, D] -> hidden [N, c, D] through `encoder.encode_embeddings`,
    optionally `batch_size` rows at a time in a `lax.scan` (like `encode_rows`; filler rows are
    zeros with an all-zero mask)."""
    size = batch_size
    rows = x.shape[0]
    if size is None or rows <= size:
        return encoder.encode_embeddings(x, None, mask, deterministic=deterministic)
    steps = -(-rows // size)
    fill = steps * size - rows
    x = jnp.pad(x, ((0, fill), (0, 0), (0, 0))).reshape(steps, size, *x.shape[1:])
    mask = jnp.pad(mask, ((0, fill), (0, 0))).reshape(steps, size, -1)
    graphdef, rng_state, rest = nnx.split(encoder, nnx.RngState, ...)

    def body(rng_carry: nnx.State, xs: tuple[jax.Array, jax.Array]):
        module = nnx.merge(graphdef, rng_carry, rest)
        hidden = module.encode_embeddings(xs[0], None, xs[1], deterministic=deterministic)
        return nnx.state(module, nnx.RngState), hidden

    rng_state, hidden = jax.lax.scan(body, rng_state, (x, mask))
    nnx.update(encoder, rng_state)
    return hidden.reshape(steps * size, *hidden.shape[2:])[:rows]


def chunked_encode(
    encoder: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    chunk_size: int,
    pad_token_id: int,
    deterministic: bool = True,
    encoder_batch_size: int | None = None,
    caller: str = "chunked_encode",
) -> tuple[jax.Array, jax.Array]:
    """Chunked note encoding shared by PLM-ICD/PLM-CA and PLM-RR (module docstring).

    input_ids, attention_mask [B, T] (T a multiple of `chunk_size`) -> (hidden [B, T, D],
    attention_mask [B, T]). The B·(T/c) chunk rows are encoded independently; with
    `encoder_batch_size` they go through the encoder that many rows at a time in a `lax.scan`
    (filler rows are `pad_token_id` with an all-zero mask). `caller` prefixes error messages.
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{caller}: input_ids and attention_mask must both be [B, T], got "
            f"{input_ids.shape} and {attention_mask.shape}."
        )
    batch, length = input_ids.shape
    c = chunk_size
    if length % c != 0:
        raise ValueError(
            f"{caller}: sequence length {length} is not a multiple of chunk_size {c}; pad the "
            "batch to a whole number of chunks (the input pipeline's buckets do this)."
        )
    rows = batch * (length // c)
    hidden = encode_rows(
        encoder, input_ids.reshape(rows, c), attention_mask.reshape(rows, c),
        deterministic=deterministic, pad_token_id=pad_token_id, batch_size=encoder_batch_size,
    )
    return hidden.reshape(batch, length, hidden.shape[-1]), attention_mask


def encode_rows(
    encoder: nnx.Module,
    ids: jax.Array,
    mask: jax.Array,
    *,
    deterministic: bool,
    pad_token_id: int,
    batch_size: int | None = None,
) -> jax.Array:
    """[N, c] -> [N, c, D], optionally `batch_size` rows at a time (a `lax.scan`)."""
    size = batch_size
    rows = ids.shape[0]
    if size is None or rows <= size:
        return encoder(ids, mask, deterministic=deterministic)
    steps = -(-rows // size)
    fill = steps * size - rows
    ids = jnp.pad(ids, ((0, fill), (0, 0)), constant_values=pad_token_id)
    mask = jnp.pad(mask, ((0, fill), (0, 0)))
    ids = ids.reshape(steps, size, -1)
    mask = mask.reshape(steps, size, -1)
    # Only the RNG state changes during a call (dropout); carry it through the scan and
    # close over everything else.
    graphdef, rng_state, rest = nnx.split(encoder, nnx.RngState, ...)

    def body(rng_carry: nnx.State, xs: tuple[jax.Array, jax.Array]):
        module = nnx.merge(graphdef, rng_carry, rest)
        hidden = module(xs[0], xs[1], deterministic=deterministic)
        return nnx.state(module, nnx.RngState), hidden

    rng_state, hidden = jax.lax.scan(body, rng_state, (ids, mask))
    nnx.update(encoder, rng_state)
    return hidden.reshape(steps * size, *hidden.shape[2:])[:rows]


def encoder_hidden_size(encoder: nnx.Module, chunk_size: int) -> int:
    """The encoder's output width D, from an abstract (FLOP-free) call on one chunk."""
    graphdef, state = nnx.split(encoder)

    def run(state: nnx.State) -> jax.Array:
        ids = jnp.zeros((1, chunk_size), jnp.int32)
        return nnx.merge(graphdef, state)(ids, jnp.ones_like(ids), deterministic=True)

    return int(jax.eval_shape(run, state).shape[-1])


def create_plmicd(
    encoder: nnx.Module,
    *,
    num_labels: int,
    head_type: HeadType = "cross_attention",
    chunk_size: int,
    pad_token_id: int,
    scale: float = 1.0,
    mask_padding: bool = True,
    unmasked_padding: UnmaskedPadding = "emc",
    encoder_batch_size: int | None = None,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> PLMICD:
    """PLM-CA (`head_type="cross_attention"`, default) or PLM-ICD (`"laat"`) around `encoder`.

    The head's width is read from the encoder's output. `scale` applies to cross-attention only
    (LAAT has none); `mask_padding=False` reproduces the reference's unmasked attention over
    the padding `unmasked_padding` names (module docstring).
    """
    if num_labels < 1:
        raise ValueError(f"create_plmicd: num_labels must be >= 1, got {num_labels}.")
    hidden_size = encoder_hidden_size(encoder, chunk_size)
    if head_type == "cross_attention":
        head = LabelCrossAttention(
            hidden_size, num_labels, scale=scale, mask_padding=mask_padding,
            rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        )
    elif head_type == "laat":
        if scale != 1.0:
            raise ValueError(
                f"create_plmicd: scale={scale} only applies to head_type='cross_attention'; "
                "LAAT has no score scale — leave scale at 1.0."
            )
        head = LabelAttention(
            hidden_size, num_labels, mask_padding=mask_padding,
            rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        )
    else:
        raise ValueError(
            f"create_plmicd: unknown head_type {head_type!r}; use 'cross_attention' or 'laat'."
        )
    return PLMICD(
        encoder, head, chunk_size=chunk_size, pad_token_id=pad_token_id,
        encoder_batch_size=encoder_batch_size, unmasked_padding=unmasked_padding,
    )
