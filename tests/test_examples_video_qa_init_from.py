"""``--init-from``: a video-QA run that starts from another run's weights and vocabulary (the
curriculum from the default variant to the identifiable one), its checks, and its resume; and
``--frame-activation leaky-relu``, a frame encoder whose activations cannot die."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.common import ExampleError
from examples.video_qa.model import ModelConfig, VideoQA
from examples.video_qa.train import _read_checkpoint, main

QUIET = ["--no-progress", "--threads", "1"]


def _run(out: Path, cache: Path, *extra: str) -> dict:
    return main(["--mode", "variational-enum", "--smoke-test", "--window", "1", "--out-dir",
                 str(out), "--cache-dir", str(cache), *extra] + QUIET)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A smoke run on the default variant (its folder, and the data cache)."""
    root = tmp_path_factory.mktemp("init_from")
    old = torch.get_default_dtype()  # a module fixture runs outside conftest's per-test policy
    torch.set_default_dtype(torch.float32)
    try:
        _run(root / "default", root / "cache", "--videos", "80")
    finally:
        torch.set_default_dtype(old)
    return root / "default", root / "cache"


def test_the_run_starts_from_the_given_weights_and_vocabulary(
        pretrained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, cache = pretrained
    init = _read_checkpoint(run / "best.pt", "cpu")
    seen = {}
    from examples.video_qa import train

    # the weights the trainer starts from: captured as the trainer is built
    real = train.Trainer.__init__

    def spy(self, args, model, *rest, **kw):  # type: ignore[no-untyped-def]
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        real(self, args, model, *rest, **kw)

    monkeypatch.setattr(train.Trainer, "__init__", spy)
    out = tmp_path / "identifiable"
    res = _run(out, cache, "--variant", "identifiable", "--init-from", str(run))
    assert res["init_from"] == str(run)
    assert seen.keys() == init["model"].keys()
    for k, v in init["model"].items():
        assert torch.equal(seen[k], v), k
    # it trained on (the identifiable answers are a subset of the default vocabulary's)
    fine = _read_checkpoint(out / "best.pt", "cpu")
    assert fine["vocab"] == init["vocab"]
    assert any(not torch.equal(fine["model"][k], v) for k, v in init["model"].items())
    assert json.loads((out / "results.json").read_text())["init_from"] == str(run)
    # a checkpoint file works as well as a run folder
    res2 = _run(tmp_path / "from_file", cache, "--variant", "identifiable", "--init-from",
                str(run / "best.pt"))
    assert res2["init_from"] == str(run / "best.pt")


def test_resume_keeps_the_vocabulary_without_the_initialising_run(
        pretrained: tuple[Path, Path], tmp_path: Path) -> None:
    run, cache = pretrained
    copy = tmp_path / "init"
    copy.mkdir()
    (copy / "best.pt").write_bytes((run / "best.pt").read_bytes())
    out = tmp_path / "identifiable"
    first = _run(out, cache, "--variant", "identifiable", "--init-from", str(copy))
    (copy / "best.pt").unlink()  # the finished run resumes from its own checkpoint alone
    again = _run(out, cache, "--variant", "identifiable", "--init-from", str(copy), "--resume")
    assert again["test"] == first["test"] and again["steps"] == first["steps"]
    # and refuses another --init-from, or none
    for other in (["--init-from", str(run)], []):
        with pytest.raises(ExampleError, match="--init-from"):
            _run(out, cache, "--variant", "identifiable", "--resume", *other)


def test_bad_init_from_is_refused_with_its_reason(pretrained: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    run, cache = pretrained
    with pytest.raises(ExampleError, match=r"--init-from .*not found.*best\.pt"):
        _run(tmp_path / "a", cache, "--init-from", str(tmp_path / "nowhere"))
    with pytest.raises(ExampleError, match=r"another model: dim 32 \(this run: 16\)"):
        _run(tmp_path / "b", cache, "--variant", "identifiable", "--init-from", str(run),
             "--dim", "16")
    with pytest.raises(ExampleError, match=r"another model: window 1 \(this run: 3\)"):
        main(["--mode", "soft", "--smoke-test", "--variant", "identifiable", "--out-dir",
              str(tmp_path / "c"), "--cache-dir", str(cache), "--init-from", str(run)] + QUIET)
    # a vocabulary without the training words: from the identifiable run to the default data,
    # whose count and direction questions it never saw
    ident = tmp_path / "ident"
    _run(ident, cache, "--variant", "identifiable")
    with pytest.raises(ExampleError, match=r"vocabulary lacks training words .*'many'"):
        _run(tmp_path / "d", cache, "--init-from", str(ident))
    # nothing was written for the refused runs
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abcd")


@pytest.mark.parametrize("features", [None, 12])
def test_a_leaky_frame_encoder_has_the_relu_encoders_parameters_and_passes_negatives(
        features: int | None) -> None:
    torch.manual_seed(0)
    cfg = dict(vocab_size=10, num_answers=5, dim=16, embed=8, feature_dim=features, window=1)
    relu = VideoQA(ModelConfig(**cfg))
    leaky = VideoQA(ModelConfig(**cfg, frame_activation="leaky-relu"))
    assert relu.state_dict().keys() == leaky.state_dict().keys()
    leaky.load_state_dict(relu.state_dict())
    acts = [type(m) for m in leaky.frames.net if not list(m.parameters())]
    assert torch.nn.ReLU not in acts and acts.count(torch.nn.LeakyReLU) == (4 if features is None
                                                                          else 2)
    shape = (2, 5, 32, 32, 3) if features is None else (2, 5, features)
    videos = (torch.randint(0, 256, shape, dtype=torch.uint8) if features is None
              else torch.randn(shape))
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        a, b = relu.frames(videos, mask), leaky.frames(videos, mask)
    assert (b < 0).any() and (a >= 0).all()
    # a layer whose every unit is negative on every frame: ReLU passes no gradient, leaky does
    for model in (relu, leaky):
        layer = model.frames.net[0]  # the first convolution, or linear map
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.fill_(-1.0)
        model.zero_grad()
        model.frames(videos, mask).sum().backward()
    assert relu.frames.net[0].bias.grad.abs().sum() == 0
    assert leaky.frames.net[0].bias.grad.abs().sum() > 0
    # a checkpoint from before the option compares equal to the default, and names the other
    assert "frame_activation" not in ModelConfig(**cfg).as_dict()
    assert ModelConfig(**cfg, frame_activation="leaky-relu").as_dict()["frame_activation"] == \
        "leaky-relu"
    with pytest.raises(ValueError, match="frame_activation must be one of"):
        ModelConfig(**cfg, frame_activation="tanh")


def test_the_frame_activation_option_trains_resumes_and_is_checked(tmp_path: Path) -> None:
    out = tmp_path / "leaky"
    opt = ["--variant", "identifiable", "--frame-activation", "leaky-relu"]
    first = _run(out, tmp_path / "cache", *opt)
    assert _read_checkpoint(out / "best.pt", "cpu")["config"]["frame_activation"] == "leaky-relu"
    assert _read_checkpoint(out / "checkpoint.pt", "cpu")["options"]["frame_activation"] == \
        "leaky-relu"
    again = _run(out, tmp_path / "cache", *opt, "--resume")
    assert again["test"] == first["test"]
    with pytest.raises(ExampleError, match="--frame-activation 'leaky-relu' -> "):
        _run(out, tmp_path / "cache", "--variant", "identifiable", "--resume")


def test_across_modes_the_shared_modules_are_loaded_and_the_others_left_fresh(
        pretrained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples.video_qa.train import _init_model

    run, cache = pretrained
    variational = _read_checkpoint(run / "best.pt", "cpu")
    cfg = {**variational["config"], "mode": "soft"}
    # a soft run started from the variational one: every soft module is the variational one's
    soft = VideoQA(ModelConfig(**cfg))
    assert _init_model(soft, variational, str(run)) == ""
    for k, v in soft.state_dict().items():
        assert torch.equal(v, variational["model"][k]), k
    # and back: the variational run keeps a fresh inference network and answer embedding
    torch.manual_seed(3)
    fresh = VideoQA(ModelConfig(**variational["config"]))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert _init_model(fresh, {"config": cfg, "model": soft.state_dict()}, "x") == \
        "answer_embed, infer"
    for k, v in fresh.state_dict().items():
        want = before[k] if k.split(".")[0] in ("answer_embed", "infer") else soft.state_dict()[k]
        assert torch.equal(v, want), k
    # through the command line, with the log saying what was left fresh
    out = tmp_path / "soft"
    main(["--mode", "soft", "--smoke-test", "--window", "1", "--variant", "identifiable",
          "--out-dir", str(out), "--cache-dir", str(cache), "--threads", "1"])
    capsys.readouterr()
    _run(tmp_path / "var", cache, "--variant", "identifiable", "--init-from", str(out))
    log = capsys.readouterr()
    assert "(a soft run); not in it, so freshly initialised: answer_embed, infer" in \
        log.out + log.err
    # parameters of another shape (a file from elsewhere) are refused, naming them
    bad = {"config": cfg, "model": {**soft.state_dict(),
                                    "classifier.0.bias": torch.zeros(3)}}
    with pytest.raises(ExampleError, match="other shapes: classifier.0.bias"):
        _init_model(VideoQA(ModelConfig(**cfg)), bad, "y")
