"""train_and_evaluate end to end: loss goes down, NaN stops the run, bad configs fail early."""
from __future__ import annotations

import glob
import os

import jax
import ml_collections
import numpy as np
import pytest

from _train_utils import poison_router, records, tiny_config, wrap_train_step
from switchjax.config import ConfigError
from switchjax.train import checkpoint, loop, metrics, optimizer
from switchjax.train.train_config import get_train_config
from switchjax.train.validate import validate_config


# ----------------------------------------------------------------------------- units


def test_rsqrt_schedule_is_t5():
    t = get_train_config()  # learning_rate 0.01, warmup 10k: T5's 1/sqrt(max(step, 1e4))
    lr = optimizer.make_schedule(t)
    for step in (0, 5_000, 10_000, 40_000, 250_000):
        assert float(lr(step)) == pytest.approx(1 / np.sqrt(max(step, 10_000)), rel=1e-6)


def test_cosine_schedule_warms_up_and_decays():
    t = get_train_config()
    t.schedule, t.learning_rate, t.warmup_steps, t.num_train_steps = "cosine", 1e-3, 10, 110
    t.end_learning_rate_factor = 0.1
    lr = optimizer.make_schedule(t)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(0.55e-3, rel=1e-4)
    assert float(lr(110)) == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizers_step_with_clipping(name):
    t = get_train_config()
    t.optimizer, t.grad_clip_norm, t.schedule = name, 1.0, "constant"
    tx = optimizer.make_optimizer(t)
    params = {"w": jax.numpy.ones((4, 3))}
    updates, _ = tx.update({"w": jax.numpy.full((4, 3), 100.0)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"])) and np.all(np.asarray(updates["w"]) < 0)


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricWriter(str(tmp_path))
    w.write(5, "train", {"task_loss": np.float32(2.5), "aux_loss_per_layer": np.ones(2),
                         "expert_load": np.full((2, 4), 0.25)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "spl')  # a run killed mid-line
    w = metrics.MetricWriter(str(tmp_path))
    w.write(7, "eval", {"task_loss": 2.0})
    w.close()
    lines = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in lines] == [(5, "train"), (7, "eval")]
    assert lines[0]["expert_load"] == [[0.25] * 4] * 2
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    p = metrics.Progress(0, 100, 1000)
    line = p.line(10, {"task_loss": 3.0, "dropped_fraction": 0.05, **p.update(10)})
    assert line.startswith("step 10/100 | loss 3.0000 | dropped 5.0% |") and "ETA" in line


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only"])
def test_short_run_decreases_eval_loss(family, tmp_path):
    workdir = str(tmp_path / family)
    final = loop.train_and_evaluate(tiny_config(family), workdir)
    evals = records(workdir, "eval")
    assert sorted(evals) == [0, 10, 20]
    assert evals[20]["task_loss"] < evals[0]["task_loss"] - 0.5, evals
    assert final["eval/task_loss"] == pytest.approx(evals[20]["task_loss"])
    train = records(workdir, "train")
    assert sorted(train) == [5, 10, 15, 20]
    r = train[20]
    for key in ("task_loss", "aux_loss", "router_z_loss", "total_loss", "dropped_fraction",
                "router_confidence", "learning_rate", "grad_norm", "tokens_per_sec"):
        assert np.isfinite(r[key]), key
    num_moe_layers = 2 if family == "encoder_decoder" else 1
    assert np.asarray(r["expert_load"]).shape == (num_moe_layers, 4)  # [MoE layers, experts]
    assert len(r["aux_loss_per_layer"]) == num_moe_layers
    assert evals[20]["capacity_factor"] == 2.0
    assert os.path.exists(os.path.join(workdir, "DONE"))
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert final["params_total"] > final["params_active"] > 0
    # A finished run is not trained again: it returns its stored final metrics.
    assert loop.train_and_evaluate(tiny_config(family), workdir) == final


@pytest.mark.slow
def test_nan_names_step_and_layer_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    # Poison MoE layer 1 (the decoder's) right before step 10, a checkpoint step.
    config = tiny_config(checkpoint_every=5)
    cfg = validate_config(config)
    wrap_train_step(monkeypatch, lambda step, state: state.replace(
        params=poison_router(state.params, cfg, 1)) if step == 10 else state)
    workdir = str(tmp_path / "nan")
    with pytest.raises(loop.NonFiniteError) as e:
        loop.train_and_evaluate(config, workdir)
    message = str(e.value)
    assert "at step 10" in message
    assert "Non-finite aux loss of MoE layer 1 (decoder layer_1)" in message
    assert "MoE layer 0" not in message  # the encoder's layer runs before it and is finite
    assert "last good checkpoint is step 5" in message
    state, step = checkpoint.read_state(workdir)
    assert step == 5 and int(state["step"]) == 5
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert not os.path.exists(os.path.join(workdir, "DONE"))


# ----------------------------------------------------------------------------- invalid configs


def _set(**fields):
    def mutate(c):
        for key, value in fields.items():
            node = c
            *parents, leaf = key.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return mutate


def _unknown_train_field(c):
    c.train.num_train_step = 5  # a typo in a config file (the CLI's locked config refuses it)


INVALID = [
    ("bad router", _set(moe__router="top3"), "moe.router='top3'"),
    ("k > experts", _set(moe__router="topk", moe__num_selected_experts=8),
     "moe.num_selected_experts=8"),
    ("capacity <= 0", _set(moe__capacity_factor_train=0.0), "moe.capacity_factor_train=0.0"),
    ("EC in decoder", _set(moe__router="expert_choice"), "cannot run in a causal decoder"),
    ("mesh mismatch", _set(mesh__data=3), "mesh={'data': 3"),
    ("experts vs mesh", _set(mesh__data=1, mesh__expert=8), "moe.num_experts=4"),
    ("batch not divisible", _set(train__batch_size=12), "train.batch_size=12"),
    ("vocab too small", _set(model__vocab_size=256), "model.vocab_size=256"),
    ("unknown optimizer", _set(train__optimizer="sgd"), "train.optimizer='sgd'"),
    ("unknown schedule", _set(train__schedule="linear"), "train.schedule='linear'"),
    ("negative steps", _set(train__num_train_steps=-5), "train.num_train_steps=-5"),
    ("missing data_dir", _set(data__name="c4/en:3.1.0", data__files=[],
                              data__data_dir="/nonexistent/tfds"), "data.data_dir="),
    ("objective vs family", _set(data__objective="causal_lm"), "data.objective='causal_lm'"),
    ("accum does not divide", _set(train__accum_steps=3), "train.accum_steps=3"),
    ("negative seed", lambda c: setattr(c, "seed", -1), "seed=-1"),
    ("unknown train field", _unknown_train_field, "train.num_train_step"),
    ("bad layer spec", _set(model__encoder_moe_layers="1,7"), "model.encoder_moe_layers"),
]


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config_rejected_before_compiling(mutate, expected, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("validation passed: the model was about to be built")

    monkeypatch.setattr(loop, "make_model", no_model)
    config = tiny_config()
    mutate(config)
    with pytest.raises((ConfigError, ValueError)) as e:
        loop.train_and_evaluate(config, str(tmp_path))
    assert expected in str(e.value)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_validate_config_rejects_unknown_section():
    config = tiny_config()
    config.unlock()
    config.optim = ml_collections.ConfigDict({"lr": 1.0})
    with pytest.raises(ConfigError, match="unknown \\['optim'\\]"):
        validate_config(config)

