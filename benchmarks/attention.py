r"""Benchmark: one training step of latent-alignment attention with its output layer.

Every variant times one training step, forward and backward, of an attention layer plus a
Luong-style output layer (:class:`attention.output.AlignedOutputLayer`:
:math:`p(y \mid h, v) = \mathrm{softmax}(W_o \tanh(W_h h + W_v v + b_c) + b_o)`) on the same
synthetic batch: batch 32, source and target length 30, hidden 256, vocabulary 8,000 (a fixed
seed; decoder states and encoder memory are random leaf tensors, so the gradient reaches them as
it would reach an encoder and a decoder; no padding, so no masks are passed). The variants:

1. ``soft``: soft attention (``LatentAlignmentAttention(mode="soft")``: the softmax-weighted
   memory), then the output layer once on ``[h_t; context]``; summed cross-entropy. The baseline.
2. ``marginal``: exact :math:`-\log \sum_z p(z) p(y \mid z)`; the output layer evaluated for every
   alignment (``AlignedOutputLayer.log_lik``: chunked, checkpointed, memory-capped).
3. ``variational-enum``: the enumerated negative ELBO with the posterior logits of a cheap
   inference network, a bilinear score of the embedded target word against the memory
   (:math:`q(z_t = s) \propto \exp((W e_{y_t})^\top m_s)`; the same network for 3, 4, 5, 5'
   and 7).
4. ``variational-enum, K-max``: the same with ``k_max=5``: the output layer on the 5 best
   positions under the prior only (``log_lik(..., gathered=True)`` on ``topk_values``).
5. ``variational-sample``: REINFORCE with 1 sample and an EMA baseline, the output layer
   evaluated at the *sampled* alignment only: ``LatentAlignmentAttention.sample`` draws ``z`` and
   its values, ``AlignedOutputLayer.log_lik(..., gathered=True)`` scores them, and the loss takes
   them with ``samples=z, sampled_log_lik=...``.
5'. ``variational-sample (all S)``: the same loss through the module API as documented, with
   ``log_lik`` of every alignment (informational, not a target row).
6. ``Markov prior``: exact :math:`-\log p(y \mid x)` under a first-order Markov alignment prior
   (:class:`attention.markov.MarkovAlignmentPrior`,
   :func:`attention.markov.markov_alignment_log_marginal`) with the per-alignment
   log-likelihoods of the output layer.
7. ``torch reference``: variational-enum in plain torch the way var-attn does it: the logits of
   every alignment at once, ``(B, T, S, V)``, ``log_softmax``, gather; no chunking, no
   checkpointing. Skipped when its logits alone would exceed ``--memory-cap``.

L1, L2, L3, L6: variants 1, 2, 3 and 6 with the log-linear output layer
(:class:`attention.output.LogLinearOutputLayer`, :math:`p(y \mid h, v) = \mathrm{softmax}(A h
+ C v + b)`) in place of the tanh layer: soft attention on it (``A h_t + C c_t + b``), and the
exact marginal, the enumerated ELBO and the Markov prior with its per-alignment
log-likelihoods (one log-space matrix product per sentence for all normalisers). Their ratios
are to variant 1, soft attention with the tanh layer, the baseline of the issue's targets.

Before timing, the variants are checked against plain-torch computations of the same losses
(loss and gradients w.r.t. every leaf: inputs and parameters): 2 against a brute-force
:math:`\log \sum_z` over the reference log-likelihoods, 3 against 7, L1, L2, L3 and L6 against
the same references on the log-linear layer's dense ``(B, T, S, V)`` logits, 4 against a top-K torch
reference, 5 against 5' on the same draws, 6 against a hand-written forward algorithm, 1 against
a hand-written soft attention. Then the variants run alternately (``--warmup`` untimed calls
each, ``--repeats`` rounds in alternating order, gradients cleared outside the timed region);
the table gives the median and interquartile range, and ratios to variant 1 from the same run.

**Peak memory.** On the CPU each variant runs in a fresh subprocess (``--memory-child``): it
builds the same inputs and modules, resets the resident-set high-water mark
(``/proc/self/clear_refs``), reads it (``VmHWM`` of ``/proc/self/status``, the kernel's
``hiwater_rss`` that ``getrusage(RUSAGE_SELF).ru_maxrss`` reports), runs one training step and
reads it again: the difference is what the step itself made resident (activations, autograd's
saved tensors, gradients, temporaries), not the inputs or the interpreter. A fresh process per
variant, because freed memory stays mapped in the allocator and a high-water mark only grows:
in one process every variant after the largest would read 0. ``ru_maxrss`` itself is not read
because a child started by fork + exec inherits the parent's value. On CUDA the child reports
``torch.cuda.max_memory_allocated()`` minus the allocation before the step (the caching
allocator's view: tensors only, not its reserved slack).

**The memory case** (``--skip-large`` skips it): batch 64, length 50, vocabulary 10,000. The
reference would need a ``(64, 50, 50, 10,000)`` logits tensor; its size is computed, and it is
not run when it exceeds ``--memory-cap`` (default 4 GB). Variant 3 runs there (one step, in a
fresh subprocess) with the output layer's ``max_bytes`` set to the cap, and its measured peak
must stay under the cap.

Run from the repository root::

    PYTHONPATH=. python benchmarks/attention.py --repeats 3
    PYTHONPATH=. python benchmarks/attention.py --smoke-test --skip-large --threads 1
    PYTHONPATH=. python benchmarks/attention.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's folder is sys.path[0] and this file (attention.py) would shadow
# the attention package: put the repository root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention import (
    AlignedOutputLayer,
    EMABaseline,
    GeneralScore,
    LatentAlignmentAttention,
    LogLinearOutputLayer,
)
from attention.markov import MarkovAlignmentPrior, markov_alignment_log_marginal
from benchmarks.common import (
    Timing,
    fmt_ms,
    high_water_kib,
    machine_info,
    markdown_table,
    reset_high_water,
    text_table,
)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
SECTION = "## attention.py"
GB = 1e9

#: variant names, in the order of the module docstring; the first is the baseline.
SOFT, MARGINAL, VENUM, KMAX, VSAMPLE, VSAMPLE_ALL, MARKOV, REF = (
    "1 soft", "2 marginal", "3 variational-enum", "4 variational-enum K-max",
    "5 variational-sample", "5' variational-sample (all S)", "6 Markov prior",
    "7 torch reference (variational-enum)")
#: the same with the log-linear output layer (names without a leading digit: the smoke test's
#: agreement lines count the tanh layer's variants by their digits)
LSOFT, LMARGINAL, LVENUM, LMARKOV = (
    "L1 soft, log-linear", "L2 marginal, log-linear", "L3 variational-enum, log-linear",
    "L6 Markov prior, log-linear")
VARIANTS = (SOFT, MARGINAL, VENUM, KMAX, VSAMPLE, VSAMPLE_ALL, MARKOV, REF,
            LSOFT, LMARGINAL, LVENUM, LMARKOV)
#: the log-linear layer's targets: a step at most this many times soft attention's (1), with a
#: peak memory at most ``LOG_LINEAR_MEMORY`` times its
LOG_LINEAR_TIME, LOG_LINEAR_MEMORY = 3.0, 2.0

Loss = Callable[[], Tensor]


# ----------------------------------------------------------------------------------------------
# the setup: inputs, modules, the variants' losses and their plain-torch twins


@dataclass
class Config:
    """Sizes and numerics of one setup (passed to the memory subprocesses as JSON)."""

    batch: int = 32
    src_len: int = 30
    tgt_len: int = 30
    hidden: int = 256
    vocab: int = 8000
    k_max: int = 5
    max_bytes: int | None = None  # the output layer's cap; None: its default
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    @property
    def ref_logits_bytes(self) -> int:
        """Bytes of the reference's ``(B, T, S, V)`` logits tensor."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return self.batch * self.tgt_len * self.src_len * self.vocab * itemsize

    def describe(self) -> str:
        return (f"batch {self.batch}, source length {self.src_len}, target length "
                f"{self.tgt_len}, hidden {self.hidden}, vocabulary {self.vocab}, K {self.k_max}, "
                f"{self.dtype} on {self.device}")


