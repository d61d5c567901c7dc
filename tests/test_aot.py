"""experiments/aot_compile.py: the runner's train step compiled ahead of time, for this host's
simulated CPU devices and, with the real XLA:TPU compiler (libtpu, the [tpu] extra), for a TPU
slice described on this CPU host.

References: collectives and bytes hand-counted from the MoE layer's buffer shapes; state bytes
from the parameter shapes; FLOPs from the formulas of switchjax.flops; an HLO text written by
hand for the parser.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs import switch_base, t5_base
from experiments import aot_compile
from experiments.aot import chips, hlo, plan, report, sweep
from experiments.aot.compile import compile_train_step, hbm_in_use, parse_oom
from switchjax.config import ConfigError, ModelConfig
from switchjax.flops import forward_flops_per_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _smoke_cfg():
    config = switch_base.get_config("smoke")
    return config, ModelConfig.from_config(config)


def test_aot_compile_tiny_switch_cpu():
    """The CPU path: (2, 2, 2) mesh of simulated host devices, Adafactor, no parameters."""
    config, cfg = _smoke_cfg()
    assert config.train.optimizer == "adafactor"
    live_before = len(jax.live_arrays())
    r = compile_train_step(config, jax.devices()[:8], (2, 2, 2), 8, 32, 8,
                           compiler_options=FAST)
    e = plan.evaluate(r, cfg, None)
    print("\n" + report.report(r, e))
    assert len(jax.live_arrays()) <= live_before + 4  # no parameters were allocated
    assert r["platform"] == "cpu" and r["param_count"] == r["abstract_param_count"]
    assert 0 < r["start_rss_gib"] <= r["peak_rss_gib"]  # sampled while compiling
    assert r["state"]["expert"] * 4 == r["state"]["expert_total"]  # expert x model = 2 x 2
    m = r["memory"]
    assert m["argument"] >= r["state"]["param"] + r["state"]["opt_state"]
    assert r["collectives"]["all-to-all"]["count"] == 4 * r["num_moe_layers"] == 8
    assert e["fits"] is None and e["hbm_in_use"] == hbm_in_use(m)


def _a2a_bytes_f32(cfg, batch, lengths, shards):
    """Bytes of the [E, G_local, C, D] float32 buffers all-to-all'ed per step: for each
    sparse layer, dispatch + combine, forward + backward."""
    from switchjax.routing import expert_capacity
    total = 0
    for stack, L in lengths:
        C = expert_capacity(L, cfg.moe.num_experts, cfg.moe.capacity_factor_train, 1,
                            cfg.moe.min_capacity, cfg.moe.capacity_rounding)
        per = cfg.moe.num_experts * (batch // shards) * C * cfg.d_model * 4
        total += 4 * per * len(cfg.moe_layer_indices(stack))
    return total


@pytest.mark.parametrize("mesh", [(1, 4, 1), (4, 1, 1)], ids=["expert", "data"])
def test_tpu_smoke_plan(mesh):
    """Switch-Base smoke compiled by XLA:TPU for v5e:2x2, with and without expert parallelism."""
    config, cfg = _smoke_cfg()
    chip, devices = chips.topology_devices("v5e:2x2")
    r = compile_train_step(config, devices, mesh, 8, 32, 8)
    e = plan.evaluate(r, cfg, chip)
    print("\n" + report.report(r, e))
    assert r["platform"] == "tpu" and r["device_kind"] == "TPU v5 lite" and r["oom"] is None
    s, m, coll = r["state"], r["memory"], r["collectives"]
    n_expert = mesh[1]
    assert s["expert"] * n_expert == s["expert_total"] == (
        cfg.num_moe_layers * 4 * 2 * cfg.d_model * cfg.d_ff * 4)
    assert s["param"] == (r["param_count"] * 4 - s["expert_total"] * (1 - 1 / n_expert))
    # The donated state comes back in place; XLA:TPU also reports its generated code.
    assert m["alias"] >= s["param"] + s["opt_state"] and m["argument"] >= m["alias"]
    assert m["generated_code"] > 0
    assert e["hbm_in_use"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m[
        "generated_code"] and e["fits"] and e["headroom"] == 16 * 2**30 - e["hbm_in_use"]
    a2a = coll["all-to-all"]
    if n_expert > 1:  # 2 sparse layers x (dispatch, combine) x (forward, backward)
        assert a2a["count"] == 4 * cfg.num_moe_layers == 8
        full = _a2a_bytes_f32(cfg, 8, [("encoder", 32), ("decoder", 8)], 4)
        assert full / 2 <= a2a["bytes"] <= full  # XLA may send bfloat16 into bf16 matmuls
    else:
        assert a2a == {"count": 0, "bytes": 0}
        # Replicated parameters: their gradients are summed over the 4 data shards.
        reduced = coll["all-reduce"]["bytes"] + 4 * coll["reduce-scatter"]["bytes"]
        assert reduced >= s["param"]
    # FLOPs: XLA's count covers the analytic matmuls (plus elementwise work).
    assert e["model_flops"] == 3 * 8 * forward_flops_per_example(cfg, 32, 8)
    assert e["executed_flops"] > e["model_flops"]  # E*C slots > tokens: 4*10 > 32
    assert e["executed_flops"] <= e["xla_flops"] <= 1.6 * e["executed_flops"]
    assert 0 < e["mfu_bound"] < 1 and e["step_time_bound"] == max(e["t_compute"],
                                                                   e["t_memory"])
    row = report.row("smoke", "v5e:2x2", r, e)
    assert row["fits"] is True and row["all_to_all"] == a2a["count"]


def test_tpu_remat_recomputes_the_forward():
    """model.remat='full': the backward pass recomputes each block's forward, and XLA's
    extra FLOPs are plan._recomputed's count: the experts' output matmuls included (the
    gates' gradient needs their outputs), the dense output projections left out (matmuls
    256 wide, so that they and not elementwise work decide the count; data mesh). On an
    expert mesh the dispatch and combine all-to-alls run again: 6 per sparse layer, not 4."""
    chip, devices = chips.topology_devices("v5e:2x2")
    xla, cfgs = {}, {}
    for remat in ("none", "full"):
        config, _ = _smoke_cfg()
        config.model.remat, config.model.d_model, config.model.d_ff = remat, 256, 1024
        cfgs[remat] = ModelConfig.from_config(config)
        r = compile_train_step(config, devices, (4, 1, 1), 8, 32, 8)
        xla[remat] = plan.evaluate(r, cfgs[remat], chip)["xla_flops"]
    recomputed = (plan.analytic_flops(cfgs["full"], 8, 32, 8)["executed"]
                  - plan.analytic_flops(cfgs["none"], 8, 32, 8)["executed"])
    assert abs((xla["full"] - xla["none"]) / recomputed - 1) < 0.1
    config, cfg = _smoke_cfg()
    config.model.remat = "full"
    r = compile_train_step(config, devices, (1, 4, 1), 8, 32, 8)
    assert r["oom"] is None and r["collectives"]["all-to-all"]["count"] == 6 * cfg.num_moe_layers


def test_tpu_does_not_fit_is_a_result():
    """A dense smoke model with 16 GiB of FFN weights per chip: XLA:TPU's out-of-HBM verdict
    is reported with its numbers."""
    config = t5_base.get_config("smoke")
    config.model.d_ff = 2 ** 24  # 4 layers x (wi, wo) x 32 x 2^24 x 4 bytes = 16 GiB
    cfg = ModelConfig.from_config(config)
    chip, devices = chips.topology_devices("v5e:2x2")
    r = compile_train_step(config, devices, (4, 1, 1), 4, 32, 8)
    e = plan.evaluate(r, cfg, chip)
    text = report.report(r, e)
    print("\n" + text)
    assert r["oom"] is not None and e["fits"] is False and "DOES NOT FIT" in text
    assert r["oom"]["required"] > r["oom"]["available"] > 15 * 2**30
    assert report.row("big", "v5e:2x2", r, e)["fits"] is False


def test_parse_oom_and_analytic_flops():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (28.88G) exceeds available HBM (15.75G).")
    assert parse_oom(msg)["required"] == int(28.88 * 2**30)
    assert parse_oom(msg)["available"] == int(15.75 * 2**30)
    assert parse_oom("INVALID_ARGUMENT: bad") is None
    dense = ModelConfig.from_config(t5_base.get_config())
    f = plan.analytic_flops(dense, 2048, 512, 114)
    assert f["executed"] == f["model"]
    sparse = ModelConfig.from_config(switch_base.get_config())
    f = plan.analytic_flops(sparse, 2048, 512, 114)
    # Encoder: S=512, E=128, C=floor(512*1.25/128)=5 -> 640 slots for 512 tokens;
    # decoder: S=114, C=max(floor(1.11), 4)=4 -> 512 slots for 114 tokens.
    ffn = 2 * 2 * 768 * 3072
    extra = 6 * 2048 * (512 * (640 / 512 - 1) + 114 * (512 / 114 - 1)) * ffn
    assert math.isclose(f["executed"] - f["model"], 3 * extra, rel_tol=1e-9)
    # Each sparse layer counts its own E's slots: 64 experts in every layer through
    # num_experts_per_layer is the 64-expert config (decoder: 256 slots, not 512).
    per_layer, uniform = switch_base.get_config(), switch_base.get_config()
    per_layer.moe.num_experts_per_layer = (64,) * sparse.num_moe_layers
    uniform.moe.num_experts = 64
    assert plan.analytic_flops(ModelConfig.from_config(per_layer), 2048, 512, 114) == \
        plan.analytic_flops(ModelConfig.from_config(uniform), 2048, 512, 114) != f
    # remat='full' on T5-Base: each block's matmuls run again in the backward pass but for
    # the attention output projections, the FFN's wo and the logits (outputs not needed).
    config = t5_base.get_config()
    config.model.remat = "full"
    f = plan.analytic_flops(ModelConfig.from_config(config), 2048, 512, 114)
    D, F, Li, Lt = 768, 3072, 512, 114  # 12 heads x 64 = D; ReLU FFN: wi, wo
    encoder = Li * 12 * (6 * D * D + 4 * Li * D + 2 * D * F)
    decoder = Lt * 12 * (6 * D * D + 4 * Lt * D + 2 * D * D + 4 * D * D * Li / Lt
                         + 4 * Li * D + 2 * D * F)
    assert math.isclose(f["executed"] - f["model"], 2048 * (encoder + decoder), rel_tol=1e-9)


def test_collectives_parser():
    text = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag-start = (f32[8]{0}, f32[32]{0}) all-gather-start(%x), dimensions={0}
  %ag-done = f32[32]{0} all-gather-done(%ag-start)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%cond2 (p: (s32[], f32[8])) -> pred[] {
  %n = s32[]{:T(128)} constant(5)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%wrapped (a: bf16[4,2,16]) -> bf16[4,2,16] {
  %a = bf16[4,2,16]{2,1,0} parameter(0)
  ROOT %a2a = bf16[4,2,16]{2,1,0:T(2,128)} all-to-all(%a), dimensions={0}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ar = (f32[8]{0}, /*index=1*/bf16[2,3]{1,0}) all-reduce(%a, %a), to_apply=%add
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %w2 = (s32[], f32[8]{0}) while(%t1), condition=%cond2, body=%body
  %s = ((bf16[4,2,16]), bf16[4,2,16], u32[]) async-start(%b), calls=%wrapped
  %d = bf16[4,2,16]{2,1,0} async-done(%s), calls=%wrapped
  ROOT %r = f32[8]{0} add(%a, %a)
}
"""
    c = hlo.collectives(text)
    assert c["all-reduce"] == {"count": 1, "bytes": 8 * 4 + 6 * 2}
    # The loop bodies run 3 (recorded) + 5 (i < 5 from 0, as jax.lax.scan lowers) times.
    assert c["all-gather"] == {"count": 3 + 5, "bytes": (3 + 5) * 32 * 4}
    assert c["all-to-all"] == {"count": 1, "bytes": 4 * 2 * 16 * 2}
    assert c["reduce-scatter"]["count"] == 0 and c["unknown_trip_counts"] == 0


