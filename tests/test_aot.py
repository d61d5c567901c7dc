"""experiments/aot_compile.py on a tiny config: the Switch-Base code path keeps working.

Same path as `python -m experiments.aot_compile` (config file, Adafactor from
config.train, abstract sharded state, lower + compile, memory analysis), on
configs/switch_base.py:smoke dims (4 experts, 2+2 layers) and the (2, 2, 2) mesh.
"""
from __future__ import annotations

import math

import jax

from configs import switch_base
from experiments import aot_compile

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_aot_compile_tiny_switch():
    config = switch_base.get_config("smoke")
    assert config.train.optimizer == "adafactor"
    live_before = len(jax.live_arrays())
    r = aot_compile.aot_compile(config, (2, 2, 2), batch_size=8, inputs_length=32,
                                targets_length=8, compiler_options=FAST)
    print("\n" + aot_compile.report(r))
    assert len(jax.live_arrays()) <= live_before + 4  # no parameters were allocated
    assert r["param_count"] == r["abstract_param_count"]
    assert r["expert_bytes_per_device"] * 4 == r["expert_bytes"]  # expert x model = 2 x 2
    m = r["memory"]
    assert m["argument"] > 0 and m["output"] > 0  # generated_code is 0 on XLA:CPU
    # The state is donated, so its buffers are aliased into the outputs.
    assert m["argument"] >= r["state_bytes_per_device"]
    assert r["all_to_all"] == 4 * r["num_moe_layers"] == 8
    assert r["mesh"] == {"data": 2, "expert": 2, "model": 2}
    assert math.isfinite(r["peak_rss_gib"])
