"""Loaders for the real data sets used by the examples, tests and benchmarks.

The data are never copied into the repository: every loader reads from the folder given by
``--data-dir`` or ``$PLATED_DATA`` (:func:`data_dir`), and fails with a :class:`DataError` that
says where the data come from when a file is missing.

- :mod:`examples.data.polyphonic`: polyphonic-music piano rolls (``polyphonic/*.mat``).
- :mod:`examples.data.seals`: seal tracks, step lengths and turning angles (``seals/*.csv``).
- :mod:`examples.data.multi30k`: Multi30k German-English sentence pairs (``multi30k/*.gz``).
- :mod:`examples.data.sst`: the Stanford Sentiment Treebank's trees (``sst/*.txt``).
- :mod:`examples.data.tgif`: the TGIF-QA GIFs and their questions (``tgif-qa/``).
"""

from .common import (
    DATA_ENV,
    SOURCES,
    DataError,
    add_data_dir_argument,
    data_dir,
    data_file,
)
from .multi30k import MULTI30K_SPLITS, Parallel, load_multi30k
from .polyphonic import NUM_KEYS, POLYPHONIC, POLYPHONIC_SOURCE, SPLITS, load_polyphonic
from .seals import Tracks, load_nfs, load_ses
from .sst import Treebank, build_vocab, load_sst
from .tgif import GifQuestion, decode_gif, load_tgif_qa

__all__ = [
    "DATA_ENV",
    "MULTI30K_SPLITS",
    "Parallel",
    "load_multi30k",
    "NUM_KEYS",
    "POLYPHONIC",
    "POLYPHONIC_SOURCE",
    "SOURCES",
    "SPLITS",
    "DataError",
    "GifQuestion",
    "decode_gif",
    "load_tgif_qa",
    "Tracks",
    "Treebank",
    "build_vocab",
    "add_data_dir_argument",
    "data_dir",
    "data_file",
    "load_nfs",
    "load_polyphonic",
    "load_ses",
    "load_sst",
]
