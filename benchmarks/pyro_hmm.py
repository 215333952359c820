"""Benchmark: one SVI step's ``loss_and_grads`` of Pyro's polyphonic-music HMM on JSB chorales.

The model is ``model_1`` of Pyro's ``examples/hmm.py``: a first-order HMM with 16 hidden states
and 88 Bernoulli piano keys in a ``tones`` plate, the sequences in a plate at dim -2, a
``pyro.markov`` loop over the time steps masked to each sequence's length, Dirichlet / Beta
priors on the transition and emission probabilities, and a MAP (Delta) guide on them. The data are
the real JSB chorales training set (229 sequences, up to 129 steps), full batch, loaded with
:mod:`examples.data`. Four implementations of the same loss are timed side by side in one
process, on the same parameter values, after checking that their losses and gradients agree:

1. ``pyro TraceEnum_ELBO``: ``pyro.infer.TraceEnum_ELBO(max_plate_nesting=2)`` on the
   ``pyro.markov`` loop model;
2. ``plated TVE_ELBO (loop)``: ``plated.pyro.TVE_ELBO(max_plate_nesting=2)`` on the same,
   unchanged, model;
3. ``plated TVE_ELBO (markov_plate)``: ``TVE_ELBO(max_plate_nesting=2)`` on the vectorized form
   of the model: the loop body runs once inside a ``plated.pyro.markov_plate("time", T)``, and the
   88 keys' log-likelihood of every step under every hidden state is one matrix product
   (``sequences @ log-odds``), added with ``pyro.factor`` — how one vectorizes an emission;
3b. ``plated TVE_ELBO (markov_plate, Bernoulli sites)``: the literal vectorization, the loop
   body's ``Bernoulli`` site in a ``tones`` plate moved into the ``markov_plate``
   (``max_plate_nesting=3``). Same loss, but Pyro broadcasts the emission distribution to
   (states, sequences, time, keys), about 42 million entries computed and differentiated
   elementwise, which dominates its time; shown to make that cost visible;
4. ``torch forward``: a hand-written forward algorithm in plain torch (log space, batched over
   sequences, emission log-likelihoods of all steps at once, then a sequential recursion over the
   steps), plus the same prior terms, differentiated by autograd.

Each timed call is one ``loss_and_grads`` (forward and backward into the parameters'
gradients); the gradients are set to ``None`` before each call, outside the timed region.
Runs of the implementations alternate (in alternating order) so that drifts in machine load hit
them alike. Pyro's validation is off (``--validate`` turns it on for every variant).

Run from the repository root (the data folder: ``--data-dir`` or ``$PLATED_DATA``)::

    PYTHONPATH=. python benchmarks/pyro_hmm.py                  # full batch, float32
    PYTHONPATH=. python benchmarks/pyro_hmm.py --dtype float64
    PYTHONPATH=. python benchmarks/pyro_hmm.py --smoke-test     # 8 sequences, 2 repeats
    PYTHONPATH=. python benchmarks/pyro_hmm.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex
from pyro.poutine.runtime import InferDict
from torch.distributions import constraints

from benchmarks.common import Timing, fmt_ms, machine_info, text_table
from examples.data import DataError, add_data_dir_argument, load_polyphonic
from plated.pyro import TVE_ELBO, markov_plate

ENUM: InferDict = {"enumerate": "parallel"}
#: variant names, in the order of the module docstring; the first is the baseline.
PYRO, TVE_LOOP, TVE_VEC, TVE_VEC_B, TORCH = (
    "1 pyro TraceEnum_ELBO", "2 plated TVE_ELBO (loop)", "3 plated TVE_ELBO (markov_plate)",
    "3b plated TVE_ELBO (markov_plate, Bernoulli sites)", "4 torch forward")

Fn = Callable[[], float]


# ----------------------------------------------------------------------------------------------
# the model (Pyro's examples/hmm.py model_1), its vectorized form, the guide, the torch reference


def priors(sequences: torch.Tensor, hidden_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs_x`` and ``probs_y`` sampled from their priors, as in ``model_1``."""
    data_dim = sequences.shape[-1]
    eye = torch.eye(hidden_dim, dtype=sequences.dtype, device=sequences.device)
    probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * eye + 0.1).to_event(1))
    probs_y = pyro.sample("probs_y", dist.Beta(sequences.new_tensor(0.1), sequences.new_tensor(0.9))
                          .expand([hidden_dim, data_dim]).to_event(2))
    return probs_x, probs_y


