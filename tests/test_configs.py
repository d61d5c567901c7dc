"""Every config in configs/ builds and validates; paper configs have the paper's sizes."""
from __future__ import annotations

import glob
import importlib
import os

import pytest

from _train_utils import REPO
from switchjax.config import ModelConfig
from switchjax.flops import flop_matched_dense, param_counts
from switchjax.train import validate
from switchjax.train.sweep import apply_overrides, variant_name
from switchjax.train.train_config import validate_train_config

# Every config module and the arguments it accepts ('' = no argument).
ARGS = {
    "cpu_base": ["", "smoke"], "cpu_default": ["", "smoke"],
    "t5_base": ["", "smoke"], "switch_base": ["", "large", "c", "finetune", "smoke"],
    "st_moe": ["", "smoke"], "decoder_moe": ["", "all", "smoke"],
    **{f"ablate_{n}": ["", "smoke"] for n in ("capacity", "experts", "router", "aux", "zloss",
                                              "precision", "init", "jitter", "shared",
                                              "balance", "sigmoid", "ntlb", "finegrained")},
    **{f"repro_{n}": ["", "smoke"] for n in ("sparse_vs_dense", "experts", "capacity",
                                             "decoder", "bound")},
}
PAPER_FULL = {("t5_base", ""), ("switch_base", ""), ("switch_base", "large"),
              ("switch_base", "c"), ("switch_base", "finetune"), ("st_moe", ""),
              ("decoder_moe", ""), ("decoder_moe", "all")}
CASES = [(m, a) for m, args in ARGS.items() for a in args]


def _config(module, arg):
    return importlib.import_module(f"configs.{module}").get_config(arg or None)


def test_every_config_file_is_covered():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
    assert files - {"__init__", "common", "repro_base"} == set(ARGS) | {"finetune"}


@pytest.mark.parametrize("arg", ["", "smoke", "label"])
def test_finetune_config_validates_on_a_task_built_here(arg, tmp_path):
    from experiments.make_task import write_task
    task = str(tmp_path / "task")
    write_task("sorted" if arg == "label" else "reverse", task, 50, 10)
    config = _config("finetune", f"task={task}" + (f",{arg}" if arg else ""))
    config.data.data_dir = str(tmp_path / "data")
    validate.validate_config(config)
    assert config.train.schedule == "constant" and config.moe.expert_dropout == 0.4
    assert (config.data.label_names == ("no", "yes")) == (arg == "label")


@pytest.mark.parametrize("module,arg", CASES, ids=[f"{m}:{a}" for m, a in CASES])
def test_config_builds_and_validates(module, arg):
    config = _config(module, arg)
    assert set(config.keys()) == set(validate.SECTIONS)
    if (module, arg) in PAPER_FULL:  # C4 is not prepared here: everything but the data
        ModelConfig.from_config(config)
        validate_train_config(config.train)
        try:
            validate.validate_config(config)
        except ValueError as e:  # unless C4 is prepared in data.data_dir
            assert str(e).startswith(("data.data_dir=", "data.name=")), e
    else:  # embedded corpus: the whole config validates
        validate.validate_config(config)
    mod = importlib.import_module(f"configs.{module}")
    assert "python -m experiments." in mod.__doc__  # the docstring gives the command


@pytest.mark.parametrize("module", [m for m in ARGS if m.startswith(("ablate_", "repro_"))])
def test_every_sweep_variant_validates(module):
    mod = importlib.import_module(f"configs.{module}")
    variants = mod.sweep()
    assert len(variants) >= 2
    names = [variant_name(v) for v in variants]
    assert len(set(names)) == len(names)
    for arg in ("", "smoke"):
        for overrides in variants:
            validate.validate_config(apply_overrides(mod.get_config(arg or None), overrides))


# Sources: Switch Transformers (Fedus et al. 2021) Table 9: Switch-Base 7B, Switch-Large 26B,
# Switch-C 1571B; Hugging Face google/switch-base-128 7.4B, switch-large-128 26.4B; T5-Base
# 220M (T5 paper), 222.9M (HF t5-base); ST-MoE (Zoph et al. 2022) Table: ST-MoE-L 4.1B;
# GLaM (Du et al. 2022) Table 4: GLaM (0.1B/64E) 1.9B.
PARAMS = [
    ("t5_base", "", 222.9e6, 0.005),
    ("switch_base", "", 7.4e9, 0.01),
    ("switch_base", "large", 26.4e9, 0.01),
    ("switch_base", "c", 1571e9, 0.001),
    ("st_moe", "", 4.1e9, 0.03),
    ("decoder_moe", "", 1.9e9, 0.02),
]


@pytest.mark.parametrize("module,arg,expected,tol", PARAMS,
                         ids=[f"{m}:{a}" for m, a, _, _ in PARAMS])
def test_paper_param_counts(module, arg, expected, tol):
    total = param_counts(ModelConfig.from_config(_config(module, arg)))["total"]
    assert total == pytest.approx(expected, rel=tol)


def test_t5_base_is_the_flop_matched_dense_switch_base():
    dense = flop_matched_dense(_config("switch_base", ""))
    t5 = _config("t5_base", "")
    keys = ("d_model", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers",
            "activation", "vocab_size", "encoder_moe_layers", "decoder_moe_layers")
    assert {k: dense.model[k] for k in keys} == {k: t5.model[k] for k in keys}
    sb = param_counts(ModelConfig.from_config(_config("switch_base", "")))
    t5_counts = param_counts(ModelConfig.from_config(t5))
    assert sb["active"] - sb["router"] == t5_counts["total"]  # same FLOPs per token


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="config argument='smok': is unknown"):
        _config("switch_base", "smok")


def test_repro_dense_baselines_are_flop_matched():
    """The dense variants of the repro sweeps do the FFN FLOPs of their sparse model: top-1
    keeps d_ff, top-2 in every decoder FFN doubles it."""
    from configs import repro_base, repro_decoder
    assert repro_base.dense(repro_base.encdec()) == {
        "model.decoder_moe_layers": "none", "model.encoder_moe_layers": "none"}
    top2 = repro_base.decoder(**repro_decoder.TOP2)
    assert repro_base.dense(top2) == {"model.d_ff": 1024, "model.decoder_moe_layers": "none"}
