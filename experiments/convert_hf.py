"""Converts a Hugging Face SwitchTransformers checkpoint to a switchjax checkpoint.

    pip install -e ".[hf]"   # after: pip install torch==2.13.0 (CPU wheel)
    python -m experiments.convert_hf --model google/switch-base-8 --out /tmp/switch-base-8

--model is a local directory (config.json + model.safetensors or
pytorch_model.bin) or a hub name (downloaded, needs internet). Writes
OUT/config.json, OUT/params and, if the source has one, OUT/spiece.model; load with
`switchjax.convert.hf_switch.load_converted(OUT)`, or train from it with
`--config.train.init_from=OUT` (docs/finetune.md).
"""
import jax
from absl import flags, logging

from experiments import cli
from switchjax.convert import hf_switch

_MODEL = flags.DEFINE_string("model", None, "Local checkpoint directory or hub name.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_DROPPED = flags.DEFINE_enum(
    "dropped_token_output", "zeros", ["zeros", "hf"],
    "What a token dropped by the capacity limit leaves the MoE layer as: 'zeros' "
    "(transformers >= 4.52 and the paper) or 'hf' (router_prob * x, transformers <= 4.51).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing OUT/params.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every step at INFO
    cfg, params = hf_switch.convert(_MODEL.value, _OUT.value,
                                    dropped_token_output=_DROPPED.value,
                                    overwrite=_OVERWRITE.value)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"wrote {_OUT.value}: {n / 1e6:.1f}M parameters, {cfg.num_moe_layers} sparse layers "
          f"of {cfg.moe.num_experts} experts, expert capacity {cfg.moe.fixed_capacity}")


if __name__ == "__main__":
    cli.run(main)
