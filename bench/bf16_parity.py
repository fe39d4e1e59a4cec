"""bf16 parity: JAX bf16 compute vs PyTorch bf16 autocast vs fp32, per encoder family and head.

    python bench/bf16_parity.py            # CPU or GPU: whatever JAX and PyTorch see
    python bench/bf16_parity.py --cudnn    # GPU: + cuDNN attention vs the explicit-mask path

Every case gives both sides the same random weights (small random configs, every parameter
perturbed as in ``tests/hf_utils.py``) and the same inputs (padded rows and, for encoders, an
all-padding row), and computes four outputs:

    ref      PyTorch fp32 (TF32 off): the reference
    jax32    JAX fp32 (matmul precision "highest"): a sanity check of the mapping
    jax16    JAX with dtype=bfloat16 and fp32 parameters (what config.train.dtype="bfloat16"
             builds), jitted
    torch16  PyTorch under torch.autocast(bfloat16) with fp32 weights (the reference trainer's
             AMP)

Error of x against ref (encoders: real tokens only; heads: all logits), relative to the RMS of
ref: ``max = max|x - ref| / rms(ref)``, ``rms = rms(x - ref) / rms(ref)``.
Pass criteria (tolerances):

    jax32    max <= 1e-4 (GPU: 1e-3)
    jax16    rms <= max(2 x torch16 rms, 4e-3) and max <= max(2 x torch16 max, 3e-2):
             JAX bf16 is no worse than twice PyTorch's AMP error (with a floor of a few bf16
             ulps, 2^-8 = 3.9e-3, for cases where AMP keeps more of the work in fp32)
    every output finite (all-padding rows included)

Cases: encoders ``bert``, ``roberta`` (transformers eager attention), ``modernbert``
(transformers, 3 layers: global / local / global), ``neobert`` (``medcode_jax.torch_model``'s
NeoBERT); heads ``cross_attention`` (PLM-CA), ``laat`` (PLM-ICD), ``rerank`` (PLM-RR's
description cross-attention; its torch16 runs the fork's order, ``pool_first=False``); and
``plmca_roberta``, the whole chunked PLM-CA model (export naming, ``torch_model.PLMICD``).

``--cudnn`` (needs a GPU; skipped with a message elsewhere): first the kernel alone
(``cudnn_kernel_*``: ``jax.nn.dot_product_attention(implementation="cudnn")`` with the padding
mask broadcast to [N, 1, c, c], with ``key_value_seq_lengths``, and with a folded local window,
against the explicit-mask attention, all-padding row included), then ModernBERT and NeoBERT in
bf16 with ``attention_backend="cudnn"`` (the same kernel, the local window folded into the
mask) against ``attention_impl="mask"`` (explicit fp32 bias): the
outputs (all rows finite, real tokens within bf16 rounding: rms <= 1e-2, max <= 6e-2 of
rms(ref)) and the parameter gradients of a random projection of the output (relative L2
difference <= 2e-2), plus each against the fp32 reference.

Prints one line per case, writes ``--out`` (default ``bench/results/bf16_parity_<backend>.json``)
and exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

CHUNK = 128
LENGTHS = (CHUNK, 100, 37, 0)  # a full row, two padded rows, an all-padding row
SMALL = dict(hidden_size=128, num_attention_heads=4, intermediate_size=512)
TOL_JAX32 = {"cpu": 1e-4, "gpu": 1e-3}
TOL_RMS_FLOOR, TOL_MAX_FLOOR, TOL_FACTOR = 4e-3, 3e-2, 2.0
TOL_CUDNN_RMS, TOL_CUDNN_MAX, TOL_CUDNN_GRAD = 1e-2, 6e-2, 2e-2
HEAD_PERTURBATION = 0.1  # makes the random heads' attention reasonably peaked


# --- comparison ----------------------------------------------------------------------------------

def errors(x: np.ndarray, ref: np.ndarray, real: np.ndarray | None = None) -> dict[str, float]:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if real is not None:
        x, ref = x[real], ref[real]
    scale = float(np.sqrt(np.mean(ref ** 2))) or 1.0
    diff = x - ref
    return {"max": float(np.abs(diff).max()) / scale,
            "rms": float(np.sqrt(np.mean(diff ** 2))) / scale}


def judge(name: str, outs: dict[str, np.ndarray], real: np.ndarray | None, backend: str) -> dict:
    """Errors of jax32 / jax16 / torch16 against ref and the pass / fail verdict."""
    ref = outs["ref"]
    res = {k: errors(outs[k], ref, real) for k in ("jax32", "jax16", "torch16")}
    res["jax16_vs_torch16"] = errors(outs["jax16"], outs["torch16"], real)
    finite = {k: bool(np.isfinite(np.asarray(v, np.float64)).all()) for k, v in outs.items()}
    rms_tol = max(TOL_FACTOR * res["torch16"]["rms"], TOL_RMS_FLOOR)
    max_tol = max(TOL_FACTOR * res["torch16"]["max"], TOL_MAX_FLOOR)
    problems = []
    if res["jax32"]["max"] > TOL_JAX32[backend]:
        problems.append(f"jax32 max {res['jax32']['max']:.1e} > {TOL_JAX32[backend]:.0e}")
    if res["jax16"]["rms"] > rms_tol:
        problems.append(f"jax16 rms {res['jax16']['rms']:.1e} > {rms_tol:.1e}")
    if res["jax16"]["max"] > max_tol:
        problems.append(f"jax16 max {res['jax16']['max']:.1e} > {max_tol:.1e}")
    problems += [f"{k} not finite" for k, ok in finite.items() if not ok]
    res.update(name=name, tolerance={"jax32_max": TOL_JAX32[backend], "jax16_rms": rms_tol,
                                     "jax16_max": max_tol},
               finite=finite, ok=not problems, problems=problems)
    return res


def line(res: dict) -> str:
    f = lambda e: f"max {e['max']:.1e} rms {e['rms']:.1e}"  # noqa: E731
    return (f"{res['name']:15s} jax32 {f(res['jax32'])} | jax16 {f(res['jax16'])} | "
            f"torch16 {f(res['torch16'])} | jax16-torch16 {f(res['jax16_vs_torch16'])} "
            f"-> {'ok' if res['ok'] else 'FAIL: ' + '; '.join(res['problems'])}")


# --- shared helpers ------------------------------------------------------------------------------

class Env:
    """Devices and the autocast context for this run."""

    def __init__(self, device: str):
        import jax
        import torch

        self.device = device
        self.backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
            torch.backends.cudnn.allow_tf32 = False

    def autocast(self):
        import torch

        return torch.autocast(device_type="cuda" if self.cuda else "cpu", dtype=torch.bfloat16)

    def torch_run(self, fn, *, bf16: bool) -> np.ndarray:
        import contextlib

        import torch

        with torch.no_grad(), (self.autocast() if bf16 else contextlib.nullcontext()):
            out = fn()
        return out.float().cpu().numpy()


def rows(vocab: int, pad: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (len(LENGTHS), CHUNK)).astype(np.int32)
    mask = (np.arange(CHUNK)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, pad).astype(np.int32), mask


def jax_forward(module, *args):
    from flax import nnx

    @nnx.jit
    def run(m, *a):
        return m(*a)

    return run(module, *args)


def copy_params(src, dst) -> None:
    """Give ``dst`` (same structure, another compute dtype) the parameters of ``src``."""
    from flax import nnx

    nnx.update(dst, nnx.state(src, nnx.Param))


def perturb_jax(module, seed: int, scale: float) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))


def table_state(module, table) -> dict:
    """``module``'s parameters in reference (torch) naming through an export key table."""
    import torch
    from flax import nnx

    params = {".".join(map(str, path)): node for path, node in nnx.iter_graph(module)
              if isinstance(node, nnx.Param)}
    return {rule.hf: torch.from_numpy(np.array(
        rule.transform.to_hf(np.asarray(params[rule.ours][...], np.float32)), copy=True))
        for rule in table.rules}


