"""The elimination loop: Algorithm 1 of Obermeyer et al. (2019), compiled into plan steps.

"Tensor Variable Elimination for Plated Factor Graphs" eliminates a plated factor graph leaf plate
set by leaf plate set. Terms are kept in a *plate tree*, a map from each plate set to the terms
that live in it. Repeatedly:

1. take a leaf, a plate set :math:`L` of the most plates;
2. in each connected component of its terms, sum out the variables whose plates are exactly
   :math:`L`;
3. product-reduce the plates of :math:`L` that the component's remaining variables do not need,
   and hand the result to that parent plate set.

A leaf whose sequential plate has chain variables in exactly :math:`L` is eliminated instead by a
parallel scan along that plate (Sec. 4 of the paper). Variables that are kept in the result
(einsum outputs) follow Pyro's ``global_local`` split: the part of a term that conditions on them
is set aside and combined with the root at the end.

The loop raises :class:`~plated.errors.IntractableError` when a component still couples
variables whose plates are not nested: the paper's tractability condition.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..errors import IntractableError
from .analysis import Analysis, analyse, connected_components, plate_str
from .chains import (
    chain_method,
    chain_need,
    chain_times,
    describe_times,
    forced_method,
    recursion_cost,
    scan_cost,
    scan_layout,
)
from .cost import CAP_MARGIN, cost_report
from .emit import Emitter
from .ir import PairStep, Plan, ScanStep, Step, Structure, check_working_memory

#: What a fused pair step adds to its chain step's note (see :attr:`Plan.fused`).
FUSED_NOTE = ("; its transition's parts are passed unsummed (where one is a (K, K) matrix "
              "shared by every element and step, each step is one matrix product; where the "
              "state is several variables and no part spans them all, each step contracts the "
              "parts one by one)")


#: What a fused chain step adds to its note where the cost model preferred the blocked
#: recursion of the summed transition: the sequential recursion on the parts runs instead.
FUSED_RECURSION = ("; fused: the sequential recursion on the transition's parts, not the "
                   "blocked recursion on their sum")


def _fusable(step: ScanStep, structure: Structure) -> ScanStep | None:
    """``step`` as a fused chain runs it: the sequential recursion, on its transition's
    parts. A step planned by the recursion stays; one planned by the blocked recursion becomes
    the recursion where the recursion beats the scan (the choice before the blocked method
    joined; the cost model has no figure for the parts' recursion itself; the memory cap still
    holds, since the recursion's working memory is under the blocked recursion's, which
    keeps the exponentials and a fresh gradient); else ``None`` (not fused; so too where
    :func:`~plated.plan.chains.forced_chain_method` forces the blocked recursion)."""
    if step.method == "recursion":
        return step
    if step.method != "blocked" or forced_method() == "blocked":
        return None
    lay = step.layout
    batch = math.prod(lay.batch_shape)
    times = chain_times(structure.ring, batch, lay.length, lay.state, structure.device,
                        structure.itemsize)
    if times["recursion"] > times["scan"]:
        return None
    copied = (lay.in_perm != tuple(range(len(lay.in_perm))) or lay.in_view != lay.in_full)
    note = step.note.replace(describe_times("blocked", times), describe_times("recursion", times))
    cost: dict[str, Any] = dict(recursion_cost(structure.ring, batch, lay.length, lay.state,
                                               copied=copied))
    return replace(step, method="recursion", note=note + FUSED_RECURSION, **cost)


def fused_pairs(steps: list[Step], last_read: dict[int, int], result: int,
                structure: Structure) -> set[int]:
    """The pair steps whose output, a broadcast sum (nothing eliminated), is read only by the
    next step, a chain eliminated by recursion (:func:`_fusable`; the step is replaced by its
    fused form), or only by a later such pair step (see :attr:`Plan.fused`)."""
    readers: dict[int, int] = {}
    for step in steps:
        for i in step.ins:
            readers[i] = readers.get(i, 0) + 1
    fused: set[int] = set()
    for k in range(len(steps) - 2, -1, -1):  # from the end: a pair may feed a fused pair
        step = steps[k]
        if (not isinstance(step, PairStep) or step.elim or step.slice_dim is not None
                or step.recompute or readers.get(step.out) != 1 or step.out == result):
            continue
        j = last_read.get(step.out, -1)  # its one reader
        nxt = steps[j] if k < j < len(steps) else None
        if isinstance(nxt, ScanStep) and j == k + 1 and nxt.ins == (step.out,):
            chain = _fusable(nxt, structure)
            if chain is not None:
                steps[j] = chain
                fused.add(k)
        elif j in fused and isinstance(nxt, PairStep):
            fused.add(k)
    return fused

__all__ = ["build_plan"]

PlateTree = dict[frozenset[str], list[int]]


def build_plan(structure: Structure) -> Plan:
    """Check ``structure``, then compile its elimination into a :class:`~plated.plan.ir.Plan`.

    :raises GraphError: if the structure is malformed (see :func:`~plated.plan.analysis.analyse`).
    :raises IntractableError: if no polynomial-time elimination exists.
    :raises MemoryCapError: if a step cannot be made to fit ``structure.memory_cap``.
    """
    return _Elimination(structure, analyse(structure)).run()


class _Elimination:
    """The state of one run of the loop: the emitter, and the conditional (local) terms of kept
    variables set aside for the final combination."""

    def __init__(self, structure: Structure, analysis: Analysis) -> None:
        self.structure = structure
        self.analysis = analysis
        self.emitter = Emitter(structure, analysis)
        self.kept_plates = frozenset(structure.keep_plates)
        self.keep_vars = set(structure.keep_vars)
        self.local_dims: set[str] = set(structure.keep_vars)  # kept from here on
        self.local_terms: list[int] = []

    def run(self) -> Plan:
        """Compile the whole elimination (every phase below) and return the plan."""
        structure, analysis, emitter = self.structure, self.analysis, self.emitter
        ordinals = analysis.ordinals

        # Phase 1: the input factors become slots in canonical dim order, grouped by plates.
        input_perms: list[tuple[int, ...] | None] = []
        tree: PlateTree = {}
        for dims, _ in structure.inputs:
            canonical = analysis.canon(dims)
            perm = tuple(dims.index(d) for d in canonical)
            input_perms.append(None if perm == tuple(range(len(perm))) else perm)
            slot = emitter.new_slot(canonical)
            tree.setdefault(frozenset(d for d in dims if d in analysis.plates), []).append(slot)
        n_inputs = len(structure.inputs)

        # Phase 2: eliminate leaf plate sets, most plates first (ties broken by name).
        while True:
            pending = [plates for plates, terms in tree.items()
                       if terms and plates != self.kept_plates]
            if not pending:
                break
            leaf = max(pending, key=lambda plates: (len(plates), sorted(plates)))
            terms = tree.pop(leaf)
            term_vars = set().union(*(emitter.vars_of(i) for i in terms))
            local = {v for v in term_vars
                     if ordinals[v] == leaf and v not in self.local_dims}
            scan_plates = [plate for plate in leaf if plate in analysis.chain_vars
                           and any(ordinals[c] == leaf for c in analysis.chain_vars[plate])]
            if len(scan_plates) > 1:
                raise IntractableError(
                    f"sequential plates {sorted(scan_plates)} both have chain variables in "
                    f"plates {plate_str(leaf)}: a grid of chains has no polynomial-time "
                    "elimination", plates=scan_plates,
                    remedies=["make one of the plates independent", "unroll it"])
            if scan_plates:
                self.scan_leaf(leaf, scan_plates[0], terms, local, tree)
                continue
            kept_here = {v for v in term_vars if ordinals[v] == leaf and v in self.local_dims}
            for members, elim in self.components(terms, local | kept_here):
                elim = elim - kept_here
                result = emitter.contract(members, elim, f"in {plate_str(leaf)}")
                rest = emitter.vars_of(result)
                split = rest & kept_here
                parent = frozenset().union(
                    *(analysis.effective_ordinal(v, leaf) for v in rest - split)) \
                    | self.kept_plates
                if parent == leaf:
                    raise self.intractable(leaf, rest - split)
                if split:
                    result = self.global_local(result, split, leaf)
                result = emitter.product(result, leaf - parent,
                                         f"product over plates {sorted(leaf - parent)}")
                tree.setdefault(parent, []).append(result)

        # Phase 3: contract what is left at the root (the kept plates), component by component.
        roots = tree.pop(self.kept_plates, [])
        local = {v for v in set().union(set(), *(emitter.vars_of(i) for i in roots))
                 if v not in self.local_dims}
        finals = [emitter.contract(members, elim, "at the root")
                  for members, elim in self.components(roots, local)]

        # Phase 4: combine the root with the set-aside conditionals of kept variables (Pyro's
        # localizing pass), summing out every variable that is not an output.
        if self.local_terms:
            ins = finals + self.local_terms
            elim_all = set().union(*(emitter.vars_of(i) for i in ins)) - self.keep_vars
            result = emitter.contract(ins, elim_all, "combine local terms with the root")
        else:
            result = emitter.contract(finals, set(), "combine the root")

        # Phase 5: when each intermediate is last read, and the predicted cost.
        last_read: dict[int, int] = {}
        for k, step in enumerate(emitter.steps):
            for i in step.ins:
                last_read[i] = k
        frees = [tuple(i for i in step.ins if i >= n_inputs and last_read[i] == k)
                 for k, step in enumerate(emitter.steps)]
        steps = list(emitter.steps)
        fused = (fused_pairs(steps, last_read, result, structure) if structure.ring == "log"
                 else set())
        for k in fused:
            if isinstance(steps[k + 1], ScanStep):
                steps[k + 1] = replace(steps[k + 1], note=steps[k + 1].note + FUSED_NOTE)
        cost = cost_report(emitter.slots, steps, n_inputs, structure.itemsize)
        return Plan(structure, emitter.slots, tuple(steps), input_perms, result,
                    emitter.slots[result].dims, analysis.var_sizes, analysis.ordinals,
                    analysis.order, cost, frees, frozenset(fused))

    def components(self, terms: list[int], local: set[str]) -> list[tuple[list[int], set[str]]]:
        """The connected components of ``terms``, joined by shared variables of ``local``.

        :return: per component, its terms (in input order) and the ``local`` variables in it.
        """
        scopes = [self.emitter.vars_of(slot) for slot in terms]
        out = []
        for group in connected_components(scopes, local):
            members = [terms[k] for k in group]
            out.append((members, set().union(*(scopes[k] for k in group)) & local))
        return out

    def global_local(self, term: int, split: set[str], leaf: frozenset[str]) -> int:
        """Split a term over kept variables ``split`` (plates ``leaf``) into a global part,
        returned and product-reduced as usual, and a local part, the conditional of ``split``
        given the rest, set aside for the final combination (Pyro's ``global_local``). Every
        variable of the local part is kept from then on."""
        emitter = self.emitter
        src = emitter.slots[term]
        total = emitter.reduce(term, tuple(d for d in src.dims if d not in split),
                               f"total of kept {sorted(split)} in {plate_str(leaf)}")
        local = emitter.normalize(term, total, split, f"conditional of kept {sorted(split)}")
        self.local_terms.append(local)
        self.local_dims |= emitter.vars_of(local)
        return total

    def intractable(self, leaf: frozenset[str], rest: set[str]) -> IntractableError:
        """The error for a component of ``leaf`` still coupling the variables ``rest``."""
        by_plates = sorted(f"{v!r} in {plate_str(self.analysis.effective_ordinal(v, leaf))}"
                           for v in rest)
        return IntractableError(
            f"cannot eliminate plates {plate_str(leaf)} in polynomial time: after summing out the "
            f"variables local to {plate_str(leaf)}, a factor still couples {', '.join(by_plates)}, "
            "whose plates are not nested (the tractability condition of Obermeyer et al. 2019)",
            plates=leaf, variables=rest,
            remedies=["unroll one of those plates (PlatedFactorGraph(..., unroll=[plate]); exact, "
                      "exponential in its size)",
                      "move the coupling factor out of one of the plates"])

    def scan_leaf(self, leaf: frozenset[str], plate: str, terms: list[int], local: set[str],
                  tree: PlateTree) -> None:
        """Eliminate the leaf ``leaf`` whose sequential ``plate`` has its chain variables there:
        contract the leaf's terms into one transition factor per element, scan it along the
        plate, and hand the result to its parent plate set in ``tree``."""
        analysis, emitter = self.analysis, self.emitter
        ordinals = analysis.ordinals
        curr = analysis.chain_vars[plate]
        prev = analysis.chain_prevs[plate]
        misplaced = [c for c in curr if ordinals[c] != leaf]
        if misplaced:
            raise IntractableError(
                f"chain variables of sequential plate {plate!r} live in different plates: "
                + ", ".join(f"{c!r} in {plate_str(ordinals[c])}" for c in curr),
                plates=[plate], variables=curr,
                remedies=["give every chain variable of a plate the same plates"])
        # the transition: sum out the non-chain variables local to the leaf, then multiply
        nonchain = local - set(curr)
        parts = [emitter.contract(members, elim, f"per element of {plate!r}")
                 for members, elim in self.components(terms, nonchain)]
        transition = emitter.contract(parts, set(), f"transition of chain {plate!r}") \
            if len(parts) > 1 else parts[0]
        outer = emitter.vars_of(transition) - set(curr) - set(prev)
        after = leaf - {plate}
        coupled = sorted(v for v in outer if not ordinals[v] <= after)
        if coupled:
            raise IntractableError(
                f"the chain along sequential plate {plate!r} is coupled to "
                + ", ".join(f"{v!r} in {plate_str(ordinals[v])}" for v in coupled)
                + f", which varies along {plate!r} but not with the chain {list(curr)}; such a "
                "coupling has no polynomial-time elimination", plates=[plate],
                variables=coupled,
                remedies=["make that variable a chain variable of the plate",
                          "move it out of the plate"])
        layout, out_dims = scan_layout(emitter.slots[transition], plate, leaf, outer, analysis)
        batch = math.prod(layout.batch_shape)
        length, state = layout.length, layout.state
        st = self.structure
        copied = (layout.in_perm != tuple(range(len(layout.in_perm)))
                  or layout.in_view != layout.in_full)
        choice = chain_method(st.ring, batch, length, state, st.device, st.itemsize,
                              st.memory_cap, copied=copied)
        if choice is None:  # neither method fits: refused, with the smaller need
            need = min(chain_need(recursion_cost(st.ring, batch, length, state, copied=copied)),
                       chain_need(scan_cost(st.ring, batch, length, state)))
            check_working_memory(f"the chain along sequential plate {plate!r} (with the "
                                 f"headroom of CAP_MARGIN = {CAP_MARGIN})",
                                 math.ceil(need * CAP_MARGIN), st.itemsize, st.memory_cap)
        assert choice is not None  # refused above
        method, cost, times = choice
        out = emitter.new_slot(out_dims)
        emitter.emit(ScanStep(
            ins=(transition,), out=out, note=f"chain along {plate!r} (length {length}, "
            f"{state} states, batch {batch}) " + describe_times(method, times), layout=layout,
            method=method, **cost))
        rest = emitter.vars_of(out)
        parent = frozenset().union(*(ordinals[v] for v in rest)) | self.kept_plates
        result = emitter.product(out, after - parent,
                                 f"product over plates {sorted(after - parent)}")
        tree.setdefault(parent, []).append(result)
