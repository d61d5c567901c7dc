"""Fine-tuning a pretrained Switch model on a text-to-text task (the paper's §4 settings).

    python -m experiments.train --config configs/cpu_default.py --workdir /tmp/pretrained
    python -m experiments.make_task --task reverse --out /tmp/task_reverse
    python -m experiments.train --config configs/finetune.py:init_from=/tmp/pretrained \
        --workdir /tmp/finetune_reverse

The model is the CPU base (configs/cpu_base.py) started from `init_from` (a run's
workdir or a directory written by experiments/convert_hf.py; its tokenizer is used),
fine-tuned with the paper's fine-tuning regularisation (dropout 0.1, expert dropout
0.4: Table 4), the capacity factors of pre-training (1.25 train / 2.0 eval) and T5's
fine-tuning optimizer (Adafactor, constant learning rate 1e-3, no warmup), on
JSONL pairs in `task` (train.jsonl, validation.jsonl). Each evaluation reports the
loss, token accuracy and exact match of greedily decoded targets.

Arguments: `init_from=PATH` ('' trains from scratch), `task=DIR` (default
/tmp/task_reverse), `label`: the task's target is the integer field `label` mapped to
the words ('no', 'yes') (experiments/make_task.py --task sorted), `smoke`: tiny model,
a few steps (tests).

Runtime and result on the 2-core CPU (results/finetune/README.md, seeds 0 and 1): ~2 min
per run; on `reverse` after 600 steps, eval loss 3.600 ± 0.023 from the pretrained
Switch run against 4.416 ± 0.032 from scratch (same tokenizer), token accuracy 0.274 vs
0.163; exact match 0 for both (whole reversed lists are not learned in 600 steps).
"""
from configs import common, cpu_base

LABEL_NAMES = ("no", "yes")


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, init_from="", task="/tmp/task_reverse",
                            label=False)
    config = cpu_base.cpu_config(smoke=args.smoke, **{"model.dropout_rate": 0.1,
                                                       "moe.expert_dropout": 0.4})
    d, t = config.data, config.train
    d.name, d.objective = "jsonl", "text_to_text"
    d.train_files = f"{args.task}/train.jsonl"
    d.eval_files = f"{args.task}/validation.jsonl"
    if args.label:
        d.targets_key, d.label_names = "label", LABEL_NAMES
    d.inputs_length, d.targets_length = (32, 16) if not args.smoke else (16, 8)
    t.init_from = args.init_from
    t.schedule, t.learning_rate, t.warmup_steps = "constant", 1e-3, 0
    if not args.smoke:
        t.num_train_steps, t.eval_every, t.checkpoint_every = 600, 200, 200
        t.eval_steps, t.exact_match_examples = 8, 256
    return config