# --- encoders ------------------------------------------------------------------------------------

def torch_encoders(tmp: str) -> dict[str, tuple]:
    """family -> (torch model in eval mode, fp32, CPU; saved HF folder; pad id)."""
    import json as _json

    import hf_utils
    import modern_encoders_test as modern
    from medcode_jax import torch_model

    out = {}
    for family, extra in (("bert", dict(max_position_embeddings=CHUNK)),
                          ("roberta", dict(max_position_embeddings=CHUNK + 2))):
        model = hf_utils.tiny_model(family, seed=1, num_hidden_layers=2, **SMALL, **extra)
        out[family] = (model, hf_utils.save_tiny_model(model, os.path.join(tmp, family)),
                       hf_utils.FAMILY_CONFIGS[family]["pad_token_id"])
    model = modern.tiny_modernbert(seed=2, num_hidden_layers=3, local_attention=32,
                                   max_position_embeddings=512, **SMALL)
    out["modernbert"] = (model, hf_utils.save_tiny_model(model, os.path.join(tmp, "modernbert")),
                         0)
    neo_cfg = dict(modern.NEOBERT, hidden_size=128, num_attention_heads=4,
                   intermediate_size=384, num_hidden_layers=2, max_length=CHUNK)
    import torch

    torch.manual_seed(3)
    model = hf_utils.perturb_(torch_model.neobert_classes().NeoBERT(neo_cfg), 3).eval()
    path = modern.save_neobert(model, os.path.join(tmp, "neobert"), lm_head=False)
    with open(os.path.join(path, "config.json"), "w") as f:  # save_neobert writes its tiny one
        _json.dump(neo_cfg, f)
    out["neobert"] = (model, path, 0)
    return out


