"""Span corruption and causal LM (numpy, against T5's numbers and an
independent reconstruction) and packing (against hand-made rows)."""
import grain
import numpy as np
import pytest

from switchjax.data import objectives, packing

FIRST_SENTINEL = 1099  # vocab of 1000 pieces + 100 sentinels: ids 1000..1099
EOS = 1


def reconstruct(inputs, targets):
    """Original tokens from T5 inputs/targets: each sentinel in the inputs is
    replaced by the tokens that follow the same sentinel in the targets (a
    1-token sequence has no noise: its targets are one empty span)."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1]:
        if t >= 1000:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans.pop(int(t)) if t >= 1000 else [int(t)])
    assert not any(spans.values()), "a target span has no sentinel in the inputs"
    return out


def corrupt(tokens, seed, density=0.15, span=3.0):
    fn = objectives.SpanCorruption(len(tokens), density, span, FIRST_SENTINEL, EOS)
    (example,) = fn(np.asarray(tokens, np.int32), np.random.default_rng(seed))
    return example["inputs"], example["targets"]


@pytest.mark.parametrize("inputs_length,expected", [(512, (568, 114))])
def test_random_spans_helper_matches_t5(inputs_length, expected):
    assert objectives.random_spans_helper(inputs_length, 0.15, 3.0) == expected


@pytest.mark.parametrize("inputs_length", [64, 128, 512, 626])
@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.5, 3.0), (0.3, 8.0)])
def test_full_chunk_fills_exactly_the_helper_lengths(inputs_length, density, span):
    tokens_length, targets_length = objectives.random_spans_helper(inputs_length, density,
                                                                   span)
    fn = objectives.SpanCorruption(tokens_length, density, span, FIRST_SENTINEL, EOS)
    tokens = np.arange(3, 3 + 3 * tokens_length, dtype=np.int32) % 997 + 3
    examples = fn(tokens, np.random.default_rng(0))
    assert len(examples[0]["inputs"]) == inputs_length
    assert len(examples[0]["targets"]) <= targets_length
    if density != 0.5:  # T5 shortens tokens_length by one for density 0.5
        assert len(examples[0]["targets"]) == targets_length
    for ex in examples[1:]:  # shorter/equal chunks never exceed the lengths
        assert len(ex["inputs"]) <= inputs_length and len(ex["targets"]) <= targets_length


def test_span_corruption_reconstructs_original():
    rng = np.random.default_rng(1)
    for length in list(range(1, 40)) + [100, 568, 1000]:
        for seed in range(5):
            tokens = rng.integers(3, 1000, length)
            inputs, targets = corrupt(tokens, seed)
            assert reconstruct(inputs, targets) == tokens.tolist()


def test_sentinels_count_down_from_top_of_vocab_in_span_order():
    inputs, targets = corrupt(np.arange(3, 203), seed=7)
    in_sentinels = inputs[inputs >= 1000].tolist()
    assert in_sentinels == list(range(FIRST_SENTINEL, FIRST_SENTINEL - len(in_sentinels), -1))
    assert targets[targets >= 1000].tolist() == in_sentinels
    assert targets[0] == FIRST_SENTINEL  # T5 masks always start with non-noise


def test_noise_density_and_mean_span_length_statistics():
    """Over 2000 sequences of random length: density 0.15 +- 0.005 and mean
    span length 3.0 +- 0.1; each sequence has exactly round(L * 0.15) noise
    tokens; noise is spread over the sequence (each third 0.15 +- 0.02)."""
    rng = np.random.default_rng(0)
    noise = spans = total = 0
    thirds = np.zeros(3)
    for _ in range(2000):
        length = int(rng.integers(60, 1000))
        mask = objectives.random_spans_noise_mask(length, 0.15, 3.0, rng)
        assert mask.sum() == round(length * 0.15)
        assert not mask[0] and mask[-1]
        noise += mask.sum()
        spans += np.sum(mask & ~np.concatenate([[False], mask[:-1]]))
        total += length
        thirds += [m.mean() for m in np.array_split(mask, 3)]
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.1
    np.testing.assert_allclose(thirds / 2000, 0.15, atol=0.02)


def test_span_corruption_is_deterministic_given_rng_and_random_across_seeds():
    tokens = np.arange(3, 300)
    a, b, c = corrupt(tokens, 1), corrupt(tokens, 1), corrupt(tokens, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_causal_lm_chunks_document_plus_eos():
    tokens = np.arange(3, 28, dtype=np.int32)  # 25 tokens + EOS = 26 = 10 + 10 + 6
    examples = objectives.CausalLM(10, EOS)(tokens, None)
    assert [len(e["targets"]) for e in examples] == [10, 10, 6]
    np.testing.assert_array_equal(np.concatenate([e["targets"] for e in examples]),
                                  np.append(tokens, EOS))


def _pack(examples, lengths, num_bins, enabled=True):
    ds = grain.MapDataset.source(examples).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    rows = list(packing.pack(ds, lengths, num_bins, enabled))
    return packing.model_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})


def _ex(inputs, targets):
    return {"inputs": np.array(inputs, np.int32), "targets": np.array(targets, np.int32)}


HAND_EXAMPLES = [_ex([11, 12, 13], [21, 22]), _ex([14, 15], [23]),
                 _ex([16, 17, 18, 19], [24, 25, 26])]


def test_packing_hand_made_example():
    batch = _pack(HAND_EXAMPLES, {"inputs": 6, "targets": 4}, num_bins=2)
    # First fit: A and B share row 0, C does not fit there and opens row 1.
    expected = {
        "encoder_input_tokens": [[11, 12, 13, 14, 15, 0], [16, 17, 18, 19, 0, 0]],
        "encoder_segment_ids": [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]],
        "encoder_positions": [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]],
        "decoder_target_tokens": [[21, 22, 23, 0], [24, 25, 26, 0]],
        "decoder_input_tokens": [[0, 21, 0, 0], [0, 24, 25, 0]],
        "decoder_segment_ids": [[1, 1, 2, 0], [1, 1, 1, 0]],
        "decoder_positions": [[0, 1, 0, 0], [0, 1, 2, 0]],
        "decoder_loss_weights": [[1, 1, 1, 0], [1, 1, 1, 0]],
    }
    assert set(batch) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)
        assert batch[key].dtype == (np.float32 if key == "decoder_loss_weights" else np.int32)
    spec = packing.batch_spec({"inputs": 6, "targets": 4}, 2)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec


def test_packing_disabled_gives_one_example_per_row():
    batch = _pack(HAND_EXAMPLES, {"inputs": 6, "targets": 4}, num_bins=2, enabled=False)
    np.testing.assert_array_equal(batch["encoder_segment_ids"],
                                  [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_input_tokens"],
                                  [[0, 21, 0, 0], [0, 0, 0, 0], [0, 24, 25, 0]])
    np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                  [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])


def test_causal_lm_packing_shift_never_crosses_segments():
    examples = [{"targets": np.array(t, np.int32)} for t in ([5, 6, 1], [7, 1], [8, 9, 10, 1])]
    batch = _pack(examples, {"targets": 10}, num_bins=1)
    np.testing.assert_array_equal(batch["decoder_target_tokens"],
                                  [[5, 6, 1, 7, 1, 8, 9, 10, 1, 0]])
    np.testing.assert_array_equal(batch["decoder_input_tokens"],
                                  [[0, 5, 6, 0, 7, 0, 8, 9, 10, 0]])
    np.testing.assert_array_equal(batch["decoder_segment_ids"],
                                  [[1, 1, 1, 2, 2, 3, 3, 3, 3, 0]])
    np.testing.assert_array_equal(batch["decoder_positions"],
                                  [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    assert "encoder_input_tokens" not in batch
