"""Synthetic hard negatives in feature space (paper sections 3.2 and 8, equations 2-8).

For every query ``q`` we take its own ``n_hard`` most similar queue entries (its hard set) and
build ``counts[t]`` synthetic negatives with rule ``t`` (types 1..6 = ``RULES`` in order):

1. interpolate            a*q + (1-a)*n_i,                 a ~ U(0, alpha_max)      (eq. 3)
2. extrapolate            n_i + b*(n_i - q),               b ~ U(1, beta_max)       (eq. 4)
3. mix                    g*n_i + (1-g)*n_j,               g ~ U(0, 1)              (eq. 5)
4. add_noise              n_i + N(0, sigma^2 I)                                     (eq. 6)
5. gradient_step          n_i + delta * grad_n cos(q, n_i)                          (eq. 7)
6. signed_gradient_step   n_i + eta * sign(grad_n cos(q, n_i))                      (eq. 8)

``n_i`` and ``n_j`` are drawn uniformly and independently from the query's hard set (with
``distinct_mix``, ``n_j`` among the entries other than ``n_i``: MoCHi's pairs), and every
coefficient is drawn per (query, slot). Each raw vector is then L2-normalised (eq. 2).

The hard set is the query's ``n_hard`` most similar queue entries, or with ``skip_top = f`` its
ranks ``[f, f + n_hard)``; ``exclude`` (a [B, K] mask, e.g. suspected false negatives from
``synco.hard_negatives.detect_false_negatives``) leaves entries out of it.

Differences from the authors' public code (giakoumoglou/synco-v2, ``models/synco.py``), where we
follow the paper instead:

* Types 5 and 6 there differentiate the *dot product* q.n with autograd, whose gradient is just
  ``q``, inside a Python loop over slots. We use the cosine similarity the paper defines, whose
  gradient has the closed form in :func:`cosine_grad`, vectorised over queries and slots.
* Type 2 there is ``q + b*(n - q)``; equation (4) is ``n + b*(n - q)``.
* That code also hard-codes sigma = 0.1 (the paper says 0.01).

Everything here is a function of detached inputs: no gradient flows into the synthetic negatives.

Memory: every [B, count, C] or [B, S, C] array is written into a buffer the generator keeps between
calls (``_Workspace``), through ``out=`` arguments and in-place ops. Fresh CPU arrays of that size
lie above glibc's mmap threshold, so each call would otherwise fault its pages in again and the cost
would grow faster than linearly in S (measured in docs/results, speed of the loop). The results are
bit for bit those of fresh arrays.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import torch

from synco.errors import SyncoError

__all__ = [
    "NegativesArgumentError",
    "RULES",
    "Rule",
    "SyntheticNegatives",
    "add_noise",
    "cosine_grad",
    "extrapolate",
    "gradient_step",
    "interpolate",
    "mix",
    "signed_gradient_step",
]

_EPS = 1e-12


class NegativesArgumentError(SyncoError, ValueError):
    """Invalid configuration or inputs: a SyncoError (user-facing) that is also a ValueError."""


# --- the six rules as plain maths (broadcasting over any leading dimensions) -------------------
#
# Each takes an optional ``out`` of the broadcast shape to write its result into (and returns it);
# ``out`` must not overlap the inputs.


def cosine_grad(q: torch.Tensor, n: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of cos(q, n) with respect to n, along the last dimension.

    grad_n cos(q, n) = q / (|q||n|) - (q.n) n / (|q||n|^3)
    """
    q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_EPS)
    n_norm = torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(_EPS)
    # q.n as torch.linalg.vecdot computes it (product, then sum), with the product held in `out`
    # (overwritten below) instead of a [..., C] temporary of its own; bit for bit the same.
    dot = torch.mul(q, n, out=out).sum(dim=-1, keepdim=True)
    # = (q - (q.n / |n|^2) n) / (|q||n|); addcmul fuses the [..., C]-sized work into one kernel
    return torch.addcmul(q, dot / n_norm**2, n, value=-1, out=out).div_(q_norm * n_norm)


