"""``python -m examples.translation translate``: German sentences in, English out, with a trained
checkpoint (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ..common import ExampleError, atomic_write_text, load_checkpoint, positive_int
from .data import Tokenizer, collate, length_batches
from .model import ModelConfig, Seq2Seq, greedy_decode

__all__ = ["PROG", "load_model", "main", "make_parser", "translate_lines"]

PROG = "python -m examples.translation translate"

DESCRIPTION = """\
Translate German sentences to English with a checkpoint of "python -m examples.translation"
(RUN/best.pt, the model with the best validation perplexity, or RUN/checkpoint.pt, the latest).
Reads one sentence a line from --input (default: standard input) and writes one translation a
line, in the same order, to --output (default: standard output). Decoding is beam search under
the prior with the alignment summed out, as in the run's evaluation; --alignments-json also
writes each sentence's alignment given its translation: the exact posterior p(z_t | x, y) in
the latent modes (for the Markov prior, the chain's posterior marginals) with its argmax, or the
attention weights of soft attention."""

#: Modes without an independent latent alignment, where K-max does not apply.
_NO_KMAX = ("soft", "markov", "variational-markov")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, type=Path, metavar="FILE",
                   help="best.pt or checkpoint.pt of a run")
    p.add_argument("--input", default="-", metavar="FILE",
                   help="German sentences, one a line (UTF-8; '-' for standard input, the "
                        "default)")
    p.add_argument("--output", default="-", metavar="FILE",
                   help="where the translations go, one a line ('-' for standard output, the "
                        "default)")
    p.add_argument("--beam", type=positive_int, default=5, help="beam size (1: greedy decoding)")
    p.add_argument("--k-max", type=positive_int, default=None, metavar="K",
                   help="decode with K-max: only the K best positions under the prior "
                        "(independent latent alignments only; default: every position)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--alignments-json", type=Path, default=None, metavar="FILE",
                   help="also write each sentence's subwords and alignment as JSON")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="FILE",
                   help="the run's sentencepiece model (needed only for a checkpoint written "
                        "before checkpoints carried it: the spm-bpe*.model file of the run's "
                        "cache folder)")
    p.add_argument("--max-decode-len", type=positive_int, default=100,
                   help="most subwords of a translation")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="GNMT length penalty (0: none)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="sentences decoded together")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads(N) first (default: torch's choice)")
    return p


def _device(text: str) -> torch.device:
    """The torch device ``text``, usable here.

    :raises ExampleError: naming ``--device`` and the devices there are.
    """
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise ExampleError(f"--device {text!r} is not a torch device ({e}); use cpu or "
                           "cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExampleError(f"--device {text!r}: no CUDA device is visible; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ExampleError(f"--device {text!r}: use cpu or cuda[:N]")
    return dev


def load_model(path: Path, device: torch.device, tokenizer: Path | None = None
               ) -> tuple[Seq2Seq, Tokenizer]:
    """The model and tokenizer of the checkpoint ``path``, in evaluation mode on ``device``.

    :raises ExampleError: if the file is missing or not a checkpoint of examples.translation,
        or it carries no tokenizer and ``tokenizer`` is not given (the message names the files).
    """
    if not path.is_file():
        raise ExampleError(f"--checkpoint {str(path)!r} does not exist; give a run's best.pt "
                           "or checkpoint.pt")
    state = load_checkpoint(path, map_location=device)
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise ExampleError(f"{str(path)!r} is not a checkpoint of examples.translation")
    if tokenizer is not None:
        try:
            tok = Tokenizer(tokenizer.read_bytes())
        except Exception as e:  # noqa: BLE001 - sentencepiece and the file system raise many
            raise ExampleError(f"--tokenizer {str(tokenizer)!r} is not a sentencepiece model "
                               f"of this example ({e})") from e
    elif "tokenizer" in state:
        tok = Tokenizer(bytes(state["tokenizer"]))
    else:
        raise ExampleError(f"{str(path)!r} carries no tokenizer (written before checkpoints "
                           "did): pass --tokenizer with the spm-bpe*.model of the run's cache "
                           "folder, or resume the run once (--resume) to write it in")
    config = ModelConfig.from_dict(state["config"])
    if config.vocab_size != tok.vocab_size:
        raise ExampleError(f"the tokenizer has {tok.vocab_size} subwords but the model of "
                           f"{str(path)!r} was trained with {config.vocab_size}; use the run's "
                           "own tokenizer")
    model = Seq2Seq(config)
    dtypes = {v.dtype for v in state["model"].values() if torch.is_floating_point(v)}
    if len(dtypes) == 1:  # the precision it was trained in, whatever torch's default is now
        model = model.to(dtype=dtypes.pop())
    model = model.to(device)
    model.load_state_dict(state["model"])
    return model.eval(), tok


def _read_input(name: str) -> list[str]:
    """The lines of ``name`` ('-': standard input), without their line breaks.

    :raises ExampleError: naming the file when it cannot be read as UTF-8 text.
    """
    if name == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ExampleError(f"--input {name!r} cannot be read as UTF-8 text: {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


@torch.no_grad()
def translate_lines(model: Seq2Seq, tok: Tokenizer, lines: Sequence[str], *, beam: int = 5,
                    k_max: int | None = None, max_len: int = 100, length_penalty: float = 0.0,
                    batch_size: int = 64, device: torch.device | None = None,
                    alignments: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """Translations of ``lines``, in order, and (with ``alignments``) one record per sentence:
    its source and target subwords and its alignment matrices given the translation.

    :raises ExampleError: on ``k_max`` for a mode without an independent latent alignment.
    """
    mode = model.config.mode
    if k_max is not None and mode in _NO_KMAX:
        raise ExampleError(f"--k-max restricts an independent latent alignment; it does not "
                           f"apply to the checkpoint's mode {mode!r}")
    device = device or next(model.parameters()).device
    ids = tok.encode(lines)
    pairs: list[tuple[list[int], list[int]]] = [(src, []) for src in ids]
    hyps: list[str] = [""] * len(lines)
    hyp_ids: list[list[int]] = [[] for _ in lines]
    old = model.attention.k_max
    model.attention.k_max = k_max
    try:
        for idx in length_batches(pairs, batch_size, shuffle=False):
            b = collate([pairs[i] for i in idx], idx).to(device)
            if beam == 1:
                out = greedy_decode(model, b.src, b.src_mask, max_len)
            else:
                out = model.translate(b.src, b.src_mask, beam_size=beam, max_len=max_len,
                                      length_penalty=length_penalty)
            rows = out.tolist()
            for i, text, row in zip(idx, tok.decode(rows), rows, strict=True):
                hyps[i] = text
                hyp_ids[i] = _strip(row)
        records: list[dict[str, Any]] = []
        if alignments:
            records = _alignments(model, tok, ids, hyp_ids, lines, hyps, batch_size, device)
    finally:
        model.attention.k_max = old
    return hyps, records


def _strip(row: Sequence[int]) -> list[int]:
    """The subword ids of a decoded row, before its first ``</s>``."""
    from .data import BOS, EOS, PAD

    out = []
    for i in row:
        if i == EOS:
            break
        if i not in (PAD, BOS):
            out.append(int(i))
    return out


def _alignments(model: Seq2Seq, tok: Tokenizer, src_ids: list[list[int]],
                hyp_ids: list[list[int]], lines: Sequence[str], hyps: Sequence[str],
                batch_size: int, device: torch.device) -> list[dict[str, Any]]:
    """Per sentence: subwords and the alignment matrices of :meth:`Seq2Seq.alignments` over
    them, the target side ending in ``</s>``."""
    pairs = list(zip(src_ids, hyp_ids, strict=True))
    records: list[dict[str, Any]] = [{} for _ in pairs]
    for idx in length_batches(pairs, batch_size, shuffle=False):
        batch = collate([pairs[i] for i in idx], idx).to(device)
        mats = model.alignments(batch)
        main_key = "posterior" if "posterior" in mats else "attention"
        for r, i in enumerate(idx):
            s, t = max(len(src_ids[i]), 1), len(hyp_ids[i]) + 1  # + </s>
            rec: dict[str, Any] = {
                "source": lines[i], "translation": hyps[i],
                "source_pieces": tok.pieces(src_ids[i]),
                "target_pieces": tok.pieces(hyp_ids[i]) + ["</s>"],
                "matrix": main_key,
            }
            for key, m in mats.items():
                rec[key] = [[round(float(x), 6) for x in row] for row in m[r, :t, :s].cpu()]
            rec["argmax"] = [int(j) for j in mats[main_key][r, :t, :s].argmax(-1).cpu()]
            records[i] = rec
    return records


def _write(text: str, name: str, out: TextIO) -> None:
    if name == "-":
        out.write(text)
        out.flush()
    else:
        atomic_write_text(text, Path(name))


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Translate as the command line ``argv`` (``None``: ``sys.argv[2:]``) says; returns the
    translations.

    :raises ExampleError: for a missing or unreadable checkpoint, tokenizer or input, an unusable
        device, or ``--k-max`` for a mode it does not apply to.
    """
    args = make_parser().parse_args(sys.argv[2:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model, tok = load_model(args.checkpoint, device, args.tokenizer)
    lines = _read_input(args.input)
    hyps, records = translate_lines(
        model, tok, lines, beam=args.beam, k_max=args.k_max, max_len=args.max_decode_len,
        length_penalty=args.length_penalty, batch_size=args.batch_size, device=device,
        alignments=args.alignments_json is not None)
    _write("".join(h + "\n" for h in hyps), args.output, sys.stdout)
    if args.alignments_json is not None:
        meta = {"checkpoint": str(args.checkpoint), "mode": model.config.mode,
                "output_layer": model.config.output_layer, "beam": args.beam,
                "k_max": args.k_max}
        atomic_write_text(json.dumps({**meta, "sentences": records}, ensure_ascii=False,
                                     indent=1) + "\n", args.alignments_json)
    return hyps