def jax_encoder(path: str, dtype, **options):
    import jax.numpy as jnp
    from flax import nnx

    from medcode_jax.convert import hf_io
    from medcode_jax.models.encoders import build_encoder, read_encoder_config

    cfg = read_encoder_config(path)
    if options:
        cfg = cfg.with_options(**options)
    encoder = build_encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    hf_io.load_pretrained_into(encoder, cfg, path)
    return cfg, encoder


def encoder_case(env: Env, family: str, model, path: str, pad: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    cfg, enc32 = jax_encoder(path, jnp.float32)
    _, enc16 = jax_encoder(path, jnp.bfloat16)
    ids, mask = rows(cfg.vocab_size, pad)
    model = model.to(env.device)
    t_ids = torch.tensor(ids, dtype=torch.long, device=env.device)
    t_mask = torch.tensor(mask, dtype=torch.long, device=env.device)
    fwd = lambda: model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state  # noqa: E731
    with jax.default_matmul_precision("highest"):
        jax32 = np.asarray(jax_forward(enc32, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    outs = {"ref": env.torch_run(fwd, bf16=False), "torch16": env.torch_run(fwd, bf16=True),
            "jax32": jax32,
            "jax16": np.asarray(jax_forward(enc16, jnp.asarray(ids), jnp.asarray(mask)),
                                np.float32)}
    model.to("cpu")
    # All-padding rows: both sides must be finite there, but only real tokens are compared.
    return judge(family, outs, mask.astype(bool), env.backend)


# --- heads ---------------------------------------------------------------------------------------

def head_inputs(seed: int = 0, batch: int = 2, length: int = 256, d: int = 128):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, d)).astype(np.float32)
    mask = (np.arange(length)[None, :] < np.array([length, 150])[:, None]).astype(np.int32)
    return hidden, mask


def label_head_case(env: Env, kind: str, num_labels: int = 500) -> dict:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from medcode_jax import export, torch_model
    from medcode_jax.models import heads

    hidden, mask = head_inputs()
    d = hidden.shape[-1]
    cls = {"cross_attention": heads.LabelCrossAttention, "laat": heads.LabelAttention}[kind]
    head32 = cls(d, num_labels, mask_padding=True, rngs=nnx.Rngs(0), dtype=jnp.float32)
    head16 = cls(d, num_labels, mask_padding=True, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    perturb_jax(head32, 0, HEAD_PERTURBATION)
    copy_params(head32, head16)
    classes = torch_model.torch_classes()
    t_cls = {"cross_attention": classes.LabelCrossAttention, "laat": classes.LabelAttention}[kind]
    t_head = t_cls(d, num_labels, mask_padding=True)
    t_head.load_state_dict(table_state(head32, export.HEAD_TABLES[kind]), strict=True)
    t_head = t_head.to(env.device).eval()
    th = torch.from_numpy(hidden).to(env.device)
    tm = torch.from_numpy(mask).long().to(env.device)
    fwd = lambda: t_head(th, tm)  # noqa: E731
    outs = _run_jax_pair(head32, head16, jnp.asarray(hidden), jnp.asarray(mask))
    outs["ref"] = env.torch_run(fwd, bf16=False)
    outs["torch16"] = env.torch_run(fwd, bf16=True)
    return judge(kind, outs, None, env.backend)


def _run_jax_pair(m32, m16, *args) -> dict[str, np.ndarray]:
    import jax

    with jax.default_matmul_precision("highest"):
        jax32 = np.asarray(jax_forward(m32, *args), np.float32)
    return {"jax32": jax32, "jax16": np.asarray(jax_forward(m16, *args), np.float32)}


def rerank_head_case(env: Env, k: int = 8, length: int = 16) -> dict:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from medcode_jax import export, torch_model
    from medcode_jax.models.reranker import DescriptionCrossAttention

    hidden, mask = head_inputs(seed=1)
    b, _, d = hidden.shape
    rng = np.random.default_rng(2)
    desc = rng.normal(size=(b * k, length, d)).astype(np.float32)
    desc_mask = (np.arange(length)[None, :] < rng.integers(3, length + 1, b * k)[:, None])
    desc_mask = desc_mask.astype(np.int32)
    slots = np.arange(b * k, dtype=np.int32).reshape(b, k)
    head32 = DescriptionCrossAttention(d, rngs=nnx.Rngs(0), dtype=jnp.float32)
    head16 = DescriptionCrossAttention(d, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    perturb_jax(head32, 1, HEAD_PERTURBATION)
    copy_params(head32, head16)
    t_head = torch_model.torch_classes().DynamicTokenAttention(d, 1, length)
    missing = t_head.load_state_dict(table_state(head32, export.RERANKER_TABLE), strict=False)
    assert set(missing.missing_keys) <= {"description_input_ids", "description_attention_mask"}
    assert not missing.unexpected_keys, missing.unexpected_keys
    t_head = t_head.to(env.device).eval()
    dev = lambda x: torch.from_numpy(x).to(env.device)  # noqa: E731
    t_args = (dev(hidden), dev(desc).reshape(b, k, length, d),
              dev(desc_mask).long().reshape(b, k, length), dev(mask).long())
    outs = _run_jax_pair(head32, head16, jnp.asarray(desc), jnp.asarray(desc_mask),
                         jnp.asarray(slots), jnp.asarray(hidden), jnp.asarray(mask))
    outs["ref"] = env.torch_run(lambda: t_head(*t_args, pool_first=True), bf16=False)
    outs["torch16"] = env.torch_run(lambda: t_head(*t_args, pool_first=False), bf16=True)
    return judge("rerank", outs, None, env.backend)


def plmca_case(env: Env, path: str, num_labels: int = 300) -> dict:
    """The whole chunked PLM-CA model: 2 documents of 3 chunks (one with an all-pad chunk)."""
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    from medcode_jax import export, torch_model
    from medcode_jax.models.plm_icd import create_plmicd

    models = {}
    for name, dtype in (("jax32", jnp.float32), ("jax16", jnp.bfloat16)):
        cfg, encoder = jax_encoder(path, dtype)
        models[name] = create_plmicd(encoder, num_labels=num_labels, chunk_size=CHUNK,
                                     pad_token_id=cfg.pad_token_id, rngs=nnx.Rngs(1),
                                     dtype=dtype, param_dtype=jnp.float32)
    perturb_jax(models["jax32"].label_wise_attention, 2, HEAD_PERTURBATION)
    copy_params(models["jax32"], models["jax16"])
    state = export.reference_state_dict(models["jax32"], cfg, flavour="emc")
    classes = torch_model.torch_classes()
    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    encoder = transformers.AutoModel.from_config(hf_cfg, attn_implementation="sdpa",
                                                 add_pooling_layer=False)
    net = classes.PLMICD(encoder, classes.LabelCrossAttention(cfg.hidden_size, num_labels),
                         chunk_size=CHUNK, pad_token_id=cfg.pad_token_id)
    net.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()},
                        strict=True)
    net = net.to(env.device).eval()
    ids, mask = export.parity_inputs(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id,
                                     chunk_size=CHUNK)
    outs = _run_jax_pair(models["jax32"], models["jax16"], jnp.asarray(ids), jnp.asarray(mask))
    t_ids = torch.from_numpy(ids).long().to(env.device)
    t_mask = torch.from_numpy(mask).long().to(env.device)
    fwd = lambda: net(t_ids, t_mask)  # noqa: E731
    outs["ref"] = env.torch_run(fwd, bf16=False)
    outs["torch16"] = env.torch_run(fwd, bf16=True)
    return judge("plmca_roberta", outs, None, env.backend)


# --- cuDNN attention (GPU) -----------------------------------------------------------------------

def cudnn_case(env: Env, family: str, model, path: str, pad: int) -> dict:
    """bf16 encoder, cuDNN attention vs the explicit-mask path: outputs and gradients."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    cfg, ref_enc = jax_encoder(path, jnp.bfloat16, attention_impl="mask")
    _, cudnn_enc = jax_encoder(path, jnp.bfloat16, attention_impl="dot_product_attention",
                               attention_backend="cudnn")
    ids, mask = rows(cfg.vocab_size, pad, seed=5)
    real = mask.astype(bool)
    model = model.to(env.device)
    ref = env.torch_run(lambda: model(
        input_ids=torch.tensor(ids, dtype=torch.long, device=env.device),
        attention_mask=torch.tensor(mask, dtype=torch.long, device=env.device)
    ).last_hidden_state, bf16=False)
    model.to("cpu")
    projection = jnp.asarray(np.random.default_rng(6).normal(size=ref.shape), jnp.float32)
    weight = jnp.asarray(real, jnp.float32)[..., None]

    @nnx.jit
    def value_and_grads(encoder, ids, mask):
        def loss(encoder):
            out = encoder(ids, mask, deterministic=True).astype(jnp.float32)
            return jnp.sum(out * projection * weight), out

        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(encoder)
        return out, grads

    results = {}
    for name, encoder in (("mask", ref_enc), ("cudnn", cudnn_enc)):
        out, grads = value_and_grads(encoder, jnp.asarray(ids), jnp.asarray(mask))
        flat = np.concatenate([np.asarray(g, np.float32).ravel()
                               for g in jax.tree.leaves(grads)])
        results[name] = (np.asarray(out, np.float32), flat)
    (out_m, g_m), (out_c, g_c) = results["mask"], results["cudnn"]
    res = {"name": f"cudnn_{family}", "cudnn_vs_mask": errors(out_c, out_m, real),
           "cudnn_vs_ref": errors(out_c, ref, real), "mask_vs_ref": errors(out_m, ref, real),
           "grad_rel_l2": float(np.linalg.norm(g_c - g_m) / max(np.linalg.norm(g_m), 1e-30)),
           "finite": {"mask": bool(np.isfinite(out_m).all() and np.isfinite(g_m).all()),
                      "cudnn": bool(np.isfinite(out_c).all() and np.isfinite(g_c).all())},
           "tolerance": {"rms": TOL_CUDNN_RMS, "max": TOL_CUDNN_MAX, "grad": TOL_CUDNN_GRAD}}
    problems = [f"{k} not finite (all-padding row?)" for k, ok in res["finite"].items() if not ok]
    if res["cudnn_vs_mask"]["rms"] > TOL_CUDNN_RMS:
        problems.append(f"output rms {res['cudnn_vs_mask']['rms']:.1e} > {TOL_CUDNN_RMS:.0e}")
    if res["cudnn_vs_mask"]["max"] > TOL_CUDNN_MAX:
        problems.append(f"output max {res['cudnn_vs_mask']['max']:.1e} > {TOL_CUDNN_MAX:.0e}")
    if not res["grad_rel_l2"] <= TOL_CUDNN_GRAD:
        problems.append(f"gradient rel. L2 {res['grad_rel_l2']:.1e} > {TOL_CUDNN_GRAD:.0e}")
    res.update(ok=not problems, problems=problems)
    return res


def cudnn_kernel_cases(env: Env, implementation: str = "cudnn") -> list[dict]:
    """``jax.nn.dot_product_attention(implementation="cudnn")`` alone, bf16 [4, 128, 4, 32] with
    padded rows and an all-padding row, against ``layers.dot_product_attention`` (explicit fp32
    bias): outputs on real tokens, finiteness everywhere, gradients of q, k, v. Variants: the
    padding mask broadcast to [N, 1, c, c], the padding given as ``key_value_seq_lengths``, and
    a ModernBERT local window folded into the [N, 1, c, c] mask (what ``self_attention`` does).
    Tells which form of the padding mask works with cuDNN and how all-padding rows come out."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medcode_jax.models import layers

    n, c, h, dh, window = len(LENGTHS), CHUNK, 4, 32, 16
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.normal(size=(n, c, h, dh)), jnp.bfloat16) for _ in range(3))
    lengths = np.array(LENGTHS, np.int32)
    real = np.arange(c)[None, :] < lengths[:, None]
    keep = jnp.asarray(real)[:, None, None, :]  # [N, 1, 1, c]
    pos = np.arange(c)
    band = jnp.asarray(np.abs(pos[:, None] - pos[None, :]) <= window)[None, None]
    cot = (rng.normal(size=(n, c, h, dh)) * real[:, :, None, None]).astype(np.float32)
    dropout = nnx.Dropout(0.0)

    def explicit(keep_mask):
        def fn(q, k, v):
            bias = jnp.where(keep_mask, 0.0, layers.MASK_VALUE).astype(jnp.float32)
            return layers.dot_product_attention(q, k, v, bias, dropout=dropout,
                                                deterministic=True)
        return fn

    def fused(**kw):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                                            **kw)

    full = jnp.broadcast_to(keep, (n, 1, c, c))
    cases = {
        "padding_broadcast_mask": (fused(mask=full), explicit(keep)),
        "padding_kv_seq_lengths": (fused(key_value_seq_lengths=jnp.asarray(lengths)),
                                   explicit(keep)),
        "window_folded_mask": (fused(mask=full & band), explicit(keep & band)),
    }

    def value_and_vjp(fn):
        @jax.jit
        def run(q, k, v):
            out, pull = jax.vjp(fn, q, k, v)
            return out, pull(jnp.asarray(cot, out.dtype))
        out, grads = run(q, k, v)
        flat = np.concatenate([np.asarray(g, np.float32).ravel() for g in grads])
        return np.asarray(out, np.float32), flat

    results = []
    for name, (fn, ref_fn) in cases.items():
        res = {"name": f"cudnn_kernel_{name}",
               "tolerance": {"rms": TOL_CUDNN_RMS, "max": TOL_CUDNN_MAX, "grad": TOL_CUDNN_GRAD}}
        try:
            (out, g), (ref, g_ref) = value_and_vjp(fn), value_and_vjp(ref_fn)
        except Exception as err:  # noqa: BLE001  (report, keep going)
            res.update(ok=False, problems=[f"{type(err).__name__}: {err}"[:500]])
            results.append(res)
            continue
        res.update(cudnn_vs_mask=errors(out, ref, real),
                   grad_rel_l2=float(np.linalg.norm(g - g_ref) / max(np.linalg.norm(g_ref), 1e-30)),
                   finite={"cudnn": bool(np.isfinite(out).all() and np.isfinite(g).all()),
                           "mask": bool(np.isfinite(ref).all() and np.isfinite(g_ref).all())},
                   all_padding_row={"cudnn_abs_max": float(np.abs(out[-1]).max()),
                                    "mask_abs_max": float(np.abs(ref[-1]).max())})
        problems = [f"{k} not finite" for k, ok in res["finite"].items() if not ok]
        if res["cudnn_vs_mask"]["rms"] > TOL_CUDNN_RMS:
            problems.append(f"output rms {res['cudnn_vs_mask']['rms']:.1e}")
        if res["cudnn_vs_mask"]["max"] > TOL_CUDNN_MAX:
            problems.append(f"output max {res['cudnn_vs_mask']['max']:.1e}")
        if not res["grad_rel_l2"] <= TOL_CUDNN_GRAD:
            problems.append(f"gradient rel. L2 {res['grad_rel_l2']:.1e}")
        res.update(ok=not problems, problems=problems)
        results.append(res)
    return results


