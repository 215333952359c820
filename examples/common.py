"""What every example script shares: the command line, seeding, atomic checkpoints, progress bars
and figures.

A training script built on these helpers

- takes ``--data-dir`` (default ``$PLATED_DATA``), ``--out-dir``, ``--seed``, ``--device``,
  ``--threads``, ``--resume``, ``--no-progress`` and ``--smoke-test``
  (:func:`example_parser`);
- writes every file atomically (:func:`atomic_save`, :func:`atomic_write_text`,
  :func:`save_figure`): a file is written under a temporary name in the same folder, flushed to
  disk and renamed over the target, so a crash never leaves a half-written checkpoint, results
  file or figure;
- checkpoints the whole training state, Pyro's parameter store, the optimizer's state and the
  random number generators (:func:`save_pyro_checkpoint`, :func:`load_pyro_checkpoint`), so that
  ``--resume`` continues exactly where a run stopped.

A trainer of epochs over batches of examples with a validation at the end of each
(``examples.translation``, ``examples.video_qa``) subclasses :class:`EpochTrainer`, which owns the
loop, its resumable position, the checkpoints, the best model, early stopping and the history.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import io
import json
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from .data import add_data_dir_argument

__all__ = [
    "EpochTrainer",
    "ExampleError",
    "LoopOptions",
    "Validation",
    "HelpFormatter",
    "RunExistsError",
    "all_reduce_sum",
    "apply_smoke",
    "check_resume_options",
    "device_option",
    "explicit_options",
    "load_checkpoint",
    "nonnegative_float",
    "nonnegative_int",
    "out_dir_guard",
    "plain_text",
    "positive_float",
    "positive_int",
    "print_written",
    "probability",
    "resume_command",
    "run_cli",
    "run_options",
    "atomic_save",
    "check_checkpoint_world",
    "data_parallel",
    "atomic_write_bytes",
    "atomic_write_text",
    "example_parser",
    "is_main",
    "log_main",
    "load_pyro_checkpoint",
    "median_ms",
    "progress",
    "replicas_identical",
    "run_distributed",
    "resolve_device",
    "resume_or_refuse",
    "rng_state",
    "save_figure",
    "save_pyro_checkpoint",
    "set_rng_state",
    "set_seed",
    "setup_distributed",
    "shard",
    "write_json",
]

T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=torch.nn.Module)


class ExampleError(Exception):
    """A problem with the command line, the data, the output folder or a checkpoint that the user
    can fix; :func:`run_cli` reports it in one line (program name, what is wrong, what to do)."""


class RunExistsError(ExampleError, FileExistsError):
    """The output folder holds another run's files and ``--resume`` was not given."""


# -- the command line ------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except that it adds ``(default: ...)`` only where the help
    text does not already speak of its default, and never for on/off flags or ``None``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.nargs == 0):
            return text
        return super()._get_help_string(action) or text


_SPHINX_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")


def plain_text(text: str) -> str:
    """``text`` (a docstring, say) without Sphinx markup: roles such as ``:math:`x``` and
    ``:func:`f``` become their content and double back-quotes are dropped, so ``--help`` reads
    as plain text."""
    text = _SPHINX_ROLE.sub(lambda m: m.group(1), text)
    return text.replace("``", "")


def _number(kind: type, low: float, strict: bool, high: float | None = None
            ) -> Callable[[str], Any]:
    what = {(int, True): "a positive whole number", (int, False): "a whole number >= 0",
            (float, True): "a number > 0", (float, False): "a number >= 0"}[(kind, strict)]
    if high is not None:
        what = f"a number in [{low:g}, {high:g})"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (value <= low if strict else value < low) or (high is not None and value >= high) \
                or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


#: argparse types: ``type=positive_int`` refuses 0 and negative numbers with a usage error.
positive_int = _number(int, 0, strict=True)
nonnegative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)
nonnegative_float = _number(float, 0.0, strict=False)
#: a probability such as a dropout rate, in [0, 1)
probability = _number(float, 0.0, strict=False, high=1.0)


def device_option(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or any other
    device torch knows; a name torch does not know, or CUDA on a machine where torch sees no
    GPU, is a usage error that says what to pass instead."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: torch sees no CUDA device on this machine; use --device cpu (or auto)")
    return text


