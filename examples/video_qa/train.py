"""Train and evaluate the video-QA model of one attention mode (see ``--help``)."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..common import (
    EpochTrainer,
    ExampleError,
    LoopOptions,
    Validation,
    apply_smoke,
    check_resume_options,
    example_parser,
    load_checkpoint,
    log_main,
    out_dir_guard,
    positive_float,
    positive_int,
    print_written,
    replicas_identical,
    resume_or_refuse,
    run_cli,
    run_distributed,
    run_options,
    save_figure,
    shard,
    write_json,
)
from ..data import DataError
from . import needle
from .data import (
    OBJECT,
    VARIANTS,
    Batch,
    Question,
    VideoQAData,
    Vocab,
    collate,
    load_features,
    load_or_generate,
    video_batches,
)
from .model import FRAME_ACTIVATIONS, MODES, ModelConfig, VideoQA

__all__ = ["Trainer", "cli", "evaluate", "load_run", "main", "make_parser"]

DESCRIPTION = """\
Video question answering with a latent frame alignment (Deng et al., 2018): which frame answers
the question. Trains on procedurally generated grounded videos (moving shapes that appear,
change colour and leave; templated questions with their ground-truth evidence frames) or on real
precomputed per-frame features (--features DIR), with the attention of --mode: soft attention,
the exact marginal likelihood, hard attention (enumerated or REINFORCE), variational attention
with an inference network q(z | video, question, answer) (enumerated or REINFORCE), or a
two-level segment-then-frame alignment eliminated by the plated engine. Reports answer accuracy,
exact NLL and grounding accuracy (the argmax of the prior, of the exact posterior and of q hits
an evidence frame) on the held-out test split; writes results.json, checkpoints and an alignment
figure. Data parallel with torchrun (gloo on CPU, NCCL on GPUs). With --task needle it trains
instead on short videos of precomputed feature vectors (a random mixture of Gaussians) holding a
needle frame whose code answers a question that names the needle's key, then measures needle
recall on videos of up to 100,000 frames at every depth, reading the frames in chunks under a
memory cap (recall.png, and recall_grid in results.json)."""

PROG = "python -m examples.video_qa"

#: The ``--smoke-test`` settings of the options the user did not give.
SMOKE = dict(videos=40, batch_size=8, epochs=2, dim=32, embed=16, checkpoint_every=3,
             eval_batch_size=16, figure_questions=2)

#: Options a resumed run may change: how long it trains, how often it checkpoints, how it
#: evaluates and where the generated data are cached. Every other option must be the one the
#: checkpoint was written with.
MAY_CHANGE = ("epochs", "patience", "max_minutes", "checkpoint_every", "eval_batch_size",
              "figure_questions", "cache_dir", "eval_lengths", "eval_depths", "eval_questions",
              "chunk_mb")

#: The ``--smoke-test`` settings that only ``--task needle`` reads.
NEEDLE_SMOKE = dict(eval_lengths=(16, 300), eval_depths=(0.0, 0.5, 1.0), eval_questions=2,
                    feature_size=32)
#: Options only ``--task needle`` reads, left out of a grounded run's recorded options.
NEEDLE_ONLY = ("task", "min_frames", "needle_span", "distractors", "feature_size",
               "needle_strength", "eval_lengths", "eval_depths", "eval_questions", "chunk_mb")
#: Options added after grounded runs were first checkpointed, left out of their recorded
#: options while they keep these values.
LATER_DEFAULTS = {"window": 3, "k_max": 4, "variant": "default", "init_from": None,
                  "frame_activation": "relu"}
#: Likewise for needle runs.
NEEDLE_LATER_DEFAULTS = {"needle_strength": 1.0, "variant": "default", "init_from": None,
                         "frame_activation": "relu"}


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a resumed run must share with the run it continues (a grounded run's as
    they were before the needle task existed)."""
    out = run_options(args, MAY_CHANGE + (NEEDLE_ONLY if args.task == "grounded" else ()))
    later = LATER_DEFAULTS if args.task == "grounded" else NEEDLE_LATER_DEFAULTS
    for name, default in later.items():
        if out.get(name) == default:
            del out[name]
    return out


