"""Codes explained per second: our batched-over-codes attributions vs a per-code Python loop.

    python bench/explain_speed.py                      # CPU default: ~1-2 min on 2 cores
    python bench/explain_speed.py --layers 12 --hidden 768 --labels 8929 --length 4096 \\
        --codes 64 --ig-steps 50 --occlusion --dtype bfloat16         # a GPU-sized run

Same random model (BERT encoder + PLM-CA head, or LAAT with ``--head laat``) and the same
document(s) for both sides:

- batched: ``medcode_jax.explain.methods.make_explain_fn`` jitted once for codes ``[B, K]``:
  one forward pass, the K backward passes vectorised (``jax.vmap`` of one VJP);
- loop: the same function jitted once for codes ``[B, 1]`` and called K times from Python
  (what an implementation that explains one code at a time does, like the reference's
  per-target captum calls).

Both are compiled before timing; each side is timed ``--repeats`` times (median). Prints one
line per method with codes/s of each side and the ratio; writes everything to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from medcode_jax.explain import methods  # noqa: E402
from medcode_jax.models.encoders import EncoderConfig, build_encoder  # noqa: E402
from medcode_jax.models.plm_icd import create_plmicd  # noqa: E402

PAD, CLS, SEP = 1, 0, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--labels", type=int, default=200)
    p.add_argument("--head", choices=("cross_attention", "laat"), default="cross_attention")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--length", type=int, default=512, help="tokens per document (padded to "
                   "whole chunks)")
    p.add_argument("--codes", type=int, default=16, help="codes explained per document")
    p.add_argument("--code-batch", type=int, default=None, help="ExplainOptions.code_batch "
                   "(backward passes vectorised together; default all K)")
    p.add_argument("--ig-steps", type=int, default=8)
    p.add_argument("--ig-batch", type=int, default=4)
    p.add_argument("--occlusion", action="store_true", help="also time occlusion (slow loop)")
    p.add_argument("--occlusion-batch", type=int, default=64)
    p.add_argument("--methods", default="attingrad,gradient_x_input,integrated_gradients")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "explain_speed.json"))
    return p.parse_args(argv)


def build(args):
    cfg = EncoderConfig(family="bert", vocab_size=args.vocab, hidden_size=args.hidden,
                        num_layers=args.layers, num_heads=args.heads,
                        intermediate_size=4 * args.hidden, pad_token_id=PAD,
                        max_position_embeddings=args.chunk, layer_norm_eps=1e-12,
                        type_vocab_size=2)
    dtype = jnp.dtype(args.dtype)
    encoder = build_encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    model = create_plmicd(encoder, num_labels=args.labels, head_type=args.head,
                          chunk_size=args.chunk, pad_token_id=PAD, rngs=nnx.Rngs(1), dtype=dtype)
    length = -(-args.length // args.chunk) * args.chunk
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, (args.docs, length)).astype(np.int32)
    mask = (np.arange(length)[None] < args.length).astype(np.int32).repeat(args.docs, 0)
    ids = np.where(mask == 1, ids, PAD)
    ids[:, 0], ids[:, args.length - 1] = CLS, SEP
    token_mask = methods.token_mask_from_ids(ids, mask, (PAD, CLS, SEP))
    codes = np.stack([rng.choice(args.labels, args.codes, replace=False)
                      for _ in range(args.docs)]).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
             "token_mask": jnp.asarray(token_mask)}
    return model, batch, jnp.asarray(codes)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, batch, codes = build(args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    frozen = nnx.State({})
    key = jax.random.key(0)
    options = methods.ExplainOptions(ig_steps=args.ig_steps, ig_batch=args.ig_batch,
                                     occlusion_batch=args.occlusion_batch,
                                     code_batch=args.code_batch)
    names = [m for m in args.methods.split(",") if m]
    if args.occlusion and "occlusion" not in names:
        names.append("occlusion")
    total_codes = args.docs * args.codes
    results = {}
    for name in names:
        fn = jax.jit(methods.make_explain_fn(graphdef, name, options))
        batched = lambda: fn(params, frozen, rest, batch, codes, key)  # noqa: E731
        columns = [codes[:, k:k + 1] for k in range(args.codes)]

        def loop():
            return [fn(params, frozen, rest, batch, col, key) for col in columns]

        out = jax.block_until_ready(batched())  # compile both shapes
        looped = jax.block_until_ready(loop())
        diff = float(jnp.max(jnp.abs(out - jnp.concatenate(looped, axis=1))))
        t_batched = timed(batched, args.repeats)
        t_loop = timed(loop, args.repeats)
        results[name] = {
            "batched_s": t_batched, "loop_s": t_loop,
            "batched_codes_per_s": total_codes / t_batched,
            "loop_codes_per_s": total_codes / t_loop,
            "speedup": t_loop / t_batched, "max_abs_diff_batched_vs_loop": diff,
        }
        r = results[name]
        print(f"{name:22s} batched {r['batched_codes_per_s']:9.2f} codes/s   loop "
              f"{r['loop_codes_per_s']:9.2f} codes/s   speedup {r['speedup']:5.2f}x   "
              f"(max |diff| {diff:.1e})", flush=True)
    report = {
        "config": vars(args), "device": str(jax.devices()[0]),
        "backend": jax.default_backend(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "methods": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
