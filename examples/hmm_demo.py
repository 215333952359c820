"""A self-contained demo of the engine: fit a hidden Markov model by exact gradient ascent.

Run ``python -m examples.hmm_demo`` (``--help`` for options; ``--smoke-test``, or its older name
``--quick``, for a run of a few seconds). Nothing is downloaded and no file is written: the data
are drawn from a synthetic ground-truth HMM with a fixed seed, and the report is printed. It uses
the engine alone (:mod:`plated`), so it runs with the base install. The demo

1. draws ``--num-seqs`` sequences of ``--num-steps`` observations from a Gaussian HMM with four
   hidden states;
2. builds the model by hand as a :class:`~plated.graph.PlatedFactorGraph`: an independent plate
   ``"seq"`` over sequences and a sequential plate ``"time"`` whose chain variable is the hidden
   state ``"z"``;
3. fits the initial distribution, the transition matrix and the emission means and scales by Adam
   on the exact log-likelihood :meth:`~plated.graph.PlatedFactorGraph.log_partition`
   (differentiated through the engine's parallel scan);
4. prints the predicted cost of the elimination plan, the MAP state accuracy against the true
   hidden states (up to relabelling of the states), posterior marginals at a few time steps and a
   few exact posterior samples.

Model (one sequence; the sequence plate replicates it). The chain's previous-value dim
``"z_prev"`` at ``t = 0`` is a state :math:`z_{-1}` before the first observation, with no
observation of its own:

.. math::

    z_{-1} \\sim \\mathrm{Cat}(\\pi), \\quad z_t \\mid z_{t-1} \\sim \\mathrm{Cat}(A_{z_{t-1}}),
    \\quad x_t \\mid z_t \\sim \\mathcal{N}(\\mu_{z_t}, \\sigma_{z_t}^2),
    \\quad t = 0, \\dots, T - 1.

Summing the hidden states out of the joint gives :math:`\\log p(x)`, the graph's log partition
function.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from plated import Factor, Plate, PlatedFactorGraph

from .common import (
    HelpFormatter,
    apply_smoke,
    device_option,
    plain_text,
    positive_float,
    positive_int,
    resolve_device,
    run_cli,
)

__all__ = ["HMMParams", "best_permutation_accuracy", "build_graph", "cli", "main", "make_parser",
           "parse_args", "sample_hmm"]

PROG = "python -m examples.hmm_demo"

DESCRIPTION = """\
Fit a Gaussian hidden Markov model on synthetic data by gradient ascent on its exact
log-likelihood (tensor variable elimination with a sequential plate), then decode it: MAP states,
posterior marginals and posterior samples. Reads no data set and writes no file: the report is
printed."""

#: The ``--smoke-test`` (``--quick``) settings of the options the user did not give.
SMOKE = dict(steps=20, num_steps=50, num_seqs=4)


@dataclass
class HMMParams:
    """Unconstrained parameters of a Gaussian HMM with ``K`` states.

    :ivar init_logits: ``(K,)`` logits of the state before the chain, :math:`z_{-1}`.
    :ivar trans_logits: ``(K, K)`` transition logits, row ``i`` for the previous state ``i``.
    :ivar loc: ``(K,)`` emission means.
    :ivar log_scale: ``(K,)`` log emission standard deviations.
    """

    init_logits: torch.Tensor
    trans_logits: torch.Tensor
    loc: torch.Tensor
    log_scale: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """The four parameter tensors, e.g. to hand to an optimizer."""
        return [self.init_logits, self.trans_logits, self.loc, self.log_scale]


def true_params(num_states: int, dtype: torch.dtype, device: torch.device) -> HMMParams:
    """The ground truth: sticky transitions, well-separated but overlapping emissions."""
    k = num_states
    trans = torch.full((k, k), 0.1 / (k - 1), dtype=dtype)
    trans.fill_diagonal_(0.9)
    loc = torch.linspace(-1.5 * (k - 1), 1.5 * (k - 1), k, dtype=dtype)
    return HMMParams(
        init_logits=torch.zeros(k, dtype=dtype, device=device),
        trans_logits=trans.log().to(device),
        loc=loc.to(device),
        log_scale=torch.zeros(k, dtype=dtype, device=device),  # unit scales
    )


def sample_hmm(
    params: HMMParams, num_seqs: int, num_steps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(states, observations)``, each ``(num_seqs, num_steps)``, from the HMM ``params``.

    Sampling runs on the CPU with ``generator`` (so a seed gives the same data on every device);
    the results are moved to the parameters' device.
    """
    init = params.init_logits.detach().cpu().softmax(-1)
    trans = params.trans_logits.detach().cpu().softmax(-1)
    loc, scale = params.loc.detach().cpu(), params.log_scale.detach().cpu().exp()
    prev = torch.multinomial(init.expand(num_seqs, -1), 1, generator=generator).squeeze(-1)
    states = torch.empty(num_seqs, num_steps, dtype=torch.long)
    for t in range(num_steps):
        prev = torch.multinomial(trans[prev], 1, generator=generator).squeeze(-1)
        states[:, t] = prev
    noise = torch.randn(num_seqs, num_steps, dtype=loc.dtype, generator=generator)
    obs = loc[states] + scale[states] * noise
    device = params.loc.device
    return states.to(device), obs.to(device)