def _int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated whole numbers >= 1 (e.g. ``16,64,1024``)."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole "
                                         "numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def _depth_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated percentages from 0 to 100, as fractions."""
    try:
        values = tuple(float(x) / 100 for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "percentages") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every depth must be from 0 to 100")
    return values


def at_least(low: int) -> Any:
    """An argparse type: a whole number ``>= low`` (else a usage error saying so)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is less than {low}")
        return value

    parse.__name__ = f"a whole number >= {low}"
    return parse


def make_parser() -> argparse.ArgumentParser:
    p = example_parser(PROG, DESCRIPTION, "runs/video_qa")
    p.add_argument("--mode", choices=MODES, default="soft", help="attention mode")
    p.add_argument("--task", choices=("grounded", "needle"), default="grounded",
                   help="grounded: the generated videos of moving shapes (or --features); "
                        "needle: find a needle frame in videos of feature vectors, trained "
                        "short and tested up to 100,000 frames")
    g = p.add_argument_group("data")
    g.add_argument("--videos", type=positive_int, default=4000,
                   help="generated videos (80/10/10 split)")
    g.add_argument("--frames", type=at_least(8), default=None,
                   help="frames per generated video (at least 8; the needle task: the most "
                        "frames of a training video) [16; the needle task: 64]")
    g.add_argument("--size", type=at_least(3 * OBJECT + 3), default=32,
                   help=f"side of a generated frame in pixels (at least {3 * OBJECT + 3})")
    g.add_argument("--questions-per-video", type=positive_int, default=4,
                   help="questions drawn per generated video")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated data set")
    g.add_argument("--variant", choices=VARIANTS, default="default",
                   help="generator variant: default, or identifiable (objects grey except at "
                        "the frames where one appears or leaves; only questions answered by "
                        "that one frame; best with --window 1; see examples/video_qa/data.py)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where generated data sets are cached (default: OUT_DIR/../cache)")
    g.add_argument("--features", default=None, metavar="DIR",
                   help="train on real precomputed features instead: DIR/qa.jsonl and "
                        "DIR/features/ID.npz|.pt (format: examples/video_qa/data.py)")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=positive_int, default=128,
                   help="frame, question and hidden size")
    g.add_argument("--embed", type=positive_int, default=64,
                   help="word and answer embedding size")
    g.add_argument("--samples", type=at_least(2), default=4,
                   help="REINFORCE samples per question (leave-one-out baseline: at least 2)")
    g.add_argument("--segment-len", type=positive_int, default=4,
                   help="frames per two-level segment")
    g.add_argument("--window", type=at_least(1), default=None,
                   help="frames the encoder sees per frame, centred on it (odd) [3; the "
                        "needle task: 1]")
    g.add_argument("--k-max", type=positive_int, default=4,
                   help="K of --mode k-max: the prior truncated to its K best frames")
    g.add_argument("--frame-activation", choices=FRAME_ACTIVATIONS, default="relu",
                   help="the frame encoder's activations: relu (as every run of RESULTS.md "
                        "before 2026-12-08), or leaky-relu, which always passes a gradient (a "
                        "layer of dead ReLUs gives every frame the same vector: a uniform "
                        "prior, an answer model blind to the frames, and no gradient to leave "
                        "them)")
    g = p.add_argument_group("the needle task (--task needle)")
    g.add_argument("--min-frames", type=at_least(8), default=16,
                   help="the fewest frames of a training video")
    g.add_argument("--needle-span", type=positive_int, default=1,
                   help="frames the needle spans")
    g.add_argument("--distractors", type=at_least(0), default=3,
                   help="needles of other keys in every video")
    g.add_argument("--feature-size", type=at_least(8), default=256,
                   help="dimensions of a frame's feature vector")
    g.add_argument("--needle-strength", type=positive_float, default=1.0,
                   help="length of the key and code vectors a needle frame adds (smaller: a "
                        "fainter needle, harder to tell from the haystack)")
    g.add_argument("--eval-lengths", type=_int_list, default=(16, 64, 256, 1024, 4096, 16384,
                                                               65536, 100000),
                   metavar="T,T,...", help="video lengths of the recall grid")
    g.add_argument("--eval-depths", type=_depth_list, default=tuple(i / 10 for i in range(11)),
                   metavar="PCT,PCT,...",
                   help="needle depths of the recall grid, in percent (given as fractions in "
                        "results.json)")
    g.add_argument("--eval-questions", type=positive_int, default=10,
                   help="questions (each on its own video) per cell of the recall grid")
    g.add_argument("--chunk-mb", type=positive_float, default=64.0,
                   help="memory cap of one chunk of frames at evaluation, in MiB")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="questions per step (per process under torchrun)")
    g.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate")
    g.add_argument("--clip", type=positive_float, default=5.0,
                   help="gradient-norm clipping")
    g.add_argument("--epochs", type=positive_int, default=30,
                   help="most epochs (a resumed run may raise it)")
    g.add_argument("--patience", type=positive_int, default=8,
                   help="early stopping: epochs without a better validation accuracy")
    g.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop training after this much training time, then evaluate "
                        "(default: no limit)")
    g.add_argument("--checkpoint-every", type=positive_int, default=200,
                   help="write the checkpoint every N steps (and after every epoch)")
    g.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from the weights of another run with the same model options "
                        "(its folder, for its best.pt, or a checkpoint file), with its "
                        "vocabulary, which must hold every training word and answer; a run of "
                        "another mode gives the modules both have (a variational run started "
                        "from a soft one keeps a fresh inference network); the optimizer, "
                        "epochs and early stopping start afresh (a curriculum: train on the "
                        "default variant, then on --variant identifiable)")
    g.add_argument("--eval-batch-size", type=positive_int, default=256,
                   help="questions per evaluation batch")
    g.add_argument("--figure-questions", type=positive_int, default=6,
                   help="test questions in the alignment figure")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on ``--task`` (``--frames``, ``--window``)."""
    needle = args.task == "needle"
    if args.frames is None:
        args.frames = 64 if needle else 16
    if args.window is None:
        args.window = 1 if needle else 3
    if args.window % 2 == 0:
        raise ExampleError(f"--window must be odd (the frame and as many neighbours on either "
                           f"side), got {args.window}")
    if needle and args.min_frames > args.frames:
        raise ExampleError(f"--min-frames {args.min_frames} is above --frames {args.frames}")
    if needle and args.features:
        raise ExampleError("--features trains on real features; the needle task generates its "
                           "own: give one of --task needle and --features")
    if args.variant != "default" and (needle or args.features):
        raise ExampleError(f"--variant {args.variant} chooses how the grounded videos are "
                           "generated: leave it out with --task needle or --features")
    return args


