"""Polyphonic music modelling with the HMM family of the TVE paper, on the four real data sets.

``python -m examples.music --help``

Six hidden Markov models of piano rolls (88 binary keys per time step), those of Pyro's
``examples/hmm.py`` and of Sec. 6.1 of Obermeyer et al. (2019), "Tensor Variable Elimination for
Plated Factor Graphs":

========  =========================================================================================
``hmm``   HMM: :math:`x_t \\sim \\mathrm{Cat}(P_{x_{t-1}})`, each key
          :math:`y_{t,d} \\sim \\mathrm{Bernoulli}(q_{x_t, d})`
``arhmm`` autoregressive HMM: key :math:`d` also depends on itself one step back,
          :math:`q_{x_t, y_{t-1,d}, d}`
``fhmm``  factorial HMM: two independent chains :math:`w, x`, keys :math:`q_{w_t, x_t, d}`
``pfhmm`` partially factorial HMM: as ``fhmm`` but :math:`x_t` depends on :math:`w_t` too
``nnhmm`` neural-network HMM: key logits from a small network of :math:`x_t` and :math:`y_{t-1}`
``hmm2``  second-order HMM: :math:`x_t \\sim \\mathrm{Cat}(P_{x_{t-2}, x_{t-1}})`
========  =========================================================================================

Each chain starts in state 0 before the first step. The transition rows have Dirichlet priors
(concentration 2.0 on the diagonal, 1.1 elsewhere) and the key probabilities Beta(1.1, 2)
priors, and the guide is a MAP guide (``AutoDelta``) on them, as in Pyro's example; the neural
network's weights are plain parameters. The MAP values start at a draw from the priors (states
that start alike stay alike for long), and training is SVI with :class:`plated.pyro.TVE_ELBO`.

Pyro's example uses Dirichlet(0.9 on the diagonal, 0.1 elsewhere) and Beta(0.1, 0.9) priors.
Their concentrations below 1 make the prior densities, and so the MAP objective, unbounded as a
probability goes to 0: a long run drives the probabilities of keys a state never plays to 0
without end (the training loss keeps falling while the likelihood does not), until float32 gives
``log 0`` and NaN (we measured it after 833 full-batch steps on JSB). With every concentration
above 1 the MAP values stay inside the simplex and training converges.

**Vectorized.** Every model is written twice:

- the *loop* form, the way Pyro's example writes it: a ``pyro.markov`` loop over time steps with a
  ``Bernoulli`` site per step in a ``tones`` plate. Pyro's ``TraceEnum_ELBO`` and our
  ``TVE_ELBO`` both run it;
- the *vectorized* form (the default): one :class:`plated.pyro.markov_plate` over time; the 88
  keys' log-likelihood of every step under every hidden state is computed at once (a matrix
  product) and added with ``pyro.factor``. The engine eliminates the time plate by a log-depth
  parallel scan, so even Piano-midi's 3,857-step pieces run with no Python loop over time.

Both forms define the same distribution; the tests check that their losses and gradients agree,
and agree with ``TraceEnum_ELBO``.

**Reported.** The negative log-likelihood per time step, :math:`-\\log p(y) / \\sum_n T_n`, of the
train, valid and test splits under the trained (MAP) parameters, computed exactly by the engine
(the ELBO of a MAP guide with the priors left out is exactly the negative log marginal
likelihood). ``--compare-pyro`` trains the same model from the same initial values with Pyro's
``TraceEnum_ELBO`` on the loop form in the same process, and reports its numbers and the speed
ratio beside ours.

**Files** (in ``--out-dir``): ``checkpoint_tve.pt`` (and ``checkpoint_pyro.pt`` with
``--compare-pyro``; atomic, every ``--checkpoint-every`` steps; ``--resume`` continues from them,
with the same options but for the number of steps, the checkpoint interval, the evaluation batch
size, the timing repeats, ``--validate`` and ``--compare-pyro``), ``results.json``,
``map_states.png`` (the MAP hidden-state sequence over a test piano roll) and ``marginals.png``
(the posterior marginals of the hidden state of that piece). A new run refuses to start over any
of them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_sample
from pyro.ops.indexing import Vindex
from pyro.optim import Adam  # type: ignore[attr-defined]  # made at import by pyro
from pyro.poutine.runtime import InferDict
from torch import nn

from plated.pyro import TVE_ELBO, markov_plate, posterior

from .common import (
    ExampleError,
    apply_smoke,
    check_resume_options,
    example_parser,
    load_checkpoint,
    load_pyro_checkpoint,
    median_ms,
    out_dir_guard,
    positive_float,
    positive_int,
    print_written,
    progress,
    resolve_device,
    resume_or_refuse,
    run_cli,
    run_options,
    save_figure,
    save_pyro_checkpoint,
    set_seed,
    write_json,
)
from .data import POLYPHONIC, load_polyphonic

__all__ = ["MODELS", "Config", "Music", "main", "negative_log_likelihood"]

#: The program's name in its messages.
PROG = "python -m examples.music"

ENUM: InferDict = {"enumerate": "parallel"}
#: The models, in the order of the module docstring.
MODELS = ("hmm", "arhmm", "fhmm", "pfhmm", "nnhmm", "hmm2")
#: Models with two hidden chains ``w`` and ``x``.
FACTORIAL = ("fhmm", "pfhmm")
#: The default number of hidden states per chain. The factorial models' joint state has
#: ``K**2`` values and the second-order model's scan state is the pair ``(x_{t-1}, x_t)``, also
#: ``K**2``; the log-depth scan multiplies ``K**2 x K**2`` matrices, ``K**6`` work per step pair,
#: so on a CPU they get ``K = 6`` (36 joint states).
DEFAULT_HIDDEN = {"hmm": 16, "arhmm": 16, "fhmm": 6, "pfhmm": 6, "nnhmm": 16, "hmm2": 6}
#: ``--smoke-test``'s values of the options the user did not give.
SMOKE = {"steps": 3, "num_sequences": 6, "hidden": 3, "checkpoint_every": 2, "time_repeats": 2}
#: Options a resumed run may change: how long it trains and how it checkpoints, evaluates and
#: times; every other option must be the one the checkpoint was written with.
MAY_CHANGE = ("steps", "checkpoint_every", "eval_batch_size", "time_repeats", "validate",
              "compare_pyro")
#: The files of a run in ``--out-dir`` besides the checkpoints.
RUN_FILES = ("results.json", "map_states.png", "marginals.png")


@dataclass(frozen=True)
class Config:
    """The structure of one model: which of :data:`MODELS`, hidden states per chain, keys and the
    neural network's width (``nnhmm`` only)."""

    model: str = "hmm"
    hidden: int = 16
    keys: int = 88
    nn_dim: int = 48

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.hidden < 1 or self.keys < 1 or self.nn_dim < 1:
            raise ValueError(f"hidden ({self.hidden}), keys ({self.keys}) and nn_dim "
                             f"({self.nn_dim}) must be positive")


