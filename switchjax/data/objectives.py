"""Objectives on token ids: T5 span corruption, causal LM and supervised text-to-text.

The pre-training objectives turn the token ids of one document (`<int32>[N]`, no EOS)
into a list of examples, each a dict of 1-D int32 arrays that ends with EOS:

- span corruption (encoder-decoder): the document is split into chunks of
  `tokens_length` raw tokens (T5's `split_tokens`), each chunk becomes
  `{'inputs': <int32>[<= inputs_length], 'targets': <int32>[<= targets_length]}`;
- causal LM (decoder-only): document + EOS split into chunks of `length`,
  `{'targets': <int32>[<= length]}` (the decoder inputs are made after packing).

Text-to-text (`TextToText`) turns one input/target pair of token ids into one example
(see there for both families' layouts).

The span-corruption functions follow `t5.data.preprocessors` (random_spans_helper,
random_spans_noise_mask, noise_span_to_unique_sentinel, ...) in numpy: same
lengths, same sentinel convention (sentinel i = vocab_size - 1 - i, taken in
order of the spans), randomness from an explicit `np.random.Generator`.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """T5's helper: raw `tokens_length` whose corruption fills `inputs_length`.

    Inputs hold the non-noise tokens, one sentinel per noise span and EOS; the
    targets hold the noise tokens, one sentinel per span and EOS.

    Returns:
      (tokens_length, targets_length); e.g. (568, 114) for inputs_length=512,
      noise_density=0.15, mean_noise_span_length=3.
    """

    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # T5: with density 0.5 make targets no longer than inputs.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """<int64>[num_segments]: random positive lengths summing to num_items."""
    first_in_segment = np.zeros(num_items, dtype=bool)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float,
                            mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """<bool>[length]: T5 noise mask, spans alternate non-noise, noise, ...

    round(length * noise_density) tokens are noise, in round(num_noise /
    mean_noise_span_length) spans; the mask starts with non-noise.
    """
    orig_length = length
    length = max(length, 2)  # T5: at least one noise and one non-noise token.
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, dtype=np.int64)
    span_start_indicator[span_starts] = 1
    is_noise = np.cumsum(span_start_indicator) % 2 == 1
    return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  first_sentinel: int) -> np.ndarray:
    """Replaces each noise span by one sentinel (first_sentinel, first_sentinel-1, ...).

    Args:
      tokens: <int32>[N].
      noise_mask: <bool>[N].
      first_sentinel: id of sentinel 0 (vocab_size - 1 in T5).
    Returns:
      <int32>[N - noise tokens + noise spans].
    """
    prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~prev_is_noise
    subsequent_noise = noise_mask & prev_is_noise
    sentinels = first_sentinel + 1 - np.cumsum(first_noise)
    out = np.where(first_noise, sentinels, tokens)
    return out[~subsequent_noise].astype(np.int32)


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     first_sentinel: int) -> np.ndarray:
    """The targets: each non-noise span replaced by a sentinel, noise kept."""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, first_sentinel)


def split_tokens(tokens: np.ndarray, length: int) -> list[np.ndarray]:
    """Chunks of at most `length` tokens (the last one may be shorter)."""
    return [tokens[i:i + length] for i in range(0, len(tokens), length)]


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """T5 span corruption of a document: chunks of `tokens_length` raw tokens.

    A chunk of `tokens_length` tokens gives exactly the `inputs_length` and
    `targets_length` of `random_spans_helper`; shorter chunks give less.
    """

    tokens_length: int
    noise_density: float
    mean_noise_span_length: float
    first_sentinel: int  # Tokenizer.sentinel(0) = vocab_size - 1
    eos_id: int

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> list[dict]:
        """<int32>[N] -> [{'inputs': <int32>[Li'], 'targets': <int32>[Lt']}, ...]."""
        examples = []
        eos = np.array([self.eos_id], np.int32)
        for chunk in split_tokens(tokens, self.tokens_length):
            mask = random_spans_noise_mask(len(chunk), self.noise_density,
                                           self.mean_noise_span_length, rng)
            examples.append({
                "inputs": np.concatenate([
                    noise_span_to_unique_sentinel(chunk, mask, self.first_sentinel), eos]),
                "targets": np.concatenate([
                    nonnoise_span_to_unique_sentinel(chunk, mask, self.first_sentinel), eos]),
            })
        return examples


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """Next-token prediction: document + EOS in chunks of `length` targets."""

    length: int
    eos_id: int

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> list[dict]:
        """<int32>[N] -> [{'targets': <int32>[<= length]}, ...]; rng is unused."""
        del rng
        tokens = np.concatenate([tokens, [self.eos_id]]).astype(np.int32)
        return [{"targets": chunk} for chunk in split_tokens(tokens, self.length)]


@dataclasses.dataclass(frozen=True)
class TextToText:
    """A supervised pair -> one example; too-long texts are truncated, EOS always kept.

    Encoder-decoder: `{'inputs': inputs[:Li - 1] + EOS, 'targets': targets[:Lt - 1] + EOS}`
    with Li = inputs_length, Lt = targets_length.

    Decoder-only: one decoder row of at most Lt tokens, the prompt then the answer,
    `{'targets': inputs[:Li - 1] + EOS + targets[:Lt - Li - 1] + EOS, 'loss_mask': 0 on
    the prompt, 1 on the answer}`: inputs_length is the prompt's share of the row (EOS
    separates prompt and answer), the loss is on the answer only
    (`packing.model_batch`), and a decoder generates the answer from the prompt.
    """

    inputs_length: int
    targets_length: int
    eos_id: int
    decoder_only: bool = False

    @property
    def limits(self) -> tuple[int, int]:
        """(input tokens, target tokens) kept, EOS not counted."""
        answer = self.targets_length - self.inputs_length if self.decoder_only \
            else self.targets_length
        return self.inputs_length - 1, answer - 1

    def __call__(self, inputs: np.ndarray, targets: np.ndarray) -> list[dict]:
        """<int32>[Ni], <int32>[Nt] (no EOS) -> [example] (see the class docstring)."""
        eos = np.array([self.eos_id], np.int32)
        max_inputs, max_targets = self.limits
        prompt = np.concatenate([inputs[:max_inputs], eos]).astype(np.int32)
        answer = np.concatenate([targets[:max_targets], eos]).astype(np.int32)
        if not self.decoder_only:
            return [{"inputs": prompt, "targets": answer}]
        mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(answer), np.int32)])
        return [{"targets": np.concatenate([prompt, answer]), "loss_mask": mask}]
