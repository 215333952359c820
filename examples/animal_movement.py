"""Animal movement: a hierarchical HMM of behavioural states on real seal tracks.

``python -m examples.animal_movement --help``

**Data** (:mod:`examples.data.seals`): the 15 southern elephant seal tracks of ``sesData.csv``
(``--dataset ses``, longitude/latitude every 9.6 h) or the northern fur seal of
``nfs_locations.csv`` and ``nfs_foragedives.csv`` (``--dataset nfs``, regularised to its hourly
dive counts). Time step ``t`` of a track is its ``t``-th location; it carries the step length to
the next location (km) and the turning angle at this location.

**Model.** Each individual ``n`` moves in one of ``K`` behavioural states :math:`x_{n,t}` (``K =
3`` by default; after training the states are sorted by their mean step length and named
*resting*, *foraging* and *travelling*). Two discrete random effects act on the transition matrix:
a *group-level* class :math:`g` shared by all individuals and an *individual-level* class
:math:`c_n`, one per individual in a plate over individuals:

.. math::

    g \\sim \\mathrm{Cat}(\\omega), \\quad c_n \\sim \\mathrm{Cat}(\\rho), \\quad
    x_{n,-1} \\sim \\mathrm{Cat}(\\pi), \\quad
    x_{n,t} \\mid x_{n,t-1} \\sim \\mathrm{Cat}(\\mathrm{softmax}(
        B_{x_{n,t-1}} + E^{grp}_{g,x_{n,t-1}} + E^{ind}_{c_n,x_{n,t-1}})),

    \\mathrm{step}_{n,t} \\sim \\mathrm{Gamma}(\\text{mean } \\mu_{x}, \\text{sd } \\sigma_{x}),
    \\quad \\mathrm{angle}_{n,t} \\sim \\mathrm{VonMises}(\\lambda_{x}, \\kappa_{x}), \\quad
    [\\mathrm{dive}_{n,t} \\sim \\mathrm{Bernoulli}(q_x)\\ \\text{of}\\ \\mathrm{dives} > 0
    \\ \\text{or}\\ \\mathrm{Poisson}(r_x)\\ \\text{of the count (nfs)}].

``--random-effects`` keeps both (``both``, the default), one (``individual``, ``group``) or none
of the effects. Missing observations (the first and last turning angles, the fur seal's
unsupported hours) and every observation past a track's end are masked with ``poutine.mask``.
Past a track's end the state stays put (an identity transition): a mask cannot do that, because
Pyro never masks enumerated sites, and with the fitted transitions there the padded steps would
leave the likelihood unchanged (their transitions sum to one) but would pull the MAP path and
the MAP classes of the shorter tracks (their maximum is below one).
Every discrete variable (:math:`g`, :math:`c_n`, the states) is enumerated and summed out exactly
by :class:`plated.pyro.TVE_ELBO`: the plate tree is group class -> individuals -> time, and the
engine eliminates the chain over time (a :class:`plated.pyro.markov_plate`) by a log-depth parallel
scan, so the model body runs once for all time steps.

**Estimation** is by maximum likelihood: every parameter is a ``pyro.param`` (no priors), the guide
is empty, and SVI with Adam minimises ``TVE_ELBO``'s loss, which for this model is exactly
:math:`-\\log p(\\text{data})`. The model also has a ``pyro.markov`` loop form
(``vectorized=False``), the way Pyro writes an HMM, which Pyro's ``TraceEnum_ELBO`` can run; the
tests check that both forms and both ELBOs agree.

**Reported** (``results.json``): the exact log-likelihood of the data from the engine
(:meth:`plated.pyro.Posterior.log_likelihood`), each individual's own log-likelihood (its track
alone under the fitted model: the group class is summed out per individual, so these add up to
the total only without a group class, which couples the individuals), each individual's MAP state
occupancy (the fraction of its locations in each state along the joint MAP path of
:meth:`plated.pyro.Posterior.map`) and posterior-mean occupancy, the posterior of each
individual's class and of the group class, and the fitted parameters in the sorted state order.

**Files** (in ``--out-dir``): ``checkpoint.pt`` (atomic, every ``--checkpoint-every`` steps and at
the end; ``--resume`` continues from it, with the same options but for ``--steps`` and
``--checkpoint-every``), ``results.json``, ``tracks.png`` (the tracks coloured by MAP state, with
the step-length distributions) and ``loss.png`` (the training curve). Without ``--resume`` a run
refuses an ``--out-dir`` that holds any of these files.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.ops.indexing import Vindex
from pyro.optim import PyroOptim
from pyro.poutine.runtime import InferDict
from torch.distributions import constraints

from plated.pyro import TVE_ELBO, markov_plate, posterior

from .common import (
    ExampleError,
    apply_smoke,
    check_resume_options,
    example_parser,
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
from .data.seals import NFS_DIVES, NFS_LOCATIONS, SES_FILE, Tracks, load_nfs, load_ses

__all__ = ["DATASETS", "DIVE_MODELS", "RANDOM_EFFECTS", "Config", "MovementHMM", "guide",
           "load_tracks", "main", "state_names"]

ENUM: InferDict = {"enumerate": "parallel"}
#: The data sets: ``ses`` (15 southern elephant seals), ``nfs`` (one northern fur seal, dives).
DATASETS = ("ses", "nfs")
#: Which discrete random effects act on the transition matrix.
RANDOM_EFFECTS = ("none", "individual", "group", "both")
#: How the fur seal's hourly dive counts are modelled.
DIVE_MODELS = ("bernoulli", "poisson")
#: The plate dims: individuals at -2 and time at -1 in the markov_plate form; individuals at -1
#: in the loop form.
NESTING = {True: 2, False: 1}


@dataclass(frozen=True)
class Config:
    """The structure of the model.

    :ivar states: ``K``, the number of behavioural states.
    :ivar random_effects: one of :data:`RANDOM_EFFECTS`.
    :ivar individual_classes: ``C``, the values of each individual's class ``c_n``.
    :ivar group_classes: ``G``, the values of the group class ``g``.
    :ivar dive: ``None`` (no dive emission), or one of :data:`DIVE_MODELS`.
    """

    states: int = 3
    random_effects: str = "both"
    individual_classes: int = 3
    group_classes: int = 2
    dive: str | None = None

    def __post_init__(self) -> None:
        if self.random_effects not in RANDOM_EFFECTS:
            raise ValueError(f"unknown random effects {self.random_effects!r}; choose one of "
                             f"{', '.join(RANDOM_EFFECTS)}")
        if self.dive is not None and self.dive not in DIVE_MODELS:
            raise ValueError(f"unknown dive model {self.dive!r}; choose one of "
                             f"{', '.join(DIVE_MODELS)}")
        for name in ("states", "individual_classes", "group_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def individual(self) -> bool:
        """Whether each individual has a latent class."""
        return self.random_effects in ("individual", "both")

    @property
    def group(self) -> bool:
        """Whether there is a latent group class."""
        return self.random_effects in ("group", "both")


def guide(*args: Any, **kwargs: Any) -> None:
    """The empty guide: every latent variable of the model is enumerated, every parameter is a
    ``pyro.param`` of the model (maximum likelihood)."""
    return None


def state_names(k: int) -> list[str]:
    """Names of the states sorted by mean step length: resting, foraging, travelling for
    ``k = 3``; ``state 0``, ``state 1``, ... otherwise."""
    return ["resting", "foraging", "travelling"] if k == 3 else [f"state {i}" for i in range(k)]


class MovementHMM:
    """The hierarchical movement HMM of the module docstring, in both forms.

    Parameters are ``pyro.param`` sites named as in :meth:`params`; their initial values are
    taken from the data (step-length quantiles) and from ``generator`` (random class effects, so
    that the classes differ).

    :param config: the model's structure.
    :param data: the tracks whose step lengths set the initial step-length means.
    :param generator: the random generator for the initial class effects.
    """

    def __init__(self, config: Config, data: Tracks, generator: torch.Generator | None = None
                 ) -> None:
        if config.dive is not None and data.dive is None:
            raise ValueError(f"Config.dive={config.dive!r} but the tracks have no dive data "
                             f"(files {', '.join(data.files)})")
        self.config = config
        self.init = self.initial_values(config, data, generator)

    @staticmethod
    def initial_values(config: Config, data: Tracks, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        """The parameters' initial values (constrained), on the data's device and dtype."""
        k, c, g = config.states, config.individual_classes, config.group_classes
        like = data.step
        steps = data.step[data.step_mask]
        if steps.numel() == 0:
            raise ValueError("the tracks have no observed step length to initialise from")
        levels = (torch.arange(k, dtype=like.dtype, device=like.device) + 0.5) / k
        mean = torch.quantile(steps, levels)
        init = {
            "init_probs": torch.full((k,), 1.0 / k),
            "trans_logits": 2.0 * torch.eye(k),
            "step_mean": mean.detach().cpu().to(torch.float64),
            "step_sd": mean.detach().cpu().to(torch.float64),
            "angle_loc": torch.zeros(k),
            "angle_concentration": torch.logspace(math.log10(0.3), math.log10(3.0), k),
        }
        if config.individual:
            init["individual_class_probs"] = torch.full((c,), 1.0 / c)
            init["individual_effect"] = 0.5 * torch.randn(c, k, k, generator=generator,
                                                          dtype=torch.float64)
        if config.group:
            init["group_class_probs"] = torch.full((g,), 1.0 / g)
            init["group_effect"] = 0.5 * torch.randn(g, k, k, generator=generator,
                                                     dtype=torch.float64)
        if config.dive == "bernoulli":
            init["dive_probs"] = torch.linspace(0.2, 0.5, k)
        elif config.dive == "poisson":
            init["dive_rate"] = torch.linspace(0.5, 2.0, k)
        return {name: v.to(device=like.device, dtype=like.dtype) for name, v in init.items()}

    CONSTRAINTS: dict[str, constraints.Constraint] = {
        "init_probs": constraints.simplex,
        "individual_class_probs": constraints.simplex,
        "group_class_probs": constraints.simplex,
        "step_mean": constraints.positive,
        "step_sd": constraints.positive,
        "angle_concentration": constraints.positive,
        "dive_probs": constraints.unit_interval,
        "dive_rate": constraints.positive,
    }

    def params(self) -> dict[str, torch.Tensor]:
        """The parameters (``pyro.param`` sites), constrained:

        - ``init_probs`` ``(K,)``: the state before the first location;
        - ``trans_logits`` ``(K, K)``: the base transition logits ``B`` (row: from);
        - ``individual_class_probs`` ``(C,)``, ``individual_effect`` ``(C, K, K)``;
        - ``group_class_probs`` ``(G,)``, ``group_effect`` ``(G, K, K)``;
        - ``step_mean``, ``step_sd`` ``(K,)`` (km); ``angle_loc``, ``angle_concentration``
          ``(K,)``; ``dive_probs`` or ``dive_rate`` ``(K,)``.
        """
        return {name: pyro.param(name, value, constraint=self.CONSTRAINTS.get(name,
                                                                             constraints.real))
                for name, value in self.init.items()}

    # ------------------------------------------------------------------------------------------
    # the model

    def model(self, data: Tracks, vectorized: bool = True) -> None:
        """The model of ``data`` (``N`` tracks of ``T`` time steps).

        :param vectorized: the :class:`~plated.pyro.markov_plate` form (plates: individuals at
            dim -2, time at -1; ``max_plate_nesting=2``), else the ``pyro.markov`` loop form
            (individuals at dim -1; ``max_plate_nesting=1``), which Pyro's ``TraceEnum_ELBO``
            can run.
        """
        cfg = self.config
        p = self.params()
        n, t_max = data.step.shape
        obs = self._observations(data)
        g = (pyro.sample("group_class", dist.Categorical(p["group_class_probs"]), infer=ENUM)
             if cfg.group else None)
        with pyro.plate("individuals", n, dim=-2 if vectorized else -1):
            c = (pyro.sample("individual_class", dist.Categorical(p["individual_class_probs"]),
                             infer=ENUM) if cfg.individual else None)
            logits = p["trans_logits"]
            if g is not None:
                logits = logits + p["group_effect"][g]
            if c is not None:
                logits = logits + p["individual_effect"][c]
            init = dist.Categorical(p["init_probs"])
            # past a track's end the state stays put (log of the identity matrix)
            stay = torch.eye(cfg.states, dtype=logits.dtype, device=logits.device).log()
            inside = data.mask.unsqueeze(-1)  # (N, T, 1)
            if vectorized:
                time_plate = markov_plate("time", t_max, dim=-1)
                x_prev = time_plate.init("x", init)
                with time_plate:
                    rows = torch.where(inside, Vindex(logits)[..., x_prev, :], stay[x_prev])
                    x = pyro.sample("x", dist.Categorical(logits=rows), infer=ENUM)
                    self._emit(p, x, obs, "", slice(None))
            else:
                x = pyro.sample("x_prev", init, infer=ENUM)
                for t in pyro.markov(range(t_max)):
                    rows = torch.where(inside[:, t], Vindex(logits)[..., x, :], stay[x])
                    x = pyro.sample(f"x_{t}", dist.Categorical(logits=rows), infer=ENUM)
                    self._emit(p, x, obs, f"_{t}", t)

    def _observations(self, data: Tracks) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (values, mask)``, each ``(N, T)``, with valid stand-ins where masked (so
        that every log-density, and its gradient, is finite)."""
        step_mask, angle_mask = data.step_mask & data.mask, data.angle_mask & data.mask
        obs = {"step": (torch.where(step_mask, data.step, torch.ones_like(data.step)), step_mask),
               "angle": (torch.where(angle_mask, data.angle, torch.zeros_like(data.angle)),
                         angle_mask)}
        if self.config.dive is not None:
            assert data.dive is not None and data.dive_mask is not None
            dive_mask = data.dive_mask & data.mask
            dive = torch.where(dive_mask, data.dive, torch.zeros_like(data.dive))
            if self.config.dive == "bernoulli":
                dive = (dive > 0).to(dive.dtype)
            obs["dive"] = (dive, dive_mask)
        return obs

    def _emit(self, p: dict[str, torch.Tensor], x: torch.Tensor,
              obs: dict[str, tuple[torch.Tensor, torch.Tensor]], suffix: str,
              t: int | slice) -> None:
        """The emissions of state ``x`` at time step(s) ``t`` (all at once for a slice)."""
        mean, sd = p["step_mean"][x], p["step_sd"][x]
        fns: dict[str, Any] = {
            "step": dist.Gamma(mean ** 2 / sd ** 2, mean / sd ** 2),
            "angle": dist.VonMises(p["angle_loc"][x], p["angle_concentration"][x]),
        }
        if self.config.dive == "bernoulli":
            fns["dive"] = dist.Bernoulli(p["dive_probs"][x])
        elif self.config.dive == "poisson":
            fns["dive"] = dist.Poisson(p["dive_rate"][x])
        for name, fn in fns.items():
            value, mask = obs[name]
            with poutine.mask(mask=cast(torch.BoolTensor, mask[:, t])):
                pyro.sample(f"{name}{suffix}", fn, obs=value[:, t])

    # ------------------------------------------------------------------------------------------
    # reporting

    def state_order(self) -> torch.Tensor:
        """``(K,)`` the states sorted by mean step length (``order[j]`` is the model state shown
        as state ``j``)."""
        return torch.argsort(self.params()["step_mean"].detach())

    def transition_matrices(self) -> torch.Tensor:
        """``(G', C', K, K)`` the transition matrices of every (group class, individual class),
        in the model's own state order (``G' = 1`` without a group class, ``C' = 1`` without
        individual classes)."""
        p = {k: v.detach() for k, v in self.params().items()}
        logits = p["trans_logits"][None, None]
        if self.config.group:
            logits = logits + p["group_effect"][:, None]
        if self.config.individual:
            logits = logits + p["individual_effect"][None, :]
        return torch.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# data, training and reporting