def test_topologies_and_meshes():
    chip, devices = chips.topology_devices("v4:2x2x2")  # megacore: one device per chip
    assert chip.name == "v4" and len(devices) == 8 and devices[0].device_kind == "TPU v4"
    assert chips.parse_topology("v5e:4x8")[1] == (4, 8)
    for bad, words in (("v9:2x2", "unknown TPU generation"), ("v5e:2x2x2", "2D torus"),
                       ("tpu", "not a TPU topology name"), ("v5e:3x3", "XLA:TPU rejects it")):
        with pytest.raises(ConfigError, match=words):
            chips.topology_devices(bad)
    assert sweep.parse_mesh("4,8,1", 32, False) == [(4, 8, 1)]
    assert sweep.parse_mesh("-1,8,1", 32, False) == [(4, 8, 1)]
    assert sweep.parse_mesh("*,*,1", 8, True) == [(1, 8, 1), (2, 4, 1), (4, 2, 1), (8, 1, 1)]
    for bad, sweeping in (("3,1,1", False), ("*,1,1", False), ("-1,-1,1", False),
                          ("4,8", False), ("3,*,1", True)):
        with pytest.raises(ConfigError, match="--mesh"):
            sweep.parse_mesh(bad, 32, sweeping)
    assert aot_compile.flag_value(["x", "--num_devices", "4"], "num_devices") == "4"
    assert aot_compile.flag_value(["x", "--num_devices=2"], "num_devices") == "2"


