"""Train and evaluate the translation model of one attention mode on Multi30k (see ``--help``)."""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..common import (
    EpochTrainer,
    ExampleError,
    LoopOptions,
    Validation,
    apply_smoke,
    atomic_write_text,
    check_checkpoint_world,
    check_resume_options,
    example_parser,
    load_checkpoint,
    log_main,
    nonnegative_float,
    nonnegative_int,
    out_dir_guard,
    positive_float,
    positive_int,
    print_written,
    probability,
    replicas_identical,
    resume_or_refuse,
    run_cli,
    run_distributed,
    run_options,
    save_figure,
    write_json,
)
from ..data import load_multi30k
from .data import Batch, Tokenizer, collate, encode_pairs, length_batches, shard
from .model import MODES, OUTPUT_LAYERS, ModelConfig, Seq2Seq, greedy_decode

__all__ = ["Trainer", "cli", "main", "make_parser", "parse_args"]

DESCRIPTION = """\
Translation with latent alignments (Deng et al., 2018) on Multi30k German->English: a
bidirectional-LSTM encoder and an LSTM decoder with input feeding, joint BPE subwords
(sentencepiece), and the attention of --attention: soft attention, the exact marginal likelihood,
hard attention (exact enumeration or REINFORCE samples), variational attention with an inference
network (enumeration, samples, Gumbel-softmax), or a first-order Markov alignment prior (exact
marginal, or variational with a chain posterior) eliminated by the plated engine. Reports the
exact perplexity and detokenised cased BLEU (sacrebleu) of beam search under the prior, writes
the translations, an alignment heatmap and results.json. Data parallel with torchrun (gloo on CPU,
NCCL on GPUs). The output layer is the paper's tanh layer (--output-layer luong) or a log-linear
product of experts whose exact enumeration costs about what soft attention does (--output-layer
log-linear). A finished run is evaluated again on another split with --resume --test-split NAME
(nothing more is trained), and "python -m examples.translation translate --checkpoint
RUN/best.pt" translates German read from a file or stdin (see "translate --help")."""

PROG = "python -m examples.translation"

SMOKE = dict(vocab_size=200, embed=16, hidden=16, layers=1, batch_size=16, epochs=2,
             train_pairs=96, eval_pairs=24, beam=2, checkpoint_every=3, eval_k_max=2)

#: Options a resumed run may change: when to stop training, how often to checkpoint, and how the
#: final model is evaluated and decoded (see --resume in the epilog of ``--help``).
MAY_CHANGE = ("epochs", "max_minutes", "patience", "checkpoint_every", "cache_dir",
              "eval_batch_size", "eval_k_max", "beam", "length_penalty", "max_decode_len",
              "test_split", "heatmaps")

EPILOG = ("--resume continues the run in --out-dir with the options it was started with; only "
          + ", ".join("--" + k.replace("_", "-") for k in MAY_CHANGE)
          + " may differ (raise --epochs to train on; a run stopped early or by --max-minutes "
            "stays stopped). Any other change is refused, naming the option.")


def vocab_size(text: str) -> int:
    """argparse type of ``--vocab-size``: a whole number of at least 16 (the special pieces and
    the single characters need room)."""
    value = positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"{text!r} is too small a vocabulary; use at least 16")
    return int(value)


def test_split(text: str) -> str:
    """argparse type of ``--test-split``: a split name other than ``train`` (whether its files
    are present is checked when they are read)."""
    if text == "train":
        raise argparse.ArgumentTypeError("'train' is what the model is trained on; evaluate on "
                                         "val, test_2016_flickr or another test split")
    return text


def even_int(text: str) -> int:
    """argparse type of ``--hidden``: a positive even number (two encoder directions)."""
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} is odd; the LSTM state size must be even (two encoder directions)")
    return int(value)


