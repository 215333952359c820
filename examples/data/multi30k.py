"""Multi30k task 1, German-English (Elliott et al. 2016): raw, cased, parallel sentences.

The files ``multi30k/<split>.{de,en}.gz`` hold one sentence a line; line ``i`` of the ``.de``
file translates line ``i`` of the ``.en`` file. Splits: ``train`` (29,000 pairs), ``val``
(1,014) and ``test_2016_flickr`` (1,000).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

from .common import DataError, data_file

__all__ = ["MULTI30K_SPLITS", "Parallel", "load_multi30k", "read_lines"]

#: The splits and their number of sentence pairs.
MULTI30K_SPLITS = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}


@dataclass(frozen=True)
class Parallel:
    """Sentence pairs of one split: ``src[i]`` translates to ``tgt[i]``."""

    split: str
    src_lang: str
    tgt_lang: str
    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        return len(self.src)


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The lines of a (gzipped when the name ends in ``.gz``) UTF-8 text file, without their
    line breaks.

    :raises DataError: naming the file when it is not valid gzip or UTF-8.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        kind = "gzipped UTF-8 text" if path.suffix == ".gz" else "UTF-8 text"
        raise DataError(f"cannot read {str(path)!r} as {kind}: {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def load_multi30k(split: str, folder: str | os.PathLike[str] | None = None, *,
                  src_lang: str = "de", tgt_lang: str = "en") -> Parallel:
    """One split of Multi30k as sentence pairs.

    :param split: ``"train"``, ``"val"`` or ``"test_2016_flickr"``.
    :param folder: the data folder (``--data-dir``; default ``$PLATED_DATA``).
    :raises DataError: on an unknown split or language, a missing file, or source and target files
        of different lengths (the message names both files and their line counts).
    """
    if split not in MULTI30K_SPLITS:
        raise DataError(f"unknown Multi30k split {split!r}; the splits are "
                        f"{', '.join(MULTI30K_SPLITS)}")
    for lang in (src_lang, tgt_lang):
        if lang not in ("de", "en"):
            raise DataError(f"unknown Multi30k language {lang!r}: task 1 has 'de' and 'en'")
    src_path = data_file(folder, "multi30k", f"{split}.{src_lang}.gz")
    tgt_path = data_file(folder, "multi30k", f"{split}.{tgt_lang}.gz")
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{str(src_path)!r} has {len(src)} lines but {str(tgt_path)!r} has "
                        f"{len(tgt)}: the two sides of a split must align line by line")
    return Parallel(split, src_lang, tgt_lang, src, tgt)