class TonesNet(nn.Module):
    """``nnhmm``'s key logits from the hidden state and the previous step's keys:
    ``logits = out(relu(W_x onehot(x) + W_y y_prev))``, for every hidden state at once."""

    def __init__(self, hidden: int, keys: int, nn_dim: int) -> None:
        super().__init__()
        self.from_x = nn.Linear(hidden, nn_dim)
        self.from_y = nn.Linear(keys, nn_dim, bias=False)
        self.out = nn.Linear(nn_dim, keys)

    def forward(self, y_prev: torch.Tensor) -> torch.Tensor:
        """:param y_prev: ``(..., keys)``. :return: logits ``(..., hidden, keys)``."""
        by_state = self.from_x.weight.T + self.from_x.bias  # (hidden, nn_dim): onehot(k) -> row k
        h = torch.relu(self.from_y(y_prev).unsqueeze(-2) + by_state)
        return cast(torch.Tensor, self.out(h))


class Music:
    """One model of :data:`MODELS` in both forms, with its MAP guide.

    :param config: the model's structure.
    :param device: where the parameters live.
    """

    def __init__(self, config: Config, device: torch.device | None = None) -> None:
        self.config = config
        self.device = device or torch.device("cpu")
        c = config
        self.net = (TonesNet(c.hidden, c.keys, c.nn_dim).to(self.device)
                    if c.model == "nnhmm" else None)
        self.guide = AutoDelta(poutine.block(
            self.model, expose_fn=lambda msg: str(msg["name"]).startswith("probs_")),
            init_loc_fn=init_to_sample)

    # ------------------------------------------------------------------------------------------
    # parameters

    def _priors(self, dtype: torch.dtype, include_prior: bool) -> dict[str, torch.Tensor]:
        """The transition and key probabilities, sampled from their priors (masked out of the
        loss when ``include_prior`` is false)."""
        c, k = self.config, self.config.hidden
        eye = torch.eye(k, dtype=dtype, device=self.device)
        row = dist.Dirichlet(0.9 * eye + 1.1)  # batch (k,), event (k,): one row per state
        beta = dist.Beta(torch.tensor(1.1, dtype=dtype, device=self.device),
                         torch.tensor(2.0, dtype=dtype, device=self.device))
        p: dict[str, torch.Tensor] = {}
        with poutine.mask(mask=include_prior):
            if c.model in FACTORIAL:
                p["probs_w"] = pyro.sample("probs_w", row.to_event(1))
            if c.model == "pfhmm":
                p["probs_x"] = pyro.sample("probs_x", row.expand([k, k]).to_event(2))
            elif c.model == "hmm2":
                p["probs_x"] = pyro.sample("probs_x", row.expand([k, k]).to_event(2))
            else:
                p["probs_x"] = pyro.sample("probs_x", row.to_event(1))
            shape = {"hmm": [k, c.keys], "arhmm": [k, 2, c.keys], "fhmm": [k, k, c.keys],
                     "pfhmm": [k, k, c.keys], "hmm2": [k, c.keys]}.get(c.model)
            if shape is not None:
                p["probs_y"] = pyro.sample("probs_y", beta.expand(shape).to_event(len(shape)))
        if self.net is not None:
            pyro.module("tones_net", self.net)
        return p

    def _emission(self, p: dict[str, torch.Tensor], seqs: torch.Tensor) -> torch.Tensor:
        """The keys' log-likelihood of every sequence, step and hidden state at once.

        :param seqs: ``(N, T, keys)`` 0/1.
        :return: ``(N, T, K)`` (``(N, T, K, K)`` over ``(w, x)`` for the factorial models).
        """
        c = self.config
        y_prev = torch.cat([torch.zeros_like(seqs[:, :1]), seqs[:, :-1]], dim=1)
        if c.model == "nnhmm":
            assert self.net is not None
            logits = self.net(y_prev)  # (N, T, K, keys)
            y = seqs.unsqueeze(-2)
            return (y * logits - nn.functional.softplus(logits)).sum(-1)
        q = p["probs_y"]
        on, off = q.log(), torch.log1p(-q)
        if c.model == "arhmm":  # q[x, y_prev_d, d]: the key's own previous value picks the table
            out = torch.zeros(())
            for a, m in ((0, 1 - y_prev), (1, y_prev)):
                out = out + (m * seqs) @ (on[:, a] - off[:, a]).T + m @ off[:, a].T
            return out
        flat_on, flat_off = on.reshape(-1, c.keys), off.reshape(-1, c.keys)
        emit = seqs @ (flat_on - flat_off).T + flat_off.sum(-1)
        return emit.reshape(*seqs.shape[:2], *q.shape[:-1])

    # ------------------------------------------------------------------------------------------
    # the model, vectorized (default) or as a pyro.markov loop

    def model(self, seqs: torch.Tensor, lengths: Sequence[int], scale: float = 1.0,
              include_prior: bool = True, vectorized: bool = True) -> None:
        """The model of ``seqs`` ``(N, T, keys)`` (0/1, zero past each ``lengths[n]``).

        :param lengths: each sequence's length, as Python ints (host-side, so the time plate's
            size needs no device sync).
        :param scale: multiplies the sequences' log-likelihood (``num_sequences / N`` for a
            minibatch of ``N``).
        :param include_prior: with ``False`` the priors are masked out, so the loss of the MAP
            guide is exactly :math:`-\\log p(\\text{seqs})`.
        :param vectorized: the :class:`markov_plate` form, else the ``pyro.markov`` loop.
        """
        p = self._priors(seqs.dtype, include_prior)
        t_max = int(max(lengths))
        if t_max > seqs.shape[1]:
            raise ValueError(f"lengths go up to {t_max} but the sequences have only "
                             f"{seqs.shape[1]} steps")
        seqs = seqs[:, :t_max]
        lens = torch.tensor(list(lengths), device=seqs.device)
        with poutine.scale(scale=scale):
            if vectorized:
                self._vectorized(p, seqs, lens)
            else:
                self._loop(p, seqs, lens)

    def _vectorized(self, p: dict[str, torch.Tensor], seqs: torch.Tensor, lens: torch.Tensor
                    ) -> None:
        c = self.config
        n, t_max, _ = seqs.shape
        emit = self._emission(p, seqs)
        eye = torch.eye(c.hidden, dtype=seqs.dtype, device=seqs.device)
        time_plate = markov_plate("time", t_max, dim=-1, history=2 if c.model == "hmm2" else 1)
        mask = torch.arange(t_max, device=seqs.device) < lens[:, None]  # (N, T)
        with pyro.plate("sequences", n, dim=-2):
            w_prev: Any = time_plate.init("w", 0, size=c.hidden) if c.model in FACTORIAL else 0
            if c.model == "hmm2":
                x_prev, x_prev2 = time_plate.init("x", 0, size=c.hidden)
            else:
                x_prev = time_plate.init("x", 0, size=c.hidden)
            # past a sequence's end every chain stays put (Pyro never masks enumerated sites,
            # so free transitions there would not change the likelihood but would pull the MAP
            # states of the shorter sequences in a padded batch)
            inside = mask.unsqueeze(-1)  # (N, T, 1)
            with time_plate, poutine.mask(mask=cast(torch.BoolTensor, mask)):
                if c.model in FACTORIAL:
                    w = pyro.sample("w", dist.Categorical(torch.where(
                        inside, p["probs_w"][w_prev], eye[w_prev])), infer=ENUM)
                if c.model == "pfhmm":
                    probs = Vindex(p["probs_x"])[w, x_prev]
                elif c.model == "hmm2":
                    probs = Vindex(p["probs_x"])[x_prev2, x_prev]
                else:
                    probs = p["probs_x"][x_prev]
                x = pyro.sample("x", dist.Categorical(torch.where(inside, probs, eye[x_prev])),
                                infer=ENUM)
                if c.model in FACTORIAL:
                    pyro.factor("y", Vindex(emit)[..., w, x])
                else:
                    pyro.factor("y", Vindex(emit)[..., x])

    def _loop(self, p: dict[str, torch.Tensor], seqs: torch.Tensor, lens: torch.Tensor) -> None:
        c = self.config
        n, t_max, keys = seqs.shape
        key_ids = torch.arange(keys, device=seqs.device)
        eye = torch.eye(c.hidden, dtype=seqs.dtype, device=seqs.device)
        tones = pyro.plate("tones", keys, dim=-1)
        logits = None
        if c.model == "nnhmm":
            assert self.net is not None
            y_prev_all = torch.cat([torch.zeros_like(seqs[:, :1]), seqs[:, :-1]], dim=1)
            logits = self.net(y_prev_all)  # (N, T, K, keys)
        with pyro.plate("sequences", n, dim=-2):
            w: Any = 0
            x: Any = 0
            x2: Any = 0
            y: Any = 0
            for t in pyro.markov(range(t_max), history=2 if c.model == "hmm2" else 1):
                inside = (t < lens).unsqueeze(-1)  # (N, 1): sequences, tones
                with poutine.mask(mask=cast(torch.BoolTensor, inside)):
                    inside = inside.unsqueeze(-1)  # and the event dim
                    if c.model in FACTORIAL:
                        w = pyro.sample(f"w_{t}", dist.Categorical(torch.where(
                            inside, p["probs_w"][w], eye[w])), infer=ENUM)
                    if c.model == "pfhmm":
                        probs = Vindex(p["probs_x"])[w, x]
                    elif c.model == "hmm2":
                        probs = Vindex(p["probs_x"])[x2, x]
                    else:
                        probs = p["probs_x"][x]
                    x2, x = x, pyro.sample(f"x_{t}", dist.Categorical(
                        torch.where(inside, probs, eye[x])), infer=ENUM)
                    with tones:
                        if c.model == "arhmm":
                            fn = dist.Bernoulli(Vindex(p["probs_y"])[x, y, key_ids])
                        elif c.model in FACTORIAL:
                            fn = dist.Bernoulli(Vindex(p["probs_y"])[w, x, key_ids])
                        elif c.model == "nnhmm":
                            assert logits is not None
                            fn = dist.Bernoulli(logits=Vindex(logits[:, t])[
                                torch.arange(n, device=seqs.device).unsqueeze(-1), x, key_ids])
                        else:
                            fn = dist.Bernoulli(p["probs_y"][x.squeeze(-1)])
                        y = pyro.sample(f"y_{t}", fn, obs=seqs[:, t]).long()