def example_parser(prog: str, description: str, out_dir: str,
                   data_example: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with the options every example has.

    :param prog: the program name shown by ``--help`` (e.g. ``"python -m examples.music"``).
    :param description: the text shown by ``--help`` (Sphinx markup is removed).
    :param out_dir: the default output folder (checkpoints, results, figures).
    :param data_example: what this program reads from the data folder, for ``--data-dir``'s help
        (e.g. ``"polyphonic/*.mat"``); ``None`` for a program that reads no data set.
    """
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(description),
                                     formatter_class=HelpFormatter)
    add_data_dir_argument(parser, data_example)
    parser.add_argument("--out-dir", default=out_dir, metavar="DIR",
                        help="folder for checkpoints, results (JSON) and figures (PNG)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto", type=device_option,
                        help="torch device: 'auto' (CUDA when available, else CPU), 'cpu', "
                             "'cuda', 'cuda:1', ...")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out-dir if there is one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a tiny configuration end to end in seconds (run by the tests); "
                             "options given explicitly keep their values")
    return parser


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations (``args`` attribute names) of the options given on the command line
    ``argv`` (``None``: ``sys.argv[1:]``), as opposed to those left at their defaults."""
    actions = parser._actions  # noqa: SLF001 - argparse has no public way to list them
    saved = [a.default for a in actions]
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        given = parser.parse_args(argv)
    finally:
        for a, d in zip(actions, saved, strict=True):
            a.default = d
    return set(vars(given))


def apply_smoke(parser: argparse.ArgumentParser, args: argparse.Namespace,
                argv: Sequence[str] | None, smoke: Mapping[str, Any]) -> argparse.Namespace:
    """With ``--smoke-test``, set every option of ``smoke`` the user did not give explicitly
    (an explicit ``--epochs 5 --smoke-test`` trains 5 epochs). Returns ``args``."""
    if args.smoke_test:
        given = explicit_options(parser, argv)
        for name, value in smoke.items():
            if name not in given:
                setattr(args, name, value)
    return args


#: Options that may differ between a run and its resumption: where things are, how fast and how
#: verbosely it runs, and how long it trains.
RESUMABLE = frozenset({"resume", "data_dir", "out_dir", "device", "threads", "no_progress",
                       "smoke_test"})


def run_options(args: argparse.Namespace, may_change: Iterable[str] = ()) -> dict[str, Any]:
    """The options of ``args`` that a resumed run must share with the run it continues: all but
    :data:`RESUMABLE` and ``may_change`` (e.g. the number of steps or epochs)."""
    skip = RESUMABLE | set(may_change)
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def check_resume_options(saved: Mapping[str, Any] | None, current: Mapping[str, Any],
                         path: str | os.PathLike[str]) -> None:
    """Refuse to resume the checkpoint ``path`` with other options than it was written with.

    :param saved: :func:`run_options` of the run that wrote the checkpoint (``None``: a
        checkpoint from before options were recorded; nothing to compare).
    :raises ExampleError: naming each changed option, its old and its new value.
    """
    if saved is None:
        return
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {current.get(k)!r}"
               for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if changed:
        raise ExampleError(
            f"the checkpoint {str(path)!r} was written with other options ({'; '.join(changed)});"
            " resume with the same options, or choose another --out-dir for a new run")


def resume_command(prog: str, argv: Sequence[str] | None = None) -> str:
    """The shell command that continues this run: ``prog`` (``"python -m examples.music"``), the
    arguments ``argv`` (``None``: ``sys.argv[1:]``) and ``--resume``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    return " ".join([prog] + [shlex.quote(a) for a in args])


def run_cli(prog: str, main: Callable[[Sequence[str] | None], Any],
            argv: Sequence[str] | None = None, resumable: bool = True) -> None:
    """Run ``main(argv)`` as the program ``prog`` (``"python -m examples.music"``): a user error
    (:class:`ExampleError`, a missing or malformed data file, an unreadable or unwritable file,
    a bad value) ends in one line on stderr, ``prog: error: ...``, and exit status 1; Ctrl-C
    ends in one line that gives the ``--resume`` command to continue, and status 130. Checkpoints
    are written atomically, so the last one written before the interrupt is intact.

    :param resumable: ``False`` for a program that writes no checkpoint (``examples.hmm_demo``):
        Ctrl-C then says only ``prog: interrupted``.
    """
    name = prog.removeprefix("python -m ")
    try:
        main(argv)
    except KeyboardInterrupt:
        if resumable:
            print(f"{name}: interrupted; the last checkpoint in --out-dir is kept. Continue with: "
                  f"{resume_command(prog, argv)}", file=sys.stderr, flush=True)
        else:
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ExampleError, OSError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


@contextlib.contextmanager
def out_dir_guard(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield ``path``; if the block fails (or is interrupted) and the folder did not exist before
    it and holds no file now, remove it: a run that failed its input checks leaves nothing
    behind."""
    path = Path(path)
    existed = path.exists()
    try:
        yield path
    except BaseException:
        if not existed and path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            path.rmdir()
        raise


def print_written(prog: str, files: Mapping[str, Any]) -> None:
    """Print, from rank 0, where the run wrote its files: ``files`` maps what (``"results"``,
    ``"checkpoint"``, ``"figures"``...) to a path or a list of paths."""
    name = prog.removeprefix("python -m ")
    lines = []
    for what, where in files.items():
        paths = [where] if isinstance(where, str | os.PathLike) else list(where)
        if paths:
            lines.append(f"  {what}: {', '.join(str(p) for p in paths)}")
    log_main(f"{name}: wrote\n" + "\n".join(lines))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else -> ``torch.device(name)``.

    :raises ExampleError: for a name torch does not know, or a CUDA device when torch sees no GPU
        (the message says what to pass instead).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_option(name))
    except argparse.ArgumentTypeError as e:
        raise ExampleError(f"--device {e}") from None
    return device


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's global, and torch's generators (``pyro.set_rng_seed``); with
    ``deterministic``, also ask torch for deterministic algorithms (an op that has none raises).

    The examples draw their random numbers from torch (and Python's ``random``), whose states
    the checkpoints carry; they never use NumPy's global generator."""
    import pyro

    pyro.set_rng_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def _atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk and rename it over
    ``path``; on any failure (a full disk, Ctrl-C) the temporary file is removed and an existing
    ``path`` is left as it was.

    :raises OSError: with the errno of the failure and ``path`` as its file name.
    """
    path = Path(path)
    try:
        _write_replace(path, data)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {str(path)!r}: {e.strerror or e}",
                      str(path)) from e
    return path


def _write_replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically: written to a temporary file in the same folder,
    flushed to disk, then renamed over ``path``. Returns the path."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _atomic_write(path, buf.getvalue())


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""
    return _atomic_write(path, data)


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns the path."""
    return _atomic_write(path, text.encode("utf-8"))


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically. Returns the path."""
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it. Returns the path."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return _atomic_write(path, buf.getvalue())


def rng_state() -> dict[str, Any]:
    """The states of Python's and torch's (CPU and CUDA) random generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_pyro_checkpoint(path: str | os.PathLike[str], optim: Any, **extra: Any) -> Path:
    """Atomically save Pyro's parameter store, the optimizer's state, the random generators'
    states and ``extra`` (step counts, histories, configuration) to ``path``.

    :param optim: a :class:`pyro.optim.PyroOptim` (its ``get_state()`` is saved), or ``None``.
    """
    import pyro

    state = {"params": pyro.get_param_store().get_state(),
             "optim": None if optim is None else optim.get_state(),
             "rng": rng_state(), "extra": extra}
    return atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: str | torch.device | None = None) -> Any:
    """``torch.load(path)`` of a checkpoint this project wrote.

    :raises ExampleError: if the file is missing, truncated, corrupt or not a torch file; the
        message names the file and says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ExampleError(f"no checkpoint at {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ExampleError(f"cannot read the checkpoint {str(path)!r} ({type(e).__name__}: {e}); "
                           "it is damaged: delete it to start again, or choose another "
                           "--out-dir") from e


def load_pyro_checkpoint(path: str | os.PathLike[str], optim: Any,
                         map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Restore what :func:`save_pyro_checkpoint` saved into Pyro's parameter store, ``optim`` and
    the random generators, and return the ``extra`` values.

    Modules registered with ``pyro.module`` get their parameters back from the store the next
    time the model runs, as Pyro's own ``ParamStore.load`` does.

    :raises ExampleError: if ``path`` does not exist, cannot be read, or is not such a
        checkpoint (the message names the file).
    """
    import pyro

    path = Path(path)
    state = load_checkpoint(path, map_location)
    if not isinstance(state, dict) or not {"params", "optim", "rng", "extra"} <= state.keys():
        raise ExampleError(f"{str(path)!r} is not a checkpoint written by save_pyro_checkpoint; "
                           "delete it or choose another --out-dir")
    store = pyro.get_param_store()
    store.clear()
    store.set_state(state["params"])
    if optim is not None and state["optim"] is not None:
        optim.set_state(state["optim"])
    set_rng_state(state["rng"])
    return dict(state["extra"])