def build_graph(params: HMMParams, obs: torch.Tensor) -> PlatedFactorGraph:
    """The HMM over ``obs`` ``(S, T)`` as a plated factor graph with plates ``seq`` and ``time``.

    Three factors, all log probabilities, so the log partition function is :math:`\\log p(x)`:

    * ``(seq, z_prev)``: the distribution of :math:`z_{-1}`, the chain's state before ``t = 0``;
    * ``(seq, time, z_prev, z)``: the transition from :math:`z_{t-1}` to :math:`z_t`;
    * ``(seq, time, z)``: the emission log density :math:`\\log p(x_t \\mid z_t)`.

    The initial factor carries the ``seq`` dim: without it, :math:`z_{-1}` would be one variable
    shared by every sequence (a variable's plates are those of all the factors that mention it).
    """
    num_seqs, num_steps = obs.shape
    k = params.loc.shape[0]
    log_init = params.init_logits.log_softmax(-1)
    log_trans = params.trans_logits.log_softmax(-1)
    emission = torch.distributions.Normal(params.loc, params.log_scale.exp())
    log_emit = emission.log_prob(obs.unsqueeze(-1))  # (S, T, K)
    factors = [
        Factor(log_init.expand(num_seqs, k), ("seq", "z_prev"), name="init"),
        Factor(log_trans.expand(num_seqs, num_steps, k, k), ("seq", "time", "z_prev", "z"),
               name="transition"),
        Factor(log_emit, ("seq", "time", "z"), name="emission"),
    ]
    plates = [
        Plate("seq", num_seqs),
        Plate("time", num_steps, sequential=True, prev={"z": "z_prev"}),
    ]
    return PlatedFactorGraph(factors, plates)


def best_permutation_accuracy(
    pred: torch.Tensor, truth: torch.Tensor, num_states: int
) -> tuple[float, tuple[int, ...]]:
    """Accuracy of ``pred`` against ``truth`` under the best relabelling of the states.

    A fitted HMM's states are identified only up to permutation, so every one of the
    ``num_states!`` relabellings is tried.

    :return: ``(accuracy, perm)`` where ``perm[k]`` is the true label of fitted state ``k``.
    """
    best, best_perm = -1.0, tuple(range(num_states))
    for perm in itertools.permutations(range(num_states)):
        relabel = torch.tensor(perm, device=pred.device)
        acc = (relabel[pred] == truth).double().mean().item()
        if acc > best:
            best, best_perm = acc, perm
    return best, best_perm


def init_params(
    obs: torch.Tensor, num_states: int, generator: torch.Generator
) -> HMMParams:
    """A plain start: uniform initial and transition probabilities, emission means at evenly
    spaced quantiles of the data (in a random order, so fitted labels need not match true ones)
    and one shared scale.

    Gradient ascent, like EM, finds a local optimum; starting the means spread over the data keeps
    it from merging two states into one.
    """
    dtype, device = obs.dtype, obs.device
    levels = (torch.arange(num_states, dtype=dtype) + 0.5) / num_states
    loc = obs.flatten().cpu().quantile(levels)
    loc = loc[torch.randperm(num_states, generator=generator)]
    scale = 0.5 * obs.std().item()
    return HMMParams(
        init_logits=torch.zeros(num_states, dtype=dtype, device=device),
        trans_logits=torch.zeros(num_states, num_states, dtype=dtype, device=device),
        loc=loc.to(device),
        log_scale=torch.full((num_states,), math.log(scale), dtype=dtype, device=device),
    )