# ----------------------------------------------------------------------------------------------
# evaluation


def batches(lengths: Sequence[int], size: int, generator: torch.Generator | None = None
            ) -> list[list[int]]:
    """Minibatches of sequence indices of similar lengths (less padding): the indices sorted by
    length, cut into runs of ``size``, in random order when a ``generator`` is given."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out = [order[i:i + size] for i in range(0, len(order), size)]
    if generator is not None:
        perm = torch.randperm(len(out), generator=generator).tolist()
        out = [out[i] for i in perm]
    return out


def negative_log_likelihood(music: Music, seqs: torch.Tensor, lengths: Sequence[int],
                            batch_size: int = 64) -> float:
    """Exact :math:`-\\log p(\\text{seqs})` under the guide's MAP values (nats), summed over
    sequences, computed by the engine a batch at a time."""
    elbo = TVE_ELBO(max_plate_nesting=2)
    total = 0.0
    with torch.no_grad():
        for idx in batches(lengths, batch_size):
            lens = [lengths[i] for i in idx]
            sub = seqs[idx][:, :max(lens)]
            total += elbo.loss(music.model, music.guide, sub, lens, include_prior=False)
    return total


# ----------------------------------------------------------------------------------------------
# training


def _checkpoint_path(out_dir: Path, tag: str) -> Path:
    return out_dir / f"checkpoint_{tag}.pt"


def _check_checkpoint(path: Path, options: dict[str, Any], steps: int) -> int:
    """Read the checkpoint ``path`` and refuse to resume it with other options than it was
    written with, or with fewer ``--steps`` than it has done, before anything is built from it.

    :return: the number of steps it has done.
    :raises ExampleError: naming the file and what differs.
    """
    state = load_checkpoint(path, map_location="cpu")
    extra = state.get("extra") if isinstance(state, dict) else None
    if not isinstance(extra, dict) or not isinstance(extra.get("step"), int):
        raise ExampleError(f"{str(path)!r} is not a checkpoint written by examples.music; "
                           "delete it or choose another --out-dir")
    check_resume_options(extra.get("run_options"), options, path)
    done = int(extra["step"])
    if done > steps:
        raise ExampleError(f"the checkpoint {str(path)!r} has done {done} steps, more than "
                           f"--steps {steps}; resume with --steps {done} or more")
    return done


def _train(music: Music, elbo: Any, data: tuple[torch.Tensor, list[int]], args: Any,
           path: Path, tag: str, vectorized: bool, resume: bool) -> dict[str, Any]:
    """SVI for ``args.steps`` steps, resuming from the checkpoint ``path`` if ``resume`` (its
    options already checked by :func:`_check_checkpoint`).

    :return: the loss history and the seconds of each step.
    """
    seqs, lengths = data
    optim = Adam({"lr": args.lr})
    svi = SVI(music.model, music.guide, optim, elbo)
    state: dict[str, Any] = {"step": 0, "losses": [], "seconds": [], "epoch_batches": [],
                             "run_options": run_options(args, MAY_CHANGE)}
    if resume:
        # one traced call registers the guide's and network's parameters before their values
        # are restored
        svi.evaluate_loss(seqs[:1, :lengths[0]], lengths[:1], vectorized=vectorized)
        state = load_pyro_checkpoint(path, optim, map_location=music.device)
        state["run_options"] = run_options(args, MAY_CHANGE)
        print(f"resumed from {path}: step {state['step']} of {args.steps}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    gen_state = state.get("batch_generator")
    if gen_state is not None:
        gen.set_state(gen_state)
    pending: list[list[int]] = state["epoch_batches"]
    num = len(lengths)
    bar = progress(range(state["step"], args.steps), total=args.steps, initial=state["step"],
                   desc=f"{tag} {music.config.model}", disable=args.no_progress)
    for step in bar:
        if not pending:
            pending = batches(lengths, args.batch_size, gen)
        idx = pending.pop()
        lens = [lengths[i] for i in idx]
        sub = seqs[idx][:, :max(lens)]
        t0 = time.perf_counter()
        loss = svi.step(sub, lens, scale=num / len(idx), vectorized=vectorized)
        state["seconds"].append(time.perf_counter() - t0)
        per_step = loss / sum(lengths)
        state["losses"].append(per_step)
        state["step"] = step + 1
        bar.set_postfix(loss=f"{per_step:.3f}")
        if state["step"] % args.checkpoint_every == 0 or state["step"] == args.steps:
            state["epoch_batches"] = pending
            state["batch_generator"] = gen.get_state()
            save_pyro_checkpoint(path, optim, **state)
    bar.close()
    return state


def _evaluate(music: Music, splits: dict[str, tuple[torch.Tensor, list[int]]], batch_size: int
              ) -> dict[str, float]:
    return {name: negative_log_likelihood(music, s, lens, batch_size) / sum(lens)
            for name, (s, lens) in splits.items()}


def _plots(music: Music, seqs: torch.Tensor, lengths: list[int], out_dir: Path) -> list[str]:
    """The MAP hidden states over a test piano roll, and the posterior marginals of the hidden
    state (the product state for the factorial models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    c = music.config
    i = max(range(len(lengths)), key=lambda j: (min(lengths[j], 120), -j))
    t = lengths[i]
    roll = seqs[i:i + 1, :t]
    post = posterior(music.model, roll, [t], include_prior=False, guide=music.guide,
                     max_plate_nesting=2)
    with torch.no_grad():
        best = post.map()
        marg = post.marginals()
    x = best["x"].reshape(-1)[:t]
    title = f"{c.model}, test piece {i} ({t} steps)"
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax1.imshow(roll[0].T.cpu().numpy(), aspect="auto", origin="lower", cmap="Greys",
               interpolation="nearest")
    ax1.set_ylabel("piano key")
    ax1.set_title(f"MAP hidden states, {title}")
    if c.model in FACTORIAL:
        w = best["w"].reshape(-1)[:t]
        ax2.step(range(t), w.cpu().numpy(), where="mid", label="w")
    ax2.step(range(t), x.cpu().numpy(), where="mid", label="x")
    ax2.set_ylabel("MAP state")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))  # the states are whole numbers
    ax2.set_xlabel("time step")
    ax2.legend(loc="upper right")
    paths = [str(save_figure(fig, out_dir / "map_states.png"))]
    mx = marg["x"].reshape(-1, c.hidden)[:t]  # (T, K)
    fig, ax = plt.subplots(figsize=(10, 3))
    im = ax.imshow(mx.T.cpu().numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0,
                   vmax=1, interpolation="nearest")
    ax.set_xlabel("time step")
    ax.set_ylabel("hidden state x")
    ax.set_title(f"posterior marginals p(x_t | piece), {title}")
    fig.colorbar(im, ax=ax)
    paths.append(str(save_figure(fig, out_dir / "marginals.png")))
    return paths


