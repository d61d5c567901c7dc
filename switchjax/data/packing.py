"""Packing examples into fixed-length rows, and the model's batch format.

Packing (grain's first-fit packer) puts several examples into one row of
each feature; every example gets a segment id (1, 2, 3, ... within the row, 0
on padding) and positions that restart at 0 with each segment. The
`inputs` and `targets` of one span-corruption example share their segment
id, so encoder, decoder and cross attention can all be masked per segment.
Without packing each row holds exactly one example (segment id 1). An optional
`loss_mask` feature (decoder-only text-to-text: 0 on the prompt, 1 on the answer) is
packed like `targets`, at the same offsets, and zeroes the loss weights it masks.

`model_batch` turns packed rows into the batch the model and losses read
(B rows, Li encoder length, Lt decoder length; int32 unless noted):

    encoder_input_tokens, encoder_segment_ids, encoder_positions     [B, Li]
        (span corruption only)
    decoder_input_tokens     targets shifted right within each segment,
                             0 (BOS) at each segment start          [B, Lt]
    decoder_target_tokens, decoder_segment_ids, decoder_positions   [B, Lt]
    decoder_loss_weights     <float32> 1 on target tokens, 0 on padding (and where
                             `loss_mask` is 0)
"""
from __future__ import annotations

import grain
import numpy as np

ENCODER_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                "decoder_positions", "decoder_loss_weights")


def pack(ds: grain.IterDataset, lengths: dict[str, int], num_bins: int,
         enabled: bool = True) -> grain.IterDataset:
    """Rows of packed examples, emitted one row at a time.

    Args:
      ds: examples, dicts of <int32>[n_k] with n_k <= lengths[k].
      lengths: row length per feature, e.g. {'inputs': 512, 'targets': 114}.
      num_bins: rows filled at once (first fit); more bins pack tighter.
      enabled: False puts exactly one example in each row (num_bins is 1 then).
    Returns:
      Rows: for each feature k, `k` <int32>[lengths[k]] (0-padded),
      `k_segment_ids` and `k_positions` <int32>[lengths[k]].
    """
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=dict(lengths), num_packing_bins=num_bins if enabled else 1,
        shuffle_bins=False, max_sequences_per_bin=None if enabled else 1)


def padding_row(lengths: dict[str, int]) -> dict[str, np.ndarray]:
    """An all-padding row in the format of `pack` (segment ids 0)."""
    row = {}
    for key, length in lengths.items():
        for suffix in ("", "_segment_ids", "_positions"):
            row[key + suffix] = np.zeros(length, np.int32)
    return row


def shift_right_by_segment(targets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """<int32>[B, L] decoder inputs: each token's predecessor in its segment, 0 at starts.

    A position-0 token starts a segment (padding also has position 0), so no
    input ever carries the previous segment's last token.
    """
    shifted = np.zeros_like(targets)
    shifted[:, 1:] = targets[:, :-1]
    return np.where(positions == 0, 0, shifted).astype(np.int32)


def model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed rows `[B, L]` (`inputs*` and `loss_mask*` optional, `targets*`) -> the
    model's batch."""
    batch = {}
    if "inputs" in rows:
        batch["encoder_input_tokens"] = rows["inputs"].astype(np.int32)
        batch["encoder_segment_ids"] = rows["inputs_segment_ids"].astype(np.int32)
        batch["encoder_positions"] = rows["inputs_positions"].astype(np.int32)
    batch["decoder_input_tokens"] = shift_right_by_segment(rows["targets"],
                                                           rows["targets_positions"])
    batch["decoder_target_tokens"] = rows["targets"].astype(np.int32)
    batch["decoder_segment_ids"] = rows["targets_segment_ids"].astype(np.int32)
    batch["decoder_positions"] = rows["targets_positions"].astype(np.int32)
    weights = rows["targets_segment_ids"] > 0
    if "loss_mask" in rows:
        weights &= rows["loss_mask"] > 0
    batch["decoder_loss_weights"] = weights.astype(np.float32)
    return batch


def batch_spec(lengths: dict[str, int], batch_size: int) -> dict[str, tuple[tuple, type]]:
    """{key: (shape, dtype)} of `model_batch` for rows of `lengths` (e.g. for model init)."""
    spec = {}
    if "inputs" in lengths:
        spec.update({k: ((batch_size, lengths["inputs"]), np.int32) for k in ENCODER_KEYS})
    spec.update({k: ((batch_size, lengths["targets"]), np.int32) for k in DECODER_KEYS})
    spec["decoder_loss_weights"] = ((batch_size, lengths["targets"]), np.float32)
    return spec
