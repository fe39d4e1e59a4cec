"""The experiment configs: every variant builds, presets apply, bad arguments are named."""
from __future__ import annotations

import os
import subprocess

import pytest

from configs import common, encoders, plmca, plmicd, plmrr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [plmca, plmicd])
@pytest.mark.parametrize("arg", ["", "demo", "tiny", "demo,fsdp", "fsdp_tp"])
def test_every_variant_builds(module, arg):
    c = module.get_config(arg)
    assert c.model.head == ("cross_attention" if module is plmca else "laat")
    assert c.train.global_batch_size % c.train.micro_batch_size == 0
    assert c.train.weight_decay == 0.0


@pytest.mark.parametrize("arg", ["", "icd9", "demo", "tiny", "demo,fsdp", "modernbert_base",
                                 "icd9,fsdp_tp"])
def test_plmrr_variants_build_with_a_plmca_retriever_on_the_same_data(arg):
    c = plmrr.get_config(arg)
    assert c.model.type == "plmrr" and c.retriever.model.type == "plmicd"
    assert c.retriever.model.head == "cross_attention"
    assert (c.retriever.data.dir, c.retriever.data.max_length) == (c.data.dir, c.data.max_length)
    assert c.rerank.k <= c.rerank.k_max
    assert c.train.global_batch_size % c.train.micro_batch_size == 0
    assert c.mesh.rules == c.retriever.mesh.rules


def test_plmrr_recipe_is_the_spec_s():
    c = plmrr.get_config("")
    assert (c.rerank.k, c.rerank.description_length) == (300, 64)
    assert (c.train.micro_batch_size, c.train.global_batch_size) == (2, 16)
    assert (c.train.num_epochs, c.train.patience, c.train.learning_rate) == (20, 6, 5e-5)
    assert c.train.dtype == "bfloat16" and c.rerank.encoder_init == "pretrained"
    assert c.rerank.loss_normalisation == "full" and c.rerank.score_fill == "cascade"
    assert plmrr.get_config("icd9").data.dir.endswith("icd9")
    demo = plmrr.get_config("demo")
    assert demo.rerank.k < 100  # well below the demo label space


def test_recipes_differ_as_the_spec_says():
    ca, icd = plmca.get_config(""), plmicd.get_config("")
    assert (ca.train.clip_norm, icd.train.clip_norm) == (1.0, 0.0)
    assert (ca.train.micro_batch_size, icd.train.micro_batch_size) == (16, 1)
    assert icd.train.warmup_steps == 2000 and ca.train.warmup_fraction == 0.1
    assert (ca.train.patience, icd.train.patience) == (3, 6)


@pytest.mark.parametrize("name", sorted(encoders.PRESETS))
def test_encoder_presets_set_path_and_chunking(name):
    c = plmca.get_config(f"{name},fsdp")
    preset = encoders.get(name)
    assert (c.encoder.path, c.data.chunk_size, c.data.max_length) == (
        preset.path, preset.chunk_size, preset.max_length)
    assert c.mesh.shape == (1, -1, 1) and c.mesh.rules == common.FSDP_RULES


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bogus"):
        plmca.get_config("demo,bogus")
    with pytest.raises(ValueError, match="more than one encoder preset"):
        plmca.get_config("neobert,modernbert_base")


def test_local_launch_script_parses_and_builds_a_valid_command(tmp_path):
    script = os.path.join(REPO, "launch", "local.sh")
    subprocess.run(["bash", "-n", script], check=True)
    # PYTHON=echo prints the command line instead of running it.
    out = subprocess.run(["bash", script, "--config.train.num_epochs=1"], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHON": "echo", "CONFIG": "configs/plmca.py:demo"})
    assert out.stdout.split() == ["-m", "medcode_jax.main", "--config=configs/plmca.py:demo",
                                  "--workdir=runs/plmca", "--config.train.num_epochs=1"]


def test_fit_micro_batch_keeps_the_effective_batch():
    from medcode_jax.train import fit_micro_batch

    assert fit_micro_batch(16, 1, 8) == 8       # SIGIR 1 x 16 on 8 devices -> 8 x 2
    assert fit_micro_batch(16, 1, 1) == 1       # one device: as configured
    assert fit_micro_batch(16, 16, 8) == 16
    assert fit_micro_batch(16, 2, 4, 2) == 4    # multiple of shards and processes
    assert fit_micro_batch(48, 5, 4) == 8       # smallest valid multiple >= 5 dividing 48
    assert fit_micro_batch(24, 5, 3) == 6
    with pytest.raises(ValueError, match="multiple of 16"):
        fit_micro_batch(24, 1, 16)
