#!/bin/bash
# Issue 21 measurements: sparse upcycling (2 seeds) and fine-tuning (2 seeds).
set -ex
cd /work/wt/ft
W=/work/exp/ft
mkdir -p $W
T="python -m experiments.train --config configs/cpu_default.py"
DENSE="--config.model.encoder_moe_layers=none --config.model.decoder_moe_layers=none"
EV="--config.train.eval_every=100 --config.train.checkpoint_every=300"
for s in 0 1; do
  [ -e $W/dense_$s/DONE ] || $T $DENSE $EV --config.seed=$s --config.train.num_train_steps=300 --workdir $W/dense_$s
  [ -e $W/dense_cont_$s ] || cp -r $W/dense_$s $W/dense_cont_$s
  $T $DENSE $EV --config.seed=$s --config.train.num_train_steps=600 --workdir $W/dense_cont_$s
  $T $EV --config.seed=$s --config.train.num_train_steps=300 --config.train.init_from=$W/dense_$s --config.train.upcycle=True --workdir $W/upcycled_$s
  $T $EV --config.seed=$s --config.train.num_train_steps=600 --workdir $W/switch_$s
done
python -m experiments.make_task --task reverse --out $W/task_reverse
SPM=$(python -c "from switchjax.train.init_from import find_source; print(find_source('$W/switch_0').spm_path)")
for s in 0 1; do
  F="python -m experiments.train --config configs/finetune.py:task=$W/task_reverse --config.seed=$s"
  $F --config.train.init_from=$W/switch_$s --workdir $W/ft_pretrained_$s
  $F --config.data.spm_path=$SPM --workdir $W/ft_scratch_$s
done
python -m experiments.make_task --task sorted --out $W/task_sorted
for s in 0 1; do
  F="python -m experiments.train --config configs/finetune.py:task=$W/task_sorted,label --config.seed=$s"
  $F --config.train.init_from=$W/switch_$s --workdir $W/ft_sorted_pretrained_$s
  $F --config.data.spm_path=$SPM --workdir $W/ft_sorted_scratch_$s
done
