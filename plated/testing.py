"""Random small plated factor graphs, shared by tests, fuzzing and benchmarks.

:func:`random_graph` draws tractable graphs by construction: plates form a random tree, every
variable lives in a branch of it (the plates on a path from the root), and every factor lives in a
branch and mentions only variables of branches along it. Such graphs are exactly the ones TVE
eliminates without coupling incomparable plates. Optionally one plate is sequential, with a chain
variable, a transition factor and an initial factor. Sizes are kept small enough that
:mod:`plated.naive` can enumerate every joint assignment.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable

import torch

from .errors import GraphError
from .factor import Factor, Plate

__all__ = ["random_graph", "random_einsum", "graph_to_einsum", "peak_allocated"]


def _branches(parents: dict[str, str | None]) -> dict[str | None, frozenset[str]]:
    out: dict[str | None, frozenset[str]] = {None: frozenset()}
    for p in parents:
        chain = []
        q: str | None = p
        while q is not None:
            chain.append(q)
            q = parents[q]
        out[p] = frozenset(chain)
    return out


def random_graph(
    seed: int,
    *,
    max_plates: int = 3,
    max_plate_size: int = 3,
    max_vars: int = 4,
    max_size: int = 3,
    max_factors: int = 4,
    sequential: bool | None = None,
    hard_zero_prob: float = 0.0,
    max_assignments: int = 2048,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    requires_grad: bool = False,
) -> tuple[list[Factor], list[Plate]]:
    """Draw a tractable plated factor graph small enough for brute force.

    :param seed: the seed; the same seed always gives the same graph.
    :param sequential: force (``True``) or forbid (``False``) a sequential plate; ``None`` lets
        the seed decide.
    :param hard_zero_prob: probability that a factor entry is ``-inf`` (a hard zero).
    :param max_assignments: redraw until the unrolled graph has at most this many joint
        assignments.
    :return: ``(factors, plates)``.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _attempt in range(1000):
        n_plates = rng.randint(0, max_plates)
        names = [f"p{i}" for i in range(n_plates)]
        parents: dict[str, str | None] = {}
        for i, p in enumerate(names):
            parents[p] = rng.choice([None, *names[:i]])
        sizes = {p: rng.randint(1, max_plate_size) for p in names}
        branch = _branches(parents)
        seq = None
        if names and (sequential is True or (sequential is None and rng.random() < 0.4)):
            seq = rng.choice(names)
            sizes[seq] = rng.randint(1, max_plate_size + 1)
        elif sequential is True:
            continue
        nodes: list[str | None] = [None] + names
        var_ord: dict[str, frozenset[str]] = {}
        var_size: dict[str, int] = {}
        for i in range(rng.randint(1, max_vars)):
            v = f"v{i}"
            var_ord[v] = branch[rng.choice(nodes)]
            var_size[v] = rng.randint(1, max_size)
        chain: tuple[str, str] | None = None
        if seq is not None:
            chain = ("x", "x_prev")
            var_ord["x"] = branch[seq]
            var_size["x"] = rng.randint(1, max_size)
        scopes: list[tuple[frozenset[str], list[str]]] = []
        for v, o in var_ord.items():
            if chain and v == chain[0]:
                continue
            others = [w for w, ow in var_ord.items() if ow <= o and w != v]
            extra = rng.sample(others, k=min(len(others), rng.randint(0, 2)))
            scopes.append((o, [v, *extra]))
        if chain:
            o = var_ord["x"]
            others = [w for w, ow in var_ord.items() if ow <= o and w != "x"]
            extra = rng.sample(others, k=min(len(others), rng.randint(0, 1)))
            scopes.append((o, ["x_prev", "x", *extra]))
            inner = [w for w, ow in var_ord.items() if ow >= o and w != "x"]
            if inner and rng.random() < 0.5:
                scopes.append((var_ord[rng.choice(inner)], ["x_prev", rng.choice(inner)]))
            if rng.random() < 0.7:
                scopes.append((o - {seq}, ["x_prev"]))
        for _ in range(rng.randint(0, max_factors)):
            node = rng.choice(nodes)
            b = branch[node]
            cand = [w for w, ow in var_ord.items() if ow <= b]
            if not cand:
                continue
            scope = rng.sample(cand, k=min(len(cand), rng.randint(1, 3)))
            scopes.append((b, scope))
        # the brute-force size: copies of every variable
        copies = 1
        for v, o in var_ord.items():
            copies *= var_size[v] ** math.prod(sizes[p] for p in o)
        if chain:
            copies *= var_size["x"] ** math.prod(sizes[p] for p in var_ord["x"] - {seq})
        if copies > max_assignments:
            continue
        plate_objs = [
            Plate(p, sizes[p], sequential=True, prev={"x": "x_prev"}) if p == seq
            else Plate(p, sizes[p]) for p in names
        ]
        factors = []
        for k, (b, scope) in enumerate(scopes):
            pl = [p for p in names if p in b]
            dims = tuple(pl) + tuple(scope)
            shape = tuple(sizes[p] for p in pl) + tuple(
                var_size["x" if d == "x_prev" else d] for d in scope)
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
            if hard_zero_prob > 0:
                mask = torch.rand(shape, generator=gen) < hard_zero_prob
                t = t.masked_fill(mask, -math.inf)
            t = t.to(dtype=dtype, device=device)
            if requires_grad:
                t.requires_grad_()
            factors.append(Factor(t, dims, name=f"f{k}"))
        return factors, plate_objs
    raise GraphError(f"could not draw a small enough graph from seed {seed}")


