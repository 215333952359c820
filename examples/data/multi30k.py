"""Multi30k task 1, German-English (Elliott et al. 2016): raw, cased, parallel sentences.

The files ``multi30k/<split>.{de,en}.gz`` hold one sentence a line; line ``i`` of the ``.de``
file translates line ``i`` of the ``.en`` file. The data folder holds ``train`` (29,000 pairs),
``val`` (1,014) and ``test_2016_flickr`` (1,000); any other split whose two files are present is
read the same way (the public release also has ``test_2017_flickr``, ``test_2018_flickr`` and
``test_2017_mscoco``), and :func:`multi30k_splits` lists the splits present.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .common import DataError, data_dir, data_file

__all__ = ["MULTI30K_SPLITS", "Parallel", "load_multi30k", "multi30k_splits", "read_lines"]

#: The splits the data folder ships, and their number of sentence pairs (any other split whose
#: two files are present is accepted too: :func:`multi30k_splits`).
MULTI30K_SPLITS = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
#: What a split's name may be: the stem of its files, ``<split>.<lang>.gz``.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


def multi30k_splits(folder: str | os.PathLike[str] | None = None, *, src_lang: str = "de",
                    tgt_lang: str = "en") -> list[str]:
    """The splits whose two files, ``<split>.<src_lang>.gz`` and ``<split>.<tgt_lang>.gz``, are
    in the data folder's ``multi30k/``: the shipped ones first (train, val, test_2016_flickr),
    then the others by name; empty when ``multi30k/`` is missing.

    :raises DataError: if the data folder itself is missing (as :func:`load_multi30k`).
    """
    sub = data_dir(folder, "multi30k", f"multi30k/train.{src_lang}.gz") / "multi30k"
    if not sub.is_dir():
        return []
    suffix = f".{src_lang}.gz"
    names = {p.name[:-len(suffix)] for p in sub.iterdir()
             if p.name.endswith(suffix) and p.is_file()}
    present = {n for n in names if (sub / f"{n}.{tgt_lang}.gz").is_file()
               and _SPLIT_NAME.fullmatch(n)}
    return ([n for n in MULTI30K_SPLITS if n in present]
            + sorted(present - set(MULTI30K_SPLITS)))


def load_multi30k(split: str, folder: str | os.PathLike[str] | None = None, *,
                  src_lang: str = "de", tgt_lang: str = "en") -> Parallel:
    """One split of Multi30k as sentence pairs.

    :param split: any split whose two files are in the data folder's ``multi30k/``: ``"train"``,
        ``"val"``, ``"test_2016_flickr"``, and e.g. ``"test_2017_flickr"`` where present.
    :param folder: the data folder (``--data-dir``; default ``$PLATED_DATA``).
    :raises DataError: on a language other than ``de`` and ``en``, a name that cannot be a
        split, a split whose files are missing (the message names the files and the folder, and
        lists the splits present), or source and target files of different lengths (the message
        names both files and their line counts).
    """
    for lang in (src_lang, tgt_lang):
        if lang not in ("de", "en"):
            raise DataError(f"unknown Multi30k language {lang!r}: task 1 has 'de' and 'en'")
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise DataError(f"{split!r} is not a Multi30k split name (letters, digits, '_', '-' "
                        "and '.', the stem of the files <split>.de.gz and <split>.en.gz)")
    names = [f"{split}.{src_lang}.gz", f"{split}.{tgt_lang}.gz"]
    sub = data_dir(folder, "multi30k", f"multi30k/{names[0]}") / "multi30k"
    missing = [n for n in names if not (sub / n).is_file()]
    if missing:
        present = multi30k_splits(folder, src_lang=src_lang, tgt_lang=tgt_lang)
        listed = (f"the splits present there are {', '.join(present)}" if present
                  else "no split is present there")
        if split not in MULTI30K_SPLITS:
            raise DataError(f"unknown Multi30k split {split!r}: {str(sub)!r} has no "
                            f"{' and no '.join(missing)}; {listed} (a split is read when both "
                            f"{names[0]} and {names[1]} are in that folder)")
        try:
            for n in missing:
                data_file(folder, "multi30k", n)
        except DataError as e:
            raise DataError(f"{e}; {listed}") from e
    src_path = data_file(folder, "multi30k", names[0])
    tgt_path = data_file(folder, "multi30k", names[1])
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{str(src_path)!r} has {len(src)} lines but {str(tgt_path)!r} has "
                        f"{len(tgt)}: the two sides of a split must align line by line")
    return Parallel(split, src_lang, tgt_lang, src, tgt)