def load_tracks(dataset: str, data_dir: str | None, dtype: torch.dtype,
                individuals: int | None = None, max_length: int | None = None) -> Tracks:
    """The tracks of ``dataset`` (one of :data:`DATASETS`), optionally only the first
    ``individuals`` and each cut to ``max_length`` time steps."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    data = load_ses(data_dir, dtype) if dataset == "ses" else load_nfs(data_dir, dtype)
    if individuals is not None or max_length is not None:
        n = data.num_individuals if individuals is None else min(individuals,
                                                                 data.num_individuals)
        data = data.select(range(n), max_length)
    return data


def _train(hmm: MovementHMM, data: Tracks, args: Any, optim: PyroOptim, path: Path,
           state: dict[str, Any]) -> dict[str, Any]:
    """SVI from ``state`` (a fresh one, or a checkpoint's already restored into Pyro's parameter
    store, ``optim`` and the random generators) to ``args.steps`` steps, writing the checkpoint
    ``path`` every ``args.checkpoint_every`` steps and at the end.

    :return: the state: ``step``, ``losses`` (negative log-likelihood per step, nats),
        ``seconds`` (wall-clock seconds of each SVI step in this and earlier processes).
    :raises ExampleError: if a loss is not finite (the message suggests a smaller ``--lr``).
    """
    elbo = TVE_ELBO(max_plate_nesting=NESTING[True])
    svi = SVI(hmm.model, guide, optim, elbo)
    bar = progress(range(state["step"], args.steps), total=args.steps, initial=state["step"],
                   desc=f"{args.dataset} {args.random_effects}", disable=args.no_progress)
    for step in bar:
        t0 = time.perf_counter()
        loss = svi.step(data, vectorized=True)
        state["seconds"].append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise ExampleError(f"SVI step {step + 1}: the loss is {loss}; try a smaller --lr "
                               f"(now {args.lr:g})")
        state["losses"].append(loss)
        state["step"] = step + 1
        bar.set_postfix(nll=f"{loss:.2f}")
        if state["step"] % args.checkpoint_every == 0 or state["step"] == args.steps:
            save_pyro_checkpoint(path, optim, **state)
    bar.close()
    return state


def _resume(path: Path, optim: PyroOptim, args: Any, options: dict[str, Any],
            run_config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Restore the checkpoint ``path`` into Pyro's parameter store, ``optim`` and the random
    generators, after checking that it was written with the same options (:func:`run_options`;
    ``run_config`` for an older checkpoint that did not record them) and is not past
    ``--steps``.

    :return: the checkpoint's training state (as :func:`_train` takes it).
    :raises ExampleError: for an unreadable checkpoint, one written with other options (each
        named), or one already past ``--steps``.
    """
    state = load_pyro_checkpoint(path, optim, map_location=device)
    if not {"step", "losses", "seconds"} <= state.keys():
        raise ExampleError(f"{str(path)!r} is not a checkpoint of this program; delete it or "
                           "choose another --out-dir")
    check_resume_options(state.get("options"), options, path)
    if state.get("options") is None and state.get("config") != run_config:
        # a checkpoint from before the options were recorded: compare the model's configuration
        saved = state.get("config") or {}
        diff = "; ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in run_config.items()
                         if saved.get(k) != v)
        raise ExampleError(f"the checkpoint {str(path)!r} was written with other options "
                           f"({diff}); resume with the same options, or choose another "
                           "--out-dir for a new run")
    if state["step"] > args.steps:
        raise ExampleError(f"the checkpoint {str(path)!r} is at step {state['step']}, past "
                           f"--steps {args.steps}; pass --steps {state['step']} or more to "
                           "continue it, or choose another --out-dir for a new run")
    return state


