"""The latent-sentiment example (:mod:`examples.sentiment`) and its SST loader
(:mod:`examples.data.sst`).

- The tree parser on hand-written trees (spans, labels, escaped and odd tokens) and its errors.
- The loader on the real files: split sizes, label ranges and counts, node spans, vocabulary and
  padding.
- The model's loss and gradients under ``TVE_ELBO`` equal Pyro's ``TraceEnum_ELBO`` on a small
  batch of real sentences, and its exact posteriors equal brute-force enumeration.
- ``--resume`` continues a run exactly, and the script runs end to end (smoke mode).
- The program never loses a run and never shows a traceback: a second run into a finished
  --out-dir is refused, a resume with other options or from a damaged checkpoint is refused in
  one line that names the option or the file, bad option values are usage errors, a run that
  fails its input checks leaves no folder, Ctrl-C keeps a resumable checkpoint, and a run says
  where it resumed and where it wrote its files.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pytest
import torch
from helpers import assert_one_line_error, interrupt_run, real_data, run_example
from pyro.infer import TraceEnum_ELBO

from examples.common import ExampleError, RunExistsError, run_cli
from examples.data import DATA_ENV, DataError
from examples.data.sst import (
    UNK,
    Node,
    Vocab,
    binary_labels,
    build_vocab,
    load_sst,
    pad_ids,
    parse_tree,
)
from examples.sentiment import (
    FIGURES,
    POLARITY,
    PROG,
    Config,
    Sentiment,
    allowed_word_classes,
    class_agreement,
    label_agreement,
    main,
    naive_bayes,
    negative_log_likelihood,
    parser,
    sentence_accuracy,
    span_means,
)
from plated.pyro import TVE_ELBO

REPO = Path(__file__).resolve().parents[1]


SST = real_data("sst/train.txt", "sst/dev.txt", "sst/test.txt")
DATA = SST.folder
MODULE = "examples.sentiment"


# ------------------------------------------------------------------------------------------------
# the parser


def test_parse_tree_spans_labels_and_tokens() -> None:
    tree = parse_tree("(3 (2 It) (4 (2 's) (3 good)))\n")
    assert tree.tokens == ("It", "'s", "good")
    assert tree.label == 3
    # post-order: leaves before their parents, the root last
    assert tree.nodes == (Node(0, 1, 2), Node(1, 2, 2), Node(2, 3, 3), Node(1, 3, 4),
                          Node(0, 3, 3))


def test_parse_tree_escaped_and_odd_tokens() -> None:
    tree = parse_tree("(1 (2 -LRB-) (1 (0 8\u00a01\\/2) (2 (2 :-RRB-) (4 2))))")
    # escapes are kept verbatim, a no-break space is part of a word, a word may be a digit
    assert tree.tokens == ("-LRB-", "8\u00a01\\/2", ":-RRB-", "2")
    assert [n.label for n in tree.nodes] == [2, 0, 2, 4, 2, 1, 1]
    assert tree.nodes[-1] == Node(0, 4, 1)
    # a unary chain and white space other than single spaces
    tree = parse_tree("( 2\t( 4  (3 ok) ) )")
    assert tree.tokens == ("ok",) and tree.nodes == (Node(0, 1, 3), Node(0, 1, 4), Node(0, 1, 2))


def test_parse_tree_deep_tree_needs_no_recursion() -> None:
    depth = 5000
    line = "(2 " * depth + "x" + ")" * depth
    tree = parse_tree(line)
    assert tree.tokens == ("x",) and len(tree.nodes) == depth


@pytest.mark.parametrize("line, message", [
    ("", "empty line"),
    ("   \n", "empty line"),
    ("(3 (2 a) b)", "node at offset 0 has more than a single word, or a word and child nodes "
                    "\\(word 'b' at offset 9\\)"),
    ("(2 a b)", "more than a single word"),
    ("(2 a (2 b))", "node at offset 0 has both a word and child nodes \\(child at offset 5\\)"),
    ("(3 (2 a)", "1 unclosed '\\(' \\(the innermost at offset 0\\)"),
    ("(2 a))", "unbalanced '\\)' at offset 5"),
    ("(7 a)", "expected a label 0-4 after '\\(' at offset 0, got '7'"),
    ("(x a)", "got 'x'"),
    ("(", "got end of line"),
    ("(2)", "node at offset 0 has neither a word nor children"),
    ("(2 a) (2 b)", "text after the end of the tree at offset 6"),
    ("a", "word 'a' at offset 0 is outside any node"),
])
def test_parse_tree_errors(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tree(line)


def test_malformed_file_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "sst").mkdir()
    (tmp_path / "sst" / "dev.txt").write_text("(2 (2 a) (2 b))\n(3 (2 a) (3 b)\n",
                                              encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.txt', line 2: malformed tree: 1 unclosed"):
        load_sst("dev", data_dir=tmp_path)


def test_missing_file_and_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Stanford Sentiment Treebank") as e:
        load_sst("test", data_dir=tmp_path)
    assert "sst/test.txt" in str(e.value)
    with pytest.raises(DataError, match="unknown SST split 'valid'; valid splits: train, dev, "
                                        "test"):
        load_sst("valid", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# the loader on the real files


@SST.needed
def test_real_splits() -> None:
    sizes = {"train": 8544, "dev": 1101, "test": 2210}
    counts = {"train": [1092, 2218, 1624, 2322, 1288], "dev": [139, 289, 229, 279, 165],
              "test": [279, 633, 389, 510, 399]}
    for split, size in sizes.items():
        bank = load_sst(split, data_dir=DATA)
        assert len(bank) == size and len(bank.sentences) == size
        labels = bank.labels
        assert labels.shape == (size,) and labels.dtype == torch.long
        assert torch.bincount(labels, minlength=5).tolist() == counts[split]
        for tree in bank.trees:
            n = len(tree.tokens)
            # binary trees: n leaves, n - 1 inner nodes; the root spans the sentence
            assert len(tree.nodes) == 2 * n - 1
            assert tree.nodes[-1] == Node(0, n, tree.label)
            assert all(0 <= nd.start < nd.end <= n and 0 <= nd.label <= 4 for nd in tree.nodes)
        nodes = bank.nodes()
        assert nodes.shape == (sum(2 * len(t.tokens) - 1 for t in bank.trees), 4)
    keep, binary = binary_labels(load_sst("test", data_dir=DATA).labels)
    assert int(keep.sum()) == 1821 and int(binary[keep].sum()) == 909


@SST.needed
def test_real_nodes_and_padding() -> None:
    test = load_sst("test", data_dir=DATA)
    assert load_sst("test", data_dir=DATA) is test  # parsed once per process
    leaves = test.nodes(max_len=1)
    phrases = test.nodes(min_len=2, roots=False)
    n_words = sum(len(s) for s in test.sentences)
    assert leaves.shape == (n_words, 4) and bool((leaves[:, 2] - leaves[:, 1] == 1).all())
    # every sentence of two or more words has n - 2 inner non-root nodes
    lengths = torch.tensor([len(s) for s in test.sentences])
    assert phrases.shape[0] == int((lengths - 2).clamp(min=0).sum())
    assert bool((phrases[:, 2] - phrases[:, 1] >= 2).all())
    vocab = build_vocab(load_sst("train", data_dir=DATA).sentences, min_count=2)
    ids, mask = pad_ids(test.sentences, vocab)
    assert ids.shape == mask.shape == (2210, 56)
    assert mask.sum(-1).tolist() == lengths.tolist()
    assert bool((ids[~mask] == 0).all())
    assert test.sentences[0][:3] == ["Effective", "but", "too-tepid"]
    assert ids[0, :2].tolist() == vocab.encode(["effective", "BUT"])


@SST.needed
def test_vocabulary() -> None:
    train = load_sst("train", data_dir=DATA).sentences
    vocab = build_vocab(train, min_count=2)
    assert vocab.tokens[0] == UNK and len(vocab) == 8217
    assert len(build_vocab(train)) == 16582
    assert len(build_vocab(train, lowercase=False)) == 18281
    # most frequent first; lower-cased lookup; unknown words map to 0
    assert vocab.tokens[1:6] == (".", "the", ",", "a", "and")
    assert vocab.encode(["The", "the", "qwertyuiop"]) == [vocab.encode(["the"])[0]] * 2 + [0]
    small = build_vocab([["a", "b", "a"], ["A", "c"]], min_count=2)
    assert small.tokens == (UNK, "a")
    with pytest.raises(ValueError, match="first token must be '<unk>'"):
        Vocab(("a", UNK))
    with pytest.raises(ValueError, match="empty"):
        pad_ids([["a"], []], small)
    with pytest.raises(ValueError, match="more than max_words=1"):
        pad_ids([["a", "a"]], small, max_words=1)


# ------------------------------------------------------------------------------------------------
# the model


def test_allowed_word_classes() -> None:
    allowed = allowed_word_classes(torch.arange(5))
    assert allowed.tolist() == [[True, True, False], [True, True, False], [True, True, True],
                                [False, True, True], [False, True, True]]
    assert POLARITY == (0, 0, 1, 2, 2)


def _real_batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Vocab]:
    train = load_sst("train", data_dir=DATA)
    vocab = build_vocab(train.sentences[:200], min_count=1)
    sentences = [s[:9] for s in train.sentences[:n]]  # short: unequal lengths, padding masked
    words, mask = pad_ids(sentences, vocab)
    assert not bool(mask.all())
    return words, mask, train.labels[:n], vocab


def _perturb() -> None:
    with torch.no_grad():
        for _, p in pyro.get_param_store().items():
            p.add_(0.5 * torch.randn_like(p))


def _loss_and_grads(elbo: Any, model: Sentiment, *args: Any, **kwargs: Any
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    store = pyro.get_param_store()
    for _, p in store.named_parameters():
        p.grad = None
    pyro.set_rng_seed(7)  # the same subsample for both ELBOs
    loss = elbo.loss_and_grads(model.model, model.guide, *args, **kwargs)
    return float(loss), {k: p.grad.clone() for k, p in store.named_parameters()
                         if p.grad is not None}


@SST.needed
@pytest.mark.parametrize("max_polar, batch_size", [(0.5, None), (1.0, None), (0.5, 3)])
def test_tve_elbo_equals_trace_enum_elbo(max_polar: float, batch_size: int | None) -> None:
    pyro.clear_param_store()
    words, mask, labels, vocab = _real_batch()
    model = Sentiment(Config(len(vocab), classes_per_label=2, max_polar=max_polar))
    TVE_ELBO(max_plate_nesting=2).loss(model.model, model.guide, words, mask, labels)
    _perturb()
    ours = _loss_and_grads(TVE_ELBO(max_plate_nesting=2), model, words, mask, labels,
                           batch_size=batch_size)
    ref = _loss_and_grads(TraceEnum_ELBO(max_plate_nesting=2), model, words, mask, labels,
                          batch_size=batch_size)
    assert ours[0] == pytest.approx(ref[0], rel=1e-9)
    assert set(ours[1]) == set(ref[1]) == {"class_logits", "word_class_logits",
                                           "background_logits", "deviation"}
    for name, g in ours[1].items():
        assert bool(torch.isfinite(g).all()), name
        assert float(g.abs().max()) > 0, name
        assert torch.allclose(g, ref[1][name], rtol=1e-6, atol=1e-9), (
            f"gradient of {name}: max |difference| {float((g - ref[1][name]).abs().max())}")
    # without priors the loss is the exact negative log-likelihood
    nll = negative_log_likelihood(model, words, mask, labels, batch_size=2)
    assert nll == pytest.approx(TraceEnum_ELBO(max_plate_nesting=2).loss(
        model.model, model.guide, words, mask, labels, include_prior=False), rel=1e-9)


def _brute_force(model: Sentiment, words: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(y | w), p(z_i | w) and log p(w) (per sentence) by enumerating every (c, z) jointly."""
    with torch.no_grad():
        t = model.tables()
    n, width = words.shape
    num_c = model.config.sentence_classes
    label_probs = torch.zeros(n, 5)
    word_probs = torch.zeros(n, width, 3)
    log_evidence = torch.zeros(n)
    for s in range(n):
        length = int(mask[s].sum())
        total = torch.zeros(())
        for c in range(num_c):
            for zs in itertools.product(range(3), repeat=length):
                lp = t["class"][c] + sum(t["word_class"][c, z] + t["word"][z, words[s, i]]
                                         for i, z in enumerate(zs))
                p = torch.exp(lp)
                total = total + p
                label_probs[s, int(model.class_label[c])] += p
                for i, z in enumerate(zs):
                    word_probs[s, i, z] += p
        label_probs[s] /= total
        word_probs[s] /= total
        log_evidence[s] = total.log()
    return label_probs, word_probs, log_evidence