def cudnn_kernel_line(res: dict) -> str:
    if "cudnn_vs_mask" not in res:
        return f"{res['name']:36s} FAIL: {'; '.join(res['problems'])}"
    e, pad = res["cudnn_vs_mask"], res["all_padding_row"]
    return (f"{res['name']:36s} vs explicit mask: max {e['max']:.1e} rms {e['rms']:.1e}, grads "
            f"rel. L2 {res['grad_rel_l2']:.1e}, all-padding row |out| max "
            f"{pad['cudnn_abs_max']:.2g} (mask path {pad['mask_abs_max']:.2g}) -> "
            f"{'ok' if res['ok'] else 'FAIL: ' + '; '.join(res['problems'])}")


def cudnn_line(res: dict) -> str:
    f = lambda e: f"max {e['max']:.1e} rms {e['rms']:.1e}"  # noqa: E731
    return (f"{res['name']:15s} cudnn-mask {f(res['cudnn_vs_mask'])} | grads rel. L2 "
            f"{res['grad_rel_l2']:.1e} | cudnn-ref {f(res['cudnn_vs_ref'])} | mask-ref "
            f"{f(res['mask_vs_ref'])} -> "
            f"{'ok' if res['ok'] else 'FAIL: ' + '; '.join(res['problems'])}")


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when JAX runs on a GPU, else cpu)")
    parser.add_argument("--cudnn", action="store_true",
                        help="also compare cuDNN attention with the mask path (GPU only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # save_pretrained's shard bar
    import flax
    import jax
    import torch
    import transformers

    device = args.device or ("cuda" if jax.default_backend() == "gpu" else "cpu")
    env = Env(device)
    out = args.out or os.path.join(REPO, "bench", "results", f"bf16_parity_{env.backend}.json")
    print(f"bf16 parity: jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), torch {torch.__version__} on {device}; errors relative "
          f"to rms(ref), ref = PyTorch fp32", flush=True)
    results = []

    def attempt(name: str, fn, show) -> None:
        """Run one case; an exception is a failed case, reported, and the run goes on."""
        try:
            res = fn()
        except Exception as err:  # noqa: BLE001
            res = {"name": name, "ok": False, "problems": [f"{type(err).__name__}: {err}"[:500]]}
            print(f"{name:15s} FAIL: {res['problems'][0]}", flush=True)
        else:
            print(show(res), flush=True)
        results.append(res)

    with tempfile.TemporaryDirectory() as tmp:
        encoders = torch_encoders(tmp)
        for family, (model, path, pad) in encoders.items():
            attempt(family, lambda: encoder_case(env, family, model, path, pad), line)
        attempt("cross_attention", lambda: label_head_case(env, "cross_attention"), line)
        attempt("laat", lambda: label_head_case(env, "laat"), line)
        attempt("rerank", lambda: rerank_head_case(env), line)
        attempt("plmca_roberta", lambda: plmca_case(env, encoders["roberta"][1]), line)
        if args.cudnn:
            if env.backend != "gpu":
                print("cudnn: skipped (needs JAX on a GPU)")
            else:
                for res in cudnn_kernel_cases(env):
                    results.append(res)
                    print(cudnn_kernel_line(res), flush=True)
                for family in ("modernbert", "neobert"):
                    model, path, pad = encoders[family]
                    attempt(f"cudnn_{family}", lambda: cudnn_case(env, family, model, path, pad),
                            cudnn_line)
    failed = [r["name"] for r in results if not r["ok"]]
    summary = {"what": "bf16_parity",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": {"jax_backend": jax.default_backend(),
                          "jax_device_kind": jax.devices()[0].device_kind,
                          "torch_device": device, "platform": platform.platform()},
               "versions": {"jax": jax.__version__, "flax": flax.__version__,
                            "torch": torch.__version__, "transformers": transformers.__version__},
               "tolerances": {"jax32_max": TOL_JAX32, "jax16_factor": TOL_FACTOR,
                              "jax16_rms_floor": TOL_RMS_FLOOR, "jax16_max_floor": TOL_MAX_FLOOR,
                              "cudnn_rms": TOL_CUDNN_RMS, "cudnn_max": TOL_CUDNN_MAX,
                              "cudnn_grad_rel_l2": TOL_CUDNN_GRAD},
               "results": results, "failed": failed}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(f"{len(results) - len(failed)}/{len(results)} ok"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; wrote {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