def _report(hmm: MovementHMM, data: Tracks) -> dict[str, Any]:
    """The exact log-likelihood, per-individual figures and the fitted parameters, with states
    sorted by mean step length."""
    cfg = hmm.config
    k = cfg.states
    order = hmm.state_order()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=order.device)  # model state -> shown state
    names = state_names(k)
    with torch.no_grad():
        post = posterior(hmm.model, data, max_plate_nesting=NESTING[True])
        loglik = float(post.log_likelihood())
        best = post.map()
        marg = post.marginals()
        alone = [float(posterior(hmm.model, data.select([i]),
                                 max_plate_nesting=NESTING[True]).log_likelihood())
                 for i in range(data.num_individuals)]
    x_map = rank[best["x"].reshape(data.num_individuals, -1)]  # (N, T), shown states
    x_marg = marg["x"].reshape(data.num_individuals, -1, k)[..., order]  # (N, T, K)
    mask = data.mask
    lengths = data.lengths.tolist()
    per: list[dict[str, Any]] = []
    for i, ident in enumerate(data.ids):
        n_i = lengths[i]
        xs = x_map[i, :n_i]
        row: dict[str, Any] = {
            "id": ident, "locations": n_i, "log_likelihood": alone[i],
            "log_likelihood_per_location": alone[i] / n_i,
            "map_occupancy": dict(zip(names, (torch.bincount(xs, minlength=k).double() / n_i)
                                      .tolist(), strict=True)),
            "posterior_occupancy": dict(zip(names, x_marg[i, :n_i].mean(0).tolist(),
                                            strict=True)),
        }
        if cfg.individual:
            row["class_posterior"] = marg["individual_class"].reshape(
                data.num_individuals, -1)[i].tolist()
            row["map_class"] = int(best["individual_class"].reshape(-1)[i])
        per.append(row)
    p = {name: v.detach() for name, v in hmm.params().items()}
    trans = hmm.transition_matrices()[..., order, :][..., order]
    params: dict[str, Any] = {
        "state_names": names,
        "step_mean_km": p["step_mean"][order].tolist(),
        "step_sd_km": p["step_sd"][order].tolist(),
        "angle_loc": p["angle_loc"][order].tolist(),
        "angle_concentration": p["angle_concentration"][order].tolist(),
        "init_probs": p["init_probs"][order].tolist(),
        "transition_matrices": trans.tolist(),
    }
    if "dive_probs" in p:
        params["dive_probs"] = p["dive_probs"][order].tolist()
    if "dive_rate" in p:
        params["dive_rate"] = p["dive_rate"][order].tolist()
    if cfg.individual:
        params["individual_class_probs"] = p["individual_class_probs"].tolist()
    out: dict[str, Any] = {
        "log_likelihood": loglik,
        "locations": int(data.lengths.sum()),
        "log_likelihood_per_location": loglik / int(data.lengths.sum()),
        "map_occupancy": dict(zip(names, (torch.bincount(x_map[mask], minlength=k).double()
                                          / int(mask.sum())).tolist(), strict=True)),
        "individuals": per,
        "params": params,
    }
    if cfg.group:
        params["group_class_probs"] = p["group_class_probs"].tolist()
        out["group_class_posterior"] = marg["group_class"].reshape(-1).tolist()
        out["map_group_class"] = int(best["group_class"].reshape(-1)[0])
    out["_map_states"] = x_map  # for the plot; removed before writing
    return out


