"""The translation example (``python -m examples.translation``): Multi30k loading, the BPE
tokenizer, the model's exact scores against brute force, beam search, checkpoints and resume,
the smoke run of every attention mode and a two-process data-parallel run."""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_one_line_error, interrupt_run, real_data, run_example

from examples.common import ExampleError
from examples.data import DataError, load_multi30k
from examples.translation import report
from examples.translation.data import (
    BOS,
    EOS,
    PAD,
    Tokenizer,
    collate,
    length_batches,
    shard,
)
from examples.translation.model import (
    MODES,
    OUTPUT_LAYERS,
    ModelConfig,
    Seq2Seq,
    greedy_decode,
)
from examples.translation.train import Trainer, cli, main, make_parser, read_checkpoint

MULTI30K = real_data(*(f"multi30k/{split}.{lang}.gz" for split in
                       ("train", "val", "test_2016_flickr") for lang in ("de", "en")))
DATA = MULTI30K.folder
PROG = "examples.translation"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PLATED_DATA"] = str(DATA)
    return env


# -- data ------------------------------------------------------------------------------------------


@MULTI30K.needed
def test_multi30k_splits_have_their_sizes_and_aligned_lines() -> None:
    sizes = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
    for split, n in sizes.items():
        p = load_multi30k(split, DATA)
        assert len(p.src) == len(p.tgt) == n
        assert all(s.strip() and t.strip() for s, t in zip(p.src, p.tgt, strict=True))
    train = load_multi30k("train", DATA)
    # the first and last pairs of the files, read independently
    with gzip.open(DATA / "multi30k" / "train.de.gz", "rt", encoding="utf-8") as f:
        de = f.read().splitlines()
    with gzip.open(DATA / "multi30k" / "train.en.gz", "rt", encoding="utf-8") as f:
        en = f.read().splitlines()
    assert (train.src[0], train.tgt[0]) == (de[0], en[0])
    assert (train.src[-1], train.tgt[-1]) == (de[-1], en[-1])
    assert train.src[0].startswith("Zwei junge weiße Männer")
    assert train.tgt[0].startswith("Two young, White males")
    test = load_multi30k("test_2016_flickr", DATA)
    assert test.tgt[0] == "A man in an orange hat starring at something."
    rev = load_multi30k("val", DATA, src_lang="en", tgt_lang="de")
    assert rev.src == load_multi30k("val", DATA).tgt


def _write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_multi30k_errors_name_the_files(tmp_path: Path) -> None:
    (tmp_path / "multi30k").mkdir()
    _write_gz(tmp_path / "multi30k" / "val.de.gz", ["a", "b", "c"])
    _write_gz(tmp_path / "multi30k" / "val.en.gz", ["a", "b"])
    with pytest.raises(DataError, match=r"val\.de\.gz.* 3 lines .*val\.en\.gz.* 2"):
        load_multi30k("val", tmp_path)
    with pytest.raises(DataError, match=r"train\.de\.gz.*not found.*Multi30k.*--data-dir"):
        load_multi30k("train", tmp_path)
    with pytest.raises(DataError, match="unknown Multi30k split 'dev'"):
        load_multi30k("dev", tmp_path)
    (tmp_path / "multi30k" / "test_2016_flickr.de.gz").write_bytes(b"not gzip")
    _write_gz(tmp_path / "multi30k" / "test_2016_flickr.en.gz", ["x"])
    with pytest.raises(DataError, match=r"cannot read .*test_2016_flickr\.de\.gz"):
        load_multi30k("test_2016_flickr", tmp_path)