def side_by_side(music: Music, data: tuple[torch.Tensor, list[int]], batch_size: int,
                 repeats: int) -> dict[str, Any]:
    """Time one ``loss_and_grads`` of ``TVE_ELBO`` on the ``markov_plate`` form and of Pyro's
    ``TraceEnum_ELBO`` on the loop form, on the same training minibatch at the current parameter
    values, alternating the two (and their order) ``repeats`` times after one untimed call each,
    so that changes in machine load hit both alike.

    :return: the median milliseconds of each, their ratio and the minibatch's size.
    """
    seqs, lengths = data
    groups = batches(lengths, batch_size)
    idx = groups[len(groups) // 2]
    lens = [lengths[i] for i in idx]
    sub = seqs[idx][:, :max(lens)]
    scale = len(lengths) / len(idx)
    fns: dict[str, tuple[Any, bool]] = {"tve": (TVE_ELBO(max_plate_nesting=2), True),
                                        "pyro": (TraceEnum_ELBO(max_plate_nesting=2), False)}
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    cuda = music.device.type == "cuda"

    def timed(name: str) -> float:
        elbo, vectorized = fns[name]
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.synchronize(music.device)
        t0 = time.perf_counter()
        elbo.loss_and_grads(music.model, music.guide, sub, lens, scale=scale,
                            vectorized=vectorized)
        if cuda:
            torch.cuda.synchronize(music.device)
        return time.perf_counter() - t0

    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name in fns:
        timed(name)
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            samples[name].append(timed(name))
    for p in params:
        p.grad = None
    ms = {name: 1000 * statistics.median(v) for name, v in samples.items()}
    return {"tve_ms": ms["tve"], "pyro_ms": ms["pyro"], "pyro_over_tve": ms["pyro"] / ms["tve"],
            "repeats": repeats, "sequences": len(idx), "padded_steps": max(lens)}


def _parser() -> argparse.ArgumentParser:
    parser = example_parser(
        PROG,
        "Train the HMM family of the TVE paper on a polyphonic-music data set with TVE_ELBO and "
        "report the exact negative log-likelihood per time step (optionally beside Pyro's "
        "TraceEnum_ELBO).", out_dir="runs/music", data_example="polyphonic/*.mat")
    parser.add_argument("--model", choices=MODELS, default="hmm",
                        help="which hidden Markov model (see the module docstring)")
    parser.add_argument("--dataset", choices=list(POLYPHONIC), default="JSB_Chorales",
                        help="which polyphonic-music data set")
    parser.add_argument("--hidden", type=positive_int, default=None,
                        help="hidden states per chain (default: 16; 6 for fhmm, pfhmm, hmm2)")
    parser.add_argument("--steps", type=positive_int, default=300, help="SVI steps")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="Adam learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="sequences per SVI step (minibatches of similar lengths)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=64,
                        help="sequences per engine call when evaluating")
    parser.add_argument("--checkpoint-every", type=positive_int, default=25,
                        help="SVI steps between checkpoints")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="floating dtype of the data and the parameters")
    parser.add_argument("--loop", action="store_true",
                        help="train the pyro.markov loop form instead of the markov_plate form")
    parser.add_argument("--compare-pyro", action="store_true",
                        help="also train the loop form with Pyro's TraceEnum_ELBO from the same "
                             "initial values, and report it beside ours")
    parser.add_argument("--validate", action="store_true",
                        help="keep Pyro's and torch's distribution validation on (off by default: "
                             "it costs time, and in float32 a long run's simplex rows drift past "
                             "its 1e-6 tolerance)")
    parser.add_argument("--time-repeats", type=positive_int, default=5,
                        help="with --compare-pyro: alternating timed loss_and_grads calls of "
                             "each ELBO after training")
    parser.add_argument("--num-sequences", type=positive_int, default=None,
                        help="use the first N sequences of each split (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the program with the command-line arguments ``argv`` (``None``: ``sys.argv[1:]``).

    :return: what it writes to ``results.json``.
    :raises ExampleError: for a run that would overwrite another (``RunExistsError``) or a
        checkpoint that cannot be resumed with these options; :class:`DataError` for missing or
        damaged data (both named in one line by :func:`run_cli`).
    """
    parser = _parser()
    args = apply_smoke(parser, parser.parse_args(argv), argv, SMOKE)
    args.hidden = args.hidden or DEFAULT_HIDDEN[args.model]  # a resume compares the real value
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    device = resolve_device(args.device)
    with out_dir_guard(args.out_dir) as out_dir:
        return _run(args, out_dir, device)


def _run(args: argparse.Namespace, out_dir: Path, device: torch.device) -> dict[str, Any]:
    tags = ["tve", "pyro"] if args.compare_pyro else ["tve"]
    # refuse to overwrite another run, and check every checkpoint before any data are read
    checkpoints = {tag: _checkpoint_path(out_dir, tag) for tag in tags}
    others = [_checkpoint_path(out_dir, "pyro"), *(out_dir / f for f in RUN_FILES)]
    resume_or_refuse(args.resume, checkpoints["tve"], others)
    options = run_options(args, MAY_CHANGE)
    resume = {tag: args.resume and path.is_file() for tag, path in checkpoints.items()}
    for tag, path in checkpoints.items():
        if resume[tag]:
            _check_checkpoint(path, options, args.steps)

    dtype = getattr(torch, args.dtype)
    splits: dict[str, tuple[torch.Tensor, list[int]]] = {}
    for split in ("train", "valid", "test"):
        s, lens = load_polyphonic(args.dataset, split, data_dir=args.data_dir, dtype=dtype)
        if args.num_sequences is not None:
            s, lens = s[:args.num_sequences], lens[:args.num_sequences]
        splits[split] = (s.to(device), lens.tolist())
    steps_total = {k: sum(v[1]) for k, v in splits.items()}
    config = Config(args.model, args.hidden, splits["train"][0].shape[-1])

    runs: list[tuple[str, Any, bool]] = [("tve", TVE_ELBO(max_plate_nesting=2), not args.loop)]
    if args.compare_pyro:
        runs.append(("pyro", TraceEnum_ELBO(max_plate_nesting=2), False))
    results: dict[str, Any] = {
        "dataset": args.dataset, "config": asdict(config), "steps": args.steps, "lr": args.lr,
        "batch_size": args.batch_size, "dtype": args.dtype, "device": str(device),
        "threads": torch.get_num_threads(), "time_steps": steps_total,
        "num_sequences": {k: len(v[1]) for k, v in splits.items()}, "runs": {}}
    music = None
    for tag, elbo, vectorized in runs:
        pyro.clear_param_store()
        set_seed(args.seed)  # the same initial values for every run
        music = Music(config, device)
        t0 = time.perf_counter()
        state = _train(music, elbo, splits["train"], args, checkpoints[tag], tag, vectorized,
                       resume[tag])
        train_s = time.perf_counter() - t0
        nll = _evaluate(music, splits, args.eval_batch_size)
        results["runs"][tag] = {
            "elbo": type(elbo).__name__, "form": "markov_plate" if vectorized else "loop",
            "nll_per_step": nll, "final_train_loss_per_step": state["losses"][-1],
            "median_ms_per_svi_step": median_ms(state["seconds"]),
            "train_seconds_this_process": train_s, "loss_history": state["losses"]}
        print(f"{tag:4s} {type(elbo).__name__:14s} {results['runs'][tag]['form']:12s} "
              f"NLL/step train {nll['train']:.4f} valid {nll['valid']:.4f} "
              f"test {nll['test']:.4f}   median {median_ms(state['seconds']):.1f} ms/step")
    if args.compare_pyro:
        ours, theirs = results["runs"]["tve"], results["runs"]["pyro"]
        results["pyro_over_tve_training_time_ratio"] = (theirs["median_ms_per_svi_step"]
                                                        / ours["median_ms_per_svi_step"])
        results["test_nll_abs_diff"] = abs(ours["nll_per_step"]["test"]
                                           - theirs["nll_per_step"]["test"])
        # plots, the timing and the saved parameters are those of our run
        pyro.clear_param_store()
        music = Music(config, device)
        svi_probe = SVI(music.model, music.guide, Adam({"lr": args.lr}),
                        TVE_ELBO(max_plate_nesting=2))
        probe_s, probe_l = splits["train"]
        svi_probe.evaluate_loss(probe_s[:1, :probe_l[0]], probe_l[:1])
        load_pyro_checkpoint(checkpoints["tve"], None, map_location=device)
        results["side_by_side"] = side_by_side(music, splits["train"], args.batch_size,
                                               args.time_repeats)
        sbs = results["side_by_side"]
        print(f"|test NLL difference| {results['test_nll_abs_diff']:.2e} nats/step; one "
              f"loss_and_grads on {sbs['sequences']} sequences x {sbs['padded_steps']} steps, "
              f"median of {sbs['repeats']} alternating: TVE_ELBO {sbs['tve_ms']:.1f} ms, "
              f"TraceEnum_ELBO {sbs['pyro_ms']:.1f} ms, ratio {sbs['pyro_over_tve']:.2f}x")
    assert music is not None
    test_s, test_l = splits["test"]
    results["figures"] = _plots(music, test_s, test_l, out_dir)
    if not all(math.isfinite(v) for r in results["runs"].values()
               for v in r["nll_per_step"].values()):
        nll = {tag: r["nll_per_step"] for tag, r in results["runs"].items()}
        raise ExampleError(f"a negative log-likelihood is not finite ({nll}); train with "
                           "--dtype float64 or a smaller --lr, in another --out-dir")
    results_path = write_json(results, out_dir / "results.json")
    print_written(PROG, {"results": results_path,
                         "checkpoints": [checkpoints[tag] for tag in tags],
                         "figures": results["figures"]})
    return results


if __name__ == "__main__":
    run_cli(PROG, main)
