"""SentencePiece tokenizer with T5's id convention and span-corruption sentinels.

Ids: pad=0, eos=1, unk=2, no BOS; the SentencePiece pieces fill
[0, spm_size); `num_extra_ids` sentinels sit on top of the vocabulary:
sentinel i = vocab_size - 1 - i with vocab_size = spm_size + num_extra_ids
(T5's `<extra_id_i>`). T5's public `sentencepiece.model` follows this
convention; `train_sentencepiece` makes a local model that does too.
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """SentencePiece model + sentinels. Picklable (grain worker processes)."""

    def __init__(self, model_proto: bytes, num_extra_ids: int):
        self._proto = model_proto
        self._num_extra_ids = num_extra_ids
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if ids[:3] != (PAD_ID, EOS_ID, UNK_ID) or ids[3] >= 0:
            raise ValueError(f"the SentencePiece model's (pad, eos, unk, bos) ids are {ids}, "
                             "switchjax needs T5's (0, 1, 2, none)")
        if self._sp.get_piece_size() <= UNK_ID:
            raise ValueError(f"the SentencePiece model has {self._sp.get_piece_size()} pieces")

    @classmethod
    def from_file(cls, path: str, num_extra_ids: int) -> Tokenizer:
        with open(path, "rb") as f:
            return cls(f.read(), num_extra_ids)

    def __getstate__(self):
        return {"model_proto": self._proto, "num_extra_ids": self._num_extra_ids}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["num_extra_ids"])

    @property
    def spm_size(self) -> int:
        """Number of SentencePiece pieces (ids below the sentinels)."""
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """All ids including the sentinels: the model's embedding size."""
        return self.spm_size + self._num_extra_ids

    @property
    def num_extra_ids(self) -> int:
        return self._num_extra_ids

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def sentinel(self, i: int) -> int:
        """Id of sentinel `<extra_id_i>`: vocab_size - 1 - i."""
        if not 0 <= i < self._num_extra_ids:
            raise IndexError(f"sentinel {i} out of range [0, {self._num_extra_ids})")
        return self.vocab_size - 1 - i

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no EOS appended); `<extra_id_i>` is not parsed."""
        return self._sp.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        """Text -> <int32>[N]."""
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def id_to_piece(self, i: int) -> str:
        """One id as its SentencePiece piece ('▁' marks a space); sentinels as `<extra_id_i>`."""
        if i >= self.spm_size:
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        return self._sp.id_to_piece(int(i))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; sentinels become `<extra_id_i>`, pad/eos are dropped."""
        out, run = [], []
        for i in (int(i) for i in ids):
            if i >= self.spm_size:
                out.append(self._sp.decode(run))
                out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """Trains a unigram SentencePiece model on texts; returns the model proto.

    Lossless for source code: identity normalisation, whitespace kept,
    newline and tab as their own pieces, byte fallback for unseen characters,
    digits split. Each line of each text is one training sentence.
    """
    def lines():
        for text in texts:
            yield from (line for line in text.split("\n") if line.strip())

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"], split_digits=True,
        max_sentence_length=16384, hard_vocab_limit=True, num_threads=2,
        minloglevel=2)
    return model.getvalue()


def cached_sentencepiece(path: str, texts_fn: Callable[[], Iterable[str]],
                         vocab_size: int) -> bytes:
    """The model at `path`, trained on `texts_fn()` and written there if absent.

    The file is written atomically, so concurrent processes never read half a
    model; the first complete one wins.
    """
    if not os.path.exists(path):
        proto = train_sentencepiece(texts_fn(), vocab_size)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(proto)
        os.replace(tmp, path)
    with open(path, "rb") as f:
        return f.read()
