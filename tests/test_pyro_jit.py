"""``JitTVE_ELBO`` (a drop-in for ``JitTraceEnum_ELBO``): its compiled step gives the losses and
gradients of ``TVE_ELBO``, call after call, and the draws of ``JitTraceEnum_ELBO`` when the guide
samples (a compiled step draws its random numbers in its own order, in Pyro's class as in ours)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
from helpers import real_data
from pyro import poutine
from pyro.infer import SVI, JitTraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from test_pyro_dropin import MIX_DATA, empty_guide, hmm_data, hmm_loop, hmm_vec, mixture

from plated.pyro import TVE_ELBO, JitTVE_ELBO

# torch 2.13 deprecates torch.jit.trace, which JitTraceEnum_ELBO compiles with too (through
# pyro.ops.jit.trace); the warning is torch's, not ours
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def clean_param_store() -> Iterator[None]:
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def delta_guide() -> Any:
    return AutoDelta(poutine.block(mixture, expose=["weights", "scale", "locs"]))


def normal_guide() -> Any:
    return AutoNormal(poutine.block(mixture, hide=["assignment"]))


CASES: dict[str, tuple[Any, Any, int, Any]] = {
    "hmm_loop": (hmm_loop, lambda: empty_guide, 1, hmm_data),
    "hmm_markov_plate": (hmm_vec, lambda: empty_guide, 2, hmm_data),
    "mixture_AutoDelta": (mixture, delta_guide, 1, lambda: MIX_DATA),
}


def train(cls: Any, case: str, steps: int, seed: int = 0
          ) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """``steps`` SVI steps with ``cls``: the losses, the parameters after them (unconstrained)
    and the ELBO."""
    model, make_guide, nesting, data = CASES.get(case, (mixture, normal_guide, 1,
                                                        lambda: MIX_DATA))
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    elbo = cls(max_plate_nesting=nesting, ignore_jit_warnings=True)
    svi = SVI(model, make_guide(), pyro.optim.Adam({"lr": 0.05}), elbo)
    losses = [svi.step(data()) for _ in range(steps)]
    params = {name: pyro.param(name).unconstrained().detach().clone()
              for name in pyro.get_param_store()}
    return losses, params, elbo


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_steps_equal_tve_elbo(case: str) -> None:
    """Every step of SVI, and the parameters after them: the compiled step's gradients are
    TVE_ELBO's at each new parameter value."""
    ref_losses, ref_params, _ = train(TVE_ELBO, case, 5)
    losses, params, elbo = train(JitTVE_ELBO, case, 5)
    assert ref_losses[-1] < ref_losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-12, atol=1e-12)
    (compiled,) = elbo._compiled.values()  # one compiled step, traced once and rerun
    assert len(compiled.compiled) == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_differentiable_loss_and_gradients_equal_tve_elbo(case: str) -> None:
    model, make_guide, nesting, data = CASES[case]
    guide = make_guide()
    out = []
    for cls in (TVE_ELBO, JitTVE_ELBO):
        pyro.set_rng_seed(0)
        elbo = cls(max_plate_nesting=nesting, ignore_jit_warnings=True)
        for _ in range(2):  # the second call runs the compiled step
            loss = elbo.differentiable_loss(model, guide, data())
        params = [pyro.param(name).unconstrained() for name in sorted(pyro.get_param_store())]
        out.append((loss.detach(), torch.autograd.grad(loss, params)))
    (ref, ref_grads), (loss, grads) = out
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(ref_grads) > 0
    for g, h in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


def test_sampling_guide_matches_jit_trace_enum_elbo() -> None:
    """AutoNormal samples inside the compiled step: the same draws, losses and parameters as
    Pyro's compiled class from the same seed."""
    ref_losses, ref_params, _ = train(JitTraceEnum_ELBO, "mixture_AutoNormal", 6)
    losses, params, _ = train(JitTVE_ELBO, "mixture_AutoNormal", 6)
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-10)
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-9, atol=1e-10)



JSB = real_data("polyphonic/JSB_Chorales.mat")


@JSB.needed
def test_benchmark_smoke() -> None:
    """benchmarks/pyro_jit.py runs end to end (tiny data) and its six variants agree."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    result = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "pyro_jit.py"), "--smoke-test", "--threads",
         "1", "--data-dir", str(JSB.folder)], cwd=repo, env=env, capture_output=True, text=True,
        timeout=600, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "4 sequences, max length 8" in out
    assert result.stdout.count("   ok\n") == 6, out
    assert re.search(r"6 plated JitTVE_ELBO \(markov_plate\)\s+[\d.]+\s+[\d.e+]+ \[", out), out