@pytest.mark.parametrize("args, words", [
    (["--topology", "v9:2x2"], "--topology='v9:2x2': unknown TPU generation"),
    (["--topology=v5e:2x2", "--mesh", "3,1,1"], "--mesh='3,1,1': no (data, expert, model) "
     "sizes of that form multiply to the 4 devices"),
], ids=["topology", "mesh"])
def test_cli_bad_input(args, words):
    """Exit status 2, one message naming the flag and the fix, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-m", "experiments.aot_compile",
                        "--config", "configs/switch_base.py:smoke", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert words in p.stderr and "Fix:" in p.stderr and "Traceback" not in p.stderr


def test_cli_sweep_json(tmp_path):
    """--sweep --json ranks every mesh and marks the file complete; a run stopped by
    --max_rss_gib (exit 3) leaves its JSON marked incomplete, not missing."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "experiments.aot_compile", "--config",
           "configs/switch_base.py:smoke", "--num_devices", "2", "--batch_size", "4",
           "--sweep", "--mesh", "*,*,1"]
    out = tmp_path / "sweep.json"
    p = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ranking" in p.stdout
    d = json.loads(out.read_text())
    assert d["complete"] is True and d["provenance"]["command"]
    assert sorted(tuple(r["mesh"]) for r in d["runs"]) == [(1, 2, 1), (2, 1, 1)]
    assert all(r["row"]["all_to_all"] is not None for r in d["runs"])
    stopped = tmp_path / "stopped.json"
    p = subprocess.run([*cmd, "--max_rss_gib", "0.01", "--json", str(stopped)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3 and "passed --max_rss_gib" in p.stderr
    d = json.loads(stopped.read_text())
    assert d["complete"] is False and d["runs"] == []


def test_table_ranks_plans_across_files_and_marks_incomplete_ones(tmp_path):
    """table.write: the plans of one config, setting and topology ranked together across
    files (fits, then the roofline bound), a mesh compiled again replacing its earlier
    row, a lone plan unranked, skipped meshes listed, a stopped file marked incomplete."""
    from experiments.aot import table

    def run(mesh, fits, step):
        e = {"fits": fits, "step_time_bound": step, "headroom": 1.0, "hbm_in_use": 2.0}
        return {"mesh": mesh, "evaluation": e, "row": {"config": "c", "mesh": mesh,
                                                       "topology": "v5e:2x2", "fits": fits,
                                                       "step_ms_bound": step}}

    prov = {"commit": "abc", "machine": "m", "python": "3", "jax": "j", "libtpu": "l",
            "date": "d"}
    remat = "--config.model.remat=full"
    files = {"sweep.json": (f"aot_compile --sweep {remat}", True,
                            [run("1x4x1", False, None), run("2x2x1", True, 9.0),
                             {"mesh": [8, 1, 1], "skipped": "no", "evaluation": None}]),
             "one.json": ("aot_compile --mesh 4,1,1", False, [run("4x1x1", True, 3.0)]),
             "two.json": (f"aot_compile --mesh 4,1,1 {remat}", True, [run("4x1x1", True, 3.0)]),
             "again.json": (f"aot_compile --mesh 1,4,1 {remat}", True,
                            [run("1x4x1", True, 5.0)])}
    for name, (command, complete, runs) in files.items():
        (tmp_path / name).write_text(json.dumps(
            {"provenance": dict(prov, command=command), "config": "c",
             "topology": "v5e:2x2", "complete": complete, "runs": runs}))
    table.write(str(tmp_path / "out"), [str(tmp_path / n) for n in files])
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(r["mesh"], r["rank"], r["setting"], r["source"]) for r in rows] == [
        ("4x1x1", 1, "model.remat=full", "two.json"),
        ("1x4x1", 2, "model.remat=full", "again.json"),  # replaces the sweep's row
        ("2x2x1", 3, "model.remat=full", "sweep.json"),
        ("4x1x1", None, "as configured", "one.json")]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "mesh (8, 1, 1): no" in md
    assert md.count("**incomplete**") == 1 and "`one.json`" in md.split("**incomplete**")[0]