def graph_to_einsum(factors: list[Factor], plates: list[Plate]) -> tuple[str, str, dict[str, str]]:
    """Rename a graph (without sequential plates) into an einsum equation with a ``""`` output.

    :return: ``(inputs, plate letters, name -> letter)``; the equation is ``inputs + "->" + out``.
    """
    if any(p.sequential for p in plates):
        raise GraphError("einsum has no sequential plates")
    letters = iter(string.ascii_letters)
    names: dict[str, str] = {}
    for p in plates:
        names[p.name] = next(letters)
    for f in factors:
        for d in f.dims:
            if d not in names:
                names[d] = next(letters)
    inputs = ",".join("".join(names[d] for d in f.dims) for f in factors)
    return inputs, "".join(names[p.name] for p in plates), names


def random_einsum(seed: int, **kwargs: object) -> tuple[str, list[torch.Tensor], str]:
    """A random plated einsum with a random valid output, from :func:`random_graph`.

    The output keeps a random set of plates and variables that respects the rule that a kept
    plated variable keeps all its plates.

    :return: ``(equation, operands, plates)``.
    """
    factors, plates = random_graph(seed, sequential=False, **kwargs)  # type: ignore[arg-type]
    inputs, plate_letters, names = graph_to_einsum(factors, plates)
    rng = random.Random(seed + 7919)
    ords: dict[str, set[str]] = {}
    for f in factors:
        fp = {names[d] for d in f.dims if names[d] in plate_letters}
        for d in f.dims:
            if names[d] not in plate_letters:
                ords[names[d]] = ords[names[d]] & fp if names[d] in ords else set(fp)
    out: set[str] = set()
    for v in sorted(ords):
        if rng.random() < 0.3:
            out.add(v)
            out |= ords[v]
    used = set(inputs)
    for p in plate_letters:
        if p in used and rng.random() < 0.2:
            out.add(p)
    order = sorted(out)  # sorted first: a set's order varies with PYTHONHASHSEED
    rng.shuffle(order)
    return inputs + "->" + "".join(order), [f.tensor for f in factors], plate_letters


def peak_allocated(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn()`` and return its result and the peak of the bytes its tensor allocations
    held at once (net of what it freed), as the PyTorch profiler's memory events report them on
    any device. Tensors that existed before the call (the inputs) are not counted; what the call
    leaves allocated (its results, gradients it accumulates) is.

    This is the measure a memory cap is checked against in the tests: exact, deterministic, and
    blind to the allocator's caching and to Python objects (``benchmarks/memory.py`` measures
    the process's resident set instead).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return result, peak