def make_parser() -> argparse.ArgumentParser:
    p = example_parser(PROG, DESCRIPTION, "runs/translation",
                       data_example="multi30k/{train,val,test_2016_flickr}.{de,en}.gz")
    p.epilog = EPILOG
    p.add_argument("--attention", choices=MODES, default="soft", help="attention mode")
    p.add_argument("--output-layer", choices=OUTPUT_LAYERS, default="luong",
                   help="per-alignment output layer: the paper's tanh layer (luong) or a "
                        "log-linear product of a decoder and an alignment expert, whose exact "
                        "modes cost about what soft attention does (log-linear)")
    p.add_argument("--k-max", type=positive_int, default=None,
                   help="train with K-max: only the K best positions under the prior "
                        "(independent alignments only; default: all positions)")
    p.add_argument("--eval-k-max", type=nonnegative_int, default=5,
                   help="also evaluate (PPL, BLEU) with K-max at this K (0: no)")
    p.add_argument("--vocab-size", type=vocab_size, default=8000,
                   help="joint BPE vocabulary (at least 16)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the BPE model is cached (default: OUT_DIR/../cache)")
    p.add_argument("--embed", type=positive_int, default=256, help="word embedding size")
    p.add_argument("--hidden", type=even_int, default=512, help="LSTM state size (even)")
    p.add_argument("--layers", type=positive_int, default=2,
                   help="LSTM layers (encoder and decoder)")
    p.add_argument("--dropout", type=probability, default=0.3,
                   help="dropout probability of the embeddings and LSTM outputs, in [0, 1)")
    p.add_argument("--max-jump", type=positive_int, default=4,
                   help="Markov prior: jump-bias range")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sentence pairs per step "
                   "(per process under torchrun)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-decay", type=positive_float, default=0.5,
                   help="learning-rate factor after an epoch that does not improve validation")
    p.add_argument("--decay-after", type=nonnegative_int, default=None, metavar="N",
                   help="also multiply the learning rate by --lr-decay at the start of every "
                        "epoch after the first N (a fixed schedule for short budgets; default: "
                        "no fixed schedule)")
    p.add_argument("--clip", type=positive_float, default=5.0, help="gradient-norm clipping")
    p.add_argument("--epochs", type=positive_int, default=20, help="most epochs")
    p.add_argument("--patience", type=positive_int, default=3,
                   help="early stopping: epochs without a better validation perplexity")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop training after this much training time (then evaluate; "
                        "default: no limit)")
    p.add_argument("--max-train-len", type=positive_int, default=80,
                   help="leave out training pairs longer than this many subwords")
    p.add_argument("--checkpoint-every", type=positive_int, default=200, metavar="N",
                   help="write the checkpoint every N steps (and after every epoch)")
    p.add_argument("--beam", type=positive_int, default=5,
                   help="beam size at test time (1: greedy decoding)")
    p.add_argument("--length-penalty", type=nonnegative_float, default=0.0,
                   help="GNMT length penalty (0: none)")
    p.add_argument("--max-decode-len", type=positive_int, default=100,
                   help="most subwords of a translation")
    p.add_argument("--eval-batch-size", type=positive_int, default=100,
                   help="sentence pairs per batch when evaluating and decoding")
    p.add_argument("--test-split", default="test_2016_flickr", type=test_split,
                   help="the Multi30k split the test figures are measured on: any split whose "
                        "two files DATA_DIR/multi30k/NAME.{de,en}.gz are present, but train "
                        "(with --resume, a finished run is evaluated on it without training)")
    p.add_argument("--heatmaps", type=positive_int, default=3,
                   help="validation sentences in the alignment figure")
    p.add_argument("--max-bytes", type=positive_int, default=256,
                   help="MiB cap of the per-alignment output layer's chunks")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (slower; CUDA needs "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    p.add_argument("--no-tf32", action="store_true",
                   help="full float32 matrix products on GPUs (without it: TF32)")
    p.add_argument("--train-pairs", type=positive_int, default=None, metavar="N",
                   help="use only the first N training pairs (debugging; default: all)")
    p.add_argument("--eval-pairs", type=positive_int, default=None, metavar="N",
                   help="use only the first N validation and test pairs (debugging; "
                        "default: all)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``, with the smoke configuration filled in where not given, checked
    together (usage errors, exit status 2)."""
    parser = make_parser()
    args = apply_smoke(parser, parser.parse_args(argv), argv, SMOKE)
    if args.k_max is not None and args.attention in ("soft", "markov", "variational-markov"):
        parser.error(f"--k-max restricts an independent latent alignment; it does not apply to "
                     f"--attention {args.attention}")
    return args


#: What :meth:`Trainer.state` saves (``options`` too, since run options were recorded).
CHECKPOINT_KEYS = ("model", "optim", "config", "epoch", "step_in_epoch", "steps", "best_ppl",
                   "bad_epochs", "history", "train_seconds", "done", "rng")


class Trainer(EpochTrainer[Seq2Seq]):
    """The model, its optimizer and the training state, with exact checkpoints
    (:class:`~examples.common.EpochTrainer`): the best model has the lowest validation
    perplexity; a validation that does not improve it multiplies the learning rate by
    ``--lr-decay``; a run stopped early or by ``--max-minutes`` stays stopped.

    The state after any step is (model, optimizer, learning rate, epoch, step within the epoch,
    validation history, random generators); :meth:`save` writes all of it atomically and
    :meth:`load` restores it, so a resumed run takes the same next step as an uninterrupted one
    (the batch order of an epoch is a function of the seed and the epoch).
    """

    metric = "valid PPL"
    loss_unit = "/token"
    rate = "tok_s"
    budget_is_final = True

    def __init__(self, args: argparse.Namespace, model: Seq2Seq, train: Sequence[Any],
                 device: torch.device, world: int = 1, rank: int = 0,
                 valid: Sequence[Any] = (), tokenizer: Tokenizer | None = None) -> None:
        super().__init__(LoopOptions.from_args(args), model,
                         torch.optim.Adam(model.parameters(), lr=args.lr), device, world, rank)
        self.args, self.train_pairs, self.valid = args, train, valid
        self.tokenizer = tokenizer

    @property
    def best_ppl(self) -> float:
        """The lowest validation perplexity so far (``inf`` before the first validation)."""
        return -self.best[0]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        b = length_batches(self.train_pairs, self.args.batch_size, shuffle=True,
                           seed=self.args.seed * 100003 + epoch)
        return shard(b, self.rank, self.world)

    def step(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """One optimizer step on ``batch``; returns the reported loss sum (a tensor, no host
        sync) and the number of target tokens."""
        return self.optimizer_step(batch, batch.num_tokens), batch.num_tokens

    def train_on(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        return self.step(collate([self.train_pairs[i] for i in idx], idx).to(self.device))

    def validate(self) -> Validation:
        ppl = evaluate(self.model, self.valid, self.args.eval_batch_size, self.device)["ppl"]
        lr = self.optim.param_groups[0]["lr"]
        return Validation(score=(-ppl,), figures={"valid_ppl": ppl, "lr": lr},
                          summary=f"valid PPL {ppl:.3f}, lr {lr:.2e}")

    def start_epoch(self) -> None:
        """``--decay-after N``: multiply the learning rate by ``--lr-decay`` at the start of
        every epoch after the first N."""
        if self.args.decay_after is not None and self.epoch >= self.args.decay_after:
            self._decay()

    def no_improvement(self) -> None:
        self._decay()

    def _decay(self) -> None:
        for g in self.optim.param_groups:
            g["lr"] *= self.args.lr_decay

    def model_state(self) -> dict[str, Any]:
        """The model, its configuration and (when known) the tokenizer's sentencepiece model,
        so that ``best.pt`` alone is enough to translate (``translate --checkpoint``)."""
        state: dict[str, Any] = {"model": self.model.state_dict(),
                                 "config": self.model.config.as_dict()}
        if self.tokenizer is not None:
            state["tokenizer"] = self.tokenizer.model_proto
        return state

    def extra_state(self) -> dict[str, Any]:
        return {"best_ppl": self.best_ppl, "done": self.stopped,
                "options": run_options(self.args, MAY_CHANGE)}

    def load(self, path: Path) -> None:
        """Restore the state saved in the checkpoint ``path``.

        :raises ExampleError: if the file cannot be read, is not a checkpoint of this program, or
            was written for another model configuration (the message names the file).
        """
        self.restore(read_checkpoint(path, self.device), path)

    def check_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        if ModelConfig.from_dict(state["config"]).as_dict() != self.model.config.as_dict():
            raise ExampleError(f"the checkpoint {str(path)!r} was written for {state['config']}, "
                               f"not {self.model.config.as_dict()}; use the same options, or "
                               "another --out-dir")

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.best, self.stopped = (-float(state["best_ppl"]),), bool(state["done"])


def read_checkpoint(path: Path, device: torch.device, keys: Sequence[str] = CHECKPOINT_KEYS
                    ) -> dict[str, Any]:
    """The checkpoint ``path`` (``checkpoint.pt``, or ``best.pt`` with ``keys=("model",
    "config")``) as a dict.

    :raises ExampleError: if the file is missing, damaged or not a checkpoint of this program
        (the message names the file).
    """
    st = load_checkpoint(path, map_location=device)
    if not isinstance(st, dict) or not set(keys) <= st.keys():
        raise ExampleError(f"{str(path)!r} is not a checkpoint of examples.translation; delete "
                           "it or choose another --out-dir")
    return st


def evaluate(model: Seq2Seq, pairs: Sequence[Any], batch_size: int, device: torch.device,
             k_max: int | None = None) -> dict[str, float]:
    """Exact perplexity and mean prior entropy per target token (``</s>`` included)."""
    model.eval()
    old = model.attention.k_max
    if k_max is not None:
        model.attention.k_max = k_max
    try:
        nll = ent = tok = 0.0
        for idx in length_batches(pairs, batch_size, shuffle=False):
            r = model.score(collate([pairs[i] for i in idx], idx).to(device))
            nll += float(r["nll"])
            ent += float(r["entropy"])
            tok += float(r["tokens"])
    finally:
        model.attention.k_max = old
    return {"nll_per_token": nll / tok, "ppl": math.exp(nll / tok), "prior_entropy": ent / tok,
            "tokens": tok}


def translate_all(model: Seq2Seq, tok: Tokenizer, pairs: Sequence[Any], args: argparse.Namespace,
                  device: torch.device, k_max: int | None = None) -> list[str]:
    """Beam-search translations of every source sentence, in the split's order."""
    model.eval()
    old = model.attention.k_max
    if k_max is not None:
        model.attention.k_max = k_max
    out: list[str] = [""] * len(pairs)
    try:
        for idx in length_batches(pairs, args.eval_batch_size, shuffle=False):
            b = collate([pairs[i] for i in idx], idx).to(device)
            if args.beam == 1:
                ids = greedy_decode(model, b.src, b.src_mask, args.max_decode_len)
            else:
                ids = model.translate(b.src, b.src_mask, beam_size=args.beam,
                                      max_len=args.max_decode_len,
                                      length_penalty=args.length_penalty)
            for i, text in zip(idx, tok.decode(ids.tolist()), strict=True):
                out[i] = text
    finally:
        model.attention.k_max = old
    return out


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Detokenised, cased corpus BLEU (sacrebleu's defaults: 13a tokenisation)."""
    import sacrebleu

    metric = sacrebleu.BLEU()
    b = metric.corpus_score(list(hyps), [list(refs)])
    return {"bleu": b.score, "signature": str(metric.get_signature()),
            "brevity_penalty": b.bp, "sys_len": b.sys_len, "ref_len": b.ref_len}


def alignment_figure(model: Seq2Seq, tok: Tokenizer, pairs: Sequence[Any], n: int,
                     device: torch.device, path: Path) -> None:
    """Heatmaps of the prior (and the exact posterior) for the first ``n`` pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attention.plotting import plot_alignments

    model.eval()
    idx = list(range(min(n, len(pairs))))
    batch = collate([pairs[i] for i in idx], idx).to(device)
    al = model.alignments(batch)
    panels = len(al)
    fig, axes = plt.subplots(len(idx), panels, squeeze=False,
                             figsize=(4.5 * panels, 4.0 * len(idx)))
    for r, i in enumerate(idx):
        src_ids, tgt_ids = pairs[i][0], pairs[i][1] + [3]
        s, t = max(len(src_ids), 1), len(tgt_ids)
        mats = {f"{model.config.mode}: {k}": v[r, :t, :s].float().cpu() for k, v in al.items()}
        plot_alignments(mats, tok.pieces(src_ids) or ["<empty>"], tok.pieces(tgt_ids),
                        axes=list(axes[r]))
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and evaluate as the command line ``argv`` (``None``: ``sys.argv[1:]``) says; returns
    the results (``{}`` on the processes other than rank 0 of a data-parallel run).

    :raises ExampleError: for a missing or unreadable data set or checkpoint, another run's files
        in ``--out-dir`` without ``--resume``, or a resume with changed options.
    """
    args = parse_args(argv)
    with out_dir_guard(args.out_dir):
        out: dict[str, Any] = run_distributed(args, _run)
    return out


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda" and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(args.out_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_dir.parent / "cache"
    ckpt, best_path = out_dir / "checkpoint.pt", out_dir / "best.pt"
    # refuse a second run into the same folder, and a resume with other options, before any work
    saved: dict[str, Any] | None = None
    if resume_or_refuse(args.resume, ckpt, others=[best_path, out_dir / "results.json"]):
        saved = read_checkpoint(ckpt, device)
        old = saved.get("options")  # a run from before --output-layer used the tanh layer
        check_resume_options(None if old is None else {"output_layer": "luong", **old},
                             run_options(args, MAY_CHANGE), ckpt)
        check_checkpoint_world(saved, ckpt, world)

    train_raw = load_multi30k("train", args.data_dir)
    valid_raw = load_multi30k("val", args.data_dir)
    test_raw = load_multi30k(args.test_split, args.data_dir)
    if args.train_pairs:
        train_raw = type(train_raw)("train", "de", "en", train_raw.src[:args.train_pairs],
                                    train_raw.tgt[:args.train_pairs])
    if args.eval_pairs:
        valid_raw, test_raw = (type(r)(r.split, "de", "en", r.src[:args.eval_pairs],
                                       r.tgt[:args.eval_pairs]) for r in (valid_raw, test_raw))
    # every process trains the same tokenizer (deterministic); rank 0 writes the cache first
    if rank == 0:
        tok = Tokenizer.cached(train_raw.src + train_raw.tgt, args.vocab_size, cache_dir)
    if world > 1:
        dist.barrier()
    if rank != 0:
        tok = Tokenizer.cached(train_raw.src + train_raw.tgt, args.vocab_size, cache_dir)
    train_all = encode_pairs(tok, train_raw.src, train_raw.tgt)
    train = [p for p in train_all if len(p[0]) <= args.max_train_len
             and len(p[1]) < args.max_train_len]
    valid = encode_pairs(tok, valid_raw.src, valid_raw.tgt)
    test = encode_pairs(tok, test_raw.src, test_raw.tgt)
    log_main(f"Multi30k de->en: {len(train)} training pairs (of {len(train_all)}), {len(valid)} "
             f"valid, {len(test)} {args.test_split}; {tok.vocab_size} joint BPE subwords; "
             f"{world} process(es) on {device}")

    config = ModelConfig(vocab_size=tok.vocab_size, mode=args.attention, embed=args.embed,
                         hidden=args.hidden, layers=args.layers, dropout=args.dropout,
                         k_max=args.k_max, max_jump=args.max_jump,
                         max_bytes=args.max_bytes * 2**20, output_layer=args.output_layer)
    model = Seq2Seq(config).to(device)
    trainer = Trainer(args, model, train, device, world, rank, valid=valid, tokenizer=tok)
    if saved is not None:
        trainer.restore(saved, ckpt)
        log_main(f"resumed from {ckpt}: {resume_position(trainer)}")
    log_main(f"{sum(p.numel() for p in model.parameters()):,} parameters; mode {args.attention}, "
             f"{args.output_layer} output layer")

    trainer.fit(ckpt, best_path)

    identical = replicas_identical(model, world)
    if rank != 0:
        return {}
    if best_path.is_file():
        model.load_state_dict(read_checkpoint(best_path, device, ("model", "config"))["model"])
    results = _final(args, model, tok, trainer, valid, test, valid_raw, test_raw, device,
                     out_dir, identical)
    print_written(PROG, {"results": out_dir / "results.json",
                         "translations": translation_files(args, out_dir, results),
                         "figures": [out_dir / "alignments.png"],
                         "checkpoints": [ckpt, best_path]})
    return results


def translation_files(args: argparse.Namespace, out_dir: Path, results: dict[str, Any]
                      ) -> list[Path]:
    """The translation files :func:`_final` wrote."""
    files = [out_dir / f"{args.test_split}.hyp.en", out_dir / "val.hyp.en"]
    if f"test_kmax{args.eval_k_max}" in results:
        files.append(out_dir / f"{args.test_split}.kmax{args.eval_k_max}.hyp.en")
    return files


def resume_position(trainer: Trainer) -> str:
    """Where a resumed run stands, counted as the log counts: epochs from 1, and the steps of the
    epoch being trained already taken (as its progress bar starts)."""
    epochs, done = trainer.args.epochs, trainer.steps
    if trainer.stopped or trainer.epoch >= epochs:
        why = "stopped early" if trainer.stopped and trainer.epoch < epochs else "finished"
        return (f"training {why} after {trainer.epoch} complete epoch(s) of {epochs}, {done} "
                "steps in all; evaluating")
    per_epoch = len(trainer.epoch_batches(trainer.epoch))
    return (f"epoch {trainer.epoch + 1} of {epochs}, step {trainer.step_in_epoch} of "
            f"{per_epoch} of it, {done} steps in all")


def _final(args: argparse.Namespace, model: Seq2Seq, tok: Tokenizer, trainer: Trainer,
           valid: Sequence[Any], test: Sequence[Any], valid_raw: Any, test_raw: Any,
           device: torch.device, out_dir: Path, identical: bool | None = None
           ) -> dict[str, Any]:
    results: dict[str, Any] = {
        "replicas_identical": identical,
        "mode": args.attention, "config": model.config.as_dict(), "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "epochs": trainer.epoch, "steps": trainer.steps, "train_seconds": trainer.train_seconds,
        "best_valid_ppl": trainer.best_ppl, "history": trainer.history,
        "train_pairs": len(trainer.train_pairs), "beam": args.beam,
        "world_size": trainer.world, "batch_size": args.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "test_split": args.test_split,
    }
    t0 = time.perf_counter()
    results["valid"] = evaluate(model, valid, args.eval_batch_size, device)
    results["test"] = evaluate(model, test, args.eval_batch_size, device)
    hyps = translate_all(model, tok, test, args, device)
    results["test"].update(bleu(hyps, test_raw.tgt))
    atomic_write_text("\n".join(hyps) + "\n", out_dir / f"{args.test_split}.hyp.en")
    valid_hyps = translate_all(model, tok, valid, args, device)
    results["valid"].update(bleu(valid_hyps, valid_raw.tgt))
    atomic_write_text("\n".join(valid_hyps) + "\n", out_dir / "val.hyp.en")
    k = args.eval_k_max
    latent_indep = args.attention not in ("soft", "markov", "variational-markov")
    if k and latent_indep and args.k_max is None:
        kres = evaluate(model, test, args.eval_batch_size, device, k_max=k)
        khyps = translate_all(model, tok, test, args, device, k_max=k)
        kres.update(bleu(khyps, test_raw.tgt))
        atomic_write_text("\n".join(khyps) + "\n", out_dir / f"{args.test_split}.kmax{k}.hyp.en")
        results[f"test_kmax{k}"] = kres
    results["eval_seconds"] = time.perf_counter() - t0
    # every split a run was evaluated on stays in results.json (--resume --test-split NAME
    # evaluates a finished run on another one)
    results["evaluations"] = dict(_previous_evaluations(out_dir / "results.json"))
    results["evaluations"][args.test_split] = {
        k: v for k, v in results.items() if k == "test" or k.startswith("test_kmax")}
    alignment_figure(model, tok, valid, args.heatmaps, device, out_dir / "alignments.png")
    write_json(results, out_dir / "results.json")
    t = results["test"]
    log_main(f"{args.test_split}: PPL {t['ppl']:.3f}, BLEU {t['bleu']:.2f}, prior entropy "
         f"{t['prior_entropy']:.3f}; valid PPL {results['valid']['ppl']:.3f}, BLEU "
         f"{results['valid']['bleu']:.2f}; training {trainer.train_seconds:.0f} s")
    if f"test_kmax{k}" in results:
        kr = results[f"test_kmax{k}"]
        log_main(f"  K-max (K={k}): PPL {kr['ppl']:.3f}, BLEU {kr['bleu']:.2f}")
    return results


def _previous_evaluations(path: Path) -> dict[str, Any]:
    """The per-split test figures of an earlier ``results.json`` of the run (``{}`` if none or
    unreadable); one written before they were recorded gives its one ``test`` split."""
    import json

    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict):
        return {}
    evals = old.get("evaluations")
    if isinstance(evals, dict):
        return evals
    if isinstance(old.get("test"), dict) and isinstance(old.get("test_split"), str):
        return {old["test_split"]: {k: v for k, v in old.items()
                                    if k == "test" or k.startswith("test_kmax")}}
    return {}


def cli(argv: Sequence[str] | None = None) -> None:
    """``python -m examples.translation``: :func:`main` with one-line errors (:func:`run_cli`);
    ``python -m examples.translation translate ...``:
    :func:`examples.translation.translate.main`."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["translate"]:
        from . import translate

        run_cli(translate.PROG, translate.main, args[1:], resumable=False)
        return
    run_cli(PROG, main, args)