def interpolate(q: torch.Tensor, n_i: torch.Tensor, alpha, out: torch.Tensor | None = None) -> torch.Tensor:
    """Type 1, eq. (3): alpha*q + (1 - alpha)*n_i."""
    # lerp(a, b, w) = a + w*(b - a): one fused kernel instead of three broadcast ops
    return torch.lerp(n_i, q, alpha, out=out)


def extrapolate(q: torch.Tensor, n_i: torch.Tensor, beta, out: torch.Tensor | None = None) -> torch.Tensor:
    """Type 2, eq. (4): n_i + beta*(n_i - q) = q + (1 + beta)*(n_i - q)."""
    return torch.lerp(q, n_i, 1 + beta, out=out)


def mix(n_i: torch.Tensor, n_j: torch.Tensor, gamma, out: torch.Tensor | None = None) -> torch.Tensor:
    """Type 3, eq. (5): gamma*n_i + (1 - gamma)*n_j."""
    return torch.lerp(n_j, n_i, gamma, out=out)


def add_noise(n_i: torch.Tensor, noise: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Type 4, eq. (6): n_i + noise, with noise ~ N(0, sigma^2 I) drawn by the caller."""
    return torch.add(n_i, noise, out=out)


def gradient_step(
    q: torch.Tensor, n_i: torch.Tensor, delta: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Type 5, eq. (7): n_i + delta * grad_{n_i} cos(q, n_i)."""
    return torch.add(n_i, cosine_grad(q, n_i, out=out), alpha=delta, out=out)


def signed_gradient_step(
    q: torch.Tensor, n_i: torch.Tensor, eta: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Type 6, eq. (8): n_i + eta * sign(grad_{n_i} cos(q, n_i))."""
    return torch.add(n_i, cosine_grad(q, n_i, out=out).sign_(), alpha=eta, out=out)


# --- how each rule draws its inputs ----------------------------------------------------------


class _Draw:
    """Random inputs for the [B, count] slots of one rule, drawn in call order.

    ``hard()`` picks one uniformly random entry of each query's hard set per slot and gathers
    it straight from the queue, so nothing larger than [B, count, C] is materialised. It and
    ``normal()`` write their [B, count, C] arrays into the next unused of the flat ``work``
    buffers (at least B*count*C elements each), so a rule may make ``len(work)`` such draws.
    """

    def __init__(self, queue: torch.Tensor, hard_idx: torch.Tensor, count: int, generator, work):
        self._queue = queue
        self._hard_idx = hard_idx
        self._generator = generator
        self._shape = (hard_idx.shape[0], count)
        self._work = iter(work)
        self.last_pick: torch.Tensor | None = None

    def _buffer(self) -> torch.Tensor:
        """The next unused work buffer, as a contiguous [B, count, C] view."""
        shape = (*self._shape, self._queue.shape[1])
        buf = next(self._work, None)
        if buf is None:
            raise RuntimeError(f"a rule drew more [B, count, C] arrays than the {_DRAW_BUFFERS} work buffers")
        return buf[: math.prod(shape)].view(shape)

    def hard(self, other_than: torch.Tensor | None = None) -> torch.Tensor:
        """One entry of each query's hard set per slot, uniformly; with ``other_than`` (the picks of an earlier
        ``hard()``), uniformly among the other entries of the set."""
        n_hard = self._hard_idx.shape[1]
        if other_than is None or n_hard == 1:
            pick = torch.randint(n_hard, self._shape, generator=self._generator, device=self._queue.device)
        else:  # a shift of 1..n_hard-1 positions: every other entry equally likely
            shift = torch.randint(1, n_hard, self._shape, generator=self._generator, device=self._queue.device)
            pick = (other_than + shift) % n_hard
        self.last_pick = pick
        rows = self._hard_idx.gather(1, pick).reshape(-1)
        out = self._buffer()
        torch.index_select(self._queue, 0, rows, out=out.view(-1, self._queue.shape[1]))
        return out

    def another_hard(self) -> torch.Tensor:
        """:meth:`hard`, never the entry the previous call picked for the same slot."""
        return self.hard(other_than=self.last_pick)

    def uniform(self, low: float, high: float) -> torch.Tensor:
        """[B, count, 1] coefficients from U(low, high)."""
        u = torch.rand(
            (*self._shape, 1), generator=self._generator, device=self._queue.device, dtype=torch.float32
        )
        return u * (high - low) + low

    def normal(self, std: float) -> torch.Tensor:
        """[B, count, C] noise from N(0, std^2 I)."""
        z = self._buffer()
        return torch.randn(z.shape, generator=self._generator, out=z).mul_(std)


# How many [B, count, C] arrays one rule may draw (mix draws two hard sets; add_noise one and noise).
_DRAW_BUFFERS = 2


class Rule(NamedTuple):
    """One synthetic-negative type: ``build(q, draw, cfg, out)`` writes raw [B, count, C] into ``out``.

    ``q`` is [B, 1, C]; ``draw`` supplies hard entries and coefficients (see ``_Draw``);
    ``cfg`` is the ``SyntheticNegatives`` instance, for its hyper-parameters; ``out`` is the
    rule's [B, count, C] slice of the output. Python evaluates arguments left to right, so the
    draw order within a rule is the order written below.
    """

    name: str
    build: Callable[[torch.Tensor, _Draw, SyntheticNegatives, torch.Tensor], torch.Tensor]


# Types 1..6 in slot order; `counts` has one entry per rule. To add a rule: write its maths
# above, append one line here, and test it.
RULES: tuple[Rule, ...] = (
    Rule("interpolate", lambda q, d, c, out: interpolate(q, d.hard(), d.uniform(0.0, c.alpha_max), out)),
    Rule("extrapolate", lambda q, d, c, out: extrapolate(q, d.hard(), d.uniform(1.0, c.beta_max), out)),
    Rule("mix", lambda q, d, c, out: mix(d.hard(), d.another_hard() if c.distinct_mix else d.hard(),
                                         d.uniform(0.0, 1.0), out)),
    Rule("add_noise", lambda q, d, c, out: add_noise(d.hard(), d.normal(c.sigma), out)),
    Rule("gradient_step", lambda q, d, c, out: gradient_step(q, d.hard(), c.delta, out)),
    Rule("signed_gradient_step", lambda q, d, c, out: signed_gradient_step(q, d.hard(), c.eta, out)),
)

DEFAULT_COUNT = 128


# --- the generator ---------------------------------------------------------------------------


def _storage_uses(t: torch.Tensor) -> int | None:
    """How many references torch holds to ``t``'s memory (views, autograd's saved tensors, ...);
    None where this torch cannot tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(t.untyped_storage()._cdata)