def _plots(hmm: MovementHMM, data: Tracks, report: dict[str, Any], losses: list[float],
           out_dir: Path, title: str) -> list[str]:
    """``tracks.png`` (tracks coloured by MAP state; step lengths by state) and ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    k = hmm.config.states
    names = report["params"]["state_names"]
    prm = report["params"]
    occ = report["map_occupancy"]
    colours = plt.get_cmap("viridis")(torch.linspace(0.05, 0.9, k).tolist())
    x_map = report["_map_states"].cpu()
    pos = data.position.detach().cpu()
    mask = data.mask.cpu()
    fig = plt.figure(figsize=(12, 9), layout="constrained")
    grid_spec = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    ax = fig.add_subplot(grid_spec[0, :])
    for i in range(data.num_individuals):
        n_i = int(data.lengths[i])
        ax.plot(pos[i, :n_i, 0].numpy(), pos[i, :n_i, 1].numpy(), color="0.7", lw=0.5,
                zorder=1)
        far = int((pos[i, :n_i] - pos[i, :1]).norm(dim=-1).argmax())  # label the far end
        ax.annotate(data.ids[i], (float(pos[i, far, 0]), float(pos[i, far, 1])), fontsize=8,
                    color="0.2", xytext=(3, 3), textcoords="offset points")
    # one scatter in time order, so no state is hidden under the others
    ax.scatter(pos[..., 0][mask].numpy(), pos[..., 1][mask].numpy(), s=3, zorder=2,
               c=colours[x_map[mask].numpy()])
    handles = [Line2D([], [], ls="", marker="o", color=colours[j],
                      label=f"{names[j]}: {occ[names[j]]:.0%} of locations")
               for j in range(k)]
    ax.legend(handles=handles, title="MAP state", loc="best")
    if data.coords == "lonlat":
        ax.set_xlabel("longitude (degrees)")
        ax.set_ylabel("latitude (degrees)")
        lat = float(pos[..., 1][mask].mean())
        ax.set_aspect(1 / math.cos(math.radians(lat)))
    else:
        ax.set_xlabel("x (km)")
        ax.set_ylabel("y (km)")
        ax.set_aspect("equal")
    ax.set_title(title)
    ax2 = fig.add_subplot(grid_spec[1, 0])
    steps = data.step.detach().cpu()[data.step_mask.cpu()]
    hi = float(steps.max())
    grid = torch.linspace(hi / 500, hi, 400, dtype=torch.float64)
    ax2.hist(steps.numpy(), bins=60, range=(0, hi), density=True, color="0.85",
             label="observed")
    for j in range(k):
        m, sd = torch.tensor(prm["step_mean_km"][j]), torch.tensor(prm["step_sd_km"][j])
        g = torch.distributions.Gamma(m ** 2 / sd ** 2, m / sd ** 2)
        ax2.plot(grid.numpy(), (occ[names[j]] * g.log_prob(grid).exp()).numpy(),
                 color=colours[j], lw=2, label=f"{names[j]}: mean {m:.2f}, sd {sd:.2f}")
    ax2.set_xlabel("step length (km)")
    ax2.set_ylabel("density")
    ax2.set_title("step lengths: fitted gamma x MAP occupancy")
    ax2.legend(fontsize=8)
    ax3 = fig.add_subplot(grid_spec[1, 1])
    angles = data.angle.detach().cpu()[data.angle_mask.cpu()]
    grid = torch.linspace(-math.pi, math.pi, 400, dtype=torch.float64)
    ax3.hist(angles.numpy(), bins=48, range=(-math.pi, math.pi), density=True, color="0.85",
             label="observed")
    for j in range(k):
        vm = torch.distributions.VonMises(torch.tensor(prm["angle_loc"][j]),
                                          torch.tensor(prm["angle_concentration"][j]))
        ax3.plot(grid.numpy(), (occ[names[j]] * vm.log_prob(grid).exp()).numpy(),
                 color=colours[j], lw=2,
                 label=f"{names[j]}: concentration {prm['angle_concentration'][j]:.2f}")
    ax3.set_xlabel("turning angle (radians, + = right)")
    ax3.set_title("turning angles: fitted von Mises x MAP occupancy")
    ax3.legend(fontsize=8)
    paths = [str(save_figure(fig, out_dir / "tracks.png"))]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.5), layout="constrained")
    steps_run = range(1, len(losses) + 1)
    ax.plot(steps_run, losses)
    ax.set_xlabel("SVI step")
    ax.set_ylabel("-log p(data) (nats)")
    best_loss = min(losses)
    ax2.semilogy(steps_run, [v - best_loss + 1e-3 for v in losses])
    ax2.set_xlabel("SVI step")
    ax2.set_ylabel("loss - lowest loss + 0.001 (nats)")
    fig.suptitle(f"training, {title}")
    paths.append(str(save_figure(fig, out_dir / "loss.png")))
    return paths


PROG = "python -m examples.animal_movement"
#: What ``--smoke-test`` sets where the option is not given: 5 SVI steps on the first 40
#: locations of 3 individuals, a checkpoint every 2 steps.
SMOKE = {"steps": 5, "individuals": 3, "max_length": 40, "checkpoint_every": 2}
#: The options a resumed run may change: how long it trains and how often it checkpoints.
MAY_CHANGE = ("steps", "checkpoint_every")


def _parser() -> argparse.ArgumentParser:
    parser = example_parser(
        PROG,
        "Fit a hierarchical HMM of behavioural states (gamma step lengths, von Mises turning "
        "angles, and hourly dives for the fur seal) with discrete individual- and group-level "
        "random effects to real seal tracks by maximum likelihood with TVE_ELBO, and report "
        "the exact log-likelihood and each individual's state occupancy.",
        out_dir="runs/animal_movement",
        data_example=f"seals/{SES_FILE} (--dataset ses) or seals/{NFS_LOCATIONS} and "
                     f"seals/{NFS_DIVES} (--dataset nfs)")
    parser.add_argument("--dataset", choices=DATASETS, default="ses",
                        help="ses: 15 southern elephant seals; nfs: a northern fur seal with "
                             "hourly dives")
    parser.add_argument("--states", type=positive_int, metavar="K", default=3,
                        help="behavioural states K")
    parser.add_argument("--random-effects", choices=RANDOM_EFFECTS, default="both",
                        help="discrete random effects on the transition matrix")
    parser.add_argument("--individual-classes", type=positive_int, default=3,
                        help="values of each individual's latent class")
    parser.add_argument("--group-classes", type=positive_int, default=2,
                        help="values of the group-level latent class")
    parser.add_argument("--dive-model", choices=DIVE_MODELS, default="bernoulli",
                        help="nfs: Bernoulli of 'any foraging dive in the hour', or Poisson of "
                             "the hourly count")
    parser.add_argument("--steps", type=positive_int, metavar="N", default=1500,
                        help="SVI steps in all, counting those of the run a --resume continues "
                             f"({SMOKE['steps']} with --smoke-test)")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="Adam learning rate")
    parser.add_argument("--checkpoint-every", type=positive_int, metavar="N", default=50,
                        help=f"write the checkpoint every N SVI steps (and at the end; "
                             f"{SMOKE['checkpoint_every']} with --smoke-test)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                        help="floating-point precision of the data and the parameters")
    parser.add_argument("--individuals", type=positive_int, metavar="N", default=None,
                        help="use the first N individuals (default: all; "
                             f"{SMOKE['individuals']} with --smoke-test)")
    parser.add_argument("--max-length", type=positive_int, metavar="T", default=None,
                        help="cut each track to its first T locations (default: whole tracks; "
                             f"{SMOKE['max_length']} with --smoke-test)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the movement HMM on a seal data set and write ``results.json`` and the figures.

    :return: the results (as written to ``results.json``).
    :raises RunExistsError: if ``--out-dir`` holds a run's files (checkpoint, results, figures)
        and ``--resume`` was not given.
    :raises ExampleError: for a checkpoint that cannot be resumed (unreadable, other options,
        past ``--steps``) or a loss that is not finite; :class:`~examples.data.DataError` for
        missing or malformed data.
    """
    parser = _parser()
    args = apply_smoke(parser, parser.parse_args(argv), argv, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    out_dir = Path(args.out_dir)
    path = out_dir / "checkpoint.pt"
    results_path = out_dir / "results.json"
    figure_paths = [out_dir / "tracks.png", out_dir / "loss.png"]
    resume = resume_or_refuse(args.resume, path, others=[results_path, *figure_paths])
    options = run_options(args, may_change=MAY_CHANGE)
    set_seed(args.seed)
    pyro.clear_param_store()
    optim = PyroOptim(torch.optim.Adam, {"lr": args.lr})  # what pyro.optim.Adam makes
    config = Config(args.states, args.random_effects, args.individual_classes,
                    args.group_classes, args.dive_model if args.dataset == "nfs" else None)
    run_config = {"dataset": args.dataset, "config": asdict(config), "lr": args.lr,
                  "dtype": args.dtype, "seed": args.seed, "individuals": args.individuals,
                  "max_length": args.max_length}
    with out_dir_guard(out_dir):
        state: dict[str, Any] = {"step": 0, "losses": [], "seconds": [], "options": options,
                                 "config": run_config}
        if resume:  # before the data: a changed option is named before anything can clash
            state = _resume(path, optim, args, options, run_config, device)
        data = load_tracks(args.dataset, args.data_dir, dtype, args.individuals,
                           args.max_length).to(device)
        hmm = MovementHMM(config, data, torch.Generator().manual_seed(args.seed))
        if resume:
            print(f"resumed from {path}: step {state['step']} of {args.steps}", flush=True)
        t0 = time.perf_counter()
        state = _train(hmm, data, args, optim, path, state)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = _report(hmm, data)
        report_s = time.perf_counter() - t0
        losses = state["losses"]
        tail = losses[-max(2, len(losses) // 10):]
        title = (f"{args.dataset}, K={config.states}, random effects: {config.random_effects}, "
                 f"log-lik {report['log_likelihood']:.1f}")
        if not math.isfinite(report["log_likelihood"]):
            raise ExampleError(f"the log-likelihood of the fitted model is "
                               f"{report['log_likelihood']}; try a smaller --lr (now "
                               f"{args.lr:g}) in another --out-dir")
        figures = _plots(hmm, data, report, losses, out_dir, title)
        del report["_map_states"]
        results: dict[str, Any] = {
            **run_config, "steps": args.steps, "device": str(device),
            "threads": torch.get_num_threads(), "individuals_used": data.num_individuals,
            "files": list(data.files), **report,
            "final_loss": losses[-1], "loss_change_last_10pct_of_steps": tail[0] - tail[-1],
            "median_ms_per_svi_step": median_ms(state["seconds"]),
            "train_seconds_this_process": train_s, "report_seconds": report_s,
            "loss_history": losses, "figures": figures,
        }
        write_json(results, results_path)
    _print_summary(results)
    print_written(PROG, {"results": results_path, "checkpoint": path, "figures": figures})
    return results


def _print_summary(r: dict[str, Any]) -> None:
    names = r["params"]["state_names"]
    print(f"{r['dataset']}: {r['individuals_used']} individuals, {r['locations']} locations; "
          f"random effects {r['config']['random_effects']}; {r['steps']} SVI steps, "
          f"median {r['median_ms_per_svi_step']:.1f} ms/step")
    print(f"exact log-likelihood {r['log_likelihood']:.3f} "
          f"({r['log_likelihood_per_location']:.4f} per location); final loss "
          f"{r['final_loss']:.3f}, change over the last 10% of steps "
          f"{r['loss_change_last_10pct_of_steps']:.4f}")
    print("state means (km): " + ", ".join(
        f"{n} {m:.2f}" for n, m in zip(names, r["params"]["step_mean_km"], strict=True)))
    head = f"{'id':>10s} {'locs':>5s} {'loglik':>10s} " + " ".join(f"{n[:10]:>10s}"
                                                                   for n in names)
    if r["config"]["random_effects"] in ("individual", "both"):
        head += "  class posterior"
    print(head)
    for row in r["individuals"]:
        line = (f"{row['id']:>10s} {row['locations']:5d} {row['log_likelihood']:10.2f} "
                + " ".join(f"{row['map_occupancy'][n]:10.3f}" for n in names))
        if "class_posterior" in row:
            line += "  " + " ".join(f"{q:.3f}" for q in row["class_posterior"])
        print(line)
    if "group_class_posterior" in r:
        print("group class posterior: "
              + " ".join(f"{q:.3f}" for q in r["group_class_posterior"]))


if __name__ == "__main__":
    run_cli(PROG, main)
