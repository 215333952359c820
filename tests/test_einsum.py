"""The functional face, :func:`plated.einsum`, against Pyro and the brute-force twin.

References (used only as references):

* ``pyro.ops.contract.naive_ubersum`` (log backend), which unrolls plates: our results must equal
  it exactly (shapes included), for every output, including outputs that keep plated variables and
  outputs with plates only (which broadcast);
* ``pyro.ops.contract.einsum(..., modulo_total=True)``, Pyro's fast TVE: it agrees with us exactly
  for ``""`` outputs and up to a scale per output plate slice otherwise, so nonempty outputs are
  compared after normalising over their variable dims;
* :func:`plated.naive.einsum` for the max-product ring (Pyro has no naive max-product ubersum).

The hand-written battery takes its equations from Pyro's own tests of ``ubersum`` / ``einsum``
(plates are ``i, j, k``; variables ``a``-``g``), plus a few of our own.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import RTOL
from pyro.ops.contract import einsum as pyro_einsum
from pyro.ops.contract import naive_ubersum
from torch.testing import assert_close

import plated
from plated import naive, testing

BACKEND = "pyro.ops.einsum.torch_log"

#: (equation, plates); each equation may have several outputs.
BATTERY = [
    # no plates
    ("->", ""),
    ("a->", ""),
    ("a->a", ""),
    (",ab->", ""),
    ("ab,bc->ac", ""),
    ("ab,bc->a,b,c", ""),
    ("ab->,a,b,ab,ba", ""),
    ("ab,bc->,a,b,c,ab,bc,ac,abc", ""),
    ("ab,bc,cd->,a,b,c,d,ab,ac,ad,bc,bd,cd,abc,acd,bcd,abcd", ""),
    # one plate
    ("i->,i", "i"),
    (",i->,i", "i"),
    (",i,i->,i", "i"),
    ("ai->", "i"),
    ("ai->ai", "i"),
    ("a,ai->", "i"),
    ("ai,ai->", "i"),
    ("a,ai,bi->a", "i"),
    ("ab,ai,bi->", "i"),
    ("ai,abi->bi", "i"),
    ("ai,abi->i,", "i"),
    ("a,ai,abi->a,bi,i,ai", "i"),
    (",i,ia->,i,ia", "i"),
    (",i,i,ia,ia->,i,ia", "i"),
    ("bi,ia->,i,ia,ib,iab", "i"),
    ("abi,b->,b,ai,abi", "i"),
    ("ab,bci->,a,b,ab,i,ai,bi,ci,abi,bci,abci", "i"),
    # two or three plates
    ("ab,aij,bij->", "ij"),
    ("a,ai,aij->", "ij"),
    ("ai,aij->ai,aij", "ij"),
    ("ai,aj->,a,ij", "ij"),
    ("a,ia,jb,ijab->,a", "ij"),  # tractable: a is global (the factor 'a' has no plates)
    ("ia,ja,ija->,a,i,ia,j,ja,ija", "ij"),
    ("i,jb,ijab->,i,j,jb,ij,ija,ijb,ijab", "ij"),
    (",i,j,a,ij,ia,ja,ija->,a,i,j,ia,ja,ij,ija", "ij"),
    (",ia,ija,ika->,i,j,k,ij,ik,ijk,ia,ija,ika,ijka", "ijk"),
    ("ab,bcij->,a,b,ab,i,j,ij,ai,aj,aij,bi,bj,bij,cij,abij,acij,bcij,abcij", "ij"),
    ("abi,bcij->,i,ai,bi,abi,j,ij,aij,bij,cij,abij,bcij,abcij", "ij"),
    ("ab,bcdi,deij->,a,b,ci,di,eij", "ij"),
    ("ab,bcdi,defij,fgijk->,a,b,ci,di,eij,fij,gijk", "ijk"),
    ("aik,bij,abci,cd,dej,eij->,ai,bi,ej,aik,bij,eij", "ijk"),
    ("aij,abi,bc,cdj,dij->,bi,cj,aij,dij,adij", "ij"),
    ("c,cda,ecb->,b,c", "ab"),
    ("ab,bc,cd->a,b,c,d", "ad"),
]

#: equations that are exponential for TVE: Pyro raises NotImplementedError, we IntractableError.
INTRACTABLE = [
    ("ia,jb,ijab->", "ij"),  # a in {i}, b in {j}, coupled by a factor in {i, j}
    ("ia,jb,ijab->,i,ia", "ij"),
    ("c,ica,jcb,ijab->c", "ij"),  # the same, with a global c kept in the output
    ("ika,jkb,ijkab->", "ijk"),  # a in {i, k}, b in {j, k}, coupled in {i, j, k}
]


def ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{eq}|{pl}" for eq, pl in cases]


def make_operands(equation: str, sizes: tuple[int, ...] = (2, 3, 4),
                  requires_grad: bool = False, dtype: torch.dtype = torch.float64
                  ) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Random operands, sizes cycling through ``sizes`` in letter order (as Pyro's tests do)."""
    symbols = sorted(set(equation) - set(",->"))
    size = dict(zip(symbols, itertools.cycle(sizes), strict=False))
    inputs = equation.split("->")[0].split(",")
    ops = [torch.randn(tuple(size[d] for d in dims), dtype=dtype).requires_grad_(requires_grad)
           for dims in inputs]
    return ops, size


