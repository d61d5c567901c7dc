"""Decoding speed as ratios in one process (switchjax.decoding).

    flock /work/exp/heavy.lock python -m experiments.bench_decode --out results/decode
    python -m experiments.bench_decode --out /tmp/bench_decode --smoke   # tiny, 1 round

Model: configs/cpu_base.py (Switch encoder-decoder: d_model 128, 2+2 layers, 8
top-1 experts in every other FFN, vocab 8192) with random weights, and a
decoder-only model of the same widths (4 layers, the same sparse layout).
Batch 8, prompts of 128 tokens, 128 new tokens, no EOS (every row runs every
step). Sections, each timed in interleaved rounds (the candidates back to back,
in reverse order every other round; a ratio is the median of the per-round
ratios, so a load spike on a shared machine hits both sides):

  1. cached vs uncached greedy: `generate` (prefill + one compiled while_loop)
     against `greedy_decode` (re-runs the decoder over the whole prefix each step);
     the ids must be equal.
  2. tokens/s per strategy: greedy, sampling (temperature 0.8, top-k 50, top-p
     0.95), beam search (4 beams): batch x new tokens / seconds.
  3. Switch vs FLOP-matched dense (`flops.flop_matched_dense`): greedy seconds per
     generated token, both families.

Times exclude compilation (one warm-up call each). Writes results.md and
results.json into --out with the command, git commit and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import cpu_base
from experiments import cli
from switchjax.config import ModelConfig
from switchjax.decoding import DecodeOptions, generate_fn, greedy_decode
from switchjax.flops import flop_matched_dense
from switchjax.models import make_model

STRATEGIES = {
    "greedy": dict(strategy="greedy"),
    "sample": dict(strategy="sample", temperature=0.8, top_k=50, top_p=0.95),
    "beam": dict(strategy="beam", num_beams=4),
}
TARGETS = {"cached_vs_uncached": (">=", 5.0), "switch_vs_dense": ("<=", 1.3)}


def configs(smoke: bool) -> dict[str, ml_collections.ConfigDict]:
    """{'encoder_decoder': cpu_base, 'decoder_only': its decoder-only twin} (smoke: tiny)."""
    base = cpu_base.get_config("smoke" if smoke else None)
    decoder_only = ml_collections.ConfigDict(base.to_dict())
    m = decoder_only.model
    m.family, m.num_decoder_layers = "decoder_only", 2 * m.num_decoder_layers
    m.num_encoder_layers, m.encoder_moe_layers = 0, "none"
    return {"encoder_decoder": base, "decoder_only": decoder_only}


def init_variables(cfg: ModelConfig, seed: int = 0) -> dict:
    batch = {"decoder_input_tokens": jnp.ones((1, 8), jnp.int32),
             "encoder_input_tokens": jnp.ones((1, 8), jnp.int32)}
    params = jax.jit(lambda r: nn.meta.unbox(make_model(cfg).init(r, batch)["params"]))(
        jax.random.key(seed))
    return {"params": params}


def interleaved(runners: dict, rounds: int) -> dict:
    """{name: [seconds per round]}: each runner once (warm-up), then `rounds` rounds."""
    for fn in runners.values():
        fn()
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(num, den) -> float:
    return float(np.median(np.asarray(num) / np.asarray(den)))


def cached_runner(cfg, variables, prompts, **options):
    fn = generate_fn(cfg, DecodeOptions(max_new_tokens=options.pop("N"), eos_id=None,
                                        **options))
    args = (variables, jnp.asarray(prompts), jnp.uint32(0))
    return lambda: jax.block_until_ready(fn(*args))


def bench_family(family, config, args) -> dict:
    cfg = ModelConfig.from_config(config)
    dense_cfg = ModelConfig.from_config(flop_matched_dense(config))
    variables, dense_variables = init_variables(cfg), init_variables(dense_cfg)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size - 100, (args.batch, args.prompt_length), np.int32)
    N = args.new_tokens
    out = {"family": family, "batch": args.batch, "prompt_length": args.prompt_length,
           "new_tokens": N, "params": int(sum(x.size for x in jax.tree.leaves(variables)))}

    # 1. cached vs uncached greedy (same ids).
    greedy = cached_runner(cfg, variables, prompts, N=N, prefill_routing="token")
    uncached = lambda: greedy_decode(cfg, variables, prompts, N, route_tokens_alone=True)  # noqa: E731
    ids = np.asarray(greedy().tokens)
    out["ids_equal"] = bool((ids == uncached()).all())
    t = interleaved({"cached": greedy, "uncached": uncached}, args.rounds)
    out["cached_s"], out["uncached_s"] = float(np.median(t["cached"])), float(np.median(t["uncached"]))
    out["cached_vs_uncached"] = median_ratio(t["uncached"], t["cached"])
    print(f"{family}: cached {out['cached_s']:.3f} s, uncached {out['uncached_s']:.3f} s, "
          f"x{out['cached_vs_uncached']:.1f}, ids equal {out['ids_equal']}", flush=True)

    # 2. tokens/s per strategy (cached).
    runners = {name: cached_runner(cfg, variables, prompts, N=N, **opts)
               for name, opts in STRATEGIES.items()}
    t = interleaved(runners, args.rounds)
    out["tokens_per_s"] = {name: args.batch * N / float(np.median(v)) for name, v in t.items()}
    print(f"{family}: tokens/s {out['tokens_per_s']}", flush=True)

    # 3. Switch vs FLOP-matched dense, greedy.
    dense = cached_runner(dense_cfg, dense_variables, prompts, N=N)
    switch = cached_runner(cfg, variables, prompts, N=N)
    t = interleaved({"switch": switch, "dense": dense}, args.rounds)
    out["switch_ms_per_token"] = 1e3 * float(np.median(t["switch"])) / N
    out["dense_ms_per_token"] = 1e3 * float(np.median(t["dense"])) / N
    out["switch_vs_dense"] = median_ratio(t["switch"], t["dense"])
    out["dense_d_ff"] = dense_cfg.d_ff
    print(f"{family}: switch/dense per token x{out['switch_vs_dense']:.2f}", flush=True)
    return out


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": dev.platform,
            "device_kind": dev.device_kind, "jax": jax.__version__,
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check_targets(families: list[dict]) -> dict:
    """Targets of issue 22 on the encoder-decoder (the CPU base model)."""
    row = next(f for f in families if f["family"] == "encoder_decoder")
    out = {}
    for name, (op, target) in TARGETS.items():
        value = row[name]
        out[name] = {"value": value, "target": f"{op} {target}",
                     "met": value >= target if op == ">=" else value <= target}
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; the first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
            *("| " + " | ".join(r) + " |" for r in rows)]


def write_markdown(results: dict, path: str) -> None:
    m, a = results["machine"], results["args"]
    lines = ["# Decoding speed (switchjax.decoding)", "",
             f"Command: `{results['command']}`  ", f"Commit: `{results['commit']}`  ",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['platform']} "
             f"({m['device_kind']}), jax {m['jax']}, Python {m['python']}; load average "
             f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end.  ",
             f"Batch {a['batch']}, prompts of {a['prompt_length']} tokens, {a['new_tokens']} "
             f"new tokens, no EOS; medians of {a['rounds']} interleaved rounds after a "
             f"warm-up; random weights. Run time {results['wall_s']:.0f} s.", "",
             "## Cached vs uncached greedy decoding", ""]
    fams = results["families"]
    lines += _table(["model", "params", "cached (s)", "uncached (s)", "speed-up", "same ids"], [
        [f["family"], f"{f['params'] / 1e6:.1f}M", f"{f['cached_s']:.3f}",
         f"{f['uncached_s']:.2f}", f"{f['cached_vs_uncached']:.1f}x",
         "yes" if f["ids_equal"] else "NO"] for f in fams])
    lines += ["", "## Tokens per second (cached)", ""]
    lines += _table(["model", *STRATEGIES], [
        [f["family"], *(f"{f['tokens_per_s'][s]:.0f}" for s in STRATEGIES)] for f in fams])
    lines += ["", "Sampling: temperature 0.8, top-k 50, top-p 0.95. Beam: 4 beams "
              "(tokens/s counts the returned sequences' tokens).", "",
              "## Switch vs FLOP-matched dense, greedy, per generated token", ""]
    lines += _table(["model", "Switch (ms/token)", "dense (ms/token)", "dense d_ff",
                     "Switch / dense"], [
        [f["family"], f"{f['switch_ms_per_token']:.2f}", f"{f['dense_ms_per_token']:.2f}",
         str(f["dense_d_ff"]), f"{f['switch_vs_dense']:.2f}"] for f in fams])
    lines += ["", "ms/token: one batch step (all rows) per generated position.", "",
              "## Targets (encoder-decoder, the CPU base model)", ""]
    lines += _table(["target", "value", "goal", "met"], [
        [name, f"{t['value']:.2f}", t["target"], "yes" if t["met"] else "no"]
        for name, t in results["targets"].items()])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for results.md and results.json")
    p.add_argument("--smoke", action="store_true", help="tiny model, 8 tokens, 1 round")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_length", type=int, default=None, help="default 128 (smoke 16)")
    p.add_argument("--new_tokens", type=int, default=None, help="default 128 (smoke 8)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.smoke else 5)
    args.prompt_length = args.prompt_length or (16 if args.smoke else 128)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 128)
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = {"command": " ".join(["python -m experiments.bench_decode", *argv]),
               "commit": git_commit(), "machine": machine_info(), "args": vars(args)}
    results["families"] = [bench_family(family, config, args)
                           for family, config in configs(args.smoke).items()]
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - start
    results["targets"] = check_targets(results["families"])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, os.path.join(args.out, "results.md"))
    print(f"wrote {args.out}/results.md ({results['wall_s']:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    cli.run_plain(main)
