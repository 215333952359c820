"""The Stanford Sentiment Treebank (Socher et al. 2013): parser, loader, vocabulary and padding.

The files ``sst/{train,dev,test}.txt`` hold one PTB-style binary tree a line, with a sentiment
label 0-4 (very negative, negative, neutral, positive, very positive) on every node, e.g.::

    (3 (2 It) (4 (2 's) (3 good)))

The root's label is the sentence's label. Words never contain parentheses or ASCII spaces: the
treebank writes ``(`` and ``)`` as ``-LRB-`` and ``-RRB-`` and ``/`` as ``\\/``, which this module
keeps verbatim; a few words hold a no-break space (``8\u00a01\\/2``), which is part of the word.

Splits (the standard ones): train 8,544, dev 1,101, test 2,210 sentences.

- :func:`parse_tree`: one line -> :class:`Tree` (tokens, root label, every node's span and label).
- :func:`load_sst`: a split -> :class:`Treebank`, raising :class:`~examples.data.DataError` that
  names the file and line of a malformed tree.
- :func:`build_vocab` (train sentences only, minimum count, ``<unk>``), :class:`Vocab` and
  :func:`pad_ids`: token lists -> a ``(sentences, max_words)`` tensor of ids and a mask.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .common import DataError, data_file

__all__ = [
    "NUM_LABELS",
    "SST_SPLITS",
    "UNK",
    "Node",
    "Tree",
    "TreeSyntaxError",
    "Treebank",
    "Vocab",
    "binary_labels",
    "build_vocab",
    "load_sst",
    "pad_ids",
    "parse_tree",
]

#: The splits and their files' names (``sst/<split>.txt``).
SST_SPLITS = ("train", "dev", "test")
#: Sentiment labels 0 (very negative) .. 4 (very positive).
NUM_LABELS = 5
#: The out-of-vocabulary token; it has id 0 in every :class:`Vocab`.
UNK = "<unk>"

#: A token of a tree line: a parenthesis, or a run of anything else up to an ASCII space, tab or
#: line break. Other white space is part of a word: the treebank has words such as
#: ``8\u00a01\\/2`` (a no-break space inside).
_TOKEN = re.compile(r"\(|\)|[^ \t\r\n()]+")


class Node(NamedTuple):
    """One node of a tree: the words ``tokens[start:end]`` and their gold sentiment ``label``."""

    start: int
    end: int
    label: int


class Tree(NamedTuple):
    """A parsed sentence: its ``tokens``, its (root) ``label``, and every node (leaves, inner
    nodes and the root) in post-order, each with its span and gold label."""

    tokens: tuple[str, ...]
    label: int
    nodes: tuple[Node, ...]


class TreeSyntaxError(ValueError):
    """A line is not a well-formed labelled tree (the message says where)."""


def _offset(line: str, k: int) -> int:
    """The character offset of token ``k`` of ``line``."""
    for j, m in enumerate(_TOKEN.finditer(line)):
        if j == k:
            return m.start()
    return len(line)


def parse_tree(line: str) -> Tree:
    """Parse one PTB-style sentiment tree, e.g. ``(3 (2 It) (4 (2 's) (3 good)))``.

    A node is ``(LABEL WORD)`` (a leaf) or ``(LABEL CHILD CHILD ...)`` (one or more child nodes);
    ``LABEL`` is an integer 0-4. Parsing is a single left-to-right pass over the tokens with an
    explicit stack of open nodes (no recursion, so deep trees are fine).

    :return: the :class:`Tree`; node spans are ``[start, end)`` over the tokens.
    :raises TreeSyntaxError: (a ``ValueError``) on unbalanced parentheses, a missing or
        out-of-range label, a node with no children or with both a word and child nodes, a bare
        word outside a node, a second tree on the line, or an empty line. The message gives the
        character offset.
    """
    toks = _TOKEN.findall(line)
    if not toks:
        raise TreeSyntaxError("empty line (expected a tree like '(3 (2 It) (3 good))')")
    words: list[str] = []
    nodes: list[Node] = []
    # the open nodes: [label, first word, content (0 nothing yet, 1 a word, 2 child nodes),
    # token index of the "("]
    stack: list[list[int]] = []
    n = len(toks)
    i = 0
    while i < n:
        tok = toks[i]
        if tok == "(":
            if stack:
                top = stack[-1]
                if top[2] == 1:
                    raise TreeSyntaxError(
                        f"node at offset {_offset(line, top[3])} has both a word and child nodes "
                        f"(child at offset {_offset(line, i)})")
                top[2] = 2
            elif nodes:
                raise TreeSyntaxError(
                    f"text after the end of the tree at offset {_offset(line, i)}: {tok!r}")
            label = toks[i + 1] if i + 1 < n else ""
            if not label.isdigit() or int(label) >= NUM_LABELS:
                got = repr(label) if label else "end of line"
                raise TreeSyntaxError(f"expected a label 0-{NUM_LABELS - 1} after '(' at offset "
                                      f"{_offset(line, i)}, got {got}")
            stack.append([int(label), len(words), 0, i])
            i += 2
        elif tok == ")":
            if not stack:
                raise TreeSyntaxError(f"unbalanced ')' at offset {_offset(line, i)}")
            label_, start, content, opened = stack.pop()
            if not content:
                raise TreeSyntaxError(
                    f"node at offset {_offset(line, opened)} has neither a word nor children")
            nodes.append(Node(start, len(words), label_))
            i += 1
        else:
            if not stack:
                raise TreeSyntaxError(
                    f"word {tok!r} at offset {_offset(line, i)} is outside any node")
            top = stack[-1]
            if top[2]:
                raise TreeSyntaxError(
                    f"node at offset {_offset(line, top[3])} has more than a single word, or a "
                    f"word and child nodes (word {tok!r} at offset {_offset(line, i)})")
            top[2] = 1
            words.append(tok)
            i += 1
    if stack:
        raise TreeSyntaxError(f"{len(stack)} unclosed '(' (the innermost at offset "
                              f"{_offset(line, stack[-1][3])})")
    return Tree(tuple(words), nodes[-1].label, tuple(nodes))


@dataclass(frozen=True)
class Treebank:
    """One split of the treebank.

    :ivar trees: the parsed sentences, in file order.
    :ivar path: the file read.
    """

    trees: tuple[Tree, ...]
    path: Path

    @property
    def sentences(self) -> list[list[str]]:
        """Each sentence's tokens (a new list each time)."""
        return [list(t.tokens) for t in self.trees]

    @property
    def labels(self) -> torch.Tensor:
        """``(sentences,)`` long: the root (sentence) labels 0-4."""
        return torch.tensor([t.label for t in self.trees], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.trees)

    def nodes(self, min_len: int = 1, max_len: int | None = None, roots: bool = True
              ) -> torch.Tensor:
        """Every node's ``(sentence, start, end, label)``, as a ``(nodes, 4)`` long tensor.

        :param min_len: keep nodes spanning at least this many words (1: leaves included).
        :param max_len: keep nodes spanning at most this many words (``None``: no bound).
        :param roots: keep the nodes that span the whole sentence (the root, whose label is the
            sentence label, and any unary chain above or below it).
        """
        rows = [(s, n.start, n.end, n.label) for s, t in enumerate(self.trees) for n in t.nodes
                if n.end - n.start >= min_len and (max_len is None or n.end - n.start <= max_len)
                and (roots or (n.start, n.end) != (0, len(t.tokens)))]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


def load_sst(split: str = "train", data_dir: str | os.PathLike[str] | None = None) -> Treebank:
    """Read ``sst/<split>.txt`` from the data folder (``data_dir``, else ``$PLATED_DATA``).

    :param split: one of :data:`SST_SPLITS`.
    :raises DataError: for an unknown split, a missing folder or file (the message says where the
        data come from), or a malformed tree (the message names the file and line).
    """
    if split not in SST_SPLITS:
        raise DataError(f"unknown SST split {split!r}; valid splits: {', '.join(SST_SPLITS)}")
    path = data_file(data_dir, "sst", f"{split}.txt")
    stat = path.stat()
    return _read(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> Treebank:
    """Parse a file (cached by path, modification time and size: a :class:`Treebank` is
    immutable, and parsing the training split takes about a second)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path!r}, line {line}: not UTF-8 text ({e.reason}); expected the "
                        "treebank's trees/ files") from None
    trees = []
    # line breaks as open() reads text: \n, \r or \r\n (not str.splitlines' other breaks)
    for number, line_text in enumerate(io.StringIO(text, newline=None), start=1):
        try:
            trees.append(parse_tree(line_text))
        except TreeSyntaxError as e:
            raise DataError(f"{path!r}, line {number}: malformed tree: {e}") from None
    return Treebank(tuple(trees), Path(path))


def binary_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual binary version of 5-class labels: neutral (2) dropped, 0-1 -> 0, 3-4 -> 1.

    :param labels: ``(N,)`` long in 0-4.
    :return: ``keep`` ``(N,)`` bool (not neutral) and ``binary`` ``(N,)`` long (0 negative,
        1 positive; meaningless where ``keep`` is false).
    """
    return labels != 2, (labels > 2).long()


@dataclass(frozen=True)
class Vocab:
    """A token <-> id map; id 0 is :data:`UNK`, which every unknown token maps to.

    :ivar tokens: the tokens, by id.
    :ivar lowercase: whether tokens are lower-cased before lookup.
    """

    tokens: tuple[str, ...]
    lowercase: bool = True

    def __post_init__(self) -> None:
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"a Vocab's first token must be {UNK!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a Vocab's tokens must be distinct")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, sentence: Iterable[str]) -> list[int]:
        """The ids of a sentence's tokens (0 for unknown ones)."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        if self.lowercase:
            return [index.get(t.lower(), 0) for t in sentence]
        return [index.get(t, 0) for t in sentence]


def build_vocab(sentences: Iterable[Sequence[str]], min_count: int = 1, lowercase: bool = True
                ) -> Vocab:
    """The vocabulary of (training) sentences: every token seen at least ``min_count`` times,
    most frequent first (ties alphabetically), after :data:`UNK` (id 0)."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = Counter(t.lower() if lowercase else t for s in sentences for t in s)
    counts.pop(UNK, None)
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return Vocab((UNK, *kept), lowercase)


def pad_ids(sentences: Sequence[Sequence[str]], vocab: Vocab, max_words: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and right-pad sentences.

    :param max_words: the padded width (default: the longest sentence); longer sentences are
        an error, not silently cut.
    :return: ``ids`` ``(sentences, max_words)`` long (padding is id 0) and ``mask``
        ``(sentences, max_words)`` bool (true on real words).
    :raises ValueError: if a sentence is empty or longer than ``max_words``.
    """
    lengths = [len(s) for s in sentences]
    if any(n == 0 for n in lengths):
        raise ValueError(f"sentence {lengths.index(0)} is empty")
    width = max(lengths, default=0) if max_words is None else max_words
    if lengths and max(lengths) > width:
        raise ValueError(f"a sentence has {max(lengths)} words, more than max_words={width}")
    ids = torch.zeros(len(sentences), width, dtype=torch.long)
    for i, s in enumerate(sentences):
        ids[i, :len(s)] = torch.tensor(vocab.encode(s), dtype=torch.long)
    mask = torch.arange(width) < torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)
    return ids, mask