def outputs_of(equation: str) -> list[str]:
    return equation.split("->")[1].split(",")


def assert_outputs_equal(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...],
                         equation: str, rtol: float = RTOL, atol: float = 1e-10) -> None:
    outs = outputs_of(equation)
    assert isinstance(ours, tuple) and len(ours) == len(outs) == len(ref), equation
    for out, a, b in zip(outs, ours, ref, strict=True):
        assert a.shape == b.shape, f"{equation}: output {out!r} shape {a.shape} vs {b.shape}"
        assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, out=out: f"{equation} {out!r}: {m}")


def check_gradients(equation: str, ops: list[torch.Tensor], plates: str, tag: str) -> None:
    """The gradient of a random linear functional of all outputs matches ``naive_ubersum``'s."""
    ours = plated.einsum(equation, *ops, plates=plates)
    ref = naive_ubersum(equation, *ops, plates=plates, backend=BACKEND)
    weights = [torch.randn(x.shape) for x in ref]

    def grads(outs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        total = sum((w * x).sum() for w, x in zip(weights, outs, strict=True))
        gs = torch.autograd.grad(total, ops, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, ops, strict=True)]

    for k, (a, b) in enumerate(zip(grads(ours), grads(ref), strict=True)):
        assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"{tag}, operand {k}: {m}")


# -- the battery ----------------------------------------------------------------------------------


def test_battery_is_big_enough() -> None:
    assert len(BATTERY) >= 25
    assert sum(len(outputs_of(eq)) for eq, _ in BATTERY) >= 150


@pytest.mark.parametrize("sizes", [(2, 3, 4), (1, 2, 3), (1,)], ids=str)
@pytest.mark.parametrize("equation,plates", BATTERY, ids=ids(BATTERY))
def test_battery_vs_naive_ubersum(equation: str, plates: str, sizes: tuple[int, ...]) -> None:
    ops, size = make_operands(equation, sizes)
    ours = plated.einsum(equation, *ops, plates=plates)
    ref = naive_ubersum(equation, *ops, plates=plates, backend=BACKEND)
    assert_outputs_equal(ours, ref, equation)
    for out, x in zip(outputs_of(equation), ours, strict=True):
        assert x.shape == tuple(size[d] for d in out), f"{equation}: {out!r}"


@pytest.mark.parametrize("equation,plates", BATTERY, ids=ids(BATTERY))
def test_battery_vs_pyro_einsum(equation: str, plates: str) -> None:
    """Exact for ``""`` outputs; up to a scale per output plate slice for outputs with variables
    (compared after subtracting the logsumexp over the output's variable dims)."""
    ops, _ = make_operands(equation)
    ours = plated.einsum(equation, *ops, plates=plates)
    ref = pyro_einsum(equation, *ops, plates=plates, backend=BACKEND, modulo_total=True)
    compared = 0
    for out, a, b in zip(outputs_of(equation), ours, ref, strict=True):
        assert a.shape == b.shape, f"{equation}: {out!r}"
        var_dims = tuple(k for k, d in enumerate(out) if d not in plates)
        if out == "":
            assert_close(a, b, rtol=RTOL, atol=1e-10, msg=lambda m: f"{equation} '': {m}")
        elif var_dims:
            na = a - a.logsumexp(var_dims, keepdim=True)
            nb = b - b.logsumexp(var_dims, keepdim=True)
            assert_close(na, nb, rtol=RTOL, atol=1e-10,
                         msg=lambda m, out=out: f"{equation} {out!r}: {m}")
        else:
            continue  # plates only: Pyro's scale is arbitrary (covered by naive_ubersum)
        compared += 1
    assert compared >= 1


@pytest.mark.parametrize("equation,plates", BATTERY, ids=ids(BATTERY))
def test_battery_max_ring_vs_naive(equation: str, plates: str) -> None:
    ops, _ = make_operands(equation, (1, 2, 3))
    ours = plated.einsum(equation, *ops, plates=plates, ring="max")
    ref = naive.einsum(equation, *ops, plates=plates, ring="max")
    assert_outputs_equal(ours, ref, equation)