def test_exact_posteriors_equal_brute_force() -> None:
    pyro.clear_param_store()
    model = Sentiment(Config(vocab_size=6, classes_per_label=2, max_polar=0.6))
    words = torch.tensor([[1, 2, 5], [0, 3, 0], [4, 4, 1]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    labels = torch.tensor([0, 2, 4])
    model.tables()
    _perturb()
    label_probs, word_probs = model.predict(words, mask, batch_size=2)
    ref_labels, ref_words, log_evidence = _brute_force(model, words, mask)
    torch.testing.assert_close(label_probs, ref_labels, rtol=0, atol=1e-10)
    torch.testing.assert_close(word_probs, ref_words, rtol=0, atol=1e-10)
    assert label_probs[:, 0].max() > 0.05 and label_probs[:, 4].max() > 0.05
    # log p(y, w) = log p(w) + log p(y | w)
    nll = negative_log_likelihood(model, words, mask, labels)
    ref = -(log_evidence + ref_labels[torch.arange(3), labels].log()).sum()
    assert nll == pytest.approx(float(ref), rel=1e-10)


# ------------------------------------------------------------------------------------------------
# metrics


def test_metrics_on_hand_made_inputs() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1],   # gold 1: right, binary right
                          [0.3, 0.0, 0.4, 0.1, 0.2],   # gold 2: right, not in binary
                          [0.0, 0.3, 0.0, 0.3, 0.4],   # gold 0: wrong, binary wrong (0.7 >= 0.3)
                          [0.2, 0.2, 0.2, 0.2, 0.2]])  # gold 3: wrong (argmax 0), binary right
    acc = sentence_accuracy(probs, torch.tensor([1, 2, 0, 3]))
    assert acc == {"five": 0.5, "binary": pytest.approx(2 / 3), "sentences": 4,
                   "binary_sentences": 3}
    word_probs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0]],
                               [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    nodes = torch.tensor([[0, 0, 2, 0], [0, 1, 3, 3], [1, 0, 1, 4], [0, 1, 2, 2]])
    means = span_means(word_probs, nodes)
    torch.testing.assert_close(means, torch.tensor([[0.5, 0.5, 0.0], [0.45, 0.55, 0.0],
                                                    [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    ag = class_agreement(means, nodes[:, 3])
    # argmax: 0 (tie -> first), 1, 2, 1; gold polarity: 0, 2, 2, 1; binary (gold not neutral):
    # negative, negative, positive against negative, positive, positive
    assert ag["polarity"]["accuracy"] == 0.75
    assert ag["polarity"]["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert ag["polarity"]["majority_baseline"] == 0.5
    assert ag["binary"]["count"] == 3 and ag["binary"]["accuracy"] == pytest.approx(2 / 3)
    assert ag["five"]["predicted_distribution"] == [0, 1, 2, 1, 0]
    lab = label_agreement(probs, torch.tensor([1, 2, 0, 3]))
    assert lab["five"]["accuracy"] == 0.5 and lab["binary"]["accuracy"] == pytest.approx(2 / 3)
    log_prior, log_word = naive_bayes(torch.tensor([[1, 2], [2, 0]]),
                                      torch.tensor([[True, True], [True, False]]),
                                      torch.tensor([0, 4]), vocab_size=3, alpha=1.0)
    torch.testing.assert_close(log_prior.exp(), torch.tensor([0.5, 0, 0, 0, 0.5]))
    torch.testing.assert_close(log_word.exp()[0], torch.tensor([1.0, 2.0, 2.0]) / 5)
    torch.testing.assert_close(log_word.exp()[4], torch.tensor([1.0, 1.0, 2.0]) / 4)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_polar"):
        Config(10, max_polar=0.0)
    with pytest.raises(ValueError, match="deviation_penalty"):
        Config(10, deviation_penalty=-1.0)
    with pytest.raises(ValueError, match="init_word_logits has shape"):
        Sentiment(Config(10), init_word_logits=torch.zeros(9))


# ------------------------------------------------------------------------------------------------
# the script


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--smoke-test", "--no-progress", "--data-dir", str(DATA), "--out-dir", str(out),
            "--dtype", "float64", "--num-sentences", "120", "--batch-size", "32",
            "--eval-every", "2", *extra]


@SST.needed
def test_resume_continues_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = main(_argv(tmp_path / "full", "--steps", "6", "--checkpoint-every", "2"))
    part = main(_argv(tmp_path / "split", "--steps", "4", "--checkpoint-every", "2"))
    assert len(part["loss_history"]) == 4
    assert "resumed from" not in capsys.readouterr().out
    resumed = main(_argv(tmp_path / "split", "--steps", "6", "--checkpoint-every", "2",
                         "--resume"))
    # the resume says so, counting steps as the progress bar does
    checkpoint = tmp_path / "split" / "checkpoint.pt"
    assert f"resumed from {checkpoint}: step 4 of 6\n" in capsys.readouterr().out
    assert resumed["steps_run"] == 6 and len(resumed["loss_history"]) == 6
    assert resumed["loss_history"] == pytest.approx(full["loss_history"], rel=1e-12)
    assert resumed["dev_history"] == full["dev_history"]
    assert resumed["best_step"] == full["best_step"]
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["nll_per_sentence"] == pytest.approx(full["nll_per_sentence"], rel=1e-12)
    # a fresh run (no --resume) in the same folder is refused: it would overwrite this one
    with pytest.raises(RunExistsError, match="pass --resume"):
        main(_argv(tmp_path / "split", "--steps", "2", "--checkpoint-every", "2"))
    torch.save({"x": 1}, checkpoint)
    with pytest.raises(ExampleError, match="not a checkpoint"):
        main(_argv(tmp_path / "split", "--steps", "6", "--resume"))


@SST.needed
def test_smoke_run(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env[DATA_ENV] = str(DATA)
    cmd = [sys.executable, "-m", "examples.sentiment", "--smoke-test", "--out-dir", str(tmp_path),
           "--threads", "1", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test accuracy" in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["steps_run"] == 6 and res["sentences"] == {"train": 300, "dev": 300, "test": 300}
    for split in ("dev", "test"):
        acc = res["accuracy"][split]
        assert 0 <= acc["five"] <= 1 and 0 <= acc["binary"] <= 1 and acc["sentences"] == 300
        for readout in ("in_context", "isolated", "phrase_label"):
            for kind in ("words", "phrases"):
                ag = res["phrase_agreement"][split][readout][kind]
                assert set(ag) == {"polarity", "binary", "five"}
                assert 0 <= ag["polarity"]["accuracy"] <= 1 and ag["polarity"]["count"] > 0
        assert res["nll_per_sentence"][split] > 0
    assert set(res["baselines"]["naive_bayes"]) == {"dev", "test"}
    assert set(res["top_words"]) == {"negative", "positive"}
    for png in ("confusion.png", "word_classes.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(tmp_path / png) in res["figures"]
    assert (tmp_path / "checkpoint.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    # the run ends by saying where it wrote its files
    wrote = r.stdout[r.stdout.index("examples.sentiment: wrote\n"):]
    assert f"  results: {tmp_path / 'results.json'}\n" in wrote
    assert f"  checkpoint: {tmp_path / 'checkpoint.pt'}\n" in wrote
    assert f"  figures: {', '.join(str(tmp_path / png) for png in FIGURES)}" in wrote


# ------------------------------------------------------------------------------------------------
# never lose a run, never show a traceback


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the program in this process as its ``__main__`` does (:func:`run_cli`), and return
    its exit status and output as a finished subprocess would."""
    capsys.readouterr()
    try:
        run_cli(PROG, main, list(argv))
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out.out, out.err)


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


class Run(NamedTuple):
    """A finished smoke run: its folder, its files, what it printed and returned."""

    folder: Path
    files: dict[str, tuple[bytes, int]]
    stdout: str
    results: dict[str, Any]


def _run_argv(out: Path, *extra: str) -> list[str]:
    return [*_argv(out, "--steps", "4", "--checkpoint-every", "2"), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One finished run (4 steps, smoke mode), shared by the tests below, which copy its folder
    before they change anything."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            results = main(_run_argv(folder))
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    yield Run(folder, _files(folder), out.getvalue(), results)


def _copy(run: Run, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(run.folder, folder)
    return folder


def test_help_names_the_data_and_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    r = _cli(capsys, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "this program reads DIR/sst/*.txt" in text and "polyphonic" not in text
    assert "``" not in text and ":math:" not in text and ":func:" not in text
    actions = [a for a in parser()._actions if a.option_strings]  # noqa: SLF001
    assert len(actions) > 20
    for a in actions:
        assert a.help and a.help.strip(), f"{a.option_strings} has no help text"
    # each option's entry of --help (from its flag to the next one's) gives its default once
    entries = r.stdout.split("\n  -")[1:]
    assert len(entries) == len(actions)
    for entry in entries:
        assert entry.count("(default:") <= 1, entry


@pytest.mark.parametrize("option, value", [
    ("--steps", "-5"), ("--steps", "0"), ("--batch-size", "0"), ("--batch-size", "-4"),
    ("--classes-per-label", "0"), ("--min-count", "0"), ("--word-prior", "-1"),
    ("--class-prior", "-0.5"), ("--deviation-penalty", "-1"), ("--max-polar", "0"),
    ("--max-polar", "1.5"), ("--max-polar", "nan"), ("--lr", "0"), ("--lr", "x"),
    ("--eval-every", "0"), ("--patience", "-1"), ("--eval-batch-size", "0"),
    ("--checkpoint-every", "0"), ("--num-sentences", "0"), ("--threads", "0"),
    ("--device", "gpu"), ("--dtype", "float16"),
])
def test_bad_option_values_are_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            option: str, value: str) -> None:
    r = _cli(capsys, "--out-dir", str(tmp_path / "out"), option, value)
    assert_one_line_error(r, MODULE, option, usage=True)
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    r = _cli(capsys, "--out-dir", str(tmp_path / "out"), "--device", "cuda")
    assert_one_line_error(r, MODULE, "--device", "no CUDA device", "--device cpu", usage=True)


def test_no_data_folder_is_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    r = run_example(MODULE, "--smoke-test", "--no-progress", "--out-dir", str(out),
                    env={DATA_ENV: None}, timeout=120)
    assert_one_line_error(r, MODULE, "no data folder", "--data-dir", "sst/train.txt")
    assert not out.exists() and not (tmp_path / "new").exists()


def test_wrong_data_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _cli(capsys, "--smoke-test", "--no-progress", "--data-dir", "/nonexistent",
             "--out-dir", str(out))
    assert_one_line_error(r, MODULE, "'/nonexistent'", "does not exist", "--data-dir")
    assert not out.exists()
    # a folder without the treebank: the error names the file it looked for
    r = _cli(capsys, "--smoke-test", "--no-progress", "--data-dir", str(tmp_path),
             "--out-dir", str(out))
    assert_one_line_error(r, MODULE, str(tmp_path / "sst" / "train.txt"), "Stanford")
    assert not out.exists()


def test_undecodable_data_file_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "sst").mkdir()
    (tmp_path / "sst" / "dev.txt").write_bytes(b"(2 (2 a) (2 b))\n(3 (2 \xff) (3 b))\n")
    with pytest.raises(DataError, match=r"dev\.txt', line 2: not UTF-8 text"):
        load_sst("dev", data_dir=tmp_path)


def test_garbage_checkpoint_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint at all\x00\x01")
    r = _cli(capsys, "--smoke-test", "--no-progress", "--out-dir", str(tmp_path), "--resume")
    assert_one_line_error(r, MODULE, str(checkpoint), "damaged")
    assert checkpoint.read_bytes() == b"not a checkpoint at all\x00\x01"


@SST.needed
def test_smoke_keeps_explicit_options(finished: Run) -> None:
    # --smoke-test's defaults (6 steps, batches of 64, 300 sentences) give way to explicit ones
    assert finished.results["steps_run"] == 4 and len(finished.results["loss_history"]) == 4
    assert finished.results["args"]["batch_size"] == 32
    assert finished.results["sentences"] == {"train": 120, "dev": 120, "test": 120}
    # options not given take the smoke values
    assert finished.results["args"]["checkpoint_every"] == 2
    assert finished.results["args"]["eval_every"] == 2
    assert "examples.sentiment: wrote\n" in finished.stdout


@SST.needed
def test_second_run_is_refused_and_keeps_the_first(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, finished: Run) -> None:
    folder = _copy(finished, tmp_path)
    before = _files(folder)
    r = _cli(capsys, *_run_argv(folder))
    assert_one_line_error(r, MODULE, str(folder / "checkpoint.pt"), "--resume", "--out-dir")
    assert _files(folder) == before
    # any of the run's files is enough to refuse: here the results and figures alone
    (folder / "checkpoint.pt").unlink()
    for name in ("results.json", *FIGURES):
        r = _cli(capsys, *_run_argv(folder))
        assert_one_line_error(r, MODULE, str(folder / name), "--resume")
        (folder / name).unlink()


@SST.needed
def test_resume_with_other_options_is_refused(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, finished: Run) -> None:
    folder = _copy(finished, tmp_path)
    before = _files(folder)
    checkpoint = str(folder / "checkpoint.pt")
    r = _cli(capsys, *_run_argv(folder, "--classes-per-label", "3", "--resume"))
    assert_one_line_error(r, MODULE, checkpoint, "--classes-per-label 2 -> 3")
    r = _cli(capsys, *_run_argv(folder, "--lr", "0.5", "--min-count", "1", "--resume"))
    assert_one_line_error(r, MODULE, checkpoint, "--lr 0.02 -> 0.5", "--min-count 2 -> 1")
    # fewer steps than the checkpoint has done
    r = _cli(capsys, *_run_argv(folder, "--resume"), "--steps", "3")
    assert_one_line_error(r, MODULE, checkpoint, "step 4", "--steps 4 or more")
    assert _files(folder) == before
    # other data (here: another vocabulary) under the same options
    data = tmp_path / "data" / "sst"
    data.mkdir(parents=True)
    for split in ("dev", "test"):
        shutil.copy(DATA / "sst" / f"{split}.txt", data)
    lines = (DATA / "sst" / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "train.txt").write_text("".join(lines[1:]), encoding="utf-8")
    r = _cli(capsys, *_run_argv(folder, "--resume", "--data-dir", str(data.parent)))
    assert_one_line_error(r, MODULE, checkpoint, "vocab_size", "--data-dir")
    assert _files(folder) == before
    # a checkpoint that recorded neither options nor sizes: its parameters' shapes are checked
    state = torch.load(checkpoint, weights_only=False)
    del state["extra"]["run_options"], state["extra"]["config"]
    torch.save(state, checkpoint)
    r = _cli(capsys, *_run_argv(folder, "--classes-per-label", "3", "--resume"))
    assert_one_line_error(r, MODULE, checkpoint, "class_logits (10,) -> (15,)",
                          "--classes-per-label")


@SST.needed
def test_truncated_checkpoint_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       finished: Run) -> None:
    folder = _copy(finished, tmp_path)
    checkpoint = folder / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 2])
    r = _cli(capsys, *_run_argv(folder, "--resume"))
    assert_one_line_error(r, MODULE, str(checkpoint), "damaged")
    assert checkpoint.read_bytes() == data[:len(data) // 2]


@SST.needed
def test_interrupt_keeps_a_resumable_checkpoint(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run"
    checkpoint = folder / "checkpoint.pt"
    argv = [*_argv(folder, "--checkpoint-every", "2", "--patience", "0"), "--steps", "100000"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    code, out, err = interrupt_run([sys.executable, "-m", MODULE, "--threads", "1", *argv],
                                   checkpoint, env, settle=0.0)
    assert code == 130, (out, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("examples.sentiment: interrupted; the last checkpoint in --out-dir "
                           "is kept. Continue with: python -m examples.sentiment "), err
    assert last.endswith(" --resume") and "--steps 100000" in last
    # the checkpoint is whole, and the run continues from it
    step = torch.load(checkpoint, weights_only=False)["extra"]["step"]
    assert step >= 2 and step % 2 == 0
    capsys.readouterr()
    resumed = main([*argv[:-2], "--steps", str(step + 2), "--resume"])
    assert f"resumed from {checkpoint}: step {step} of {step + 2}\n" in capsys.readouterr().out
    assert resumed["steps_run"] == step + 2 and len(resumed["loss_history"]) == step + 2