def load_data(args: argparse.Namespace, out_dir: Path) -> VideoQAData:
    if args.features:
        return load_features(args.features)
    cache = Path(args.cache_dir) if args.cache_dir else out_dir.parent / "cache"
    return load_or_generate(cache, args.videos, args.frames, args.size,
                            args.questions_per_video, args.data_seed, args.variant)


class Trainer(EpochTrainer[VideoQA]):
    """The model, its optimizer and the training state, with exact checkpoints
    (:class:`~examples.common.EpochTrainer`): the best model has the highest validation accuracy
    (ties: the lower NLL); a run stopped early stays stopped, one that used up its ``--epochs``
    or ``--max-minutes`` trains on when resumed with larger ones.

    The state after any step is (model, optimizer, epoch, step within the epoch, validation
    history, random generators); :meth:`save` writes all of it atomically and :meth:`restore`
    puts it back, so a resumed run takes the same next step as an uninterrupted one (the batch
    order of an epoch is a function of the seed and the epoch). The checkpoint also carries the
    running loss of the epoch, so that an epoch resumed in its middle reports the train loss of
    all of its steps.
    """

    metric = "valid accuracy"
    initial_best = (-1.0, 0.0)  # (valid accuracy, -valid NLL)
    resume_partial = True

    def __init__(self, args: argparse.Namespace, model: VideoQA, data: VideoQAData,
                 train: Sequence[Question], vocab: Vocab, device: torch.device, world: int = 1,
                 rank: int = 0, valid: Sequence[Question] = ()) -> None:
        super().__init__(LoopOptions.from_args(args), model,
                         torch.optim.Adam(model.parameters(), lr=args.lr), device, world, rank)
        self.args, self.data, self.train, self.valid, self.vocab = args, data, train, valid, vocab

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return shard(video_batches(self.train, self.args.batch_size,
                                   self.args.seed * 100003 + epoch), self.rank, self.world)

    def batch(self, idx: list[int]) -> Batch:
        return collate(self.data, self.train, self.vocab, idx).to(self.device)

    def step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step; returns the loss summed over the batch (no host sync)."""
        return self.optimizer_step(batch, len(batch))

    def train_on(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        return self.step(self.batch(idx)), len(idx)

    def validate(self) -> Validation:
        v = evaluate(self.model, self.data, self.valid, self.vocab, self.args.eval_batch_size,
                     self.device)
        return Validation(
            score=(v["accuracy"], -v["nll"]),
            figures={"valid_accuracy": v["accuracy"], "valid_nll": v["nll"],
                     "valid_ground_prior": v["ground_prior"]},
            summary=f"valid accuracy {v['accuracy']:.3f}, NLL {v['nll']:.3f}, prior grounding "
                    f"{v['ground_prior']:.3f}")

    def model_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "config": self.model.config.as_dict(),
                "vocab": self.vocab.as_dict()}

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "stopped_early": self.stopped,
                "options": options(self.args)}

    def load(self, path: Path) -> None:
        """Restore the state saved in the checkpoint ``path``.

        :raises ExampleError: if the file cannot be read, is not a checkpoint of this program, or
            was written with other options (the message names the file).
        """
        self.restore(_read_checkpoint(path, self.device), path)

    def check_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        check_resume_options(state.get("options"), options(self.args), path)
        if state["config"] != self.model.config.as_dict() or \
                state["vocab"] != self.vocab.as_dict():
            raise ExampleError(f"the checkpoint {str(path)!r} was written for {state['config']} "
                               "and another data set or options, not "
                               f"{self.model.config.as_dict()}; use the same options, or "
                               "another --out-dir")

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.stopped = bool(state.get("stopped_early", False))
        self.best = (float(state["best"][0]), float(state["best"][1]))


def _read_checkpoint(path: Path, device: torch.device | str) -> dict[str, Any]:
    """The contents of a checkpoint of this program (``checkpoint.pt`` or ``best.pt``).

    :raises ExampleError: naming the file if it is missing, unreadable or another program's.
    """
    st = load_checkpoint(path, map_location=device)
    if not isinstance(st, dict) or "model" not in st or "config" not in st or "vocab" not in st:
        raise ExampleError(f"{str(path)!r} is not a checkpoint of examples.video_qa; delete it "
                           "or choose another --out-dir")
    return st


def _init_path(path: str) -> Path:
    """``--init-from``'s checkpoint: a run folder's ``best.pt``, or the file itself."""
    p = Path(path)
    return p / "best.pt" if p.is_dir() else p


def _read_init(path: str, device: torch.device | str) -> dict[str, Any]:
    """The checkpoint ``--init-from path`` names (see :func:`_init_path`)."""
    p = _init_path(path)
    if not p.is_file():
        raise ExampleError(f"--init-from {path!r}: {str(p)!r} not found; give a finished run's "
                           "folder (it holds best.pt) or a checkpoint file of examples.video_qa")
    return _read_checkpoint(p, device)


def _init_vocab(state: dict[str, Any], train: Sequence[Question], path: str) -> Vocab:
    """The vocabulary of the ``--init-from`` checkpoint, which must cover ``train``: the model's
    embeddings and answer layer are indexed by it."""
    vocab = Vocab.from_dict(state["vocab"])
    new = Vocab.build(train)
    words = sorted(set(new.words) - set(vocab.words))
    answers = sorted(set(new.answers) - set(vocab.answers))
    if words or answers:
        missing = "; ".join(f"{kind} {', '.join(map(repr, xs[:8]))}"
                            + (f" and {len(xs) - 8} more" if len(xs) > 8 else "")
                            for kind, xs in (("words", words), ("answers", answers)) if xs)
        raise ExampleError(f"--init-from {path!r}: its vocabulary lacks training {missing}; "
                           "start from a run whose training questions use them, or train "
                           "without --init-from")
    return vocab


def _init_model(model: VideoQA, state: dict[str, Any], path: str) -> str:
    """Load the ``--init-from`` checkpoint's weights into ``model``, whose configuration must be
    the checkpoint's but for the mode. Across modes, the modules both have are loaded and the
    others keep their initialisation (e.g. the inference network of a variational run started
    from a soft one). Returns what was left fresh, for the log (empty when nothing was)."""
    ours = asdict(model.config)  # every field, those a checkpoint leaves out at their defaults
    theirs = asdict(ModelConfig(**state["config"]))
    diff = [f"{k} {theirs[k]!r} (this run: {ours[k]!r})"
            for k in ours if k != "mode" and ours[k] != theirs[k]]
    if diff:
        raise ExampleError(f"--init-from {path!r} was trained with another model: "
                           f"{'; '.join(diff)}; use the same model options")
    own = model.state_dict()
    weights = state["model"]
    shapes = [k for k in weights.keys() & own.keys() if weights[k].shape != own[k].shape]
    if shapes:  # the same options give the same shapes; a foreign file would not
        raise ExampleError(f"--init-from {path!r}: parameters of other shapes: "
                           f"{', '.join(sorted(shapes))}")
    missing, _ = model.load_state_dict(weights, strict=False)
    fresh = sorted({k.split(".")[0] for k in missing})
    return ", ".join(fresh)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu"
             ) -> tuple[VideoQA, Vocab, dict[str, Any]]:
    """The best model of a finished run (``RUN/best.pt``), its vocabulary and ``results.json``'s
    contents (empty if missing)."""
    import json

    run = Path(run_dir)
    path = run / "best.pt"
    if not path.is_file():
        raise ExampleError(f"{str(path)!r} not found: {str(run)!r} is not a finished run of "
                           "examples.video_qa (train one with python -m examples.video_qa)")
    st = _read_checkpoint(path, device)
    model = VideoQA(ModelConfig(**st["config"])).to(device)
    model.load_state_dict(st["model"])
    model.eval()
    res = run / "results.json"
    results: dict[str, Any] = {}
    if res.is_file():
        try:
            results = json.loads(res.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExampleError(f"{str(res)!r} is not a results file of examples.video_qa ({e}); "
                               "run the training again into another --out-dir") from e
        if not isinstance(results, dict):
            raise ExampleError(f"{str(res)!r} is not a results file of examples.video_qa")
    return model, Vocab.from_dict(st["vocab"]), results


def predicted_span(probs: Tensor) -> Tensor:
    """The evidence span a distribution over frames predicts: the longest run of consecutive
    frames around its mode whose probabilities are at least half the mode's. ``probs`` ``(B,
    T)`` -> ``(B, T)`` bool."""
    top = probs.max(-1, keepdim=True)
    above = probs >= top.values / 2
    run = torch.cumsum(~above, -1)  # constant over each run of frames above the threshold
    out: Tensor = above & (run == run.gather(-1, top.indices))
    return out


def temporal_iou(probs: Tensor, evidence: Tensor) -> Tensor:
    """Temporal IoU, as NExT-GQA measures grounding: frames in both the predicted span
    (:func:`predicted_span`) and the true evidence, over frames in either. ``probs`` and
    ``evidence`` ``(B, T)`` -> ``(B,)`` (0 where there is no evidence)."""
    span = predicted_span(probs)
    inter = (span & evidence).sum(-1)
    union = (span | evidence).sum(-1).clamp(min=1)
    return inter.double() / union.double()


def evaluate(model: VideoQA, data: VideoQAData, questions: Sequence[Question], vocab: Vocab,
             batch_size: int, device: torch.device) -> dict[str, Any]:
    """Answer accuracy, exact NLL per question and grounding accuracies over ``questions``.

    Grounding (``ground_*``) counts the questions with known evidence frames whose argmax frame
    (of the prior, of the exact posterior given the true answer, of ``q``) is an evidence frame,
    ``near_*`` those whose argmax is within one frame of one (the frame encoder's window); the
    grounding is also broken down by question type, together with accuracy. ``iou_*`` is the
    mean temporal IoU of the span each distribution predicts (:func:`temporal_iou`) with the
    evidence, ``iou50_*`` the fraction of questions where it is at least 0.5 (both over the
    questions with evidence).
    """
    model.eval()
    sums: dict[str, Tensor] = {}
    per_type: dict[str, dict[str, list[float]]] = {}
    n_ev = 0
    for idx in video_batches(questions, batch_size):
        b = collate(data, questions, vocab, idx).to(device)
        r = model.analyse(b)
        ans = b.answers
        correct = (r["log_pred"].argmax(-1) == ans).double()
        has_ev = b.evidence.any(-1)
        n_ev += int(has_ev.sum())
        rows = torch.arange(len(b), device=device)
        stats = {"correct": correct, "nll": -r["log_pred"][rows, ans].double()}
        # "near": within one frame of an evidence frame, the resolution of the encoder, whose
        # vector of frame t sees frames t - 1 to t + 1
        near = b.evidence.clone()
        near[:, 1:] |= b.evidence[:, :-1]
        near[:, :-1] |= b.evidence[:, 1:]
        for key in ("prior", "posterior", "q"):
            if f"{key}_map" in r:
                stats[f"ground_{key}"] = (b.evidence[rows, r[f"{key}_map"]] & has_ev).double()
                stats[f"near_{key}"] = (near[rows, r[f"{key}_map"]] & has_ev).double()
                iou = temporal_iou(r[key], b.evidence) * has_ev
                stats[f"iou_{key}"] = iou
                stats[f"iou50_{key}"] = ((iou >= 0.5) & has_ev).double()
        if "segment_posterior" in r:
            seg = model.config.segment_len
            ev = torch.nn.functional.pad(b.evidence, (0, r["segment_posterior"].shape[1] * seg
                                                      - b.evidence.shape[1]))
            seg_ev = ev.view(len(b), -1, seg).any(-1)
            stats["ground_segment"] = seg_ev[rows, r["segment_posterior"].argmax(-1)].double()
        for k, v in stats.items():
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.sum()
        host = {k: v.cpu().tolist() for k, v in stats.items() if k != "nll"}
        host["evidence"] = has_ev.cpu().tolist()
        for j, i in enumerate(idx):
            by = per_type.setdefault(questions[i].type, {})
            for k, vals in host.items():
                by.setdefault(k, []).append(vals[j])
    n = len(questions)
    out: dict[str, Any] = {"questions": n, "accuracy": float(sums["correct"]) / n,
                           "nll": float(sums["nll"]) / n, "with_evidence": n_ev}
    for k, v in sums.items():
        if k.startswith(("ground_", "near_", "iou")):
            out[k] = float(v) / max(n_ev, 1)
    out["accuracy_by_type"] = {t: sum(v["correct"]) / len(v["correct"])
                               for t, v in sorted(per_type.items())}
    out["grounding_by_type"] = {
        t: {k[7:] if k.startswith("ground_") else k: sum(x) / max(sum(v["evidence"]), 1)
            for k, x in v.items() if k.startswith(("ground_", "near_"))}
        for t, v in sorted(per_type.items())}
    return out



def alignment_figure(models: dict[str, VideoQA], data: VideoQAData,
                     questions: Sequence[Question], vocab: Vocab, device: torch.device,
                     path: Path) -> None:
    """Per question: the frames as thumbnails (evidence frames framed in green) and, per model,
    the prior over frames (bars) and the exact posterior or ``q`` (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(questions)
    batch = collate(data, questions, vocab, list(range(n))).to(device)
    res = {name: m.analyse(batch) for name, m in models.items()}
    rows = 1 + len(models)
    fig, axes = plt.subplots(n * rows, 1, figsize=(10, 1.1 * n * rows + 0.5), squeeze=False)
    t = int(batch.frame_mask.shape[1])
    for i, q in enumerate(questions):
        ax = axes[i * rows, 0]
        length = int(data.lengths[q.video])
        if data.pixels:
            frames = data.videos[q.video, :length].numpy()
            strip = _thumbnails(frames, set(q.evidence))
            ax.imshow(strip, extent=(-0.5, length - 0.5, 0, 1), aspect="auto")
        ax.set_xlim(-0.5, t - 0.5)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_title(f"{q.text}  answer: {q.answer}  evidence: {list(q.evidence)}", fontsize=9)
        for j, (name, r) in enumerate(res.items()):
            a = axes[i * rows + 1 + j, 0]
            prior = r["prior"][i, :length].float().cpu().numpy()
            colours = ["tab:green" if f in q.evidence else "tab:gray" for f in range(length)]
            a.bar(range(length), prior, color=colours, width=0.8)
            other = "q" if "q" in r else "posterior" if "posterior" in r else None
            if other is not None:
                a.plot(range(length), r[other][i, :length].float().cpu().numpy(), "o-",
                       color="tab:red", markersize=3, linewidth=1, label=other)
            pred = vocab.answers[int(r["log_pred"][i].argmax())]
            a.set_xlim(-0.5, t - 0.5)
            a.set_ylim(0, 1)
            a.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
            a.tick_params(labelsize=7)
            a.text(t - 0.6, 0.95, f"says {pred}" + (f"; red: {other}" if other else ""),
                   ha="right", va="top", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _thumbnails(frames: Any, evidence: set[int]) -> Any:
    """A strip of frames, each with a 2-pixel border (green for evidence frames)."""
    import numpy as np

    out = []
    for f, x in enumerate(frames):
        colour = (40, 200, 40) if f in evidence else (90, 90, 90)
        y = np.empty((x.shape[0] + 4, x.shape[1] + 4, 3), dtype=np.uint8)
        y[:] = colour
        y[2:-2, 2:-2] = x
        out.append(y)
    return np.concatenate(out, 1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m examples.video_qa``: train, evaluate and write the run's files; returns the
    contents of ``results.json`` (empty on the processes other than rank 0)."""
    parser = make_parser()
    args = apply_smoke(parser, parser.parse_args(argv), argv, SMOKE)
    if args.task == "needle":
        args = apply_smoke(parser, args, argv, NEEDLE_SMOKE)
    args = resolve_defaults(args)
    with out_dir_guard(args.out_dir):
        out: dict[str, Any] = run_distributed(args, _run)
    return out


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    ckpt, best_path = out_dir / "checkpoint.pt", out_dir / "best.pt"
    results_path, figure_path = out_dir / "results.json", out_dir / "alignments.png"
    recall_path = out_dir / "recall.png"
    # refuse to overwrite another run, and a resume with other options, before any work
    saved = None
    if resume_or_refuse(args.resume, ckpt, [best_path, results_path, figure_path, recall_path]):
        saved = _read_checkpoint(ckpt, device)
        check_resume_options(saved.get("options"), options(args), ckpt)
    world_vectors = None
    if args.task == "needle":  # generated afresh (in seconds) by every process
        data, world_vectors = needle.data_from_args(args)
    else:  # rank 0 generates and caches the data set first; the others then read the cache
        if rank == 0:
            data = load_data(args, out_dir)
        if world > 1:
            dist.barrier()
        if rank != 0:
            data = load_data(args, out_dir)
    train, valid, test = data.split("train"), data.split("val"), data.split("test")
    if not train or not valid or not test:
        raise DataError(f"{data.source}: every split needs questions; got {len(train)} train, "
                        f"{len(valid)} val and {len(test)} test (use more --videos, or set "
                        "\"split\" in qa.jsonl)")
    init = None
    if args.init_from and saved is not None:  # the checkpoint keeps the initialising vocabulary
        vocab = Vocab.from_dict(saved["vocab"])
    elif args.init_from:
        init = _read_init(args.init_from, device)
        vocab = _init_vocab(init, train, args.init_from)
    else:
        vocab = Vocab.build(train)
    log_main(f"{data.source}: {data.videos.shape[0]} videos, {len(train)} training, "
             f"{len(valid)} validation and {len(test)} test questions; {len(vocab.words)} words, "
             f"{len(vocab.answers) - 1} answers; {world} process(es) on {device}")
    config = ModelConfig(
        vocab_size=len(vocab.words), num_answers=len(vocab.answers), mode=args.mode,
        feature_dim=None if data.pixels else int(data.videos.shape[-1]),
        image_size=int(data.videos.shape[2]) if data.pixels else 32, dim=args.dim,
        embed=args.embed, samples=args.samples, segment_len=args.segment_len,
        window=args.window, k_max=args.k_max, frame_activation=args.frame_activation)
    model = VideoQA(config).to(device)
    if init is not None:
        fresh = _init_model(model, init, args.init_from)
        log_main(f"initialised from {str(_init_path(args.init_from))!r} (a "
                 f"{init['config']['mode']} run)" + (f"; not in it, so freshly initialised: "
                                                     f"{fresh}" if fresh else ""))
    trainer = Trainer(args, model, data, train, vocab, device, world, rank, valid=valid)
    if saved is not None:
        trainer.restore(saved, ckpt)
        log_main(_resumed(trainer, ckpt))
    log_main(f"{sum(p.numel() for p in model.parameters()):,} parameters; mode {args.mode}")
    trainer.fit(ckpt, best_path)

    identical = replicas_identical(model, world)  # a collective: best.pt is written by now
    best_epoch = None
    if best_path.is_file() and (rank == 0 or world_vectors is not None):
        best = _read_checkpoint(best_path, device)
        model.load_state_dict(best["model"])
        best_epoch = best["epoch"]
    grid = None
    if world_vectors is not None:  # every process takes its share of the grid's cells
        grid = needle.grid_from_args(model, vocab, world_vectors, args, device, rank, world)
    if rank != 0:
        return {}
    results: dict[str, Any] = {
        "mode": args.mode, "task": args.task, "config": config.as_dict(), "data": data.source,
        "data_args": {"features": args.features, "videos": args.videos, "frames": args.frames,
                      "size": args.size, "questions_per_video": args.questions_per_video,
                      "data_seed": args.data_seed,
                      # recorded only where not the default, as before variants existed
                      **({"variant": args.variant} if args.variant != "default" else {})},
        "videos": int(data.videos.shape[0]), "frames": int(data.videos.shape[1]),
        "train_questions": len(train), "init_from": args.init_from, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "world_size": world, "batch_size": args.batch_size, "epochs": trainer.epoch,
        "best_epoch": best_epoch,
        "steps": trainer.steps, "train_seconds": trainer.train_seconds,
        "history": trainer.history, "replicas_identical": identical,
        "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
        "valid": evaluate(model, data, valid, vocab, args.eval_batch_size, device),
        "test": evaluate(model, data, test, vocab, args.eval_batch_size, device),
    }
    alignment_figure({args.mode: model}, data, test[:args.figure_questions], vocab, device,
                     figure_path)
    figures = [figure_path]
    t = results["test"]
    ground = ", ".join(f"{k[7:]} {v:.3f}" for k, v in t.items() if k.startswith("ground_"))
    log_main(f"test: accuracy {t['accuracy']:.3f}, NLL {t['nll']:.3f}, grounding ({ground}); "
             f"training {trainer.train_seconds:.0f} s")
    if grid is not None:
        results["recall_grid"] = grid
        needle.recall_figure({args.mode: grid}, recall_path)
        figures.append(recall_path)
        worst = [min(row) for row in grid["recall"]]
        log_main("needle recall, worst depth per length: " + ", ".join(
            f"{n} frames {100 * w:.0f}%" for n, w in zip(grid["lengths"], worst, strict=True)))
    write_json(results, results_path)
    print_written(PROG, {"results": results_path, "checkpoint": ckpt,
                         "best model": [best_path] if best_path.is_file() else [],
                         "figures": figures})
    return results


def _resumed(trainer: Trainer, path: Path) -> str:
    """The resume message, counting epochs from 1 as the log and the progress bars do."""
    args = trainer.args
    done = f"{trainer.steps} steps in all"
    if trainer.stopped:
        return (f"resumed from {path}: stopped early after epoch {trainer.epoch} ({done}); "
                "evaluating")
    if trainer.epoch >= args.epochs:
        return (f"resumed from {path}: all {args.epochs} epochs done ({done}); evaluating "
                "(raise --epochs to train more)")
    batches = len(trainer.epoch_batches(trainer.epoch))
    return (f"resumed from {path}: epoch {trainer.epoch + 1} of {args.epochs}, "
            f"{trainer.step_in_epoch} of its {batches} steps done ({done})")


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line: :func:`main` with one-line errors and a Ctrl-C that says how to
    resume."""
    run_cli(PROG, main, argv)


if __name__ == "__main__":
    cli()
