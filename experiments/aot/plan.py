"""What a compiled train step means on a chip: fit, analytic FLOPs, roofline estimate.

- Fit: the bytes a chip holds while the step runs (`compile.hbm_in_use`: arguments,
  outputs not aliased to the donated state, temporaries, code) against the chip's HBM;
  a program XLA:TPU rejected as out of HBM does not fit, with XLA's numbers.
- FLOPs, from `switchjax.flops`: `model` = 3 x forward FLOPs (forward + backward of
  every matmul) of the batch with k experts per token, the useful work that MFU counts;
  `executed` adds what the capacity dispatch really computes: every one of a group's
  E x C expert slots, filled or not, and the one-hot einsums of `dispatch='einsum'`
  (`flops.moe_layer_flops`), and with `model.remat='full'` the blocks' forward again,
  less the matmuls whose outputs the backward does not use (`_recomputed`).
  XLA's count (cost analysis of the per-device program, times the devices) is compared
  with `executed`; with `remat='dots'` it also holds the recomputed batched matmuls
  (attention, experts), which `executed` leaves out.
- Roofline (an estimate, a lower bound on the step time): the longer of XLA's FLOPs
  per chip at the chip's peak bf16 FLOP/s and XLA's bytes accessed per chip at its
  HBM bandwidth. Collectives, latencies and imperfect overlap are not in it, so real
  steps are slower and the MFU it implies (model FLOPs / (chips x peak x time)) is an
  upper bound.
  With gradient accumulation (`accum_steps` > 1) XLA's cost analysis counts the
  microbatch loop's body once, so neither the comparison nor the estimate is made.
"""
from __future__ import annotations

from typing import Optional

from switchjax.config import ModelConfig
from switchjax.flops import experts_per_token, forward_flops_per_example, moe_layer_flops

from experiments.aot.chips import Chip
from experiments.aot.compile import hbm_in_use


def _stacks(cfg: ModelConfig, inputs_length: int, targets_length: int) -> list[tuple[str, int]]:
    stacks = [("decoder", targets_length)]
    if cfg.family == "encoder_decoder":
        stacks.append(("encoder", inputs_length))
    return stacks


def analytic_flops(cfg: ModelConfig, batch_size: int, inputs_length: int,
                   targets_length: int) -> dict:
    """Train-step FLOPs of the whole batch: {'model', 'executed'} (see the module doc)."""
    model = 3.0 * batch_size * forward_flops_per_example(cfg, inputs_length, targets_length)
    extra = 0.0
    for stack, length in _stacks(cfg, inputs_length, targets_length):
        for i in cfg.moe_layer_indices(stack):
            parts = moe_layer_flops(cfg, cfg.moe.group_size or length, train=True,
                                    num_experts=cfg.layer_num_experts(stack, i))
            useful = parts["total"] / parts["ratio_to_dense"]  # k experts' FFN per token
            extra += batch_size * length * (parts["experts"] + parts["dispatch"] - useful)
    executed = model + 3.0 * extra
    if cfg.remat == "full":
        executed += _recomputed(cfg, batch_size, inputs_length, targets_length,
                                model / 3.0 + extra)
    return {"model": model, "executed": executed}


def _recomputed(cfg: ModelConfig, batch_size: int, inputs_length: int, targets_length: int,
                forward: float) -> float:
    """FLOPs that `model.remat='full'` adds: the blocks' forward run again in the backward
    pass, less what the backward does not use and XLA leaves out: the output matmul of
    each attention (2·D·H·Dh per token), of each dense FFN and shared expert (2·F·D per
    token), the combine einsum of `dispatch='einsum'`, and the logits (outside the
    blocks). The routed experts' output matmuls do run again: the gates' gradient needs
    the experts' outputs. `forward`: the batch's forward FLOPs as executed."""
    D, HA = cfg.d_model, cfg.num_heads * cfg.head_dim
    blocks = forward - batch_size * targets_length * 2 * D * cfg.vocab_size
    gated = cfg.activation.startswith("gated_")
    unused = 0.0
    for stack, length in _stacks(cfg, inputs_length, targets_length):
        n, sparse = (cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers,
                     cfg.moe_layer_indices(stack))
        attentions = 2 if stack == "decoder" and cfg.family == "encoder_decoder" else 1
        per_token = n * attentions * 2 * D * HA + (n - len(sparse)) * 2 * cfg.d_ff * D
        for i in sparse:
            parts = moe_layer_flops(cfg, cfg.moe.group_size or length, train=True,
                                    num_experts=cfg.layer_num_experts(stack, i))
            per_token += parts["shared"] / (3 if gated else 2) + parts["dispatch"] / 2
        unused += batch_size * length * per_token
    return blocks - unused


def evaluate(result: dict, cfg: ModelConfig, chip: Optional[Chip]) -> dict:
    """Fit, FLOP comparison and (for a TPU chip) the roofline estimate of a
    `compile.compile_train_step` result."""
    B, Li, Lt = result["batch"]
    flops = analytic_flops(cfg, B, Li, Lt)
    out = {"model_flops": flops["model"], "executed_flops": flops["executed"],
           "experts_per_token": experts_per_token(cfg), "hbm_bytes": chip and chip.hbm_bytes}
    if result["oom"] is not None:
        out.update(fits=False, hbm_in_use=result["oom"]["required"], headroom=None)
        return out
    in_use = hbm_in_use(result["memory"])
    out["hbm_in_use"] = in_use
    out["fits"] = None if chip is None else in_use <= chip.hbm_bytes
    out["headroom"] = None if chip is None else chip.hbm_bytes - in_use
    xla_total = result["cost"]["flops"] * result["devices"]
    out["xla_flops"] = xla_total
    if result["accum_steps"] > 1:  # XLA's cost analysis counts the microbatch loop once
        out.update(xla_counts_loop_once=True, xla_vs_executed=None, xla_vs_model=None)
        return out
    out["xla_vs_executed"] = xla_total / flops["executed"] - 1.0 if flops["executed"] else None
    out["xla_vs_model"] = xla_total / flops["model"] - 1.0 if flops["model"] else None
    if chip is not None:
        t_compute = result["cost"]["flops"] / chip.peak_bf16_flops
        t_memory = result["cost"]["bytes_accessed"] / chip.hbm_bytes_per_s
        step = max(t_compute, t_memory)
        out.update(t_compute=t_compute, t_memory=t_memory, step_time_bound=step,
                   bound="compute" if t_compute >= t_memory else "memory",
                   mfu_bound=flops["model"] / (result["devices"] * chip.peak_bf16_flops * step)
                   if step else None,
                   tokens_per_s_bound=B * (Lt + (Li if cfg.family == "encoder_decoder" else 0))
                   / step if step else None)
    return out