def _states_str(z: torch.Tensor) -> str:
    return "".join(str(int(v)) for v in z.tolist())


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m examples.hmm_demo``."""
    p = argparse.ArgumentParser(prog=PROG, description=plain_text(DESCRIPTION),
                                formatter_class=HelpFormatter)
    p.add_argument("--steps", type=positive_int, default=100, help="Adam steps")
    p.add_argument("--num-steps", type=positive_int, default=200,
                   help="time steps per sequence")
    p.add_argument("--num-seqs", type=positive_int, default=8, help="number of sequences")
    p.add_argument("--num-states", type=int, default=4,
                   help="hidden states, 2 to 8; the accuracy search tries all K! relabellings, "
                        "so keep it small")
    p.add_argument("--lr", type=positive_float, default=0.1, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for data, start and samples")
    p.add_argument("--device", default="cpu", type=device_option,
                   help="torch device: 'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when "
                        "available)")
    p.add_argument("--smoke-test", "--quick", action="store_true",
                   help="a very fast run (20 Adam steps on 4 x 50 observations), as the tests run "
                        "it; options given explicitly keep their values")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``, with the smoke configuration filled in where not given (usage
    errors: exit status 2)."""
    p = make_parser()
    args = apply_smoke(p, p.parse_args(argv), argv, SMOKE)
    if not 2 <= args.num_states <= 8:
        p.error(f"argument --num-states: {args.num_states} is not between 2 and 8")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the demo and print its report.

    :param argv: command-line arguments (default: ``sys.argv[1:]``).
    :return: summary numbers: ``loglik_before``, ``loglik_after`` and ``loglik_true`` (log
        likelihood per observation at the start, after fitting, and under the true parameters),
        ``map_accuracy`` and ``map_accuracy_before`` (MAP accuracy under the best relabelling),
        ``chance`` (``1 / num_states``) and ``seconds`` (wall time of the fit).
    """
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = torch.float64
    k, s, t = args.num_states, args.num_seqs, args.num_steps
    n_obs = s * t
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # posterior sampling draws from the global generator

    truth = true_params(k, dtype, device)
    states, obs = sample_hmm(truth, s, t, gen)
    print(f"data: {s} sequences x {t} time steps, {k} hidden states, Gaussian emissions "
          f"(seed {args.seed}, device {device})")
    with torch.no_grad():
        loglik_true = build_graph(truth, obs).log_partition().item() / n_obs

    params = init_params(obs, k, gen)
    for x in params.tensors():
        x.requires_grad_(True)
    with torch.no_grad():
        start_graph = build_graph(params, obs)
        loglik_before = start_graph.log_partition().item() / n_obs
        acc_before, _ = best_permutation_accuracy(start_graph.map()["z"], states, k)

    optim = torch.optim.Adam(params.tensors(), lr=args.lr)
    every = max(1, args.steps // 10)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        optim.zero_grad()
        loss = -build_graph(params, obs).log_partition() / n_obs
        loss.backward()
        optim.step()
        if step == 1 or step % every == 0 or step == args.steps:
            print(f"step {step:4d}  log-likelihood per observation {-loss.item():8.4f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        graph = build_graph(params, obs)
        loglik_after = graph.log_partition().item() / n_obs
        print()
        print(f"log-likelihood per observation: before {loglik_before:.4f}, after "
              f"{loglik_after:.4f}, true parameters {loglik_true:.4f} ({args.steps} Adam steps "
              f"in {seconds:.2f} s)")

        print()
        print("elimination plan (predicted before any tensor work):")
        print(graph.cost())

        z_map = graph.map()["z"]
        acc, perm = best_permutation_accuracy(z_map, states, k)
        print()
        print(f"MAP state accuracy: {acc:.3f} (before fitting {acc_before:.3f}, chance "
              f"{1 / k:.3f}); best relabelling fitted -> true: {list(perm)}")
        order = sorted(range(k), key=lambda j: perm[j])  # fitted states in true-label order
        loc = params.loc[order].tolist()
        scale = params.log_scale.exp()[order].tolist()
        print("fitted emission means:  " + " ".join(f"{v:6.2f}" for v in loc)
              + "   (true: " + " ".join(f"{v:.2f}" for v in truth.loc.tolist()) + ")")
        print("fitted emission scales: " + " ".join(f"{v:6.2f}" for v in scale)
              + "   (true: " + " ".join(f"{v:.2f}" for v in truth.log_scale.exp().tolist())
              + ")")
        diag = params.trans_logits.softmax(-1).diagonal()[order].tolist()
        print("fitted P(stay):         " + " ".join(f"{v:6.2f}" for v in diag)
              + "   (true: " + " ".join(f"{v:.2f}" for v in truth.trans_logits.exp().diagonal()
                                        .tolist()) + ")")

        relabel = torch.tensor(perm, device=device)
        marg = graph.marginals()["z"][0][:, order]  # sequence 0, states in true-label order
        print()
        print("posterior marginals of sequence 0 (columns: true states 0..K-1):")
        for tt in sorted({0, t // 4, t // 2, (3 * t) // 4, t - 1}):
            probs = " ".join(f"{v:.3f}" for v in marg[tt].tolist())
            print(f"  t={tt:4d}  p(z_t) = [{probs}]  true state {int(states[0, tt])}")

        samples = relabel[graph.sample(3)["z"]]  # (3, S, T), relabelled to true labels
        width = min(t, 60)
        print()
        print(f"sequence 0, first {width} time steps (states relabelled to the true labels):")
        print(f"  true      {_states_str(states[0, :width])}")
        print(f"  MAP       {_states_str(relabel[z_map][0, :width])}")
        for j in range(samples.shape[0]):
            agree = (samples[j] == states).double().mean().item()
            print(f"  sample {j}  {_states_str(samples[j, 0, :width])}  "
                  f"(agrees with truth on {agree:.3f} of all states)")

    return {
        "loglik_before": loglik_before,
        "loglik_after": loglik_after,
        "loglik_true": loglik_true,
        "map_accuracy": acc,
        "map_accuracy_before": acc_before,
        "chance": 1 / k,
        "seconds": seconds,
    }


def cli(argv: Sequence[str] | None = None) -> None:
    """``python -m examples.hmm_demo``: :func:`main` with one-line errors and a one-line Ctrl-C
    (:func:`~examples.common.run_cli`; the demo writes no checkpoint to resume from)."""
    run_cli(PROG, main, argv, resumable=False)


if __name__ == "__main__":
    cli()
