"""experiments/benchmark/ in smoke mode: it runs and writes its files; nothing about speed."""
import json
import os
import subprocess
import sys

import pytest

from experiments.benchmark import common, expert_parallel, report


def test_hlo_collectives_counts_ops_and_bytes():
    hlo = """
  %all-to-all = (f32[1,2,4,32]{3,2,1,0}, f32[1,2,4,32]{3,2,1,0}) all-to-all(%a, %b), replica_groups={}
  %all-to-all.1 = bf16[8,2,4,32]{3,2,1,0} all-to-all(%c), dimensions={0}
  %get-tuple-element.5 = f32[1,2,4,32]{3,2,1,0} get-tuple-element(%all-to-all), index=0
  %all-reduce-start = f32[16]{0} all-reduce-start(%d), to_apply=%add
  %all-reduce-done = f32[16]{0} all-reduce-done(%all-reduce-start)
  ROOT %all-gather = s32[4,8]{1,0} all-gather(%e), dimensions={0}
"""
    c = expert_parallel.hlo_collectives(hlo)
    assert c["all-to-all"] == {"count": 2, "bytes": 2 * 256 * 4 + 2048 * 2}
    assert c["all-reduce"] == {"count": 1, "bytes": 64}
    assert c["all-gather"] == {"count": 1, "bytes": 128}
    assert c["reduce-scatter"]["count"] == 0


@pytest.mark.slow
def test_smoke_run_writes_results(tmp_path):
    """The CLI as a user runs it: one host device, the expert-parallel section in a child
    process on 8 simulated ones; the allocator is set before anything imports JAX."""
    out = str(tmp_path)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "experiments.benchmark",
                           "--out", out, "--smoke"], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    first_jax = next(i for i, m in enumerate(imported) if m.split(".")[0] == "jax")
    assert imported.index("experiments.malloc") < first_jax
    for name in ("results.md", "results.json", "scaling.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert set(saved) >= {"machine", "args", "layer", "model", "scaling", "expert_parallel",
                          "capacity", "targets", "peak_rss_bytes"}
    assert [r["capacity_factor"] for r in saved["capacity"]] == [1.0, 1.25, 2.0]
    assert saved["capacity"][0]["ratio_to_cf1"] == 1.0
    assert all(r["ratio_to_dense"] > 0 for r in saved["capacity"])
    assert saved["machine"]["num_devices"] == 1
    assert {r["dispatch"] for r in saved["layer"]} == {"einsum", "gather", "ragged",
                                                       "experts alone"}
    for r in saved["layer"]:
        assert {"ratio", "flop_ratio", "moe_s", "dense_s", "compile_s", "memory"} <= set(r)
        assert r["ratio"] > 0 and r["flop_ratio"] > 0
    assert {r["family"] for r in saved["model"]} == {"encoder_decoder", "decoder_only"}
    for r in saved["model"]:
        assert r["throughput_ratio"] > 0
        assert r["switch"]["tokens_per_s"] > 0 and r["dense"]["tokens_per_s"] > 0
        assert r["switch"]["active_params"] == pytest.approx(r["dense"]["active_params"],
                                                             rel=0.05)
    assert [r["experts"] for r in saved["scaling"]["experts"]] == list(
        common.SIZES["smoke"]["experts"])
    assert all(r["step_s"] > 0 and r["step_compile_s"] > 0 for r in saved["scaling"]["experts"])
    assert [r["multiplier"] for r in saved["scaling"]["tokens"]] == list(
        common.SIZES["smoke"]["token_multipliers"])
    big = saved["scaling"]["experts_at_most_tokens"]
    smoke = common.SIZES["smoke"]
    assert (big["experts"], big["multiplier"]) == (smoke["experts"][-1],
                                                   smoke["token_multipliers"][-1])
    assert big["step_vs_first"] > 0
    ep = {r["mesh"]["expert"]: r for r in saved["expert_parallel"]}
    assert set(ep) == {1, 8}
    assert ep[8]["collectives"]["all-to-all"]["count"] > 0
    assert ep[8]["collectives"]["all-to-all"]["bytes"] > 0
    assert set(saved["targets"]) == set(report.TARGETS)
    assert saved["targets"]["scaling_E128_vs_E8_step"]["value"] == big["step_vs_first"]
    assert "floor: the experts alone" in saved["targets"]["layer_dropless"]["note"]
    text = open(os.path.join(out, "results.md")).read()
    for heading in ("1. MoE layer", "2. Whole-model", "3. Scaling", "4. Expert parallelism",
                    "5. Capacity factor", "6. Memory"):
        assert heading in text