class _Workspace:
    """The large arrays a generator keeps between calls, keyed by name, shape, dtype and device.

    Work buffers never leave a call: one of each is kept and replaced when its shape changes.
    Outputs are handed to the caller, so one is reused only once nothing else refers to its
    memory any more. A training step holds two until backward (one per view, in the loss's
    autograd graph), so up to ``MAX_OUTPUTS`` are kept; when all are in use, a fresh one is
    returned and not kept.
    """

    MAX_OUTPUTS = 2

    def __init__(self):
        self._work: dict[str, torch.Tensor] = {}
        self._outputs: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when unshared)

    def work(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._work.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            self._work[name] = None  # free the old one first
            buf = self._work[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def output(self, shape: tuple, device: torch.device) -> torch.Tensor:
        """A float32 buffer of ``shape`` that nothing outside this workspace refers to."""
        self._outputs = [(t, n) for t, n in self._outputs if t.shape == shape and t.device == device]
        for t, unshared in self._outputs:
            if _storage_uses(t) == unshared:
                return t
        t = torch.empty(shape, dtype=torch.float32, device=device)
        unshared = _storage_uses(t)
        if unshared is not None and len(self._outputs) < self.MAX_OUTPUTS:
            self._outputs.append((t, unshared))
        return t


def _real(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = f"{high:g}]" if math.isfinite(high) else "inf)"
        raise NegativesArgumentError(f"{name} must be a finite number in {lo}{low:g}, {hi}, got {value!r}")
    return value


class SyntheticNegatives:
    """Generate synthetic hard negatives for a batch of queries against a queue of negatives.

    ``gen(q, queue, generator=None)`` takes L2-normalised queries ``q`` [B, C] and queue
    ``queue`` [K, C] and returns ``[B, num_synthetic, C]`` unit vectors in ``q``'s dtype,
    detached, slots ordered by type: row ``b`` holds query ``b``'s negatives, the types
    concatenated in ``RULES`` order with ``counts[t]`` slots each (``counts[0]`` type-1 slots
    first, and so on); ``slices`` gives each type's slot range.

    The generator keeps its large arrays between calls (see ``_Workspace``): a returned tensor's
    memory is written again by a later call only once nothing refers to it any more (neither the
    caller nor an autograd graph), so results stay valid for as long as they are held.

    Randomness comes from ``generator`` (a ``torch.Generator`` on ``q``'s device) or, if None,
    the global torch RNG. Draws happen in a fixed order: for each type 1..6 with a non-zero
    count, that rule's draws (hard-set picks, then its coefficient or noise). A type with count 0
    draws nothing, so switching one type off changes the draws of the types after it; magnitudes
    (e.g. sigma = 0) never change what is drawn.

    Maths runs in float32 with autocast disabled, whatever the input dtype or autocast state.
    """

    def __init__(
        self,
        n_hard: int = 256,
        counts: Sequence[int] | None = None,
        alpha_max: float = 0.5,
        beta_max: float = 1.5,
        sigma: float = 0.01,
        delta: float = 0.01,
        eta: float = 0.01,
        skip_top: int = 0,
        distinct_mix: bool = False,
    ):
        if not isinstance(n_hard, numbers.Integral) or isinstance(n_hard, bool) or n_hard < 1:
            raise NegativesArgumentError(f"n_hard must be an integer >= 1, got {n_hard!r}")
        if counts is None:
            counts = (DEFAULT_COUNT,) * len(RULES)
        if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or len(counts) != len(RULES):
            names = ", ".join(rule.name for rule in RULES)
            raise NegativesArgumentError(
                f"counts must have one entry per rule ({len(RULES)}: {names}), got {counts!r}"
            )
        for c in counts:
            if not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 0:
                raise NegativesArgumentError(f"counts must be non-negative integers, got {tuple(counts)!r}")

        self.n_hard = int(n_hard)
        self.counts = tuple(int(c) for c in counts)
        self.alpha_max = _real("alpha_max", alpha_max, low=0.0, high=1.0, low_open=True)
        self.beta_max = _real("beta_max", beta_max, low=1.0)
        self.sigma = _real("sigma", sigma, low=0.0)
        self.delta = _real("delta", delta, low=0.0)
        self.eta = _real("eta", eta, low=0.0)
        if not isinstance(skip_top, numbers.Integral) or isinstance(skip_top, bool) or skip_top < 0:
            raise NegativesArgumentError(f"skip_top must be an integer >= 0, got {skip_top!r}")
        self.skip_top = int(skip_top)
        self.distinct_mix = bool(distinct_mix)
        self._workspace = _Workspace()

    @property
    def num_synthetic(self) -> int:
        return sum(self.counts)

    @property
    def slices(self) -> dict[str, slice]:
        """Slot range of each rule in the output, by rule name (empty slices for count 0)."""
        out, start = {}, 0
        for rule, count in zip(RULES, self.counts):
            out[rule.name] = slice(start, start + count)
            start += count
        return out

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_workspace"}  # buffers are not state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workspace = _Workspace()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_hard={self.n_hard}, counts={self.counts}, "
            f"alpha_max={self.alpha_max:g}, beta_max={self.beta_max:g}, "
            f"sigma={self.sigma:g}, delta={self.delta:g}, eta={self.eta:g}, skip_top={self.skip_top}, "
            f"distinct_mix={self.distinct_mix})"
        )

    def _check_inputs(self, q, queue, generator) -> None:
        if not isinstance(q, torch.Tensor) or q.dim() != 2 or not q.is_floating_point():
            raise NegativesArgumentError(f"q must be a 2-D floating tensor [B, C], got {_describe(q)}")
        if not isinstance(queue, torch.Tensor) or queue.dim() != 2 or not queue.is_floating_point():
            raise NegativesArgumentError(
                f"queue must be a 2-D floating tensor [K, C], got {_describe(queue)}"
            )
        if q.shape[1] != queue.shape[1]:
            raise NegativesArgumentError(
                f"q and queue channel dimensions differ: q is {tuple(q.shape)}, queue is {tuple(queue.shape)}"
            )
        if q.device != queue.device:
            raise NegativesArgumentError(f"q is on {q.device} but queue is on {queue.device}")
        if self.n_hard + self.skip_top > queue.shape[0]:
            raise NegativesArgumentError(f"n_hard={self.n_hard} + skip_top={self.skip_top} exceeds the queue size "
                                         f"K={queue.shape[0]}")
        if generator is not None and generator.device.type != q.device.type:
            raise NegativesArgumentError(f"generator is on {generator.device} but q is on {q.device}")

    @torch.no_grad()
    def __call__(self, q: torch.Tensor, queue: torch.Tensor, generator: torch.Generator | None = None,
                 exclude: torch.Tensor | None = None):
        """``exclude``: optional ``[B, K]`` bool, queue entries left out of each query's hard set (e.g. suspected
        false negatives); they are taken only when fewer than ``n_hard + skip_top`` entries remain."""
        self._check_inputs(q, queue, generator)
        if exclude is not None and exclude.shape != (q.shape[0], queue.shape[0]):
            raise NegativesArgumentError(f"exclude must be [B, K] = {(q.shape[0], queue.shape[0])}, got "
                                         f"{tuple(exclude.shape)}")
        batch, channels = q.shape
        if self.num_synthetic == 0:
            return q.new_zeros((batch, 0, channels))

        with torch.autocast(device_type=q.device.type, enabled=False):
            q32 = q.detach().float()
            queue32 = queue.detach().float()
            work, f32 = self._workspace, torch.float32
            # Inputs are unit vectors, so the dot product ranks by cosine similarity.
            sim = torch.mm(q32, queue32.T, out=work.work("sim", (batch, queue.shape[0]), f32, q.device))
            if exclude is not None:
                sim.masked_fill_(exclude, -math.inf)
            if self.skip_top:  # ranks [skip_top, skip_top + n_hard) of each query's row
                hard_idx = sim.topk(self.n_hard + self.skip_top, dim=1, sorted=True).indices[:, self.skip_top:]
            else:
                hard_idx = sim.topk(self.n_hard, dim=1, sorted=False).indices
            q_row = q32.unsqueeze(1)

            size = (batch * max(self.counts) * channels,)
            draws = [work.work(f"draw{i}", size, f32, q.device) for i in range(_DRAW_BUFFERS)]
            out = work.output((batch, self.num_synthetic, channels), q.device)
            for rule, span in zip(RULES, self.slices.values()):
                if span.stop > span.start:
                    draw = _Draw(queue32, hard_idx, span.stop - span.start, generator, draws)
                    rule.build(q_row, draw, self, out[:, span])

            out.div_(torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min_(_EPS))
        # float32: a new tensor object on the kept memory, so the workspace sees the caller hold it
        return out.detach() if q.dtype == torch.float32 else out.to(q.dtype)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
