"""Planning: from the structure of a plated factor graph to a cached, reusable elimination plan.

A plan is a straight-line program of tensor operations over numbered *slots*. It is made once per
(structure, shapes, ring, options), cached in a bounded LRU cache, and run many times by
:mod:`plated.contract`. Making a plan performs every structural check (including tractability),
chooses contraction paths with :func:`opt_einsum.contract_path`, predicts FLOPs and peak memory, and
splits contractions that would exceed a memory cap. Running it does tensor work only.

The elimination order is Algorithm 1 of Obermeyer et al. (2019), "Tensor Variable Elimination for
Plated Factor Graphs": repeatedly take a leaf plate set :math:`L` (a largest ordinal), sum out the
variables whose plates are exactly :math:`L` in each connected component, and product-reduce the
plates that the remaining variables no longer need. A leaf that contains a sequential plate whose
chain variables live exactly in :math:`L` is eliminated instead by a log-depth parallel scan
(:mod:`plated.markov`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import opt_einsum

from ..errors import GraphError, IntractableError, MemoryCapError
from ..factor import Plate
from ..rings import PairSpec, RingName
from .analysis import dim_sizes, plate_str, variable_ordinals

__all__ = [
    "Structure",
    "Plan",
    "CostReport",
    "make_plan",
    "clear_plan_cache",
    "set_plan_cache_size",
    "plan_cache_info",
]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: Contractions that eliminate a chain of at least this many equal-sized variables (an unrolled
#: HMM, say) run as one parallel scan instead of pairwise steps. Set to a huge value to disable.
CHAIN_MIN_LENGTH = 8


@dataclass(frozen=True)
class Structure:
    """Everything about a graph that a plan depends on: names, shapes and options, no values.

    :ivar plates: the declared plates, in order (this order lays out every result's plate dims).
    :ivar inputs: per factor, its dim names and shape.
    :ivar labels: per factor, the label used in error messages.
    :ivar keep_plates: plates kept in the result (not product-reduced).
    :ivar keep_vars: variables kept in the result (not eliminated), as einsum outputs keep them.
    :ivar ring: the ring the plan runs in (memory estimates differ by ring).
    :ivar itemsize: bytes per element of the factors' dtype.
    :ivar memory_cap: an optional cap in bytes on any one step's working memory.
    """

    plates: tuple[Plate, ...]
    inputs: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]
    labels: tuple[str, ...]
    keep_plates: tuple[str, ...] = ()
    keep_vars: tuple[str, ...] = ()
    ring: RingName = "log"
    itemsize: int = 8
    memory_cap: int | None = None


@dataclass
class Slot:
    dims: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Op:
    """One step of a plan: ``pair``, ``unary``, ``product``, ``scan``, ``chain`` or
    ``normalize``."""

    kind: str
    ins: tuple[int, ...]
    out: int
    elim: tuple[str, ...] = ()
    spec: PairSpec | None = None
    dims: tuple[int, ...] = ()
    scan: ScanSpec | None = None
    chain: ChainSpec | None = None
    flops: int = 0
    temp_numel: int = 0
    slice_dim: int | None = None
    slice_chunks: int = 1
    note: str = ""


@dataclass
class ScanSpec:
    """Layout of a sequential-plate scan (see :mod:`plated.markov`)."""

    plate: str
    curr: tuple[str, ...]
    prev: tuple[str, ...]
    present_prev: tuple[str, ...]
    in_perm: tuple[int, ...]
    in_view: tuple[int, ...]
    in_full: tuple[int, ...]
    batch_shape: tuple[int, ...]
    length: int
    state: int
    prev_sizes: tuple[int, ...]
    curr_sizes: tuple[int, ...]
    out_batch_dims: tuple[str, ...]
    out_perm: tuple[int, ...]
    plates_before: tuple[str, ...]
    plates_after: tuple[str, ...]


@dataclass
class ChainSpec:
    """Layout of a chain of variables inside one contraction (see ``_Builder.chain_scan``).

    The chain ``v_0 - v_1 - ... - v_n`` of equal-sized variables is eliminated by the same
    parallel scan as a sequential plate. Each input is laid out as ``(*batch, K, K)`` (an edge
    between ``v_t`` and ``v_{t+1}``), ``(*batch, 1, K)`` (a unary factor of ``v_{t+1}``),
    ``(*batch, K)`` (a unary factor of ``v_0``) or ``(*batch,)`` (a constant).
    """

    vars: tuple[str, ...]
    size: int
    batch_dims: tuple[str, ...]
    batch_shape: tuple[int, ...]
    # per input: (role, step, perm, view); role is "edge", "next", "start" or "const"
    parts: tuple[tuple[str, int, tuple[int, ...], tuple[int, ...]], ...]
    out_perm: tuple[int, ...]


@dataclass
class CostReport:
    """Predicted cost of a plan, available before any tensor work.

    :ivar flops: predicted floating-point operations of one forward run.
    :ivar peak_bytes: predicted peak bytes of inputs plus live intermediates plus the working
        memory of the largest step, for a forward run that frees intermediates (no gradient).
    :ivar peak_bytes_saved: the same when every intermediate is kept, as for a gradient, MAP,
        sampling or marginals. It counts the plan's own intermediates and step temporaries, not
        autograd's extra saved tensors, backward temporaries or gradient buffers; measured peaks
        of log Z plus gradient run about twice this (see ``benchmarks/README.md``).
    :ivar steps: one printable line per step of the elimination plan.
    """

    flops: int
    peak_bytes: int
    peak_bytes_saved: int
    steps: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"plan: {len(self.steps)} steps, {self.flops:.3e} FLOPs, peak memory "
            f"{_fmt_bytes(self.peak_bytes)} (forward) / {_fmt_bytes(self.peak_bytes_saved)} "
            "(all intermediates kept)"
        ]
        lines += [f"  {i:3d}. {s}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024
    raise AssertionError  # pragma: no cover


@dataclass
class Plan:
    """A compiled elimination plan. See :func:`make_plan`.

    :ivar structure: the structure it was made for.
    :ivar slots: the shape and dims of every slot; slots ``0..n-1`` are the input factors,
        permuted into canonical dim order by ``input_perms`` (``None``: already in order).
    :ivar ops: the steps, in execution order.
    :ivar result: the slot holding the final result, with dims ``keep_plates + keep_vars`` in
        canonical order.
    :ivar var_sizes: domain size of every variable.
    :ivar ordinals: the plates of every variable (a chain variable's ordinal includes its plate).
    :ivar chain_of: for each chain variable (``curr`` of a sequential plate), its plate name.
    """

    structure: Structure
    slots: list[Slot]
    ops: list[Op]
    input_perms: list[tuple[int, ...] | None]
    result: int
    result_dims: tuple[str, ...]
    var_sizes: dict[str, int]
    ordinals: dict[str, frozenset[str]]
    order: dict[str, int]
    cost: CostReport
    frees: list[tuple[int, ...]] = field(default_factory=list)

    def var_plates(self, var: str) -> tuple[str, ...]:
        """The plates of ``var`` in declaration order (leading dims of its MAP/sample/marginal)."""
        return tuple(p.name for p in self.structure.plates if p.name in self.ordinals[var])


# ----------------------------------------------------------------------------------------------
# structure analysis


def _analyse(s: Structure) -> tuple[dict[str, int], dict[str, frozenset[str]]]:
    plates = {p.name: p for p in s.plates}
    if len(plates) != len(s.plates):
        names = [p.name for p in s.plates]
        dup = sorted({n for n in names if names.count(n) > 1})
        raise GraphError(f"plate {dup[0]!r} is declared twice; give each plate one name")
    sizes = dim_sizes(((dims, shape, label) for (dims, shape), label
                       in zip(s.inputs, s.labels, strict=True)),
                      {name: p.size for name, p in plates.items()})
    var_sizes = {d: n for d, n in sizes.items() if d not in plates}

    chain_plate: dict[str, str] = {}  # curr -> plate
    prev_plate: dict[str, str] = {}  # prev -> plate
    for p in s.plates:
        for curr, prev in p.prev:
            for name, role in ((curr, "chain variable"), (prev, "previous-value dim")):
                if name in plates:
                    raise GraphError(
                        f"sequential plate {p.name!r} uses plate {name!r} as its {role}; "
                        "chain names must be variables"
                    )
                if name in chain_plate or name in prev_plate:
                    raise GraphError(
                        f"variable {name!r} belongs to the chains of two sequential plates"
                    )
            if curr not in var_sizes:
                raise GraphError(
                    f"sequential plate {p.name!r} names chain variable {curr!r}, which no factor "
                    "mentions; check the spelling or add a factor over it"
                )
            if prev in var_sizes and var_sizes[prev] != var_sizes[curr]:
                raise GraphError(
                    f"chain variable {curr!r} has size {var_sizes[curr]} but its previous-value "
                    f"dim {prev!r} has size {var_sizes[prev]}; they must match"
                )
            chain_plate[curr] = p.name
            prev_plate[prev] = p.name
            var_sizes.setdefault(prev, var_sizes[curr])

    ordinals = variable_ordinals((dims for dims, _ in s.inputs), s.plates)
    for curr, t in chain_plate.items():
        prev = dict(next(p for p in s.plates if p.name == t).prev)[curr]
        if t not in ordinals[curr]:
            bad = [lab for (dims, _), lab in zip(s.inputs, s.labels, strict=True)
                   if curr in dims and t not in dims]
            raise GraphError(
                f"chain variable {curr!r} of sequential plate {t!r} appears in factor "
                f"{bad[0]} outside the plate; every factor over a chain variable must include "
                f"dim {t!r} (use {prev!r} outside the plate for the initial state)"
            )
        for (dims, _), lab in zip(s.inputs, s.labels, strict=True):
            if prev in dims and t in dims:
                missing = ordinals[curr] - set(dims)
                if missing:
                    raise GraphError(
                        f"factor {lab} uses {prev!r} (the previous value of {curr!r}) but lacks "
                        f"plates {sorted(missing)} of {curr!r}; add those plate dims"
                    )
        if prev not in ordinals:
            ordinals[prev] = ordinals[curr] - {t}
    for v in s.keep_vars:
        if v not in var_sizes:
            raise GraphError(f"kept variable {v!r} is unknown; it appears in no factor")
        if v in chain_plate or v in prev_plate:
            raise GraphError(f"kept variable {v!r} belongs to a chain; chains cannot be kept")
    for k in s.keep_plates:
        if k not in plates:
            what = "a variable" if k in var_sizes else "unknown"
            raise GraphError(f"kept plate {k!r} is {what}, not a declared plate")
        if plates[k].sequential:
            raise GraphError(f"plate {k!r} is sequential and cannot be kept in the result")
        for (dims, _), lab in zip(s.inputs, s.labels, strict=True):
            if k not in dims:
                raise GraphError(
                    f"plate {k!r} is kept in the result but factor {lab} is not in it; a kept "
                    "plate must contain every factor"
                )
    return var_sizes, ordinals


class _Builder:
    def __init__(self, s: Structure) -> None:
        self.s = s
        self.var_sizes, self.ordinals = _analyse(s)
        self.plates = {p.name: p for p in s.plates}
        self.chain: dict[str, tuple[str, ...]] = {}  # plate -> curr vars
        self.chain_prev: dict[str, tuple[str, ...]] = {}
        self.prev_plate: dict[str, str] = {}
        self.prev_curr: dict[str, str] = {}
        for p in s.plates:
            if p.sequential:
                self.chain[p.name] = tuple(c for c, _ in p.prev)
                self.chain_prev[p.name] = tuple(q for _, q in p.prev)
                for c, q in p.prev:
                    self.prev_plate[q] = p.name
                    self.prev_curr[q] = c
        order: dict[str, int] = {}
        for p in s.plates:
            order[p.name] = len(order)
        for dims, _ in s.inputs:
            for d in dims:
                order.setdefault(d, len(order))
        for p in s.plates:
            for c, q in p.prev:
                order.setdefault(c, len(order))
                order.setdefault(q, len(order))
        self.order = order
        self.sizes = {**{p.name: p.size for p in s.plates}, **self.var_sizes}
        self.slots: list[Slot] = []
        self.ops: list[Op] = []
        self.keep_vars = set(s.keep_vars)
        self.local_dims: set[str] = set(s.keep_vars)
        self.local_terms: list[int] = []
        self.keep_plates = frozenset(s.keep_plates)

    # -- helpers -------------------------------------------------------------------------------
    def canon(self, dims: set[str] | frozenset[str] | Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(dims, key=self.order.__getitem__))

    def new_slot(self, dims: Sequence[str]) -> int:
        dims = self.canon(dims)
        self.slots.append(Slot(dims, tuple(self.sizes[d] for d in dims)))
        return len(self.slots) - 1

    def vars_of(self, slot: int) -> set[str]:
        return {d for d in self.slots[slot].dims if d not in self.plates}

    def eff_ord(self, v: str, where: frozenset[str]) -> frozenset[str]:
        """The plates ``v`` varies along inside plates ``where``: a previous-value dim inside its
        sequential plate refers to the chain variable one step back, so it has that one's plates."""
        t = self.prev_plate.get(v)
        if t is not None and t in where:
            return self.ordinals[self.prev_curr[v]]
        return self.ordinals[v]

    def plates_of(self, slot: int) -> frozenset[str]:
        return frozenset(d for d in self.slots[slot].dims if d in self.plates)

    # -- contraction compilation ---------------------------------------------------------------
    def contract(self, ins: list[int], elim: set[str], note: str) -> int:
        """Sum-product of ``ins`` eliminating ``elim``; returns the result slot."""
        all_dims = set().union(*(self.slots[i].dims for i in ins))
        out_dims = self.canon(all_dims - elim)
        if len(ins) == 1:
            (i,) = ins
            if not (elim & set(self.slots[i].dims)):
                return i
            return self.unary(i, out_dims, note)
        if len(ins) == 2:
            return self.pair(ins[0], ins[1], out_dims, note)
        chained = self.chain_scan(ins, elim, out_dims, note)
        if chained is not None:
            return chained
        symbols = {d: opt_einsum.get_symbol(k) for k, d in enumerate(self.canon(all_dims))}
        eq = (",".join("".join(symbols[d] for d in self.slots[i].dims) for i in ins) + "->"
              + "".join(symbols[d] for d in out_dims))
        shapes = [self.slots[i].shape for i in ins]
        path, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="auto")
        live = list(ins)
        for step in path:
            picked = [live[k] for k in step]
            for k in sorted(step, reverse=True):
                del live[k]
            needed = set(out_dims).union(*(self.slots[i].dims for i in live))
            while len(picked) > 2:  # fold n-ary steps pairwise
                a, b = picked[0], picked[1]
                rest = set().union(*(self.slots[i].dims for i in picked[2:]))
                dims = (set(self.slots[a].dims) | set(self.slots[b].dims)) & (needed | rest)
                picked = [self.pair(a, b, self.canon(dims), note)] + picked[2:]
            if len(picked) == 2:
                dims = (set(self.slots[picked[0]].dims) | set(self.slots[picked[1]].dims)) & needed
                r = self.pair(picked[0], picked[1], self.canon(dims), note)
            else:
                dims = set(self.slots[picked[0]].dims) & needed
                r = picked[0]
                if set(dims) != set(self.slots[r].dims):
                    r = self.unary(r, self.canon(dims), note)
            live.append(r)
        (r,) = live
        return r

    def chain_scan(self, ins: list[int], elim: set[str], out_dims: tuple[str, ...], note: str
              ) -> int | None:
        """Recognise a long chain among ``ins`` and eliminate it by parallel scan.

        Applies when the eliminated variables all have one size and the inputs are edges
        between consecutive variables of a path through all of them, unary factors or
        constants; e.g. an HMM unrolled into one einsum. Returns ``None`` otherwise.
        """
        if len(elim) < CHAIN_MIN_LENGTH:
            return None
        sizes = {self.sizes[v] for v in elim}
        if len(sizes) != 1:
            return None
        (k,) = sizes
        scopes = [tuple(d for d in self.slots[i].dims if d in elim) for i in ins]
        if any(len(sc) > 2 for sc in scopes):
            return None
        nbrs: dict[str, set[str]] = {v: set() for v in elim}
        for sc in scopes:
            if len(sc) == 2:
                nbrs[sc[0]].add(sc[1])
                nbrs[sc[1]].add(sc[0])
        ends = [v for v, n in nbrs.items() if len(n) == 1]
        if any(len(n) > 2 or not n for n in nbrs.values()) or len(ends) != 2:
            return None
        order = [min(ends, key=self.order.__getitem__)]
        while len(order) < len(elim):
            nxt = nbrs[order[-1]] - ({order[-2]} if len(order) > 1 else set())
            if len(nxt) != 1:
                return None
            order.append(nxt.pop())
        pos = {v: t for t, v in enumerate(order)}
        batch = out_dims
        parts = []
        for i, sc in zip(ins, scopes, strict=True):
            dims = self.slots[i].dims
            rest = [d for d in batch if d in dims]
            view_b = [self.sizes[d] if d in dims else 1 for d in batch]
            if len(sc) == 2:
                a, b = sorted(sc, key=pos.__getitem__)
                if pos[b] != pos[a] + 1:
                    return None  # pragma: no cover - a path's edges join neighbours
                role, step, tail = "edge", pos[a], [a, b]
                view = (*view_b, k, k)
            elif len(sc) == 1:
                (v,) = sc
                if pos[v] == 0:
                    role, step, tail, view = "start", 0, [v], (*view_b, k)
                else:
                    role, step, tail, view = "next", pos[v] - 1, [v], (*view_b, 1, k)
            else:
                role, step, tail, view = "const", 0, [], tuple(view_b)
            perm = tuple(dims.index(d) for d in rest + tail)
            parts.append((role, step, perm, tuple(view)))
        out = self.new_slot(out_dims)
        spec = ChainSpec(tuple(order), k, batch, tuple(self.sizes[d] for d in batch),
                         tuple(parts), tuple(range(len(batch))))
        nb = math.prod(spec.batch_shape)
        n = len(order) - 1
        flops = 2 * nb * n * k ** 3
        temp = 2 * nb * n * k * k if self.s.ring == "log" else nb * n * k ** 3
        self.ops.append(Op("chain", tuple(ins), out, elim=tuple(order), chain=spec, flops=flops,
                           temp_numel=temp, note=f"{note}: chain of {len(order)} variables by "
                           "parallel scan"))
        return out

    def unary(self, i: int, out_dims: tuple[str, ...], note: str) -> int:
        src = self.slots[i]
        red = tuple(k for k, d in enumerate(src.dims) if d not in out_dims)
        elim = tuple(src.dims[k] for k in red)
        out = self.new_slot(out_dims)
        op = Op("unary", (i,), out, elim=elim, dims=red, flops=2 * src.numel,
                temp_numel=2 * src.numel, note=note)
        self.ops.append(op)
        return out

    def pair(self, a: int, b: int, out_dims: tuple[str, ...], note: str) -> int:
        sa, sb = self.slots[a], self.slots[b]
        union = self.canon(set(sa.dims) | set(sb.dims))
        letters = {d: _LETTERS[k] for k, d in enumerate(union)}
        eq = ("".join(letters[d] for d in sa.dims) + "," + "".join(letters[d] for d in sb.dims)
              + "->" + "".join(letters[d] for d in out_dims))
        elim = tuple(d for d in union if d not in out_dims)

        def red(src: Slot) -> tuple[int, ...]:
            return tuple(k for k, d in enumerate(src.dims) if d not in out_dims)

        def shift(src: Slot) -> tuple[int, ...]:
            return tuple(self.sizes[d] if d in src.dims else 1 for d in out_dims)

        def view(src: Slot) -> tuple[int, ...]:
            return tuple(self.sizes[d] if d in src.dims else 1 for d in union)

        spec = PairSpec(eq, red(sa), red(sb), shift(sa), shift(sb), view(sa), view(sb),
                        tuple(k for k, d in enumerate(union) if d not in out_dims))
        out = self.new_slot(out_dims)
        union_numel = math.prod(self.sizes[d] for d in union)
        out_numel = self.slots[out].numel
        if self.s.ring == "max" or not elim:
            temp = union_numel
        else:
            temp = sa.numel + sb.numel + out_numel
        op = Op("pair", (a, b), out, elim=elim, spec=spec, flops=2 * union_numel,
                temp_numel=temp, note=note)
        self.ops.append(op)
        self._maybe_slice(op)
        return out

    def _maybe_slice(self, op: Op) -> None:
        """Under a memory cap, split a pairwise step along its largest kept dim, or refuse."""
        cap = self.s.memory_cap
        if cap is None:
            return
        item = self.s.itemsize
        out = self.slots[op.out]
        need = (op.temp_numel + out.numel) * item
        if need <= cap:
            return
        avail = cap - out.numel * item
        if avail <= 0:
            raise MemoryCapError(
                f"step '{op.note}' produces a result over dims {out.dims} of "
                f"{_fmt_bytes(out.numel * item)}, over the memory cap of {_fmt_bytes(cap)}; "
                "raise memory_cap"
            )
        chunks = math.ceil(op.temp_numel * item / avail)
        fits = [k for k, n in enumerate(out.shape) if n >= chunks]
        if not fits:
            raise MemoryCapError(
                f"step '{op.note}' contracting {self.slots[op.ins[0]].dims} with "
                f"{self.slots[op.ins[1]].dims} needs {_fmt_bytes(need)} of working memory, over "
                f"the cap of {_fmt_bytes(cap)}, and no kept dim of {out.dims} can be split into "
                f"{chunks} slices; raise memory_cap"
            )
        best = max(fits, key=lambda k: out.shape[k])
        per = math.ceil(out.shape[best] / chunks)
        op.slice_dim = best
        op.slice_chunks = math.ceil(out.shape[best] / per)
        op.temp_numel = math.ceil(op.temp_numel / op.slice_chunks)

    def product(self, i: int, plates: frozenset[str], note: str) -> int:
        if not plates:
            return i
        src = self.slots[i]
        red = tuple(k for k, d in enumerate(src.dims) if d in plates)
        out = self.new_slot([d for d in src.dims if d not in plates])
        self.ops.append(Op("product", (i,), out, dims=red, flops=src.numel, temp_numel=0,
                           note=note))
        return out

    # -- elimination -----------------------------------------------------------------------------
    def components(self, slots: list[int], local: set[str]) -> list[tuple[list[int], set[str]]]:
        parent = list(range(len(slots)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        owner: dict[str, int] = {}
        for k, i in enumerate(slots):
            for v in self.vars_of(i) & local:
                if v in owner:
                    parent[find(k)] = find(owner[v])
                else:
                    owner[v] = k
        groups: dict[int, list[int]] = {}
        for k in range(len(slots)):
            groups.setdefault(find(k), []).append(k)
        out = []
        for ks in groups.values():
            members = [slots[k] for k in ks]
            dims = set().union(*(self.vars_of(i) for i in members)) & local
            out.append((members, dims))
        return out

    def build(self) -> Plan:
        s = self.s
        input_perms: list[tuple[int, ...] | None] = []
        tree: dict[frozenset[str], list[int]] = {}
        for dims, shape in s.inputs:
            cdims = self.canon(dims)
            perm = tuple(dims.index(d) for d in cdims)
            input_perms.append(None if perm == tuple(range(len(perm))) else perm)
            k = self.new_slot(cdims)
            assert self.slots[k].shape == tuple(shape[dims.index(d)] for d in cdims)
            tree.setdefault(frozenset(d for d in dims if d in self.plates), []).append(k)
        n_inputs = len(s.inputs)
        K = self.keep_plates

        while True:
            pending = [L for L, v in tree.items() if v and L != K]
            if not pending:
                break
            L = max(pending, key=lambda x: (len(x), sorted(x)))
            slots = tree.pop(L)
            local = {v for v in set().union(*(self.vars_of(i) for i in slots))
                     if self.ordinals[v] == L and v not in self.local_dims}
            scan_plates = [t for t in L if t in self.chain
                           and any(self.ordinals[c] == L for c in self.chain[t])]
            if len(scan_plates) > 1:
                raise IntractableError(
                    f"sequential plates {sorted(scan_plates)} both have chain variables in plates "
                    f"{plate_str(L)}: a grid of chains has no polynomial-time elimination; make "
                    "one of the plates independent, or unroll it"
                )
            if scan_plates:
                self.scan_leaf(L, scan_plates[0], slots, local, tree)
                continue
            kept_here = {v for v in set().union(*(self.vars_of(i) for i in slots))
                         if self.ordinals[v] == L and v in self.local_dims}
            for members, elim in self.components(slots, local | kept_here):
                elim = elim - kept_here
                r = self.contract(members, elim, f"in {plate_str(L)}")
                rest = self.vars_of(r)
                split = rest & kept_here
                parent = frozenset().union(
                    *(self.eff_ord(v, L) for v in rest - split)) | K
                if parent == L:
                    raise self.intractable(L, rest - split)
                if split:
                    r = self.global_local(r, split, L)
                r = self.product(r, L - parent, f"product over plates {sorted(L - parent)}")
                tree.setdefault(parent, []).append(r)

        roots = tree.pop(K, [])
        local = {v for v in set().union(set(), *(self.vars_of(i) for i in roots))
                 if v not in self.local_dims}
        finals = []
        for members, elim in self.components(roots, local):
            finals.append(self.contract(members, elim, "at the root"))
        if self.local_terms:
            # Pyro's localizing pass: combine the root with the conditional (local) terms and sum
            # out every variable that is not an output
            ins = finals + self.local_terms
            elim_all = set().union(*(self.vars_of(i) for i in ins)) - self.keep_vars
            result = self.contract(ins, elim_all, "combine local terms with the root")
        else:
            result = self.contract(finals, set(), "combine the root")
        result_dims = self.slots[result].dims
        cost = self.cost(n_inputs)
        last: dict[int, int] = {}
        for k, op in enumerate(self.ops):
            for i in op.ins:
                last[i] = k
        frees = [tuple(i for i in op.ins if i >= n_inputs and last[i] == k)
                 for k, op in enumerate(self.ops)]
        return Plan(s, self.slots, self.ops, input_perms, result, result_dims, self.var_sizes,
                    self.ordinals, self.order, cost, frees)

    def global_local(self, r: int, split: set[str], L: frozenset[str]) -> int:
        """Split a term over kept variables ``split`` (plates ``L``) into a global part, which is
        product-reduced as usual, and a local part, the conditional of ``split`` given the rest,
        kept aside for the final combination (Pyro's ``global_local``). Every variable of the
        local part is kept from then on."""
        src = self.slots[r]
        red = tuple(k for k, d in enumerate(src.dims) if d in split)
        g = self.unary(r, tuple(d for d in src.dims if d not in split),
                       f"total of kept {sorted(split)} in {plate_str(L)}")
        loc = self.new_slot(src.dims)
        self.ops.append(Op("normalize", (r, g), loc, dims=red, flops=src.numel,
                           temp_numel=0, note=f"conditional of kept {sorted(split)}"))
        self.local_terms.append(loc)
        self.local_dims |= self.vars_of(loc)
        return g

    def intractable(self, L: frozenset[str], rest: set[str]) -> IntractableError:
        by_plates = sorted(f"{v!r} in {plate_str(self.eff_ord(v, L))}" for v in rest)
        return IntractableError(
            f"cannot eliminate plates {plate_str(L)} in polynomial time: after summing out the "
            f"variables local to {plate_str(L)}, a factor still couples {', '.join(by_plates)}, "
            "whose plates are not nested (the tractability condition of Obermeyer et al. "
            "2019). Way out: unroll one of those plates (PlatedFactorGraph(..., "
            "unroll=[plate]); exact, exponential in its size), or move the coupling factor "
            "out of one of the plates"
        )

    def scan_leaf(self, L: frozenset[str], t: str, slots: list[int], local: set[str],
                  tree: dict[frozenset[str], list[int]]) -> None:
        curr = self.chain[t]
        prev = self.chain_prev[t]
        bad = [c for c in curr if self.ordinals[c] != L]
        if bad:
            raise IntractableError(
                f"chain variables of sequential plate {t!r} live in different plates: "
                + ", ".join(f"{c!r} in {plate_str(self.ordinals[c])}" for c in curr)
                + "; give every chain variable of a plate the same plates"
            )
        nonchain = local - set(curr)
        parts = []
        for members, elim in self.components(slots, nonchain):
            parts.append(self.contract(members, elim, f"per element of {t!r}"))
        x = self.contract(parts, set(), f"transition of chain {t!r}") if len(parts) > 1 \
            else parts[0]
        outer = self.vars_of(x) - set(curr) - set(prev)
        after = L - {t}
        wrong = sorted(v for v in outer if not self.ordinals[v] <= after)
        if wrong:
            raise IntractableError(
                f"the chain along sequential plate {t!r} is coupled to "
                + ", ".join(f"{v!r} in {plate_str(self.ordinals[v])}" for v in wrong)
                + f", which varies along {t!r} but not with the chain {list(curr)}; such a "
                "coupling has no polynomial-time elimination. Way out: make that variable a "
                "chain variable of the plate, or move it out of the plate"
            )
        src = self.slots[x]
        plates_after = self.canon(after)
        outer_c = self.canon(outer)
        target = list(plates_after) + list(outer_c) + [t] + list(prev) + list(curr)
        present = [d for d in target if d in src.dims]
        in_perm = tuple(src.dims.index(d) for d in present)
        in_view = tuple(self.sizes[d] if d in src.dims else 1 for d in target)
        in_full = tuple(self.sizes[d] for d in target)
        batch_shape = tuple(self.sizes[d] for d in list(plates_after) + list(outer_c))
        present_prev = tuple(q for q in prev if q in src.dims)
        out_batch = list(plates_after) + list(outer_c) + list(present_prev)
        out_dims = self.canon(out_batch)
        out_perm = tuple(out_batch.index(d) for d in out_dims)
        k_state = math.prod(self.sizes[c] for c in curr)
        T = self.sizes[t]
        spec = ScanSpec(
            plate=t, curr=curr, prev=prev, present_prev=present_prev, in_perm=in_perm,
            in_view=in_view, in_full=in_full, batch_shape=batch_shape, length=T, state=k_state,
            prev_sizes=tuple(self.sizes[q] for q in prev),
            curr_sizes=tuple(self.sizes[c] for c in curr), out_batch_dims=tuple(out_batch),
            out_perm=out_perm, plates_before=self.canon(L), plates_after=plates_after)
        out = self.new_slot(out_dims)
        batch = math.prod(batch_shape)
        per_level = 2 * T * batch * k_state * k_state
        flops = 2 * T * batch * k_state ** 3
        temp = per_level if self.s.ring == "log" else T * batch * k_state ** 3
        self.ops.append(Op("scan", (x,), out, elim=tuple(curr), scan=spec, flops=flops,
                           temp_numel=temp, note=f"parallel scan along {t!r} (length {T}, "
                           f"{k_state} states, batch {batch})"))
        if self.s.memory_cap is not None and temp * self.s.itemsize > self.s.memory_cap:
            raise MemoryCapError(
                f"the scan along sequential plate {t!r} needs "
                f"{_fmt_bytes(temp * self.s.itemsize)}, over the memory cap of "
                f"{_fmt_bytes(self.s.memory_cap)}; raise memory_cap"
            )
        rest = self.vars_of(out)
        parent = frozenset().union(*(self.ordinals[v] for v in rest)) | self.keep_plates
        r = self.product(out, after - parent, f"product over plates {sorted(after - parent)}")
        tree.setdefault(parent, []).append(r)

    def cost(self, n_inputs: int) -> CostReport:
        item = self.s.itemsize
        consumer: dict[int, int] = {}
        for k, op in enumerate(self.ops):
            for i in op.ins:
                consumer[i] = k
        inputs = sum(self.slots[i].numel for i in range(n_inputs))
        live = 0
        peak = inputs
        saved = inputs
        flops = 0
        steps = []
        for k, op in enumerate(self.ops):
            out = self.slots[op.out].numel
            peak = max(peak, inputs + live + out + op.temp_numel)
            saved += out + (op.temp_numel if op.kind in ("pair", "scan", "unary", "chain")
                            else 0)
            live += out
            for i in op.ins:
                if i >= n_inputs and consumer.get(i) == k:
                    live -= self.slots[i].numel
            flops += op.flops
            ins = " x ".join("(" + ",".join(self.slots[i].dims) + ")" for i in op.ins)
            sl = f" [sliced {op.slice_chunks}x along {self.slots[op.out].dims[op.slice_dim]!r}]" \
                if op.slice_dim is not None else ""
            what = f"sum out {list(op.elim)} " if op.kind in ("pair", "unary") and op.elim \
                else ""
            if op.kind == "chain":
                ins = f"{len(op.ins)} factors"
            steps.append(f"{op.kind:9s} {ins} -> ({','.join(self.slots[op.out].dims)})  "
                         f"{what}{op.note}{sl}")
        return CostReport(flops=flops, peak_bytes=peak * item, peak_bytes_saved=saved * item,
                          steps=steps)


# ----------------------------------------------------------------------------------------------
# cache

_CACHE: OrderedDict[Structure, Plan] = OrderedDict()
_CACHE_SIZE = 256
_STATS = {"hits": 0, "misses": 0}


def make_plan(structure: Structure) -> Plan:
    """Return the plan for ``structure``, building it on a cache miss.

    :raises GraphError: if the structure is malformed.
    :raises IntractableError: if the graph has no polynomial-time elimination.
    :raises MemoryCapError: if a step cannot be made to fit ``structure.memory_cap``.
    """
    plan = _CACHE.get(structure)
    if plan is not None:
        _CACHE.move_to_end(structure)
        _STATS["hits"] += 1
        return plan
    _STATS["misses"] += 1
    plan = _Builder(structure).build()
    _CACHE[structure] = plan
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan


def clear_plan_cache() -> None:
    """Drop every cached plan and reset the hit/miss counters."""
    _CACHE.clear()
    _STATS["hits"] = _STATS["misses"] = 0


def set_plan_cache_size(size: int) -> None:
    """Bound the plan cache to ``size`` plans (least recently used are dropped first)."""
    global _CACHE_SIZE
    if size < 0:
        raise ValueError(f"plan cache size must be >= 0, got {size}")
    _CACHE_SIZE = size
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)


def plan_cache_info() -> dict[str, int]:
    """Return ``{"hits", "misses", "size", "maxsize"}`` of the plan cache."""
    return {**_STATS, "size": len(_CACHE), "maxsize": _CACHE_SIZE}
