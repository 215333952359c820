"""Subword tokenisation and batching for the translation example.

* :class:`Tokenizer`: a joint (source + target) BPE model of sentencepiece, trained on the
  training split only and cached on disk under a name that includes a hash of the training text
  and the settings, so every run and every attention mode shares the same subwords.
* :func:`encode_pairs`, :func:`length_batches` and :func:`collate`: sentences -> ids -> padded
  batches of similar lengths (right padding, ``<s>`` / ``</s>`` on the target side).
* :func:`shard` (from :mod:`examples.common`): the batches of one process of a data-parallel run.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import atomic_write_bytes, shard
from ..data import DataError

__all__ = ["BOS", "EOS", "PAD", "UNK", "Batch", "Tokenizer", "collate", "encode_pairs",
           "length_batches", "shard"]

#: Special ids of every tokenizer made here.
PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
    """A sentencepiece model with the ids :data:`PAD`, :data:`UNK`, :data:`BOS`, :data:`EOS`.

    Build one with :meth:`train` (or :meth:`cached`); ``encode`` / ``decode`` map between text
    and ids. Decoding detokenises: ``decode(encode(s)) == s`` for text in the model's alphabet
    (sentencepiece normalises white space runs; ``normalization_rule_name="identity"`` keeps
    everything else as it is, case included).
    """

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        want = {"<pad>": PAD, "<unk>": UNK, "<s>": BOS, "</s>": EOS}
        for piece, i in want.items():
            if self.sp.id_to_piece(i) != piece:
                raise ValueError(f"the sentencepiece model has {self.sp.id_to_piece(i)!r} at id "
                                 f"{i}; this example needs {want}")

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without ``<s>`` / ``</s>``."""
        return [list(x) for x in self.sp.encode(list(texts))]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenised text of each id list; stops at the first ``</s>``, skips ``<s>`` and
        padding."""
        out = []
        for row in ids:
            row = list(row)
            if EOS in row:
                row = row[:row.index(EOS)]
            out.append(self.sp.decode([i for i in row if i not in (PAD, BOS)]))
        return out

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The subword strings of ``ids`` (for plots)."""
        return [self.sp.id_to_piece(int(i)) for i in ids]

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, *, max_sentences: int = 0) -> Tokenizer:
        """Train a BPE model on ``texts`` (deterministic for the same texts and settings);
        ``max_sentences > 0`` trains on that many of them only."""
        import sentencepiece as spm

        if vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, shuffle_input_sentence=False,
            input_sentence_size=max_sentences, num_threads=1, minloglevel=2,
            hard_vocab_limit=False)
        return cls(buf.getvalue())

    @classmethod
    def cached(cls, texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike[str]
               ) -> Tokenizer:
        """The model :meth:`train` gives for ``texts`` and ``vocab_size``, read from
        ``cache_dir`` when it was made before (keyed by a hash of both), else trained and written
        there atomically."""
        h = hashlib.sha256()
        h.update(f"bpe/{vocab_size}/identity/v1\n".encode())
        for t in texts:
            h.update(t.encode("utf-8") + b"\n")
        path = Path(cache_dir) / f"spm-bpe{vocab_size}-{h.hexdigest()[:12]}.model"
        if path.is_file():
            try:
                return cls(path.read_bytes())
            except Exception as e:  # noqa: BLE001 - sentencepiece raises several kinds
                raise DataError(f"the cached tokenizer {str(path)!r} is unreadable ({e}); delete "
                                "it and it will be trained again") from e
        tok = cls.train(texts, vocab_size)
        atomic_write_bytes(tok.model_proto, path)
        return tok


def encode_pairs(tok: Tokenizer, src: Sequence[str], tgt: Sequence[str]
                 ) -> list[tuple[list[int], list[int]]]:
    """Id lists of each pair (target without ``<s>`` / ``</s>``; :func:`collate` adds them)."""
    return list(zip(tok.encode(src), tok.encode(tgt), strict=True))


@dataclass
class Batch:
    """A padded batch. ``tgt_in`` starts with ``<s>``, ``tgt_out`` ends with ``</s>``.

    :ivar src: ``(B, S)`` ids. :ivar src_mask: ``(B, S)`` bool, ``True`` at real positions.
    :ivar tgt_in: ``(B, T)``. :ivar tgt_out: ``(B, T)``. :ivar tgt_mask: ``(B, T)`` bool.
    :ivar index: ``(B,)`` positions of the pairs in the split.
    :ivar num_tokens: target tokens, ``</s>`` included (what perplexity is per); counted on the
        host by :func:`collate`, so reading it never waits for a device.
    """

    src: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    tgt_mask: torch.Tensor
    index: torch.Tensor
    num_tokens: int

    def to(self, device: torch.device) -> Batch:
        src, src_mask, tgt_in, tgt_out, tgt_mask, index = (
            x.to(device, non_blocking=True) for x in (
                self.src, self.src_mask, self.tgt_in, self.tgt_out, self.tgt_mask, self.index))
        return Batch(src, src_mask, tgt_in, tgt_out, tgt_mask, index, self.num_tokens)


def collate(pairs: Sequence[tuple[list[int], list[int]]], index: Sequence[int]) -> Batch:
    """Pad ``pairs`` (source ids, target ids) into a :class:`Batch`."""
    b = len(pairs)
    s = max(max(len(p[0]) for p in pairs), 1)
    t = max(len(p[1]) for p in pairs) + 1
    src = torch.full((b, s), PAD, dtype=torch.long)
    tgt_in = torch.full((b, t), PAD, dtype=torch.long)
    tgt_out = torch.full((b, t), PAD, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        src[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        tgt_in[i, :len(y) + 1] = torch.tensor([BOS] + y, dtype=torch.long)
        tgt_out[i, :len(y) + 1] = torch.tensor(y + [EOS], dtype=torch.long)
    src_len = torch.tensor([max(len(p[0]), 1) for p in pairs])
    tgt_len = torch.tensor([len(p[1]) + 1 for p in pairs])
    src_mask = torch.arange(s)[None, :] < src_len[:, None]
    tgt_mask = torch.arange(t)[None, :] < tgt_len[:, None]
    return Batch(src, src_mask, tgt_in, tgt_out, tgt_mask, torch.tensor(list(index)),
                 int(tgt_len.sum()))


def length_batches(pairs: Sequence[tuple[list[int], list[int]]], batch_size: int, *,
                   shuffle: bool, seed: int = 0, pool: int = 50) -> list[list[int]]:
    """Index lists of batches of similar lengths.

    With ``shuffle``, the pairs are shuffled (by ``random.Random(seed)``), cut into pools of
    ``pool * batch_size``, sorted by (source, target) length inside each pool, cut into batches,
    and the batches are shuffled: little padding, a different order every seed (epoch). Without
    it, pairs are sorted by length and batched in that order (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(pairs)))

    def key(i: int) -> tuple[int, int]:
        return (len(pairs[i][0]), len(pairs[i][1]))

    if not shuffle:
        order.sort(key=key)
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    batches = []
    step = pool * batch_size
    for start in range(0, len(order), step):
        chunk = sorted(order[start:start + step], key=key)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
