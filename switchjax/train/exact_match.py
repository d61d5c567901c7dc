"""Exact match of greedy generations on fixed eval-split examples (data.objective='text_to_text').

Every evaluation of a text-to-text run decodes the inputs of the first
`train.exact_match_examples` examples of `data.eval_split` (in the order of an unpacked,
one-example-per-row pass over the shuffled split; the same examples every time) greedily
with the cached decoder (`switchjax.decoding`), and scores the fraction whose generated
ids, through the first EOS, equal the tokenized target (truncated as in training) through
its EOS (`matches`).

  * encoder-decoder: the prompt is the encoder input (inputs + EOS), at most
    `data.targets_length` new tokens;
  * decoder-only: the prompt is the row's prompt part (inputs + EOS), at most
    `data.targets_length - data.inputs_length` new tokens (the answer's share of the row).

Decoding runs under the run's mesh: prompts are split over ('data', 'expert') in
chunks of the training microbatch (whose routing groups `validate_devices` checked), the
generated ids come back replicated; every process decodes the same examples.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from switchjax import sharding as sharding_lib
from switchjax.decoding import DecodeOptions, generate_fn


def through_eos(ids, eos_id: int) -> list[int]:
    """The ids up to and including the first EOS (all of them if there is none)."""
    ids = [int(i) for i in ids]
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


def matches(generated_BT: np.ndarray, targets: list, eos_id: int) -> np.ndarray:
    """<bool>[B]: generated row b through its first EOS == targets[b] through its EOS (a
    generation that never emits EOS matches nothing: every target ends with EOS)."""
    return np.array([through_eos(g, eos_id) == through_eos(t, eos_id)
                     for g, t in zip(generated_BT, targets)], bool)


def eval_examples(data, tokenizer, family: str, count: int):
    """(prompts <int32>[n, data.inputs_length] right-padded with 0, targets: n arrays of
    answer ids ending with EOS) of the first n <= count unpacked eval-split examples."""
    import switchjax.data as data_lib  # lazily: the data package pulls in TFDS
    data = data.copy_and_resolve_references()
    data.pack, data.num_workers = False, 0
    it = data_lib.make_iterator(data, data.eval_split, 1, seed=0, repeat=False,
                                tokenizer=tokenizer, family=family,
                                log_truncation=False)  # the run's eval iterator logs it
    prompts, targets = [], []
    for row in it:
        if len(targets) == count:
            break
        if family == "encoder_decoder":
            prompt = row["encoder_input_tokens"][0]
        else:  # the prompt part of the row: real tokens without loss
            tokens, real = row["decoder_target_tokens"][0], row["decoder_segment_ids"][0] > 0
            prompt = tokens[real & (row["decoder_loss_weights"][0] == 0)]
        prompts.append(np.pad(prompt, (0, data.inputs_length - len(prompt))))
        targets.append(row["decoder_target_tokens"][0][row["decoder_loss_weights"][0] > 0])
    return np.stack(prompts).astype(np.int32), targets


class ExactMatch:
    """`scorer(variables) -> float`: the exact-match rate of the run's fixed examples."""

    def __init__(self, config, cfg, tokenizer, mesh, rules):
        data, t = config.data, config.train
        self.rows = t.batch_size // t.accum_steps
        self.eos_id = tokenizer.eos_id
        self.prompts, self.targets = eval_examples(data, tokenizer, cfg.family,
                                                   t.exact_match_examples)
        new_tokens = data.targets_length - (data.inputs_length
                                            if cfg.family == "decoder_only" else 0)
        decode = generate_fn(cfg, DecodeOptions(strategy="greedy", max_new_tokens=new_tokens,
                                                eos_id=tokenizer.eos_id, pad_id=0))

        def tokens(variables, prompts_BL):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                    nn.logical_axis_rules(rules):
                return decode(variables, prompts_BL, jnp.uint32(0)).tokens

        self._tokens = jax.jit(tokens, out_shardings=NamedSharding(mesh, P()))
        self._sharding = sharding_lib.batch_sharding(mesh)

    @classmethod
    def for_run(cls, run) -> Optional[ExactMatch]:
        """The scorer of a `loop._Run` (None unless text_to_text with examples to score)."""
        config = run.config
        if config.data.objective != "text_to_text" or not config.train.exact_match_examples:
            return None
        return cls(config, run.cfg, run.tokenizer, run.mesh, run.rules)

    def generate(self, variables) -> np.ndarray:
        """<int32>[n, N] greedy ids of every example (pad 0 after EOS)."""
        n, out = len(self.prompts), []
        for start in range(0, n, self.rows):
            chunk = self.prompts[start:start + self.rows]
            if len(chunk) < self.rows:  # fill the last chunk with copies of the first row
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], self.rows - len(chunk), 0)])
            prompts = jax.make_array_from_callback(chunk.shape, self._sharding,
                                                   lambda index, c=chunk: c[index])
            out.append(np.asarray(self._tokens(variables, prompts)))
        return np.concatenate(out)[:n]

    def __call__(self, variables) -> float:
        return float(matches(self.generate(variables), self.targets, self.eos_id).mean())