def model_loop(sequences: torch.Tensor, lengths: torch.Tensor, hidden_dim: int) -> None:
    """``model_1`` of Pyro's examples/hmm.py (no subsampling, the loop over the full length)."""
    num_sequences, max_length, data_dim = sequences.shape
    probs_x, probs_y = priors(sequences, hidden_dim)
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2) as batch:
        lengths = lengths[batch]
        x: Any = 0
        for t in pyro.markov(range(max_length)):
            with poutine.mask(mask=cast(torch.BoolTensor, (t < lengths).unsqueeze(-1))):
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer=ENUM)
                with tones_plate:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]),
                                obs=sequences[batch, t])


def model_vec(sequences: torch.Tensor, lengths: torch.Tensor, hidden_dim: int) -> None:
    """The same model vectorized: one :class:`markov_plate` over time, the emission
    log-likelihood of every (sequence, step, state) by one matrix product, as a ``pyro.factor``.
    """
    num_sequences, max_length, data_dim = sequences.shape
    probs_x, probs_y = priors(sequences, hidden_dim)
    log_on, log_off = probs_y.log(), torch.log1p(-probs_y)
    emit = sequences @ (log_on - log_off).T + log_off.sum(-1)  # (sequences, time, states)
    time_plate = markov_plate("time", max_length, dim=-1)
    steps = torch.arange(max_length, device=lengths.device)
    mask = steps < lengths[:, None]  # (sequences, time)
    with pyro.plate("sequences", num_sequences, dim=-2):
        x_prev = time_plate.init("x", 0, size=hidden_dim)
        with time_plate, poutine.mask(mask=cast(torch.BoolTensor, mask)):
            x = pyro.sample("x", dist.Categorical(probs_x[x_prev]), infer=ENUM)
            pyro.factor("y", Vindex(emit)[..., x])


def model_vec_bernoulli(sequences: torch.Tensor, lengths: torch.Tensor, hidden_dim: int
                        ) -> None:
    """The loop body moved into a :class:`markov_plate` as it is, Bernoulli sites and all."""
    num_sequences, max_length, data_dim = sequences.shape
    probs_x, probs_y = priors(sequences, hidden_dim)
    time_plate = markov_plate("time", max_length, dim=-2)
    steps = torch.arange(max_length, device=lengths.device)
    mask = (steps < lengths[:, None]).unsqueeze(-1)  # (sequences, time, 1)
    with pyro.plate("sequences", num_sequences, dim=-3):
        x_prev = time_plate.init("x", 0, size=hidden_dim)
        with time_plate, poutine.mask(mask=cast(torch.BoolTensor, mask)):
            x = pyro.sample("x", dist.Categorical(probs_x[x_prev]), infer=ENUM)
            with pyro.plate("tones", data_dim, dim=-1):
                pyro.sample("y", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences)


def make_guide(init_x: torch.Tensor, init_y: torch.Tensor) -> Callable[..., None]:
    """A MAP guide (what ``AutoDelta`` builds): a Delta at a ``pyro.param`` for each prior site."""

    def guide(sequences: torch.Tensor, lengths: torch.Tensor, hidden_dim: int) -> None:
        probs_x = pyro.param("map_probs_x", init_x, constraint=constraints.simplex)
        probs_y = pyro.param("map_probs_y", init_y, constraint=constraints.unit_interval)
        pyro.sample("probs_x", dist.Delta(probs_x, event_dim=2))
        pyro.sample("probs_y", dist.Delta(probs_y, event_dim=2))

    return guide