def test_the_cli_without_data_says_where_it_comes_from(tmp_path: Path) -> None:
    """No data folder, or a wrong one: one line that says where the data comes from, and the new
    --out-dir is not left behind (nor the tokenizer cache beside it)."""
    out = tmp_path / "new" / "run"
    r = run_example(PROG, "--smoke-test", "--out-dir", str(out), env={"PLATED_DATA": None},
                    timeout=300)
    assert_one_line_error(r, PROG, "PLATED_DATA is not set", "multi30k/dataset", "--data-dir")
    r = run_example(PROG, "--smoke-test", "--out-dir", str(out), "--data-dir", "/nonexistent",
                    timeout=300)
    assert_one_line_error(r, PROG, "'/nonexistent'", "does not exist")
    (tmp_path / "empty").mkdir()
    r = run_example(PROG, "--smoke-test", "--out-dir", str(out), "--data-dir",
                    str(tmp_path / "empty"), timeout=300)
    assert_one_line_error(r, PROG, str(tmp_path / "empty" / "multi30k" / "train.de.gz"))
    assert sorted(tmp_path.iterdir()) == [tmp_path / "empty"]


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_an_unusable_device_is_a_usage_error(device: str, tmp_path: Path) -> None:
    # no GPU visible to the program, also on a machine that has one
    r = run_example(PROG, "--smoke-test", "--device", device, "--out-dir", str(tmp_path / "r"),
                    env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert_one_line_error(r, PROG, "--device", repr(device), "cpu", usage=True)
    assert not (tmp_path / "r").exists()


BAD_OPTIONS = [("--epochs", "-1"), ("--epochs", "0"), ("--batch-size", "0"),
               ("--batch-size", "-4"), ("--hidden", "0"), ("--hidden", "15"), ("--embed", "0"),
               ("--layers", "0"), ("--vocab-size", "8"), ("--vocab-size", "x"), ("--beam", "0"),
               ("--lr", "0"), ("--lr", "-1e-3"), ("--lr-decay", "0"), ("--clip", "-5"),
               ("--patience", "0"), ("--dropout", "1"), ("--dropout", "-0.1"),
               ("--max-minutes", "0"), ("--max-minutes", "nan"), ("--checkpoint-every", "0"),
               ("--k-max", "0"), ("--eval-k-max", "-1"), ("--max-jump", "0"),
               ("--decay-after", "-1"), ("--max-train-len", "0"), ("--length-penalty", "-1"),
               ("--max-decode-len", "0"), ("--eval-batch-size", "0"), ("--heatmaps", "0"),
               ("--max-bytes", "0"), ("--train-pairs", "0"), ("--eval-pairs", "-3"),
               ("--threads", "0"), ("--test-split", "train")]


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_numbers_are_usage_errors(option: str, value: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--smoke-test", f"{option}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}" in err and repr(value) in err, err


def test_bad_options_are_one_usage_line_from_the_command() -> None:
    r = run_example(PROG, "--epochs", "-1", timeout=300)
    assert_one_line_error(r, PROG, "--epochs", "'-1'", "positive", usage=True)
    r = run_example(PROG, "--attention", "soft", "--k-max", "3", timeout=300)
    assert_one_line_error(r, PROG, "--k-max", "--attention soft", usage=True)


def test_help_has_text_for_every_option() -> None:
    text = make_parser().format_help()
    assert "``" not in text and ":math:" not in text
    assert "multi30k/{train,val,test_2016_flickr}.{de,en}.gz" in text
    for action in make_parser()._actions:  # noqa: SLF001 - every option argparse knows
        assert action.help, action.option_strings
        assert action.help.count("default") + ("%(default)" in action.help) <= 1
    # the options a resume may change are named (epilog)
    assert "--epochs, --max-minutes, --patience" in " ".join(text.split())
    for line in report.make_parser().format_help().splitlines():
        assert "``" not in line
    r = run_example("examples.translation.report", "--help", timeout=300)
    assert r.returncode == 0 and "RUN_DIR" in r.stdout


# -- tokenizer and batches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.cached(_tok_texts(), 400, tmp_path_factory.mktemp("spm"))


def _tok_texts() -> list[str]:
    train = load_multi30k("train", DATA)
    return train.src[:3000] + train.tgt[:3000]


@MULTI30K.needed
def test_tokenizer_round_trip_on_unseen_sentences(tok: Tokenizer) -> None:
    val = load_multi30k("val", DATA)
    alphabet = set("".join(_tok_texts())) | {" "}
    texts = [t for t in val.src + val.tgt if set(t) <= alphabet]
    assert len(texts) > 1900
    ids = tok.encode(texts)
    assert tok.decode(ids) == texts  # cased, detokenised, every character kept
    # a character never seen in training is the unknown piece
    odd = [t for t in val.src + val.tgt if not set(t) <= alphabet]
    assert odd and all(1 in row for row in tok.encode(odd))
    assert tok.vocab_size == 400
    assert all(i not in (PAD, BOS, EOS) for row in ids for i in row)
    # subwords: more pieces than words, and decoding stops at </s>
    assert sum(map(len, ids)) > sum(len(t.split()) for t in texts)
    assert tok.decode([ids[0] + [EOS, 7, 8]]) == [texts[0]]
    assert tok.decode([[BOS] + ids[1] + [EOS, PAD, PAD]]) == [texts[1]]


def test_tokenizer_cache_is_keyed_by_text_and_size(tmp_path: Path) -> None:
    texts = ["ein kleiner Hund läuft", "a small dog runs", "zwei Hunde", "two dogs"] * 20
    a = Tokenizer.cached(texts, 40, tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1
    b = Tokenizer.cached(texts, 40, tmp_path)  # read back
    assert b.model_proto == a.model_proto and b.encode(texts) == a.encode(texts)
    Tokenizer.cached(texts, 41, tmp_path)
    Tokenizer.cached(texts + ["noch einer"], 40, tmp_path)
    assert len(list(tmp_path.iterdir())) == 3
    files[0].write_bytes(b"garbage")
    with pytest.raises(DataError, match="cached tokenizer .* unreadable.*delete"):
        Tokenizer.cached(texts, 40, tmp_path)


def test_collate_and_length_batches() -> None:
    pairs = [([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11]), ([], [12])]
    b = collate(pairs, [0, 1, 2])
    assert b.src.tolist() == [[5, 6, 7], [5, PAD, PAD], [PAD, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 8, 9, PAD, PAD], [BOS, 8, 9, 10, 11],
                                 [BOS, 12, PAD, PAD, PAD]]
    assert b.tgt_out.tolist() == [[8, 9, EOS, PAD, PAD], [8, 9, 10, 11, EOS],
                                  [12, EOS, PAD, PAD, PAD]]
    assert b.src_mask.sum(1).tolist() == [3, 1, 1]  # an empty source keeps one position
    assert b.tgt_mask.sum(1).tolist() == [3, 5, 2] and b.num_tokens == 10
    many = [([1] * (i % 17 + 1), [2] * (i % 5 + 1)) for i in range(500)]
    for shuffle in (False, True):
        batches = length_batches(many, 32, shuffle=shuffle, seed=3)
        assert sorted(i for bt in batches for i in bt) == list(range(500))
        assert all(len(bt) <= 32 for bt in batches)
    assert length_batches(many, 32, shuffle=True, seed=3) == length_batches(many, 32,
                                                                           shuffle=True, seed=3)
    assert length_batches(many, 32, shuffle=True, seed=3) != length_batches(many, 32,
                                                                           shuffle=True, seed=4)
    batches = length_batches(many, 32, shuffle=True, seed=0)
    parts = [shard(batches, r, 3) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    assert sorted(map(tuple, itertools.chain(*parts))) == sorted(map(tuple, batches[:len(batches)
                                                                                  // 3 * 3]))


# -- the model against brute force -----------------------------------------------------------------


def _model(mode: str, seed: int = 0, **kw: object) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=23, mode=mode, embed=6, hidden=8, layers=1, dropout=0.0)
    cfg.update(kw)
    m = Seq2Seq(ModelConfig(**cfg)).double()  # type: ignore[arg-type]
    for p in m.parameters():
        p.data.normal_(0.0, 0.8)
    return m.eval()


PAIRS = [([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14, 15, 16, 17, 18]), ([7, 9, 11], [8])]


def _batch() -> object:
    return collate(PAIRS, [0, 1, 2])


def _brute_force_nll(m: Seq2Seq, batch) -> float:  # type: ignore[no-untyped-def]
    """-log p(y | x), summing every alignment (sequence) by explicit enumeration."""
    with torch.no_grad():
        memory, state = m.encode(batch.src, batch.src_mask)
        hs, feeds, ctxs = m.decode(memory, batch.src_mask, state, batch.tgt_in)
        out = m.output
        log_linear = m.config.output_layer == "log-linear"
        total = 0.0
        for b in range(batch.src.shape[0]):
            s = int(batch.src_mask[b].sum())
            t = int(batch.tgt_mask[b].sum())
            y = batch.tgt_out[b, :t]
            if m.config.mode == "soft":
                logits = (out.hidden_out(hs[b, :t]) + out.memory_out(ctxs[b, :t]) if log_linear
                          else out.out(feeds[b, :t]))
                lp = torch.log_softmax(logits, -1)
                total -= float(lp.gather(1, y[:, None]).sum())
                continue
            # ell[t, s] = log p(y_t | x, z_t = s), from the full (T, S, V) table
            if log_linear:  # A h_t + C m_s + b for every pair
                table = torch.log_softmax(out.hidden_out(hs[b, :t])[:, None, :]
                                          + out.memory_out(memory[b, :s])[None], -1)
            else:
                pre = (out.hidden_proj(hs[b, :t])[:, None, :]
                       + out.memory_proj(memory[b, :s])[None])
                table = torch.log_softmax(out.out(torch.tanh(pre)), -1)
            ell = table.gather(2, y[:, None, None].expand(t, s, 1))[..., 0]
            if m.config.mode in ("markov", "variational-markov"):
                assert m.markov is not None
                init, trans = m.markov(hs[b:b + 1, :t], memory[b:b + 1, :s])
                lp0 = torch.log_softmax(init[0], -1)
                lpt = torch.log_softmax(trans[0], -1)  # (T, S, S)
                terms = []
                for z in itertools.product(range(s), repeat=t):
                    v = lp0[z[0]] + ell[0, z[0]]
                    for i in range(1, t):
                        v = v + lpt[i, z[i - 1], z[i]] + ell[i, z[i]]
                    terms.append(v)
                total -= float(torch.logsumexp(torch.stack(terms), 0))
            else:
                prior = torch.log_softmax(m.attention(hs[b, :t][None], memory[b, :s][None])
                                          .prior_logits[0], -1)
                total -= float(torch.logsumexp(prior + ell, -1).sum())
        return total


@pytest.mark.parametrize("output_layer", OUTPUT_LAYERS)
@pytest.mark.parametrize("mode", ["soft", "marginal", "hard-enum", "variational-enum", "markov",
                                  "variational-markov"])
def test_score_is_the_exact_marginal_likelihood(mode: str, output_layer: str) -> None:
    m, batch = _model(mode, output_layer=output_layer), _batch()
    r = m.score(batch)
    assert int(r["tokens"]) == 3 + 1 + 5 + 1 + 1 + 1
    assert float(r["nll"]) == pytest.approx(_brute_force_nll(m, batch), rel=1e-10)


@pytest.mark.parametrize("output_layer", OUTPUT_LAYERS)
@pytest.mark.parametrize("mode", MODES)
def test_decoding_steps_score_the_reference_exactly(mode: str, output_layer: str) -> None:
    """Beam search's next-word distribution, chained along the reference, gives the exact
    log p(y | x) that score() computes (for the Markov prior: forward filtering)."""
    m, batch = _model(mode, output_layer=output_layer), _batch()
    memory, (h0, c0) = m.encode(batch.src, batch.src_mask)
    state = m._initial_state(memory, batch.src_mask, h0, c0)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for t in range(batch.tgt_in.shape[1]):
            lp, state = m._step(batch.tgt_in[:, t], state)
            assert torch.allclose(lp.logsumexp(-1), torch.zeros(3, dtype=torch.float64))
            picked = lp.gather(1, batch.tgt_out[:, t:t + 1])[:, 0]
            total = total + picked.masked_fill(~batch.tgt_mask[:, t], 0.0).sum()
    assert float(-total) == pytest.approx(float(m.score(batch)["nll"]), rel=1e-10)


@pytest.mark.parametrize("output_layer", OUTPUT_LAYERS)
@pytest.mark.parametrize("mode", ["soft", "marginal", "variational-sample", "markov"])
def test_beam_search_of_width_one_is_greedy_decoding(mode: str, output_layer: str) -> None:
    for seed in range(3):
        m, batch = _model(mode, seed, output_layer=output_layer), _batch()
        greedy = greedy_decode(m, batch.src, batch.src_mask, max_len=15)
        beam = m.translate(batch.src, batch.src_mask, beam_size=1, max_len=15)
        assert torch.equal(beam[:, :greedy.shape[1]], greedy)
        assert (beam[:, greedy.shape[1]:] == EOS).all()


@pytest.mark.parametrize("output_layer", OUTPUT_LAYERS)
def test_kmax_with_k_at_least_the_source_length_is_full_enumeration(output_layer: str) -> None:
    kw = {"output_layer": output_layer}
    full = _model("variational-enum", **kw).score(_batch())
    kmax = _model("variational-enum", k_max=4, **kw).score(_batch())
    assert float(kmax["nll"]) == pytest.approx(float(full["nll"]), rel=1e-12)
    k2 = _model("variational-enum", k_max=2, **kw).score(_batch())
    assert float(k2["nll"]) != pytest.approx(float(full["nll"]), rel=1e-6)
    # the training loss too (the log-linear layer scores every position and picks the K)
    full_loss = _model("variational-enum", **kw)(_batch())[0].detach()
    kmax_loss = _model("variational-enum", k_max=4, **kw)(_batch())[0].detach()
    assert float(kmax_loss) == pytest.approx(float(full_loss), rel=1e-12)
    k2_loss = _model("variational-enum", k_max=2, **kw)(_batch())[0].detach()
    assert float(k2_loss) != pytest.approx(float(full_loss), rel=1e-6)


def test_prior_entropy_of_a_uniform_prior_is_log_s() -> None:
    for mode in ("marginal", "markov"):
        m = _model(mode)
        with torch.no_grad():
            m.attention.score.proj.weight.zero_()
            if m.markov is not None:
                m.markov.query_proj.weight.zero_()
                m.markov.jump_bias.zero_()
                m.markov.start_bias.zero_()
        r = m.score(_batch())
        lengths = [(4, 4), (2, 6), (3, 2)]  # (S, target tokens)
        want = sum(math.log(s) * t for s, t in lengths)
        assert float(r["entropy"]) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("output_layer", OUTPUT_LAYERS)
def test_training_objectives_bound_the_exact_nll(output_layer: str) -> None:
    """Jensen: the hard and variational objectives are upper bounds of -log p(y | x)."""
    exact = {}
    for mode in ("marginal", "hard-enum", "variational-enum", "markov", "variational-markov"):
        m = _model(mode, output_layer=output_layer)
        loss = m(_batch())[0].detach()
        exact[mode] = float(m.score(_batch())["nll"])
        if mode in ("marginal", "markov"):
            assert float(loss) == pytest.approx(exact[mode], rel=1e-10)
        else:
            assert float(loss) >= exact[mode] - 1e-9


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown attention mode 'hard'"):
        Seq2Seq(ModelConfig(vocab_size=10, mode="hard"))
    with pytest.raises(ValueError, match="k_max .* does not apply to mode 'soft'"):
        Seq2Seq(ModelConfig(vocab_size=10, mode="soft", k_max=3))
    with pytest.raises(ValueError, match="hidden must be even"):
        Seq2Seq(ModelConfig(vocab_size=10, hidden=7))
    with pytest.raises(ValueError, match="unknown output layer 'tanh'"):
        Seq2Seq(ModelConfig(vocab_size=10, output_layer="tanh"))  # type: ignore[arg-type]


# -- checkpoints -----------------------------------------------------------------------------------


def _trainer(mode: str) -> Trainer:
    args = make_parser().parse_args(["--attention", mode, "--batch-size", "2", "--dropout", "0.3"])
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(vocab_size=23, mode=mode, embed=6, hidden=8, layers=1,
                                dropout=0.3))
    pairs = PAIRS * 3
    return Trainer(args, model, pairs, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["soft", "variational-sample", "variational-markov"])
def test_resume_reproduces_the_next_steps_loss(mode: str, tmp_path: Path) -> None:
    """Dropout and the sampled alignments make each step random: the checkpoint must carry the
    random generators' states as well as the model and the optimizer."""
    a = _trainer(mode)
    batches = a.epoch_batches(0)
    for idx in batches[:2]:
        a.step(collate([a.train_pairs[i] for i in idx], idx))
    a.step_in_epoch = 2
    a.save(tmp_path / "ckpt.pt")
    nxt = batches[2]
    want, _ = a.step(collate([a.train_pairs[i] for i in nxt], nxt))
    after = [p.detach().clone() for p in a.model.parameters()]

    torch.manual_seed(123)  # a fresh process's state must not matter
    b = _trainer(mode)
    b.load(tmp_path / "ckpt.pt")
    assert (b.steps, b.step_in_epoch) == (2, 2)
    assert b.epoch_batches(0)[b.step_in_epoch] == nxt
    got, _ = b.step(collate([b.train_pairs[i] for i in nxt], nxt))
    assert float(got) == float(want)
    for p, q in zip(b.model.parameters(), after, strict=True):
        assert torch.equal(p, q)


def test_checkpoint_of_another_configuration_is_refused(tmp_path: Path) -> None:
    a = _trainer("soft")
    a.save(tmp_path / "ckpt.pt")
    with pytest.raises(ExampleError, match="was written for .*'mode': 'soft'.*another --out-dir"):
        _trainer("marginal").load(tmp_path / "ckpt.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ExampleError, match=r"cannot read the checkpoint .*junk\.pt.*damaged"):
        a.load(tmp_path / "junk.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(ExampleError, match=r"cannot read the checkpoint .*cut\.pt"):
        a.load(tmp_path / "cut.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ExampleError, match=r"other\.pt.* not a checkpoint of examples.translat"):
        a.load(tmp_path / "other.pt")
    b = _trainer("soft")
    b.load(tmp_path / "ckpt.pt")  # the checkpoint itself is fine
    assert b.steps == 0


# -- end to end ------------------------------------------------------------------------------------


@MULTI30K.needed
@pytest.mark.parametrize("mode", MODES)
def test_smoke_run_of_every_mode(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    """``python -m examples.translation --smoke-test --attention MODE``, in process."""
    monkeypatch.setenv("PLATED_DATA", str(DATA))
    out = tmp_path / "run"
    res = main(["--smoke-test", "--attention", mode, "--out-dir", str(out), "--no-progress",
                "--device", "cpu"])
    assert res["mode"] == mode and res["epochs"] == 2 and res["steps"] == 12
    for split in ("valid", "test"):
        assert math.isfinite(res[split]["ppl"]) and 1.0 < res[split]["ppl"] < 1000.0
        assert 0.0 <= res[split]["bleu"] <= 100.0
        assert res[split]["prior_entropy"] >= 0.0
    hyps = (out / "test_2016_flickr.hyp.en").read_text().splitlines()
    assert len(hyps) == 24
    assert json.loads((out / "results.json").read_text())["test"]["ppl"] == res["test"]["ppl"]
    assert (out / "alignments.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").is_file() and (out / "best.pt").is_file()
    assert ("test_kmax2" in res) == (mode not in ("soft", "markov", "variational-markov"))
    # the history's best validation perplexity is the model that was evaluated
    assert res["valid"]["ppl"] == pytest.approx(min(h["valid_ppl"] for h in res["history"]),
                                                rel=1e-9)


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@MULTI30K.needed
def test_smoke_cli_resume_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["--smoke-test", "--attention", "marginal", "--out-dir", str(run), "--no-progress",
            "--device", "cpu"]
    r = run_example(PROG, *args, env={"PLATED_DATA": str(DATA)}, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_2016_flickr: PPL" in r.stdout
    # where it wrote its files
    wrote = r.stdout[r.stdout.index("examples.translation: wrote"):]
    for name in ("results.json", "test_2016_flickr.hyp.en", "val.hyp.en",
                 "test_2016_flickr.kmax2.hyp.en", "alignments.png", "checkpoint.pt", "best.pt"):
        assert str(run / name) in wrote and (run / name).is_file()
    res = json.loads((run / "results.json").read_text())
    rows = report.main([str(run)]).splitlines()
    assert rows[0].startswith("| mode | test PPL | test BLEU | prior entropy | PPL, K-max 2 |")
    t = res["test"]
    assert rows[2].startswith(f"| marginal | {t['ppl']:.2f} | {t['bleu']:.2f} |")
    assert report.main([str(tmp_path)]).splitlines() == rows  # the folder of run folders
    before = _files(run)

    # a second run into the same folder is refused and leaves the first run's files as they were
    r = run_example(PROG, *args, env={"PLATED_DATA": str(DATA)}, timeout=600)
    assert_one_line_error(r, PROG, str(run / "checkpoint.pt"), "pass --resume",
                          "another --out-dir")
    # so is a resume with a changed option, named
    r = run_example(PROG, *args, "--resume", "--lr", "0.01", env={"PLATED_DATA": str(DATA)},
                    timeout=600)
    assert_one_line_error(r, PROG, str(run / "checkpoint.pt"), "--lr 0.001 -> 0.01")
    with pytest.raises(SystemExit) as e:  # the model's options too, before any shape mismatch
        cli([*args, "--resume", "--hidden", "32"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--hidden 16 -> 32" in err[0], err
    assert _files(run) == before

    # a damaged checkpoint is named (garbage, and a truncated real one)
    for what, data in (("garbage", b"\x00garbage"), ("cut", before["checkpoint.pt"][0][:5000])):
        bad = tmp_path / what
        bad.mkdir()
        (bad / "checkpoint.pt").write_bytes(data)
        with pytest.raises(SystemExit) as e:
            cli([*args[:3], "--out-dir", str(bad), "--no-progress", "--device", "cpu", "--resume"])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("examples.translation: error: ") \
            and str(bad / "checkpoint.pt") in err[0] and "damaged" in err[0], err
    # report: a folder without results, and a damaged results.json, in one line
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExampleError, match="no .*results.json"):
        report.main([str(tmp_path / "empty")])
    (tmp_path / "garbage" / "results.json").write_text("{not json")
    r = run_example("examples.translation.report", str(tmp_path / "garbage"), timeout=300)
    assert_one_line_error(r, "examples.translation.report",
                          str(tmp_path / "garbage" / "results.json"))
    (tmp_path / "cut" / "results.json").write_text('{"mode": "soft", "test": {}}')
    r = run_example("examples.translation.report", str(tmp_path / "cut"), timeout=300)
    assert_one_line_error(r, "examples.translation.report", "lacks valid", "test.ppl")

    # resuming the finished run trains nothing more and says where it stood
    r = run_example(PROG, *args, "--resume", env={"PLATED_DATA": str(DATA)}, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {run / 'checkpoint.pt'}: training finished after 2 complete epoch(s) " \
        "of 2, 12 steps in all" in r.stdout
    assert "epoch 1:" not in r.stdout and "epoch 2:" not in r.stdout
    assert json.loads((run / "results.json").read_text())["steps"] == 12


@MULTI30K.needed
def test_smoke_test_keeps_explicit_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--smoke-test --epochs 1 trains one epoch (the smoke configuration has two); the explicit
    --beam, --eval-k-max and --batch-size are kept too."""
    monkeypatch.setenv("PLATED_DATA", str(DATA))
    res = main(["--smoke-test", "--epochs", "1", "--batch-size", "32", "--beam", "1",
                "--eval-k-max", "0", "--attention", "hard-enum", "--out-dir",
                str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    assert res["epochs"] == 1 and len(res["history"]) == 1
    assert res["batch_size"] == 32 and res["beam"] == 1 and res["steps"] == 3  # 95 pairs / 32
    assert not any(k.startswith("test_kmax") for k in res)
    assert res["config"]["hidden"] == 16  # the smoke value where nothing was given
    assert "examples.translation: wrote" in capsys.readouterr().out


@MULTI30K.needed
def test_ctrl_c_keeps_a_resumable_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A real SIGINT mid-training: one line with the --resume command, status 130, and the
    checkpoint written before it continues the run (with a raised --epochs, which may change)."""
    run = tmp_path / "run"
    args = ["--smoke-test", "--attention", "soft", "--out-dir", str(run), "--no-progress",
            "--device", "cpu", "--checkpoint-every", "1", "--epochs", "20"]
    env = _env()
    code, out, err = interrupt_run([sys.executable, "-m", PROG, *args],
                                   run / "checkpoint.pt", env, settle=0.0)
    assert code == 130, out + err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"examples.translation: interrupted; the last checkpoint in --out-dir is "
                     f"kept. Continue with: python -m {PROG} {' '.join(args)} --resume"], err
    st = read_checkpoint(run / "checkpoint.pt", torch.device("cpu"))
    steps = st["steps"]
    assert 1 <= steps == 6 * st["epoch"] + st["step_in_epoch"]
    assert not (run / "results.json").exists()
    # resume: the same options but fewer epochs; it says where it stands, counted as the log
    epochs = st["epoch"] + 1
    monkeypatch.setenv("PLATED_DATA", str(DATA))
    res = main([*args[:-1], str(epochs), "--resume"])
    text = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoint.pt'}: epoch {epochs} of {epochs}, step " \
        f"{st['step_in_epoch']} of 6 of it, {steps} steps in all" in text
    assert res["steps"] == 6 * epochs and res["epochs"] == epochs
    assert f"epoch {epochs}:" in text and (run / "results.json").is_file()


@MULTI30K.needed
def test_two_process_gloo_data_parallel_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "examples.translation", "--smoke-test", "--attention",
           "variational-enum", "--device", "cpu", "--threads", "1", "--no-progress",
           "--out-dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["replicas_identical"] is True
    # each process took half of each epoch's batches: 6 batches a epoch -> 3 steps a process
    assert res["steps"] == 6 and res["epochs"] == 2
    assert "replicas' parameters are identical" in r.stdout


def test_help_lists_the_modes() -> None:
    text = make_parser().format_help()
    for mode in MODES:
        assert mode in text
    assert isinstance(make_parser().parse_args([]), argparse.Namespace)


@MULTI30K.needed
def test_learning_rate_schedule_and_time_budget(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLATED_DATA", str(DATA))
    res = main(["--smoke-test", "--attention", "soft", "--out-dir", str(tmp_path / "a"),
                "--no-progress", "--device", "cpu", "--decay-after", "1", "--lr-decay", "0.25"])
    assert [h["lr"] for h in res["history"]] == pytest.approx([1e-3, 2.5e-4])
    # a budget spent by the first step: training stops there, the part-epoch is evaluated
    res = main(["--smoke-test", "--attention", "soft", "--out-dir", str(tmp_path / "b"),
                "--no-progress", "--device", "cpu", "--max-minutes", "1e-9"])
    assert res["steps"] == 1 and res["epochs"] == 0
    assert len(res["history"]) == 1 and res["history"][0]["complete"] is False
    assert math.isfinite(res["test"]["ppl"]) and (tmp_path / "b" / "best.pt").is_file()


# -- other splits, and the translate command ---------------------------------------------------


def _tiny_multi30k(folder: Path) -> Path:
    """A data folder with the first lines of the real splits, and a made-up fourth split
    ``test_2017_flickr`` (real validation pairs), so that runs are quick."""
    sub = folder / "multi30k"
    sub.mkdir(parents=True)
    sizes = {"train": 96, "val": 8, "test_2016_flickr": 8}
    for split, n in sizes.items():
        pairs = load_multi30k(split, DATA)
        for lang, lines in (("de", pairs.src[:n]), ("en", pairs.tgt[:n])):
            with gzip.open(sub / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(x + "\n" for x in lines))
    val = load_multi30k("val", DATA)
    for lang, lines in (("de", val.src[8:13]), ("en", val.tgt[8:13])):
        with gzip.open(sub / f"test_2017_flickr.{lang}.gz", "wt", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in lines))
    return folder


@MULTI30K.needed
def test_re_evaluation_on_another_split_and_the_translate_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples.translation import translate

    data = _tiny_multi30k(tmp_path / "data")
    run = tmp_path / "run"
    args = ["--smoke-test", "--attention", "variational-enum", "--output-layer", "log-linear",
            "--out-dir", str(run), "--no-progress", "--device", "cpu", "--data-dir", str(data),
            "--epochs", "1", "--eval-pairs", "4", "--max-decode-len", "6", "--heatmaps", "1"]
    res = main(args)
    assert res["config"]["output_layer"] == "log-linear" and res["test_split"] == \
        "test_2016_flickr"
    # a finished run evaluated on another split: nothing trained, both splits' figures kept
    again = main([*args, "--resume", "--test-split", "test_2017_flickr"])
    assert (again["steps"], again["epochs"]) == (res["steps"], res["epochs"])
    assert again["test_split"] == "test_2017_flickr" and again["test"]["ppl"] != res["test"]["ppl"]
    saved = json.loads((run / "results.json").read_text())
    assert set(saved["evaluations"]) == {"test_2016_flickr", "test_2017_flickr"}
    assert saved["evaluations"]["test_2016_flickr"]["test"]["ppl"] == res["test"]["ppl"]
    assert saved["evaluations"]["test_2017_flickr"]["test"]["ppl"] == again["test"]["ppl"]
    assert len((run / "test_2017_flickr.hyp.en").read_text().splitlines()) == 4
    # a split that is not there: one line naming its files and the splits that are
    with pytest.raises(SystemExit) as e:
        cli([*args, "--resume", "--test-split", "test_2018_flickr"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_2018_flickr.de.gz" in err[0] and \
        "train, val, test_2016_flickr, test_2017_flickr" in err[0], err

    # translate, end to end: German on stdin, English on stdout, alignments as JSON
    german = ["Ein Mann fährt Fahrrad.", "", "Zwei Hunde spielen im Schnee."]
    al = tmp_path / "al.json"
    r = subprocess.run([sys.executable, "-m", PROG, "translate", "--checkpoint",
                        str(run / "best.pt"), "--beam", "2", "--alignments-json", str(al),
                        "--max-decode-len", "8", "--threads", "1"],
                       input="".join(g + "\n" for g in german), capture_output=True, text=True,
                       env=_env(), cwd=REPO, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    english = r.stdout.split("\n")
    assert english[-1] == "" and len(english) == len(german) + 1, r.stdout
    model, tok = translate.load_model(run / "best.pt", torch.device("cpu"))
    assert model.config.output_layer == "log-linear"
    want, records = translate.translate_lines(model, tok, german, beam=2, max_len=8,
                                              alignments=True)
    assert english[:-1] == want
    got = json.loads(al.read_text())
    assert (got["mode"], got["output_layer"], got["beam"]) == ("variational-enum",
                                                               "log-linear", 2)
    for rec, src, hyp in zip(got["sentences"], german, want, strict=True):
        assert (rec["source"], rec["translation"], rec["matrix"]) == (src, hyp, "posterior")
        t, s = len(rec["target_pieces"]), max(len(rec["source_pieces"]), 1)
        assert rec["target_pieces"][-1] == "</s>"
        post = torch.tensor(rec["posterior"])
        assert post.shape == (t, s) and torch.allclose(post.sum(-1), torch.ones(t), atol=1e-5)
        assert rec["argmax"] == post.argmax(-1).tolist() and len(rec["prior"]) == t
    for mine, theirs in zip(records, got["sentences"], strict=True):  # another thread count
        assert mine["target_pieces"] == theirs["target_pieces"]
        for key in ("prior", "posterior"):
            torch.testing.assert_close(torch.tensor(mine[key]), torch.tensor(theirs[key]),
                                       rtol=0, atol=1e-5)
    # an input file, K-max and greedy decoding, output to a file
    (tmp_path / "de.txt").write_text("\n".join(german[::2]) + "\n", encoding="utf-8")
    hyps = translate.main(["--checkpoint", str(run / "best.pt"), "--input",
                           str(tmp_path / "de.txt"), "--output", str(tmp_path / "en.txt"),
                           "--beam", "1", "--k-max", "2", "--max-decode-len", "8"])
    assert (tmp_path / "en.txt").read_text().splitlines() == hyps and len(hyps) == 2

    # errors, one line each: a missing checkpoint, K-max for soft attention, no tokenizer
    soft = _trainer("soft")
    soft.tokenizer = tok
    soft.model = Seq2Seq(ModelConfig(vocab_size=tok.vocab_size, mode="soft", embed=6,
                                     hidden=8, layers=1))
    soft.save(tmp_path / "soft.pt")
    with pytest.raises(ExampleError, match="does not apply to the checkpoint's mode 'soft'"):
        translate.main(["--checkpoint", str(tmp_path / "soft.pt"), "--input",
                        str(tmp_path / "de.txt"), "--k-max", "2"])
    assert len(translate.main(["--checkpoint", str(tmp_path / "soft.pt"), "--input",
                               str(tmp_path / "de.txt"), "--max-decode-len", "4"])) == 2
    soft.tokenizer = None
    soft.save(tmp_path / "old.pt")
    with pytest.raises(ExampleError, match="carries no tokenizer.*--tokenizer"):
        translate.main(["--checkpoint", str(tmp_path / "old.pt"), "--input",
                        str(tmp_path / "de.txt")])
    (tmp_path / "spm.model").write_bytes(tok.model_proto)
    assert len(translate.main(["--checkpoint", str(tmp_path / "old.pt"), "--input",
                               str(tmp_path / "de.txt"), "--tokenizer",
                               str(tmp_path / "spm.model"), "--max-decode-len", "4"])) == 2
    with pytest.raises(SystemExit) as e:
        cli(["translate", "--checkpoint", str(tmp_path / "missing.pt")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"examples.translation translate: error: --checkpoint "
                   f"{str(tmp_path / 'missing.pt')!r} does not exist; give a run's best.pt or "
                   "checkpoint.pt"], err