class Bench:
    """Inputs, modules and loss functions of every variant (the same values for all)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        dev, dt = torch.device(cfg.device), getattr(torch, cfg.dtype)
        b, t, s, h, v = cfg.batch, cfg.tgt_len, cfg.src_len, cfg.hidden, cfg.vocab
        # inputs drawn on the CPU in float64: the same values for every dtype and device
        g = torch.Generator().manual_seed(cfg.seed)

        def leaf(*shape: int) -> Tensor:
            x = 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)
            return x.to(dev, dt).requires_grad_()

        self.dec, self.mem = leaf(b, t, h), leaf(b, s, h)
        self.target = torch.randint(v, (b, t), generator=g).to(dev)
        torch.manual_seed(cfg.seed)
        self.score = GeneralScore(h, h)
        kw: dict[str, Any] = {} if cfg.max_bytes is None else {"max_bytes": cfg.max_bytes}
        self.out = AlignedOutputLayer(h, h, v, **kw)
        self.out_ll = LogLinearOutputLayer(h, h, v, **kw)
        self.post_emb = nn.Embedding(v, h)
        self.post_proj = nn.Linear(h, h, bias=False)
        self.markov = MarkovAlignmentPrior(h, max_jump=4)
        self.attn = {m: LatentAlignmentAttention(h, h, score=self.score, mode=m)
                     for m in ("soft", "marginal", "variational-enum", "variational-sample")}
        self.attn_k = LatentAlignmentAttention(h, h, score=self.score, mode="variational-enum",
                                               k_max=cfg.k_max)
        self.modules = nn.ModuleDict({"score": self.score, "out": self.out, "out_ll": self.out_ll,
                                      "post_emb": self.post_emb, "post_proj": self.post_proj,
                                      "markov": self.markov}).to(dev, dt)
        self.leaves: list[Tensor] = [self.dec, self.mem, *self.modules.parameters()]
        self.leaf_names = ["dec", "mem"] + [n for n, _ in self.modules.named_parameters()]
        self.emas = {VSAMPLE: EMABaseline(0.99), VSAMPLE_ALL: EMABaseline(0.99)}
        self.draws = 0  # a new generator seed per sampling step
        self.fixed_draw: int | None = None  # set by the agreement check: same draw for 5 and 5'
        self.losses: dict[str, Loss] = {
            SOFT: self.soft, MARGINAL: self.marginal, VENUM: self.venum, KMAX: self.kmax,
            VSAMPLE: self.vsample, VSAMPLE_ALL: self.vsample_all, MARKOV: self.markov_loss,
            REF: self.reference, LSOFT: self.ll_soft, LMARGINAL: self.ll_marginal,
            LVENUM: self.ll_venum, LMARKOV: self.ll_markov,
        }

    # -- helpers

    def zero_grad(self) -> None:
        for p in self.leaves:
            p.grad = None

    def grads(self) -> list[Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for p in self.leaves]

    def posterior_logits(self) -> Tensor:
        """The inference network: ``(W e_{y_t})^T m_s``, ``(B, T, S)``."""
        return self.post_proj(self.post_emb(self.target)) @ self.mem.transpose(-1, -2)

    def _generator(self) -> tuple[torch.Generator, torch.Generator]:
        """Two generators in the same state (a fresh seed per step, or the fixed draw)."""
        if self.fixed_draw is None:
            self.draws += 1
        seed = 1000 + (self.draws if self.fixed_draw is None else self.fixed_draw)
        dev = self.dec.device
        return (torch.Generator(device=dev).manual_seed(seed),
                torch.Generator(device=dev).manual_seed(seed))

    # -- the variants (each returns the scalar loss of the batch)

    def soft(self) -> Tensor:
        out = self.attn["soft"](self.dec, self.mem)
        logits = self.out(self.dec, out.context)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, self.cfg.vocab), self.target.reshape(-1),
                               reduction="sum")

    def marginal(self) -> Tensor:
        a = self.attn["marginal"]
        out = a(self.dec, self.mem)
        ll = self.out.log_lik(self.dec, out.values, self.target)  # (B, T, S)
        return a.loss(out, ll).sum()

    def venum(self) -> Tensor:
        a = self.attn["variational-enum"]
        out = a(self.dec, self.mem, posterior_logits=self.posterior_logits())
        ll = self.out.log_lik(self.dec, out.values, self.target)
        return a.loss(out, ll).sum()

    def kmax(self) -> Tensor:
        a = self.attn_k
        out = a(self.dec, self.mem, posterior_logits=self.posterior_logits())
        assert out.topk_values is not None
        ll = self.out.log_lik(self.dec, out.topk_values, self.target, gathered=True)  # (B, T, K)
        return a.loss(out, ll).sum()

    def vsample(self) -> Tensor:
        """REINFORCE, the output layer at the sampled alignment only (see the docstring)."""
        a = self.attn["variational-sample"]
        out = a(self.dec, self.mem, posterior_logits=self.posterior_logits())
        g_draw, _ = self._generator()
        z, vals = a.sample(out, 1, generator=g_draw)  # (1, B, T), (1, B, T, D)
        ll_z = self.out.log_lik(self.dec, vals.movedim(0, -2), self.target, gathered=True)
        return a.loss(out, None, sampled_log_lik=ll_z.movedim(-1, 0), baseline="ema",
                      ema=self.emas[VSAMPLE], samples=z).sum()

    def vsample_all(self) -> Tensor:
        a = self.attn["variational-sample"]
        out = a(self.dec, self.mem, posterior_logits=self.posterior_logits())
        ll = self.out.log_lik(self.dec, out.values, self.target)
        _, g_loss = self._generator()
        return a.loss(out, ll, baseline="ema", ema=self.emas[VSAMPLE_ALL],
                      generator=g_loss).sum()

    def markov_loss(self) -> Tensor:
        init_logits, trans_logits = self.markov(self.dec, self.mem)
        ll = self.out.log_lik(self.dec, self.mem, self.target)
        return -markov_alignment_log_marginal(init_logits, trans_logits, ll).sum()

    # -- the log-linear layer's variants

    def ll_soft(self) -> Tensor:
        out = self.attn["soft"](self.dec, self.mem)
        logits = self.out_ll(self.dec, out.context)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, self.cfg.vocab), self.target.reshape(-1),
                               reduction="sum")

    def ll_marginal(self) -> Tensor:
        a = self.attn["marginal"]
        out = a(self.dec, self.mem)
        return a.loss(out, self.out_ll.log_lik(self.dec, out.values, self.target)).sum()

    def ll_venum(self) -> Tensor:
        a = self.attn["variational-enum"]
        out = a(self.dec, self.mem, posterior_logits=self.posterior_logits())
        return a.loss(out, self.out_ll.log_lik(self.dec, out.values, self.target)).sum()

    def ll_markov(self) -> Tensor:
        init_logits, trans_logits = self.markov(self.dec, self.mem)
        ll = self.out_ll.log_lik(self.dec, self.mem, self.target)
        return -markov_alignment_log_marginal(init_logits, trans_logits, ll).sum()

    # -- plain torch (variant 7 and the twins of the agreement checks)

    def ref_prior_logits(self) -> Tensor:
        return self.dec @ self.score.proj(self.mem).transpose(-1, -2)  # (B, T, S)

    def ref_log_lik(self, log_linear: bool = False) -> Tensor:
        """``log p(y_t | z_t = s)`` of every alignment at once: ``(B, T, S, V)`` logits (of the
        tanh layer, or with ``log_linear`` of the log-linear one)."""
        if log_linear:
            o_ll = self.out_ll
            logits = (o_ll.hidden_out(self.dec).unsqueeze(2)
                      + o_ll.memory_out(self.mem).unsqueeze(1))  # (B, T, S, V)
        else:
            o = self.out
            hid = o.hidden_proj(self.dec)  # (B, T, P)
            val = o.memory_proj(self.mem)  # (B, S, P)
            logits = o.out(torch.tanh(hid.unsqueeze(2) + val.unsqueeze(1)))  # (B, T, S, V)
        b, t, s = logits.shape[:3]
        idx = self.target[:, :, None, None].expand(b, t, s, 1)
        return logits.log_softmax(-1).gather(-1, idx).squeeze(-1)

    @staticmethod
    def _ref_velbo(prior: Tensor, post: Tensor, ll: Tensor) -> Tensor:
        log_p, log_q = prior.log_softmax(-1), post.log_softmax(-1)
        q = log_q.exp()
        return ((q * (log_q - log_p)).sum(-1) - (q * ll).sum(-1)).sum()

    def reference(self) -> Tensor:
        return self._ref_velbo(self.ref_prior_logits(), self.posterior_logits(),
                               self.ref_log_lik())

    def ref_marginal(self, log_linear: bool = False) -> Tensor:
        return -(self.ref_prior_logits().log_softmax(-1)
                 + self.ref_log_lik(log_linear)).logsumexp(-1).sum()

    def ref_ll_marginal(self) -> Tensor:
        return self.ref_marginal(log_linear=True)

    def ref_ll_venum(self) -> Tensor:
        return self._ref_velbo(self.ref_prior_logits(), self.posterior_logits(),
                               self.ref_log_lik(log_linear=True))

    def ref_ll_markov(self) -> Tensor:
        return self.ref_markov(log_linear=True)

    def ref_ll_soft(self) -> Tensor:
        ctx = self.ref_prior_logits().softmax(-1) @ self.mem
        o = self.out_ll
        logits = self.dec @ o.hidden_out.weight.T + o.hidden_out.bias + ctx @ o.memory_out.weight.T
        return -logits.log_softmax(-1).gather(-1, self.target.unsqueeze(-1)).sum()

    def ref_kmax(self) -> Tensor:
        prior = self.ref_prior_logits()
        idx = prior.detach().topk(min(self.cfg.k_max, prior.shape[-1]), dim=-1).indices
        return self._ref_velbo(prior.gather(-1, idx), self.posterior_logits().gather(-1, idx),
                               self.ref_log_lik().gather(-1, idx))

    def ref_markov(self, log_linear: bool = False) -> Tensor:
        """A hand-written forward algorithm over the reference log-likelihoods."""
        init_logits, trans_logits = self.markov(self.dec, self.mem)
        ll = self.ref_log_lik(log_linear)
        trans = trans_logits.log_softmax(-1)  # (B, T, S_prev, S)
        alpha = init_logits.log_softmax(-1) + ll[:, 0]
        for t in range(1, ll.shape[1]):
            alpha = (alpha.unsqueeze(-1) + trans[:, t]).logsumexp(-2) + ll[:, t]
        return -alpha.logsumexp(-1).sum()

    def ref_soft(self) -> Tensor:
        probs = self.ref_prior_logits().softmax(-1)
        o = self.out
        logits = o.out(torch.tanh(o.hidden_proj(self.dec) + o.memory_proj(probs @ self.mem)))
        return -logits.log_softmax(-1).gather(-1, self.target.unsqueeze(-1)).sum()


# ----------------------------------------------------------------------------------------------
# agreement


def loss_and_grads(bench: Bench, fn: Loss) -> tuple[float, list[Tensor]]:
    bench.zero_grad()
    loss = fn()
    loss.backward()
    value = float(loss.detach())
    grads = bench.grads()
    bench.zero_grad()
    return value, grads


def check_agreement(bench: Bench, rtol: float, grad_rtol: float,
                    names: Sequence[str] = VARIANTS) -> list[str]:
    """Compare each variant with its plain-torch twin: loss and gradients w.r.t. every leaf.

    :return: one line per check; raises ``SystemExit`` if a loss differs by more than ``rtol``
        relative to the reference loss, or a gradient by more than ``grad_rtol`` relative to the
        largest entry of the reference gradient of the same leaf. (Gradients get the looser
        bound: a parameter such as the Markov prior's jump bias sums B * T * S * S terms of both
        signs, so its float32 rounding error relative to the net value is larger.)
    """
    pairs = [
        (SOFT, "hand-written soft attention", bench.soft, bench.ref_soft),
        (MARGINAL, "brute-force log-sum over (B,T,S,V) log-likelihoods", bench.marginal,
         bench.ref_marginal),
        (VENUM, "7 torch reference", bench.venum, bench.reference),
        (KMAX, "torch top-K reference", bench.kmax, bench.ref_kmax),
        (VSAMPLE, "5' on the same draw", bench.vsample, bench.vsample_all),
        (MARKOV, "hand-written forward algorithm", bench.markov_loss, bench.ref_markov),
        (LSOFT, "hand-written soft attention, log-linear", bench.ll_soft, bench.ref_ll_soft),
        (LMARGINAL, "brute-force log-sum, dense log-linear logits", bench.ll_marginal,
         bench.ref_ll_marginal),
        (LVENUM, "torch ELBO on dense log-linear logits", bench.ll_venum, bench.ref_ll_venum),
        (LMARKOV, "forward algorithm, dense log-linear logits", bench.ll_markov,
         bench.ref_ll_markov),
    ]
    lines, bad = [], []
    for name, ref_name, fn, ref_fn in pairs:
        if name not in names:
            continue
        t0 = time.perf_counter()
        if name == VSAMPLE:  # the same draw and fresh EMA baselines for both
            bench.fixed_draw = 0
            bench.emas = {VSAMPLE: EMABaseline(0.99), VSAMPLE_ALL: EMABaseline(0.99)}
        value, grads = loss_and_grads(bench, fn)
        ref_value, ref_grads = loss_and_grads(bench, ref_fn)
        bench.fixed_draw = None
        rel = abs(value - ref_value) / max(abs(ref_value), 1e-30)
        gerr, worst = 0.0, "-"
        for leaf_name, a, b in zip(bench.leaf_names, grads, ref_grads, strict=True):
            scale = float(b.abs().max()) if b.numel() else 0.0
            err = float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())
            if not err <= gerr:  # NaN counts as worst
                gerr, worst = err, leaf_name
        ok = rel <= rtol and gerr <= grad_rtol and math.isfinite(value)
        lines.append(f"  {name:40s} vs {ref_name:52s} loss {value:.8g} (ref {ref_value:.8g}) "
                     f"rel. diff {rel:.1e}  max rel. grad diff {gerr:.1e} ({worst})  "
                     f"{time.perf_counter() - t0:.1f} s  {'ok' if ok else 'DISAGREE'}")
        print(lines[-1], flush=True)
        if not ok:
            bad.append(name)
    if bad:
        raise SystemExit(f"variants disagree with their references (rtol {rtol:.0e} on the "
                         f"loss, {grad_rtol:.0e} on the gradients): {', '.join(bad)}")
    return lines


# ----------------------------------------------------------------------------------------------
# timing


def side_by_side(bench: Bench, names: Sequence[str], *, repeats: int, warmup: int
                 ) -> tuple[dict[str, Timing], list[str]]:
    """Time one training step (loss, backward) of each variant: ``warmup`` untimed calls each,
    then ``repeats`` rounds alternating their order; gradients are cleared and garbage collected
    outside the timed region.

    :return: the timings and the names of variants with a non-finite loss in some step.
    """
    cuda = bench.dec.device.type == "cuda"
    nonfinite: set[str] = set()

    def timed(name: str) -> float:
        bench.zero_grad()
        gc.collect()
        if cuda:
            torch.cuda.synchronize(bench.dec.device)
        t0 = time.perf_counter()
        loss = bench.losses[name]()
        loss.backward()
        if cuda:
            torch.cuda.synchronize(bench.dec.device)
        dt = time.perf_counter() - t0
        if not math.isfinite(float(loss.detach())):
            nonfinite.add(name)
        return dt

    for name in names:
        for _ in range(warmup):
            timed(name)
    out = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].samples.append(timed(name))
    bench.zero_grad()
    return out, sorted(nonfinite)


# ----------------------------------------------------------------------------------------------
# memory: one variant per fresh subprocess


def _step_high_water(fn: Loss, bench: Bench) -> dict[str, Any]:
    """One training step; the growth of the resident-set high-water mark over it (CPU)."""
    bench.zero_grad()
    gc.collect()
    reset = reset_high_water()
    before, source = high_water_kib()
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    wall = time.perf_counter() - t0
    after, _ = high_water_kib()
    bench.zero_grad()
    return {"source": source, "high_water_reset": reset, "before_bytes": before * 1024,
            "increase_bytes": (after - before) * 1024, "wall_s": wall,
            "loss": float(loss.detach())}


def _step_cuda(fn: Loss, bench: Bench) -> dict[str, Any]:
    """One training step; ``max_memory_allocated`` over it minus the allocation before (CUDA)."""
    dev = bench.dec.device
    bench.zero_grad()
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev)
    bench.zero_grad()
    return {"source": "torch.cuda.max_memory_allocated", "before_bytes": before,
            "increase_bytes": peak - before, "wall_s": wall, "loss": float(loss.detach())}


def memory_child(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Build the setup; for each of ``spec["variants"]`` run two training steps and report the
    peak memory of each: ``cold`` (the first: lazy imports, plan caches, one-time buffers
    included) and the reported one, the second (``warm``; with ``spec["warm"]`` false the first).
    """
    bench = Bench(Config(**spec["config"]))
    step = _step_cuda if bench.dec.device.type == "cuda" else _step_high_water
    out = {}
    for variant in spec["variants"]:
        fn = bench.losses[variant]
        cold = step(fn, bench)
        warm = step(fn, bench) if spec.get("warm", True) else cold
        out[variant] = {**warm, "cold": cold}
    return out