@pytest.mark.parametrize("equation,plates", BATTERY, ids=ids(BATTERY))
def test_battery_gradients_vs_naive_ubersum(equation: str, plates: str) -> None:
    ops, _ = make_operands(equation, (2, 3), requires_grad=True)
    check_gradients(equation, ops, plates, equation)


@pytest.mark.parametrize("equation,plates", INTRACTABLE, ids=ids(INTRACTABLE))
def test_intractable_equations_raise(equation: str, plates: str) -> None:
    ops, _ = make_operands(equation)
    with pytest.raises(NotImplementedError):  # the reference refuses it too
        pyro_einsum(equation, *ops, plates=plates, backend=BACKEND, modulo_total=True)
    with pytest.raises(plated.IntractableError, match="polynomial time") as info:
        plated.einsum(equation, *ops, plates=plates)
    assert isinstance(info.value, NotImplementedError)
    with pytest.raises(plated.IntractableError):
        plated.einsum(equation, *ops, plates=plates, ring="max")
    # it is a question of cost, not of meaning: the unrolled reference still computes it
    ref = naive_ubersum(equation, *ops, plates=plates, backend=BACKEND)
    assert all(torch.isfinite(x).all() for x in ref)


# -- random equations -----------------------------------------------------------------------------

N_RANDOM = 400
RANDOM_CHUNKS = [range(k, k + 100) for k in range(0, N_RANDOM, 100)]


@pytest.mark.parametrize("seeds", RANDOM_CHUNKS, ids=lambda r: f"seeds{r.start}-{r.stop - 1}")
def test_random_einsum_vs_references(seeds: range) -> None:
    """Log ring vs ``naive_ubersum``; max ring vs :func:`plated.naive.einsum`; and the twin's log
    ring vs ``naive_ubersum`` (so the max-ring reference is itself anchored to Pyro's semantics)."""
    for seed in seeds:
        equation, ops, plates = testing.random_einsum(seed)
        tag = f"seed {seed}: {equation} plates={plates!r}"
        ours = plated.einsum(equation, *ops, plates=plates)
        ref = naive_ubersum(equation, *ops, plates=plates, backend=BACKEND)
        atol = 1e-10 * max(1, sum(x.numel() for x in ops))
        for a, b in zip(ours, ref, strict=True):
            assert a.shape == b.shape, tag
            assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m, tag=tag: f"{tag}: {m}")
        twin = naive.einsum(equation, *ops, plates=plates)
        for a, b in zip(twin, ref, strict=True):
            assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m, tag=tag: f"twin {tag}: {m}")
        ours_max = plated.einsum(equation, *ops, plates=plates, ring="max")
        ref_max = naive.einsum(equation, *ops, plates=plates, ring="max")
        for a, b in zip(ours_max, ref_max, strict=True):
            assert a.shape == b.shape, tag
            assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m, tag=tag: f"max {tag}: {m}")


def test_random_einsum_with_hard_zeros() -> None:
    n_neginf = 0
    for seed in range(200):
        equation, ops, plates = testing.random_einsum(seed, hard_zero_prob=0.3)
        tag = f"seed {seed}: {equation} plates={plates!r}"
        ours = plated.einsum(equation, *ops, plates=plates)
        ref = naive_ubersum(equation, *ops, plates=plates, backend=BACKEND)
        for a, b in zip(ours, ref, strict=True):
            assert not a.isnan().any(), tag
            assert_close(a, b, rtol=RTOL, atol=1e-10, msg=lambda m, tag=tag: f"{tag}: {m}")
            n_neginf += int((a == -math.inf).any())
    assert n_neginf >= 20, n_neginf


def keeps_plated_variable(equation: str, plates: str) -> bool:
    """Whether some output keeps a variable that has plates (Pyro's ``global_local`` case)."""
    inputs = equation.split("->")[0].split(",")
    ordinal: dict[str, set[str]] = {}
    for dims in inputs:
        for d in set(dims) - set(plates):
            ordinal[d] = ordinal.get(d, set(dims) & set(plates)) & set(dims)
    plated_vars = {d for d, o in ordinal.items() if o}
    return any(set(out) & plated_vars for out in outputs_of(equation))


def check_random_gradients(seeds: range, keep_plated: bool) -> int:
    checked = 0
    for seed in seeds:
        equation, ops, plates = testing.random_einsum(seed, requires_grad=True)
        if keeps_plated_variable(equation, plates) != keep_plated:
            continue
        check_gradients(equation, ops, plates, f"seed {seed}: {equation} plates={plates!r}")
        checked += 1
    return checked


def test_random_einsum_gradients_vs_naive_ubersum() -> None:
    """Outputs that keep no plated variable (see the next test for those that do)."""
    assert check_random_gradients(range(150), keep_plated=False) >= 80


def test_random_einsum_gradients_keeping_plated_variables() -> None:
    assert check_random_gradients(range(150), keep_plated=True) >= 20