def median_ms(seconds: list[float], skip: int = 2) -> float:
    """The median of per-step times in milliseconds, leaving out the first ``skip`` steps (they
    include tracing, plan building and allocator warm-up) when there are more."""
    skip = min(skip, len(seconds) - 1)
    return 1000 * statistics.median(seconds[skip:])


def progress(iterable: Iterable[T], total: int | None = None, desc: str | None = None,
             disable: bool = False, initial: int = 0) -> Any:
    """A tqdm progress bar over ``iterable``; iterate it, and show figures with
    ``bar.set_postfix(loss=...)``. With ``disable`` it prints nothing.

    The bar is left on screen when it closes, so a log file ends with its final state
    (``100% 3/3``, or where a run stopped), not with the last refresh before the end."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True,
                leave=True, disable=disable)


# -- data parallelism (torchrun) -------------------------------------------------------------------


def is_main() -> bool:
    """Whether this process is rank 0 of a data-parallel run (or the only process)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def log_main(msg: str) -> None:
    """Print ``msg`` (flushed) from rank 0 only."""
    if is_main():
        print(msg, flush=True)


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``: joins the process group when started by ``torchrun``
    (``WORLD_SIZE`` > 1): NCCL with one GPU per local rank on CUDA, gloo on CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(x: float, device: torch.device) -> float:
    """Sum a number over the processes of a data-parallel run (itself without one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """The batches process ``rank`` of ``world`` trains on: every ``world``-th one, after cutting
    the list to a multiple of ``world`` so that every process takes the same number of steps."""
    if world == 1:
        return batches
    n = len(batches) - len(batches) % world
    return batches[rank:n:world]


def run_distributed(args: argparse.Namespace, run: Any) -> Any:
    """``run(args, rank, world, device)`` in this process's place of a data-parallel run
    (:func:`setup_distributed`; ``--threads`` applied first), leaving the process group after."""
    import torch.distributed as dist

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    try:
        return run(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def replicas_identical(module: torch.nn.Module, world: int) -> bool | None:
    """After data-parallel training, whether every process holds the same parameters (logged
    from rank 0); ``None`` for a single process."""
    import torch.distributed as dist

    if world == 1:
        return None
    flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
    got = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(got, flat)
    same = all(bool(torch.equal(got[0], g)) for g in got[1:])
    log_main(f"data parallel: the {world} replicas' parameters are "
             f"{'identical' if same else 'DIFFERENT'}")
    return same


def data_parallel(module: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` in a run of ``world`` > 1 processes
    (one device per process on CUDA), else ``module`` itself."""
    if world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def check_checkpoint_world(state: dict[str, Any], path: str | os.PathLike[str],
                           world: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes (the batch order
    and the per-process state depend on it).

    :raises ExampleError: naming the checkpoint and both numbers.
    """
    wrote = state.get("world", 1)
    if wrote != world:
        raise ExampleError(f"the checkpoint {str(path)!r} was written by {wrote} processes; resume "
                           f"it with the same number, not {world}")


def resume_or_refuse(resume: bool, path: str | os.PathLike[str],
                     others: Iterable[str | os.PathLike[str]] = ()) -> bool:
    """Whether to resume from the checkpoint ``path``: ``--resume`` and the file exists.

    :param others: the other files of a run (``results.json``, other checkpoints): a new run
        refuses to start when any of them exists either.
    :raises RunExistsError: if ``path`` or one of ``others`` exists without ``--resume``, or one
        of ``others`` exists with ``--resume`` but ``path`` does not (either way a new run would
        overwrite it).
    """
    exists = Path(path).is_file()
    if not resume:
        for p in [path, *others]:
            if Path(p).is_file():
                raise RunExistsError(f"{p} exists: pass --resume to continue that run, or "
                                     "choose another --out-dir")
    elif not exists:
        for p in others:
            if Path(p).is_file():
                raise RunExistsError(f"{p} exists but there is no checkpoint {path} to resume "
                                     "from, so a run would overwrite it; choose another "
                                     "--out-dir")
    return resume and exists


# -- the epoch loop of a trainer -------------------------------------------------------------------


@dataclass(frozen=True)
class LoopOptions:
    """How long :class:`EpochTrainer` trains, how often it checkpoints and what it shows.

    :param epochs: the most epochs (a resumed run may raise it).
    :param checkpoint_every: write the checkpoint every this many steps (and after every epoch).
    :param clip: the gradient-norm clipping of :meth:`EpochTrainer.optimizer_step`.
    :param patience: stop early after this many validations in a row without a better score
        (``None``: never).
    :param max_minutes: stop after this much training time, summed over the steps and averaged
        over the processes (``None``: no limit).
    :param progress: show a progress bar per epoch (rank 0 only).
    """

    epochs: int
    checkpoint_every: int
    clip: float
    patience: int | None = None
    max_minutes: float | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoopOptions:
        """The options of a command line with ``--epochs``, ``--checkpoint-every``, ``--clip``,
        ``--no-progress`` and, where the program has them, ``--patience`` and
        ``--max-minutes``."""
        return cls(epochs=int(args.epochs), checkpoint_every=int(args.checkpoint_every),
                   clip=float(args.clip), patience=getattr(args, "patience", None),
                   max_minutes=getattr(args, "max_minutes", None),
                   progress=not args.no_progress)


@dataclass(frozen=True)
class Validation:
    """What the validation at the end of an epoch found (:meth:`EpochTrainer.validate`).

    :param score: compared as a tuple, higher is better: a perplexity enters as ``(-ppl,)``, an
        accuracy with the NLL to break ties as ``(accuracy, -nll)``.
    :param figures: the history entry's validation figures (``{"valid_ppl": 12.3}``), between its
        ``train_loss`` and its ``train_seconds``.
    :param summary: the epoch's log line after its training loss (``"valid PPL 12.345"``).
    """

    score: tuple[float, ...]
    figures: Mapping[str, Any]
    summary: str


class EpochTrainer(abc.ABC, Generic[ModelT]):
    """The training loop of an example that trains epochs of batches and validates after each,
    with exact, resumable checkpoints.

    The state after any step is the model, the optimizer, the position (epoch, step within the
    epoch, steps in all), the best validation score, the validations since it improved, the
    history, the training time, the random generators' states and what the example adds
    (:meth:`extra_state`). :meth:`save` writes all of it atomically and :meth:`restore` puts it
    back, so a resumed run takes the same next step as an uninterrupted one, provided the batch
    order of an epoch is a function of the seed and the epoch (:meth:`epoch_batches`).

    An example supplies its batches (:meth:`epoch_batches`), one training step
    (:meth:`train_on`, usually through :meth:`optimizer_step`), the validation
    (:meth:`validate`) and its part of the checkpoints (:meth:`model_state`,
    :meth:`extra_state`, :meth:`check_checkpoint`, :meth:`restore_extra`); :meth:`start_epoch`
    and :meth:`no_improvement` are for learning-rate schedules. The class attributes below set
    what differs in the log and on resume.
    """

    #: the validation figure early stopping names: "early stop: N epochs without a better ..."
    metric: ClassVar[str] = "validation score"
    #: what the epoch's training loss is per, in its log line (``"/token"``; ``""``: per example)
    loss_unit: ClassVar[str] = ""
    #: the progress bar's name of the examples (the counts :meth:`train_on` returns) per second,
    #: e.g. ``"tok_s"`` (``None``: no rate shown)
    rate: ClassVar[str | None] = None
    #: the best score before any validation
    initial_best: ClassVar[tuple[float, ...]] = (-float("inf"),)
    #: whether the checkpoint carries the running loss of the epoch (key ``"partial"``), so that
    #: after a mid-epoch resume the epoch's training loss averages all of its steps (else only
    #: those taken after the resume)
    resume_partial: ClassVar[bool] = False
    #: whether a run that used up ``max_minutes`` stays stopped when resumed (else a resume with
    #: a larger budget trains on)
    budget_is_final: ClassVar[bool] = False

    def __init__(self, options: LoopOptions, model: ModelT, optim: torch.optim.Optimizer,
                 device: torch.device, world: int = 1, rank: int = 0) -> None:
        self.options, self.model, self.optim = options, model, optim
        self.device, self.world, self.rank = device, world, rank
        self.net = data_parallel(model, device, world)
        self.epoch, self.step_in_epoch, self.steps = 0, 0, 0
        self.best: tuple[float, ...] = self.initial_best
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.stopped = False  # early stopping (or a final budget) ended training for good
        self.partial = (0.0, 0)  # loss sum and count of the epoch so far, at the last save

    # -- what an example supplies

    @abc.abstractmethod
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of training-example indices) this process takes in ``epoch``, a
        function of the seed and ``epoch`` only."""

    @abc.abstractmethod
    def train_on(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        """One optimizer step on the batch of training examples ``idx``, counted in
        :attr:`steps`: the reported loss summed over the batch (a tensor: no host sync) and
        what the sum is over (examples or tokens)."""

    @abc.abstractmethod
    def validate(self) -> Validation:
        """Validate the model at the end of an epoch (or where the time budget ran out)."""

    @abc.abstractmethod
    def model_state(self) -> dict[str, Any]:
        """What both checkpoints hold of the model: its ``"model"`` state dict and what is
        needed to build it again (``"config"``, a vocabulary...)."""

    def extra_state(self) -> dict[str, Any]:
        """The example's own checkpoint entries (the best score and the stopped flag under its
        own keys, its options...)."""
        return {}

    def check_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """Refuse the checkpoint ``state`` read from ``path`` before anything is loaded from it.

        :raises ExampleError: if it was written for another model or other options.
        """

    def restore_extra(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved (:attr:`best`, :attr:`stopped`...)."""

    def start_epoch(self) -> None:
        """Called before the first step of every epoch (also when resumed at one)."""

    def no_improvement(self) -> None:
        """Called after a validation that did not improve the best score, before early
        stopping is considered."""

    # -- the shared parts

    def optimizer_step(self, batch: Any, count: int) -> torch.Tensor:
        """One optimizer step on ``batch``: the training loss the model returns first, divided
        by ``count``, is back-propagated, the gradient norm clipped and :attr:`steps` counted;
        returns the reported loss sum the model returns second."""
        self.model.train()
        self.optim.zero_grad(set_to_none=True)
        loss, report = self.net(batch)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.clip)
        self.optim.step()
        self.steps += 1
        out: torch.Tensor = report
        return out

    def state(self) -> dict[str, Any]:
        """The whole training state, as :meth:`save` writes it."""
        state: dict[str, Any] = {
            **self.model_state(), "optim": self.optim.state_dict(), "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "steps": self.steps,
            "bad_epochs": self.bad_epochs, "history": self.history,
            "train_seconds": self.train_seconds, "rng": rng_state(), "world": self.world}
        if self.resume_partial:
            state["partial"] = self.partial
        state.update(self.extra_state())
        return state

    def save(self, path: Path) -> None:
        """Write :meth:`state` to ``path`` atomically (rank 0 only)."""
        if is_main():
            atomic_save(self.state(), path)

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Restore the state ``state`` read from the checkpoint ``path``.

        :raises ExampleError: if :meth:`check_checkpoint` refuses it, or it was written by
            another number of processes (the message names the file).
        """
        self.check_checkpoint(state, path)
        check_checkpoint_world(state, path, self.world)
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.steps, self.bad_epochs = state["steps"], state["bad_epochs"]
        self.history, self.train_seconds = state["history"], state["train_seconds"]
        if self.resume_partial:
            loss_sum, count = state.get("partial", (0.0, 0))
            self.partial = (float(loss_sum), int(count))
        self.restore_extra(state)
        set_rng_state(state["rng"])

    def fit(self, checkpoint: Path, best: Path) -> None:
        """Train from where the state stands until ``epochs`` epochs are done, early stopping
        or the time budget ends training, writing ``checkpoint`` every ``checkpoint_every``
        steps and after every epoch, and ``best`` (:meth:`model_state` and ``"epoch"``, counted
        from 1) after every validation that improves the best score."""
        while not self.stopped and self.epoch < self.options.epochs and (
                self.budget_is_final or not self._out_of_time()):
            self._train_epoch(checkpoint, best)
        self.save(checkpoint)

    def _out_of_time(self) -> bool:
        """Whether the training-time budget is spent (a collective call: every process)."""
        budget = self.options.max_minutes
        return budget is not None and \
            all_reduce_sum(self.train_seconds, self.device) / self.world >= 60.0 * budget

    def _train_epoch(self, checkpoint: Path, best: Path) -> None:
        """The rest of the epoch :attr:`epoch` from :attr:`step_in_epoch`, or until the time
        budget is spent; then its validation, and the checkpoint."""
        # phase 1: the epoch's batches, and its running loss, continued after a mid-epoch
        # resume where the checkpoint carries it
        batches = self.epoch_batches(self.epoch)
        if self.step_in_epoch == 0:
            self.start_epoch()
        loss0, count = self.partial if self.resume_partial and self.step_in_epoch else (0.0, 0)
        report = torch.full((), loss0, device=self.device)
        bar = progress(range(self.step_in_epoch, len(batches)), total=len(batches),
                       initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}",
                       disable=not self.options.progress or not is_main())
        rate_time, rate_count = time.perf_counter(), count
        out_of_time = False
        # phase 2: the steps, each timed, with a checkpoint every checkpoint_every steps
        for i in bar:
            start = time.perf_counter()
            loss_sum, n = self.train_on(batches[i])
            report, count = report + loss_sum, count + n
            self.step_in_epoch = i + 1
            if self.steps % 25 == 0 or i + 1 == len(batches):
                shown = {"loss": f"{float(report) / max(count, 1):.3f}"}  # a sync every 25
                if self.rate is not None:
                    now = time.perf_counter()
                    shown[self.rate] = f"{(count - rate_count) / (now - rate_time):.0f}"
                    rate_time, rate_count = now, count
                bar.set_postfix(shown)
            self.train_seconds += time.perf_counter() - start
            if self.steps % self.options.checkpoint_every == 0:
                if self.resume_partial:
                    self.partial = (float(report), count)  # a host sync per checkpoint
                self.save(checkpoint)
            if self._out_of_time():
                out_of_time = True
                break
        bar.close()
        # phase 3: validate a finished epoch (or the part trained before the budget ran out),
        # move the position on and checkpoint
        train_loss = (all_reduce_sum(float(report), self.device)
                      / max(all_reduce_sum(count, self.device), 1))
        finished = self.step_in_epoch == len(batches)
        if finished or out_of_time:
            self._validate(train_loss, finished, best)
        if finished:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if out_of_time:
            log_main(f"training-time budget of {self.options.max_minutes} min reached")
            if self.budget_is_final:
                self.stopped = True
        if self.resume_partial:
            self.partial = (float(report), count)
        self.save(checkpoint)

    def _validate(self, train_loss: float, complete: bool, best: Path) -> None:
        """Validate, log and record the epoch; keep the best model; stop early by patience."""
        v = self.validate()
        entry = {"epoch": self.epoch + 1, "steps": self.steps, "train_loss": train_loss,
                 **v.figures, "train_seconds": self.train_seconds, "complete": complete}
        self.history.append(entry)
        log_main(f"epoch {self.epoch + 1}: train loss {train_loss:.4f}{self.loss_unit}, "
                 f"{v.summary}, {self.train_seconds:.0f} s")
        if v.score > self.best:
            self.best, self.bad_epochs = v.score, 0
            if is_main():
                atomic_save({**self.model_state(), "epoch": self.epoch + 1}, best)
        else:
            self.bad_epochs += 1
            self.no_improvement()
            patience = self.options.patience
            if patience is not None and self.bad_epochs >= patience:
                log_main(f"early stop: {patience} epochs without a better {self.metric}")
                self.stopped = True