#: glibc malloc: serve every block over 64 KiB by mmap and unmap it when freed (a fixed
#: threshold also turns off glibc's dynamic one), so that memory freed by the first step leaves
#: the resident set instead of being reused unseen by the measured second step.
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure_memory(variants: Sequence[str], cfg: Config, threads: int, timeout_s: float, *,
                   one_process: bool = False, warm: bool = True) -> dict[str, dict[str, Any]]:
    """Peak memory of one training step of each variant, each in a fresh subprocess.

    :param one_process: measure all variants one after another in a single subprocess (for smoke
        runs: one interpreter start instead of one per variant; the high-water mark is reset
        before each step and freed blocks are unmapped, so each step is still measured from the
        resident set before it, but lazily imported modules and caches of earlier variants stay).
    :param warm: measure a second step after an unmeasured first one (see :func:`memory_child`).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(CHILD_MALLOC_ENV)

    def start(group: Sequence[str]) -> subprocess.Popen[str]:
        spec = {"variants": list(group), "config": asdict(cfg), "warm": warm}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
               "--memory-child", json.dumps(spec)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)

    def finish(group: Sequence[str]) -> dict[str, dict[str, Any]]:
        proc = start(group)
        try:
            out, err = proc.communicate(timeout=timeout_s * len(group))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {v: {"error": f"timed out after {timeout_s:.0f} s"} for v in group}
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            error = f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}"
            return {v: {"error": error} for v in group}
        return dict(json.loads(lines[-1]))

    if one_process:
        return finish(variants)
    return {v: m for group in ([v] for v in variants) for v, m in finish(group).items()}


# ----------------------------------------------------------------------------------------------
# reporting


def fmt_mib(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    if "error" in m:
        return f"failed: {m['error']}"
    return f"{m['increase_bytes'] / 2**20:.1f} MiB"


def write_readme(text: str) -> None:
    """Replace the ``SECTION`` section of benchmarks/README.md by ``text`` (append it if new)."""
    cur = README.read_text() if README.exists() else "# Benchmarks\n"
    start = cur.find(SECTION)
    if start < 0:
        cur = cur.rstrip("\n") + "\n\n" + SECTION + "\n"
        start = cur.find(SECTION)
    nxt = cur.find("\n## ", start + len(SECTION))
    tail = cur[nxt + 1:] if nxt >= 0 else ""
    README.write_text(cur[:start] + text.rstrip("\n") + "\n" + ("\n" + tail if tail else ""))


# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one training step (forward + backward) of latent-alignment attention "
                    "with its output layer: soft, marginal, variational-enum (full and K-max), "
                    "variational-sample, Markov prior, and a plain-torch variational-enum "
                    "reference, side by side in one process.")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: leave torch's default alone)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=30, help="source and target length")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--k-max", type=int, default=5, help="K of variant 4")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="the output layer's chunk cap in the timed runs (default: its default)")
    p.add_argument("--memory-cap", type=float, default=4.0,
                   help="GB (1e9 bytes): the reference is not run when its (B, T, S, V) logits "
                        "alone exceed it; the cap (max_bytes) of variant 3 in the memory case")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny sizes (batch 2, lengths 5, hidden 16, vocab 50, K 3), 1 repeat")
    p.add_argument("--skip-large", action="store_true",
                   help="skip the memory case (batch 64, length 50, vocabulary 10k)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the per-variant memory subprocesses")
    p.add_argument("--memory-timeout", type=float, default=1200.0)
    p.add_argument("--write-readme", action="store_true",
                   help=f"replace the '{SECTION}' section of benchmarks/README.md with the results")
    p.add_argument("--json", type=Path, default=None, help="also dump raw results here")
    p.add_argument("--variants", default=None, metavar="LIST",
                   help="run only these variants, by their first word, comma-separated (e.g. "
                        "1,3,7,L2,L3; soft attention, 1, is always run; default: all)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke_test:
        args.batch, args.length, args.hidden, args.vocab = 2, 5, 16, 50
        args.k_max = min(args.k_max, 3)
        args.repeats, args.warmup = 1, 0
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if not args.memory_cap > 0:
        p.error("--memory-cap must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    device = torch.device(args.device)
    info = machine_info(device)
    command = "PYTHONPATH=. python benchmarks/attention.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"command: {command.strip()}", flush=True)
    t_start = time.perf_counter()
    cap = int(args.memory_cap * GB)
    cfg = Config(batch=args.batch, src_len=args.length, tgt_len=args.length, hidden=args.hidden,
                 vocab=args.vocab, k_max=args.k_max, max_bytes=args.max_bytes, dtype=args.dtype,
                 device=args.device)
    bench = Bench(cfg)
    print(f"setup: {cfg.describe()}; output layer max_bytes {bench.out.max_bytes / 2**20:.0f} "
          f"MiB ({bench.out.chunk_rows(getattr(torch, cfg.dtype))} alignments per chunk)",
          flush=True)
    names = list(VARIANTS)
    if args.variants is not None:  # by their first word; soft attention, the baseline, always
        wanted = {w.strip() for w in args.variants.split(",")} | {SOFT.split()[0]}
        unknown = wanted - {n.split()[0] for n in VARIANTS}
        if unknown:
            raise SystemExit(f"--variants: unknown variant(s) {', '.join(sorted(unknown))}; "
                             f"the variants are {', '.join(n.split()[0] for n in VARIANTS)}")
        names = [n for n in VARIANTS if n.split()[0] in wanted]
    notes: list[str] = []
    if cfg.ref_logits_bytes > cap and REF in names:
        names.remove(REF)
        notes.append(f"7 not run: its logits would need {cfg.ref_logits_bytes / GB:.2f} GB > "
                     f"cap {args.memory_cap:g} GB")
        print("  " + notes[-1], flush=True)

    rtol = 1e-4 if cfg.dtype == "float32" else 1e-9
    print(f"\nagreement (loss and gradients w.r.t. every input and parameter; rtol {rtol:.0e} "
          f"on the loss, {10 * rtol:.0e} on the gradients):", flush=True)
    if cfg.ref_logits_bytes <= cap:
        agree = check_agreement(bench, rtol, 10 * rtol, names)
    else:
        agree = ["  skipped: the references build the (B, T, S, V) logits, over the cap"]
        print(agree[0], flush=True)

    print(f"\ntiming: {args.warmup} warm-up step(s) each, then {args.repeats} alternating rounds",
          flush=True)
    timings, nonfinite = side_by_side(bench, names, repeats=args.repeats, warmup=args.warmup)
    if nonfinite:
        print(f"non-finite loss in a timed step of: {', '.join(nonfinite)}", flush=True)

    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        print("\nmemory of one training step (after one unmeasured step), "
              + ("all variants in one fresh subprocess (smoke test):" if args.smoke_test
                 else "one fresh subprocess per variant:"), flush=True)
        memory = measure_memory(names, cfg, torch.get_num_threads(), args.memory_timeout,
                                one_process=args.smoke_test)
        for name, m in memory.items():
            cold = fmt_mib(m.get("cold")) if "cold" in m else "-"
            print(f"  {name:40s} {fmt_mib(m)} (first step: {cold})", flush=True)

    base = timings[SOFT].median
    header = ["variant", "ms median [IQR]", "n", "t / t(1)", "peak memory (step)"]
    rows = [[name, fmt_ms(t), str(len(t.samples)), f"{t.median / base:.2f}",
             fmt_mib(memory.get(name))] for name, t in timings.items()]
    if REF not in names and cfg.ref_logits_bytes > cap:
        rows.append([REF, "not run (over the cap)", "0", "-", "-"])
    print("\n" + text_table(header, rows), flush=True)

    med = {name: t.median for name, t in timings.items()}
    targets = []
    if REF in med and VENUM in med:
        r = med[VENUM] / med[REF]
        targets.append(f"3 variational-enum no slower than 7 torch reference: "
                       f"{'MET' if r <= 1.0 else 'NOT MET'} (3 / 7 = {r:.2f})")
    elif VENUM in med:
        targets.append("3 variational-enum no slower than 7 torch reference: not measured "
                       "(7 over the cap)")
    for name in (LMARGINAL, LVENUM):
        if name not in med:
            continue
        r = med[name] / med[SOFT]
        line = (f"{name} within {LOG_LINEAR_TIME:g}x of 1 soft: "
                f"{'MET' if r <= LOG_LINEAR_TIME else 'NOT MET'} ({name.split()[0]} / 1 = "
                f"{r:.2f})")
        m_ll, m_soft = memory.get(name), memory.get(SOFT)
        if m_ll and m_soft and "error" not in m_ll and "error" not in m_soft:
            rm = m_ll["increase_bytes"] / max(m_soft["increase_bytes"], 1)
            line += (f"; peak memory within {LOG_LINEAR_MEMORY:g}x of 1 soft: "
                     f"{'MET' if rm <= LOG_LINEAR_MEMORY else 'NOT MET'} ({rm:.2f})")
        targets.append(line)
    if KMAX in med:
        r = med[KMAX] / med[SOFT]
        targets.append(f"4 K-max (K={cfg.k_max}) within 8x of 1 soft: "
                       f"{'MET' if r <= 8.0 else 'NOT MET'} (4 / 1 = {r:.2f})")
    if VSAMPLE in med:
        r = med[VSAMPLE] / med[SOFT]
        all_s = (f"; 5' with log_lik of all S: {med[VSAMPLE_ALL] / med[SOFT]:.2f}"
                 if VSAMPLE_ALL in med else "")
        targets.append(f"5 variational-sample within 2x of 1 soft: "
                       f"{'MET' if r <= 2.0 else 'NOT MET'} (5 / 1 = {r:.2f}{all_s})")

    large: dict[str, Any] = {}
    if not args.skip_large:
        lcfg = Config(batch=64, src_len=50, tgt_len=50, hidden=args.hidden, vocab=10_000,
                      k_max=args.k_max, max_bytes=cap, dtype=args.dtype, device=args.device)
        print(f"\nmemory case: {lcfg.describe()}; cap {args.memory_cap:g} GB", flush=True)
        need = lcfg.ref_logits_bytes
        large["config"] = asdict(lcfg)
        large["ref_logits_bytes"] = need
        if need > cap:
            large["ref"] = (f"7 torch reference: would need {need / GB:.2f} GB for its "
                            f"(64, 50, 50, 10000) logits alone (more with log_softmax's output "
                            f"and the gradients) > cap {args.memory_cap:g} GB, not run")
        else:
            large["ref"] = (f"7 torch reference: its logits need {need / GB:.2f} GB <= cap; "
                            "not run here (this case measures variant 3 only)")
        print("  " + large["ref"], flush=True)
        # one (cold) step only: a second would double this case's time and the cold step is
        # the upper bound (it includes the one-time allocations)
        m = measure_memory([VENUM], lcfg, torch.get_num_threads(), args.memory_timeout,
                           warm=False)[VENUM]
        large["venum"] = m
        if "error" in m:
            line = f"3 variational-enum under the {args.memory_cap:g} GB cap: NOT MET (failed: " \
                   f"{m['error']})"
        else:
            peak = m["increase_bytes"]
            line = (f"3 variational-enum (max_bytes = {args.memory_cap:g} GB) peak "
                    f"{peak / GB:.2f} GB ({m['source']} increase over one step, "
                    f"{m['wall_s']:.1f} s): {'MET' if peak < cap else 'NOT MET'} "
                    f"(peak / cap = {peak / cap:.2f})")
        print("  " + line, flush=True)
        targets.append(line)
        targets.append(large["ref"])

    print("\ntargets:\n" + "\n".join("  " + t for t in targets), flush=True)
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s", flush=True)

    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": info, "command": command, "config": asdict(cfg),
            "timings_s": {k: t.samples for k, t in timings.items()}, "memory": memory,
            "large": large, "agreement": agree, "targets": targets, "notes": notes}, indent=1))
    if args.write_readme:
        machine = ", ".join(f"{k} {v}" for k, v in info.items() if k != "load")
        load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
        md = [SECTION, "",
              "One training step (forward and backward) of an attention layer with its output "
              "layer, each variant timed alternately in one process on the same inputs after "
              "checking it against a plain-torch twin (see the script's docstring). Each cell: "
              "median ms [interquartile range]; *t / t(1)* is the ratio of medians to soft "
              "attention in the same run. Peak memory: the growth of the resident-set "
              "high-water mark (`VmHWM`) over one step, each variant in a fresh subprocess "
              "after its inputs and modules were built (on CUDA: `max_memory_allocated`).", "",
              f"Setup: {cfg.describe()}.", "",
              f"Machine: {machine}; load average (1, 5, 15 min) at start {info['load']}, at end "
              f"{load_end}.", "", f"Command: `{command.strip()}` (total {total:.0f} s).", "",
              markdown_table(header, rows), "", "Targets:", ""]
        md += [f"* {t}" for t in targets]
        md += ["", "Checks:", ""] + [f"* {ln.strip()}" for ln in agree] + [
            f"* {n}" for n in notes]
        write_readme("\n".join(md) + "\n")
        print(f"wrote {README}", flush=True)
    return 1 if nonfinite else 0


if __name__ == "__main__":
    raise SystemExit(main())
