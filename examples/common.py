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
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from .data import add_data_dir_argument

__all__ = [
    "all_reduce_sum",
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


def example_parser(prog: str, description: str, out_dir: str) -> argparse.ArgumentParser:
    """An argparse parser with the options every example has.

    :param prog: the program name shown by ``--help`` (e.g. ``"python -m examples.music"``).
    :param description: the text shown by ``--help``.
    :param out_dir: the default output folder (checkpoints, results, figures).
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_dir_argument(parser)
    parser.add_argument("--out-dir", default=out_dir, metavar="DIR",
                        help="folder for checkpoints, results (JSON) and figures (PNG)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto",
                        help="torch device: 'auto' (CUDA when available, else CPU), 'cpu', "
                             "'cuda', 'cuda:1', ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out-dir if there is one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a tiny configuration end to end in seconds (run by the tests)")
    return parser


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else -> ``torch.device(name)``.

    :raises ValueError: for a CUDA device when torch sees no GPU (the message says so).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device; use --device cpu")
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
    path = Path(path)
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
    return path


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


def load_pyro_checkpoint(path: str | os.PathLike[str], optim: Any,
                         map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Restore what :func:`save_pyro_checkpoint` saved into Pyro's parameter store, ``optim`` and
    the random generators, and return the ``extra`` values.

    Modules registered with ``pyro.module`` get their parameters back from the store the next
    time the model runs, as Pyro's own ``ParamStore.load`` does.

    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if the file is not such a checkpoint (the message names the file).
    """
    import pyro

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or not {"params", "optim", "rng", "extra"} <= state.keys():
        raise ValueError(f"{str(path)!r} is not a checkpoint written by save_pyro_checkpoint; "
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
    ``bar.set_postfix(loss=...)``. With ``disable`` it prints nothing."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True,
                leave=False, disable=disable)


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

    :raises ValueError: naming the checkpoint and both numbers.
    """
    wrote = state.get("world", 1)
    if wrote != world:
        raise ValueError(f"the checkpoint {str(path)!r} was written by {wrote} processes; resume "
                         f"it with the same number, not {world}")


def resume_or_refuse(resume: bool, path: str | os.PathLike[str]) -> bool:
    """Whether to resume from the checkpoint ``path``: ``--resume`` and the file exists.

    :raises FileExistsError: if the file exists without ``--resume`` (a new run would overwrite
        it).
    """
    exists = Path(path).is_file()
    if exists and not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that run, or choose "
                              "another --out-dir")
    return resume and exists