def torch_forward_loss(sequences: torch.Tensor, lengths: torch.Tensor,
                       probs_x: torch.Tensor, probs_y: torch.Tensor) -> torch.Tensor:
    """The negative ELBO of the MAP guide by a hand-written forward algorithm.

    ``-(log p(probs_x) + log p(probs_y) + sum_n log p(y_n))``, where ``log p(y_n)`` sums out the
    hidden chain of sequence ``n`` over its first ``lengths[n]`` steps (the initial state is 0).
    """
    hidden_dim = probs_x.shape[0]
    eye = torch.eye(hidden_dim, dtype=probs_x.dtype, device=probs_x.device)
    log_prior = (dist.Dirichlet(0.9 * eye + 0.1).to_event(1).log_prob(probs_x)
                 + dist.Beta(probs_y.new_tensor(0.1), probs_y.new_tensor(0.9))
                 .expand(probs_y.shape).to_event(2).log_prob(probs_y))
    mask = torch.arange(sequences.shape[1], device=lengths.device) < lengths[:, None]
    # log p(y_t | x_t = k) for every sequence, step and state at once: (sequences, time, states)
    log_on, log_off = probs_y.log(), torch.log1p(-probs_y)
    emit = sequences @ (log_on - log_off).T + log_off.sum(-1)
    log_trans = probs_x.log()
    alpha = log_trans[0] + emit[:, 0]  # (sequences, states); x_{-1} = 0
    for t in range(1, sequences.shape[1]):
        step = torch.logsumexp(alpha.unsqueeze(-1) + log_trans, dim=-2) + emit[:, t]
        alpha = torch.where(mask[:, t, None], step, alpha)  # a finished sequence stays put
    return -(log_prior + torch.logsumexp(alpha, dim=-1).sum())


# ----------------------------------------------------------------------------------------------
# timing


def side_by_side(fns: dict[str, Fn], *, repeats: int, warmup: int, reset: Callable[[], None],
                 device: torch.device) -> dict[str, Timing]:
    """Time each of ``fns``: ``warmup`` untimed calls each, then ``repeats`` rounds alternating
    their order; ``reset()`` runs before every call, outside the timed region."""
    cuda = device.type == "cuda"

    def timed(fn: Fn) -> float:
        reset()
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for fn in fns.values():
        for _ in range(warmup):
            timed(fn)
    out = {name: Timing() for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].samples.append(timed(fns[name]))
    return out


# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one loss_and_grads of Pyro's polyphonic-music HMM (examples/hmm.py "
                    "model_1) on the JSB chorales: Pyro's TraceEnum_ELBO vs plated's TVE_ELBO "
                    "(loop and markov_plate forms) vs a hand-written torch forward algorithm.")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--hidden-dim", type=int, default=16, help="hidden states")
    p.add_argument("--num-sequences", type=int, default=None,
                   help="use the first N training sequences only (default: all 229)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: leave torch's default alone)")
    p.add_argument("--validate", action="store_true",
                   help="keep Pyro's validation (distribution arguments, NaN checks) on")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny run: 8 sequences, 2 repeats, 1 warm-up call")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial parameter values")
    add_data_dir_argument(p)
    args = p.parse_args(argv)
    if args.smoke_test:
        args.num_sequences = min(args.num_sequences or 8, 8)
        args.repeats = min(args.repeats, 2)
        args.warmup = min(args.warmup, 1)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def check_close(values: dict[str, float], grads: dict[str, list[torch.Tensor]], rtol: float
                ) -> list[str]:
    """Lines comparing each variant's loss and gradients with the first's; raises if they differ
    by more than ``rtol`` relative."""
    (ref_name, ref), *_ = values.items()
    lines, bad = [], []
    for name, v in values.items():
        rel = abs(v - ref) / abs(ref)
        gerr = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                   for a, b in zip(grads[name], grads[ref_name], strict=True))
        ok = rel <= rtol and gerr <= 10 * rtol
        lines.append(f"  {name:52s} loss {v:.10g}   rel. diff {rel:.1e}   "
                     f"max rel. grad diff {gerr:.1e}   {'ok' if ok else 'DISAGREE'}")
        if not ok:
            bad.append(name)
    print("\n".join(lines), flush=True)
    if bad:
        raise SystemExit(f"losses or gradients disagree (rtol {rtol:.0e} on the loss, "
                         f"{10 * rtol:.0e} on the gradients): {', '.join(bad)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # Pyro's models build some tensors (markov_plate's initial state, Pyro's plate indices) in
    # the default dtype and on the default device; Pyro's examples set both the same way.
    torch.set_default_dtype(dtype)
    if device.type != "cpu":
        torch.set_default_device(device)
    pyro.enable_validation(args.validate)
    pyro.clear_param_store()

    info = machine_info(device)
    command = "PYTHONPATH=. python benchmarks/pyro_hmm.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"command: {command.strip()}", flush=True)

    try:
        sequences, lengths = load_polyphonic("JSB_Chorales", "train", data_dir=args.data_dir,
                                             dtype=dtype)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.num_sequences is not None:
        sequences, lengths = sequences[:args.num_sequences], lengths[:args.num_sequences]
    max_length = int(lengths.max())
    sequences = sequences[:, :max_length].contiguous().to(device)
    lengths = lengths.to(device)
    hidden_dim = args.hidden_dim
    print(f"data: JSB chorales train, {len(lengths)} sequences, max length {max_length}, "
          f"{int(lengths.sum())} steps in all, {sequences.shape[-1]} keys; {hidden_dim} hidden "
          f"states; {args.dtype} on {device}; validation {'on' if args.validate else 'off'}",
          flush=True)

    # initial parameter values: drawn on the CPU in float64 (the same values for every dtype and
    # device), a sticky transition matrix and key probabilities around 0.1
    g = torch.Generator().manual_seed(args.seed)
    cpu64: dict[str, Any] = {"dtype": torch.float64, "device": "cpu"}
    init_x = torch.softmax(torch.randn(hidden_dim, hidden_dim, generator=g, **cpu64)
                           + 2.0 * torch.eye(hidden_dim, **cpu64), dim=-1)
    init_y = torch.sigmoid(torch.randn(hidden_dim, sequences.shape[-1], generator=g, **cpu64)
                           - 2.0)
    guide = make_guide(init_x.to(device, dtype), init_y.to(device, dtype))
    guide(sequences, lengths, hidden_dim)  # registers the parameters
    names = ("map_probs_x", "map_probs_y")
    leaves = [cast(Any, pyro.param(n)).unconstrained() for n in names]  # the optimized leaves

    def reset() -> None:
        for p in leaves:
            p.grad = None

    model_args = (sequences, lengths, hidden_dim)
    pyro_elbo = TraceEnum_ELBO(max_plate_nesting=2)
    tve_loop = TVE_ELBO(max_plate_nesting=2)
    tve_vec = TVE_ELBO(max_plate_nesting=2)
    tve_vec_b = TVE_ELBO(max_plate_nesting=3)

    def run_torch() -> float:
        probs_x, probs_y = (pyro.param(n) for n in names)
        loss = torch_forward_loss(sequences, lengths, probs_x, probs_y)
        loss.backward()
        return loss.item()

    fns: dict[str, Fn] = {
        PYRO: lambda: pyro_elbo.loss_and_grads(model_loop, guide, *model_args),
        TVE_LOOP: lambda: tve_loop.loss_and_grads(model_loop, guide, *model_args),
        TVE_VEC: lambda: tve_vec.loss_and_grads(model_vec, guide, *model_args),
        TVE_VEC_B: lambda: tve_vec_b.loss_and_grads(model_vec_bernoulli, guide, *model_args),
        TORCH: run_torch,
    }

    print("\nagreement (first call of each; loss = negative ELBO, gradients w.r.t. the "
          "unconstrained parameters, each vs variant 1):", flush=True)
    values: dict[str, float] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    for name, fn in fns.items():
        reset()
        t0 = time.perf_counter()
        values[name] = float(fn())
        first = time.perf_counter() - t0
        grads[name] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                       for p in leaves]
        print(f"  {name}: first call {first * 1e3:.0f} ms", flush=True)
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    check_close(values, grads, rtol)

    print(f"\ntiming: {args.warmup} warm-up call(s) each, then {args.repeats} alternating "
          "rounds", flush=True)
    timings = side_by_side(fns, repeats=args.repeats, warmup=args.warmup, reset=reset,
                           device=device)
    base = timings[PYRO].median
    header = ["variant", "ms median [IQR]", "n", "vs 1 (t1 / t)"]
    rows = [[name, fmt_ms(t), str(len(t.samples)), f"{base / t.median:.2f}"]
            for name, t in timings.items()]
    print("\n" + text_table(header, rows), flush=True)

    med = {name: t.median for name, t in timings.items()}
    r2, r3, r34 = med[PYRO] / med[TVE_LOOP], med[PYRO] / med[TVE_VEC], med[TVE_VEC] / med[TORCH]
    targets = [
        f"2 >= 1.5x faster than 1: {'MET' if r2 >= 1.5 else 'NOT MET'} (ratio {r2:.2f})",
        f"3 >= 10x faster than 1: {'MET' if r3 >= 10 else 'NOT MET'} (ratio {r3:.2f})",
        f"3 within 2x of 4: {'MET' if r34 <= 2 else 'NOT MET'} (3 / 4 = {r34:.2f})",
    ]
    print("\ntargets:\n" + "\n".join("  " + t for t in targets), flush=True)
    if not all(math.isfinite(v) for v in med.values()):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
