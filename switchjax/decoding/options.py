"""What to generate and how: `DecodeOptions`, checked before anything compiles.

Every bad value raises `switchjax.config.ConfigError` through `config.fail`
("field=value: problem. Fix: fix."), with the field named as the option (and
the `python -m experiments.generate` flag of the same name).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from switchjax.config import ModelConfig, fail

STRATEGIES = ("greedy", "sample", "beam")
PREFILL_ROUTINGS = ("training", "token")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings (hashable: one compiled function per options and shapes).

    strategy: 'greedy', 'sample' (temperature, then top-k, then top-p, as transformers'
      warpers) or 'beam' (transformers' beam search, `length_penalty`, `early_stopping`).
    max_new_tokens: N, tokens generated at most per sequence (EOS included).
    top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set of most
      likely tokens whose probability reaches top_p (1.0: all).
    length_penalty: a finished beam scores sum(log p) / (generated length ** length_penalty).
    early_stopping: beam search stops a row once it has num_beams finished beams.
    eos_id: a sequence ends after it (None: only max_new_tokens ends it); pad_id fills the
      positions after; start_id: the encoder-decoder's first decoder input (T5: 0).
    prefill_routing (decoder-only): 'training' routes the prompt as a training forward pass
      over the padded prompt (`moe.group_size`, capacity for its length: tokens can drop),
      'token' routes every prompt token alone (never dropped). Generated tokens are always
      routed alone.
    """

    strategy: str = "greedy"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = False
    eos_id: Optional[int] = 1
    pad_id: int = 0
    start_id: int = 0
    prefill_routing: str = "training"

    def validate(self, cfg: ModelConfig) -> None:
        if self.strategy not in STRATEGIES:
            fail("strategy", self.strategy, "unknown decoding strategy", f"use one of {STRATEGIES}")
        if self.max_new_tokens < 1:
            fail("max_new_tokens", self.max_new_tokens, "must be >= 1", "e.g. 32")
        if not self.temperature > 0:
            fail("temperature", self.temperature, "must be > 0",
                 "use 1.0 to sample from the model's distribution, or strategy='greedy'")
        if self.top_k < 0 or self.top_k > cfg.vocab_size:
            fail("top_k", self.top_k, f"must be in [0, vocab_size={cfg.vocab_size}]",
                 "use e.g. 50, or 0 to keep every token")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", self.top_p, "must be in (0, 1]", "use e.g. 0.9, or 1.0 to keep every token")
        if self.num_beams < 1:
            fail("num_beams", self.num_beams, "must be >= 1", "use e.g. 4")
        if self.strategy == "beam" and 2 * self.num_beams > cfg.vocab_size:
            fail("num_beams", self.num_beams, f"beam search keeps 2*num_beams candidates, more "
                 f"than the vocabulary ({cfg.vocab_size})", "use fewer beams")
        for name in ("eos_id", "pad_id", "start_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < cfg.vocab_size:
                fail(name, value, f"is not a token id (vocab_size={cfg.vocab_size})",
                     "use an id in [0, vocab_size)")
        if self.prefill_routing not in PREFILL_ROUTINGS:
            fail("prefill_routing", self.prefill_routing, "unknown prefill routing",
                 f"use one of {PREFILL_ROUTINGS}")


def check_prompts(prompts: Sequence[Sequence[int]], max_length: Optional[int] = None) -> None:
    """Rejects an empty prompt and (if `max_length` is given) one longer than it."""
    if len(prompts) == 0:
        fail("prompts", [], "no prompt given", "pass at least one prompt")
    for i, ids in enumerate(prompts):
        n = int(np.count_nonzero(np.asarray(ids)))
        if n == 0:
            fail(f"prompts[{i}]", list(ids)[:8], "the prompt is empty (no token other than "
                 "padding 0)", "give every prompt at least one token")
        if max_length is not None and n > max_length:
            fail(f"prompts[{i}]", f"<{n} tokens>", f"longer than the model's maximum prompt "
                 f"length {max_length}", f"shorten it to <= {max_length} tokens")


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int = 1) -> np.ndarray:
    """Token-id lists -> <int32>[B, P] right-padded with 0, P a multiple of `multiple`."""
    check_prompts(prompts)
    n = max(len(p) for p in prompts)
    n = -(-n // multiple) * multiple
    out = np.zeros((len(prompts), n), np.int32)
    for i, ids in enumerate(prompts):
        out[i, :len(ids)] = ids
    return out