def test_gradient_of_output_keeping_plated_variable_by_hand() -> None:
    """``"ai->ai"``: out[a, i] = x[a, i] + sum_{i' != i} logsumexp_a x[a, i'] (a has one copy per
    element of i; the copy at i is clamped, the others are summed out). Its gradient follows."""
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(2, 3)
    lse = x.logsumexp(0)
    manual = x + (lse.sum() - lse)
    (ours,) = plated.einsum("ai->ai", x, plates="i")
    assert_close(ours, manual)
    (g_ours,) = torch.autograd.grad((w * ours).sum(), x)
    (g_manual,) = torch.autograd.grad((w * manual).sum(), x)
    assert_close(g_ours, g_manual, rtol=1e-10, atol=1e-12)


#: float32 results are within this bound of float64 ones, relative to ``1 + |value|``.
FLOAT32_RTOL = 1e-5


def test_float32_agrees_with_float64() -> None:
    worst = 0.0
    for seed in range(300):
        equation, ops, plates = testing.random_einsum(seed)
        for ring in ("log", "max"):
            hi = plated.einsum(equation, *ops, plates=plates, ring=ring)
            lo = plated.einsum(equation, *[x.float() for x in ops], plates=plates, ring=ring)
            for a, b in zip(lo, hi, strict=True):
                assert a.dtype == torch.float32, f"seed {seed}"
                err = ((a.double() - b).abs() / (1 + b.abs())).max().item() if b.numel() else 0.0
                worst = max(worst, err)
                assert err < FLOAT32_RTOL, f"seed {seed} {ring}: {equation} relative error {err}"
    assert worst > 0  # float32 really was used


# -- edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ring", ["log", "max"])
@pytest.mark.parametrize("equation,plates,dead", [
    ("ab,bc->", "", 0),
    ("ab,bc->", "", 1),
    ("ab,bc->a,c,", "", 1),
    ("a,ai->", "i", 1),
    ("ai,ai->,ai,i", "i", 0),
    ("a,ai,abi->a,bi", "i", 2),
    ("ab,aij,bij->,a", "ij", 1),
], ids=lambda x: str(x))
def test_all_neginf_operand(equation: str, plates: str, dead: int, ring: str) -> None:
    """An operand that is -inf everywhere zeroes every output: results are -inf, and neither the
    results nor their gradients contain NaN."""
    ops, _ = make_operands(equation, (2, 3, 1, 4))
    ops[dead] = torch.full_like(ops[dead], -math.inf)
    ops = [x.requires_grad_() for x in ops]
    outs = plated.einsum(equation, *ops, plates=plates, ring=ring)  # type: ignore[arg-type]
    for out, x in zip(outputs_of(equation), outs, strict=True):
        assert (x == -math.inf).all(), f"{equation} {out!r}: {x}"
    total = sum(x.clamp(min=-1e3).sum() for x in outs)
    grads = torch.autograd.grad(total, ops, allow_unused=True)
    for k, gr in enumerate(grads):
        assert gr is None or not gr.isnan().any(), f"{equation}: NaN gradient of operand {k}"
    outs = plated.einsum(equation, *ops, plates=plates, ring=ring)  # type: ignore[arg-type]
    grads = torch.autograd.grad(outs[0].sum(), ops, allow_unused=True)
    for k, gr in enumerate(grads):
        assert gr is None or not gr.isnan().any(), f"{equation}: NaN gradient of operand {k}"


def test_size_one_dims_everywhere() -> None:
    """Every dim of size one, plates included (the battery covers mixed sizes)."""
    for equation, plates in BATTERY:
        ops, _ = make_operands(equation, (1,))
        ours = plated.einsum(equation, *ops, plates=plates)
        ref = naive_ubersum(equation, *ops, plates=plates, backend=BACKEND)
        assert_outputs_equal(ours, ref, equation)


def test_einsum_hand_computed() -> None:
    """A few values computed by hand from the definition."""
    x = torch.randn(3, 4)  # a, i: a has one copy per element of plate i
    (z,) = plated.einsum("ai->", x, plates="i")
    assert_close(z, x.logsumexp(0).sum())
    w, y = torch.randn(3), torch.randn(3, 5)  # a ; a, i
    (z,) = plated.einsum("a,ai->", w, y, plates="i")
    assert_close(z, (w + y.sum(1)).logsumexp(0))
    (z,) = plated.einsum("a,ai->a", w, y, plates="i")
    assert_close(z, w + y.sum(1))
    (z,) = plated.einsum("a,ai->i", w, y, plates="i")
    assert_close(z, (w + y.sum(1)).logsumexp(0).expand(5))
    (m,) = plated.einsum("a,ai->", w, y, plates="i", ring="max")
    assert_close(m, (w + y.sum(1)).max())
