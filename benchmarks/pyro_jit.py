"""Benchmark: the compiled ELBOs, ``JitTVE_ELBO`` against Pyro's ``JitTraceEnum_ELBO``.

The model and data are ``pyro_hmm.py``'s: ``model_1`` of Pyro's ``examples/hmm.py`` (16 hidden
states, 88 Bernoulli keys in a ``tones`` plate, Dirichlet / Beta priors, a MAP guide) on the JSB
chorales training set, and its ``markov_plate`` form. Each timed call is one ``loss_and_grads``
(forward and backward into the parameters' gradients). Variants, all on the same parameter values
after checking that their losses and gradients agree:

1. ``pyro TraceEnum_ELBO`` on the ``pyro.markov`` loop model;
2. ``pyro JitTraceEnum_ELBO`` on the loop model (the baseline of the ratios);
3. ``plated TVE_ELBO`` on the loop model;
4. ``plated JitTVE_ELBO`` on the loop model;
5. ``plated TVE_ELBO`` on the ``markov_plate`` model;
6. ``plated JitTVE_ELBO`` on the ``markov_plate`` model.

The first call of a compiled variant traces and compiles the step; it is reported apart
(``first call``), then ``--warmup`` untimed calls (TorchScript's profiling executor optimizes a
compiled graph over its first two runs, which are slow), then ``--repeats`` rounds that
alternate the variants' order. Each ratio is variant 2's median over the variant's; *paired* is
the median over rounds of the per-round ratio, robust to drifts in machine load.

Run from the repository root (data: ``--data-dir`` or ``$PLATED_DATA``)::

    PYTHONPATH=. python benchmarks/pyro_jit.py                   # 229 sequences, float32
    PYTHONPATH=. python benchmarks/pyro_jit.py --num-sequences 64 --threads 1
    PYTHONPATH=. python benchmarks/pyro_jit.py --smoke-test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, cast

import pyro
import torch
from pyro.infer import JitTraceEnum_ELBO, TraceEnum_ELBO

from benchmarks.common import fmt_ms, machine_info, text_table
from benchmarks.pyro_hmm import Fn, check_close, make_guide, model_loop, model_vec, side_by_side
from examples.data import DataError, add_data_dir_argument, load_polyphonic
from plated.pyro import TVE_ELBO, JitTVE_ELBO

PYRO, PYRO_JIT, TVE, TVE_JIT, TVE_VEC, TVE_VEC_JIT = (
    "1 pyro TraceEnum_ELBO (loop)", "2 pyro JitTraceEnum_ELBO (loop)",
    "3 plated TVE_ELBO (loop)", "4 plated JitTVE_ELBO (loop)",
    "5 plated TVE_ELBO (markov_plate)", "6 plated JitTVE_ELBO (markov_plate)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one loss_and_grads of Pyro's polyphonic-music HMM on the JSB chorales: "
                    "Pyro's TraceEnum_ELBO and JitTraceEnum_ELBO vs plated's TVE_ELBO and "
                    "JitTVE_ELBO (loop and markov_plate forms).")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed calls per variant first (TorchScript optimizes a compiled step "
                        "over its first two runs)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--num-sequences", type=int, default=None,
                   help="use the first N training sequences only (default: all 229)")
    p.add_argument("--max-length", type=int, default=None,
                   help="cut the sequences to their first N steps (default: all 129)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: leave torch's default alone)")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny run: 4 sequences of at most 8 steps, 2 repeats, no warm-up")
    add_data_dir_argument(p)
    args = p.parse_args(argv)
    if args.smoke_test:
        args.num_sequences = min(args.num_sequences or 4, 4)
        args.max_length = min(args.max_length or 8, 8)
        args.repeats = min(args.repeats, 2)
        args.warmup = 0
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    pyro.enable_validation(False)
    pyro.clear_param_store()
    # torch.jit.trace is deprecated in torch 2.13; both compiled ELBOs use it
    warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info().items()), flush=True)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: PYTHONPATH=. python benchmarks/pyro_jit.py {argv_text}".strip(), flush=True)
    try:
        sequences, lengths = load_polyphonic("JSB_Chorales", "train", data_dir=args.data_dir,
                                             dtype=dtype)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.num_sequences is not None:
        sequences, lengths = sequences[:args.num_sequences], lengths[:args.num_sequences]
    if args.max_length is not None:
        lengths = lengths.clamp(max=args.max_length)
    sequences = sequences[:, :int(lengths.max())].contiguous()
    hidden = 16
    print(f"data: JSB chorales train, {len(lengths)} sequences, max length "
          f"{sequences.shape[1]}, {int(lengths.sum())} steps; {hidden} hidden states; "
          f"{args.dtype}; validation off", flush=True)

    g = torch.Generator().manual_seed(0)
    cpu64: dict[str, Any] = {"dtype": torch.float64}
    init_x = torch.softmax(torch.randn(hidden, hidden, generator=g, **cpu64)
                           + 2.0 * torch.eye(hidden, **cpu64), dim=-1)
    init_y = torch.sigmoid(torch.randn(hidden, sequences.shape[-1], generator=g, **cpu64) - 2.0)
    guide = make_guide(init_x.to(dtype), init_y.to(dtype))
    guide(sequences, lengths, hidden)
    leaves = [cast(Any, pyro.param(n)).unconstrained() for n in ("map_probs_x", "map_probs_y")]

    def reset() -> None:
        for p in leaves:
            p.grad = None

    # the compiled ELBOs take tensors in *args and everything else in **kwargs
    model_args, model_kwargs = (sequences, lengths), {"hidden_dim": hidden}
    elbos = {
        PYRO: (TraceEnum_ELBO(max_plate_nesting=2), model_loop),
        PYRO_JIT: (JitTraceEnum_ELBO(max_plate_nesting=2, ignore_jit_warnings=True), model_loop),
        TVE: (TVE_ELBO(max_plate_nesting=2), model_loop),
        TVE_JIT: (JitTVE_ELBO(max_plate_nesting=2, ignore_jit_warnings=True), model_loop),
        TVE_VEC: (TVE_ELBO(max_plate_nesting=2), model_vec),
        TVE_VEC_JIT: (JitTVE_ELBO(max_plate_nesting=2, ignore_jit_warnings=True), model_vec),
    }

    def call(elbo: Any, model: Any) -> Fn:
        return lambda: float(elbo.loss_and_grads(model, guide, *model_args, **model_kwargs))

    fns = {name: call(elbo, model) for name, (elbo, model) in elbos.items()}

    print("\nfirst call of each (a compiled variant traces and compiles here), then agreement "
          "with variant 1:", flush=True)
    values: dict[str, float] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    first: dict[str, float] = {}
    for name, fn in fns.items():
        reset()
        t0 = time.perf_counter()
        values[name] = fn()
        first[name] = time.perf_counter() - t0
        grads[name] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                       for p in leaves]
        print(f"  {name}: first call {first[name]:.2f} s", flush=True)
    check_close(values, grads, 1e-4 if dtype == torch.float32 else 1e-9)

    timings = side_by_side(fns, repeats=args.repeats, warmup=args.warmup, reset=reset,
                           device=torch.device("cpu"))
    base = timings[PYRO_JIT]
    header = ["variant", "first call s", "ms median [IQR]", "n", "vs 2 (t2 / t)",
              "paired vs 2"]
    rows = []
    for name, t in timings.items():
        paired = statistics.median(b / x for b, x in zip(base.samples, t.samples, strict=True))
        rows.append([name, f"{first[name]:.2f}", fmt_ms(t), str(len(t.samples)),
                     f"{base.median / t.median:.2f}", f"{paired:.2f}"])
    print("\n" + text_table(header, rows), flush=True)
    eager_vs_jit = statistics.median(
        a / b for a, b in zip(timings[TVE_VEC].samples, timings[TVE_VEC_JIT].samples,
                              strict=True))
    print(f"\nmarkov_plate: TVE_ELBO / JitTVE_ELBO paired {eager_vs_jit:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
