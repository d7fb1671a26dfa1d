"""``lj.remat_plan``: choose save / recompute / host-offload per activation under a budget.

How it works:

1. Trace ``fun`` to a jaxpr (``jit`` calls inlined, ``scan`` kept as a layer stack).
2. Candidates are the intermediates plain ``jax.grad`` saves: every equation output
   is tagged with ``jax.ad_checkpoint.checkpoint_name`` and JAX's own partial
   evaluation (``saved_residuals`` under a save-every-name policy) says which of
   them the backward pass needs. Inside a ``scan`` the same is done per iteration.
3. The top level is cut into segments (each a ``jax.checkpoint`` region; a
   ``scan`` body is checkpointed per iteration). Bytes come from the shared
   analysis layer (``lepton_jax.jaxpr``): ``aval_bytes``, ``eqn_cost`` FLOPs.
4. A solver (``_remat_solver``: greedy or MILP) picks which residuals to keep,
   recompute or offload under the budget, for several segmentations; the cheapest
   feasible plan wins.
   Alongside, ``_remat_closure`` solves the exact save-set problem over every
   forward intermediate (least recompute FLOPs within saved bytes) and cuts the
   program into regions where everything needed across a cut is saved; it plans
   ``budget_kind="saved"`` and serves peak budgets no segment tree fits.
5. The plan is applied with JAX's own machinery: ``checkpoint_name`` +
   ``jax.checkpoint(policy=save_only_these_names / save_and_offload_only_these_names)``.
   The result is checked with JAX's saved-residual accounting and the shared
   liveness analysis; the plan is tightened if the measured bytes exceed the model.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
import threading
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
import jax.extend.core as jex_core

from lepton_jax import jaxpr as ljx
from lepton_jax.jaxpr._liveness import grad_memory as _grad_memory
from lepton_jax._errors import BudgetError
from lepton_jax._nnx import is_graph_node, nnx_module
from lepton_jax._utils import format_bytes, parse_bytes
from lepton_jax.transforms import _remat_closure as closure_lib
from lepton_jax.transforms import _remat_solver as solver_lib

__all__ = ["remat_plan", "RematPlan", "TensorDecision", "CostModel"]

_API = "lj.remat_plan"
_SOLVERS = ("auto", "greedy", "milp")
_BUDGET_KINDS = ("peak", "saved")
_INLINE_PRIMS = ("pjit", "jit", "closed_call", "core_call")
_MAX_DEPTH = 5
_CLOSURE_MILP_MAX = 20000   # save-set MILP variables; larger graphs use the rounded LP (any solver=)
_CLOSURE_TARGETS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1)  # saved-byte targets, fractions of the budget


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Device FLOP/s and host<->device bandwidth used to price recompute vs offload.

  >>> CostModel(device_flops=1e14, host_bandwidth=2e10).recompute_seconds(1e12)
  0.01
  """
  device_flops: float
  host_bandwidth: float

  def recompute_seconds(self, flops: float) -> float:
    return float(flops) / self.device_flops

  def transfer_seconds(self, nbytes: float) -> float:
    return 2.0 * float(nbytes) / self.host_bandwidth  # to host and back

  @classmethod
  def default(cls, platform: str | None = None) -> "CostModel":
    platform = platform or jax.default_backend()
    if platform == "gpu" or platform == "cuda" or platform == "rocm":
      return cls(device_flops=4e14, host_bandwidth=2.5e10)
    if platform == "tpu":
      return cls(device_flops=2e14, host_bandwidth=2e10)
    return cls(device_flops=1e11, host_bandwidth=1e10)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TensorDecision:
  """What the plan does with one residual.

  Attributes:
    name: the checkpoint name given to the value (``checkpoint_name``).
    shape, dtype: of one instance (one scan iteration inside a scan).
    count: how many instances (scan trip count, else 1).
    nbytes: device bytes if kept (``count`` instances).
    decision: ``"save"``, ``"recompute"``, ``"offload"`` or ``"boundary"`` (a value
      crossing checkpoint regions, kept on device).
    segment: index of the checkpoint region.
    recompute_flops: FLOPs to recompute it (all instances).
    primitive: the primitive that produced it.
  """
  name: str
  shape: tuple[int, ...]
  dtype: str
  count: int
  nbytes: int
  decision: str
  segment: int
  recompute_flops: float
  primitive: str

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["shape"] = list(self.shape)
    return d


@dataclasses.dataclass(frozen=True)
class RematPlan:
  """A remat plan for one argument signature (see :func:`remat_plan`).

  Attributes:
    budget_bytes: the device activation budget in bytes.
    baseline_bytes: activation peak of plain ``jax.grad``.
    peak_bytes: activation peak of the planned function's forward + backward pass,
      measured on its jaxpr: ``lepton_jax.jaxpr.grad_peak_bytes`` of the wrapped
      function (w.r.t. its first argument), the same measure as ``baseline_bytes``.
    saved_bytes: residuals kept on device between forward and backward (JAX's
      saved-residual accounting of the planned function, inputs excluded;
      ``lepton_jax.jaxpr.saved_residual_bytes``). Never above ``peak_bytes``.
    offloaded_bytes: residuals kept in host memory between forward and backward.
    recompute_flops: extra FLOPs spent recomputing residuals in the backward pass, measured:
      FLOPs of the planned forward + backward jaxprs minus plain ``jax.grad``'s
      (``lepton_jax.jaxpr`` cost model, ``grad_memory(...).flops``).
    transfer_bytes: bytes moved device->host->device for offloaded residuals.
    num_segments: innermost checkpoint regions (scan bodies count once).
    solver: which solver produced the decisions.
    decisions: one :class:`TensorDecision` per candidate and boundary value.
    baseline_saved_bytes: plain ``jax.grad``'s saved residual bytes (inputs excluded).
    model_peak_bytes: the planner's own estimate of the peak (used to rank plans).
    measured_peak_bytes: same as ``peak_bytes`` (kept for compatibility).
    cost_model: the FLOP/s and bandwidth used.
    depth: levels of nested checkpoint regions (0: plain grad, 1: one level of
      segments, 2: segments inside segments, ...).
  """
  budget_bytes: int
  baseline_bytes: int
  peak_bytes: int
  saved_bytes: int
  offloaded_bytes: int
  recompute_flops: float
  transfer_bytes: int
  num_segments: int
  solver: str
  decisions: tuple[TensorDecision, ...]
  baseline_saved_bytes: int
  model_peak_bytes: int
  measured_peak_bytes: int
  cost_model: CostModel
  depth: int = 1

  @property
  def estimated_seconds(self) -> float:
    return (self.cost_model.recompute_seconds(self.recompute_flops)
            + self.transfer_bytes / self.cost_model.host_bandwidth)

  def names(self, decision: str) -> tuple[str, ...]:
    return tuple(d.name for d in self.decisions if d.decision == decision)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["decisions"] = [x.to_dict() for x in self.decisions]
    d["cost_model"] = self.cost_model.to_dict()
    d["estimated_seconds"] = self.estimated_seconds
    return d

  def __str__(self) -> str:
    lines = [
        f"RematPlan (solver={self.solver}, segments={self.num_segments}, depth={self.depth})",
        f"  budget   {format_bytes(self.budget_bytes):>12}   baseline peak {format_bytes(self.baseline_bytes)}",
        f"  peak     {format_bytes(self.peak_bytes):>12}   saved {format_bytes(self.saved_bytes)}"
        f" (plain jax.grad saves {format_bytes(self.baseline_saved_bytes)})",
        f"  offload  {format_bytes(self.offloaded_bytes):>12}   recompute {self.recompute_flops:.3g} FLOPs"
        f"   est. {self.estimated_seconds * 1e3:.3g} ms",
        "",
        f"  {'name':<16} {'decision':<10} {'seg':>3} {'shape':<20} {'count':>5} {'bytes':>10} {'FLOPs':>10}  primitive",
    ]
    for x in self.decisions:
      shape = "x".join(map(str, x.shape)) + f" {x.dtype}"
      lines.append(f"  {x.name:<16} {x.decision:<10} {x.segment:>3} {shape:<20} {x.count:>5} "
                   f"{format_bytes(x.nbytes):>10} {x.recompute_flops:>10.3g}  {x.primitive}")
    return "\n".join(lines)


# ------------------------------------------------------------------ jaxpr helpers


def _is_inexact(aval) -> bool:
  return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.inexact)


def _bind(eqn, invals):
  """Binds ``eqn``'s primitive on new inputs (as ``jax.core.eval_jaxpr`` does)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    subfuns, params = params
    invals = [*subfuns, *invals]
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _read(env, atom):
  if isinstance(atom, jex_core.Literal):
    return atom.val
  return env[atom]


def _inline_eval(jaxpr, consts, args):
  """Evaluates a jaxpr, inlining ``jit``/``closed_call`` so the result traces flat."""
  env = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [_read(env, a) for a in eqn.invars]
    inner = eqn.params.get("jaxpr", None) if eqn.primitive.name in _INLINE_PRIMS else None
    if inner is not None:
      if isinstance(inner, jex_core.ClosedJaxpr):
        outs = _inline_eval(inner.jaxpr, inner.consts, invals)
      else:
        outs = _inline_eval(inner, (), invals)
    else:
      outs = _bind(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [_read(env, a) for a in jaxpr.outvars]


def _eval_named(jaxpr, consts, args, names: dict):
  """Evaluates ``jaxpr`` tagging each var in ``names`` with ``checkpoint_name``."""
  env = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    outs = _bind(eqn, [_read(env, a) for a in eqn.invars])
    for v, x in zip(eqn.outvars, outs):
      name = names.get(v)
      env[v] = checkpoint_name(x, name) if name is not None else x
  return [_read(env, a) for a in jaxpr.outvars]


def _saved_residuals(fun, *args):
  """JAX's saved-residual list ``[(aval, description)]`` (``jax.ad_checkpoint``)."""
  from jax._src.ad_checkpoint import saved_residuals  # public only as print_saved_residuals
  return saved_residuals(fun, *args)


def _needed_names(fun, avals, names: Sequence[str]) -> set[str]:
  """Names that JAX keeps as residuals when every name is saveable."""
  if not names:
    return set()
  policy = jax.checkpoint_policies.save_only_these_names(*names)
  res = _saved_residuals(jax.checkpoint(fun, policy=policy), *avals)
  found = set()
  for _, desc in res:
    if desc.startswith("named '"):
      found.add(desc.split("'")[1])
  return found


def _eqn_flops(eqn) -> float:
  c = ljx.eqn_cost(eqn)
  return float(c.flops + c.transcendentals)


def _recompute_flops(jaxpr, idx_of_def: dict, var, stop: set, lo: int, hi: int, fl=None) -> float:
  """FLOPs of the producer of ``var`` plus non-stop ancestors defined in [lo, hi)."""
  total, seen, stack = 0.0, set(), [var]
  while stack:
    v = stack.pop()
    i = idx_of_def.get(v)
    if i is None or i in seen or not (lo <= i < hi):
      continue
    if v is not var and v in stop:
      continue
    seen.add(i)
    eqn = jaxpr.eqns[i]
    total += fl[i] if fl is not None else _eqn_flops(eqn)
    stack.extend(a for a in eqn.invars if not isinstance(a, jex_core.Literal))
  return total


# ------------------------------------------------------------- graph description


@dataclasses.dataclass
class _Cand:
  var: Any
  name: str
  nbytes: int
  count: int
  segment_local: int  # eqn index (top-level) or scan position
  primitive: str
  flops: float = 0.0


@dataclasses.dataclass
class _Scan:
  index: int           # top-level eqn index
  body: Any            # ClosedJaxpr
  length: int
  carry_bytes: int
  cands: list          # list[_Cand] inside the body (nbytes per iteration)


@dataclasses.dataclass
class _Graph:
  closed: Any                      # flat ClosedJaxpr
  cands: dict                      # var -> _Cand (top-level)
  scans: dict                      # eqn index -> _Scan
  def_idx: dict                    # var -> eqn index
  last_use: dict                   # var -> last eqn index using it (n for outputs)
  n: int
  uses: dict = dataclasses.field(default_factory=dict)  # var -> sorted eqn indices using it
  flops: list = dataclasses.field(default_factory=list)  # FLOPs (+ transcendentals) per eqn


def _build_graph(closed, prefix: str) -> _Graph:
  jaxpr = closed.jaxpr
  n = len(jaxpr.eqns)
  def_idx, last_use, uses = {}, {}, {}
  for i, eqn in enumerate(jaxpr.eqns):
    for a in eqn.invars:
      if not isinstance(a, jex_core.Literal):
        last_use[a] = i
        uses.setdefault(a, []).append(i)
    for v in eqn.outvars:
      def_idx[v] = i
  for a in jaxpr.outvars:
    if not isinstance(a, jex_core.Literal):
      last_use[a] = n
      uses.setdefault(a, []).append(n)
  # top-level candidates (outputs of non-scan equations)
  names = {}
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name == "scan":
      continue
    for k, v in enumerate(eqn.outvars):
      if _is_inexact(v.aval) and v in last_use and ljx.aval_bytes(v.aval) > 0:
        names[v] = f"{prefix}{i}.{k}"
  fun = lambda *a: _eval_named(jaxpr, closed.consts, a, names)
  needed = _needed_names(fun, [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars],
                         list(names.values()))
  cands = {}
  for v, nm in names.items():
    if nm in needed:
      eqn = jaxpr.eqns[def_idx[v]]
      cands[v] = _Cand(v, nm, ljx.aval_bytes(v.aval), 1, def_idx[v], eqn.primitive.name)
  fl = [_eqn_flops(e) for e in jaxpr.eqns]
  stop = set(cands)
  for v, c in cands.items():
    c.flops = _recompute_flops(jaxpr, def_idx, v, stop, 0, n, fl)  # refined per segment later
  scans = {}
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name == "scan":
      scans[i] = _scan_info(eqn, i, prefix)
  return _Graph(closed, cands, scans, def_idx, last_use, n, uses, fl)


def _scan_info(eqn, i: int, prefix: str) -> _Scan:
  body = eqn.params["jaxpr"]
  bj = body.jaxpr
  length = int(eqn.params["length"])
  nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
  carry_bytes = sum(ljx.aval_bytes(v.aval) for v in bj.invars[nc:nc + ncar] if _is_inexact(v.aval))
  used = set()
  for e in bj.eqns:
    used.update(a for a in e.invars if not isinstance(a, jex_core.Literal))
  used.update(a for a in bj.outvars if not isinstance(a, jex_core.Literal))
  def_idx = {}
  names = {}
  for j, e in enumerate(bj.eqns):
    for k, v in enumerate(e.outvars):
      def_idx[v] = j
      if _is_inexact(v.aval) and v in used and ljx.aval_bytes(v.aval) > 0:
        names[v] = f"{prefix}s{i}/{j}.{k}"
  fun = lambda *a: _eval_named(bj, body.consts, a, names)
  needed = _needed_names(fun, [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in bj.invars],
                         list(names.values()))
  cands = []
  for v, nm in names.items():
    if nm in needed:
      e = bj.eqns[def_idx[v]]
      cands.append(_Cand(v, nm, ljx.aval_bytes(v.aval), length, def_idx[v], e.primitive.name))
  stop = {c.var for c in cands}
  for c in cands:
    c.flops = _recompute_flops(bj, def_idx, c.var, stop, 0, len(bj.eqns)) * length
  return _Scan(i, body, length, carry_bytes, cands)


# --------------------------------------------------------------- segmentations


@dataclasses.dataclass(frozen=True)
class _Seg:
  lo: int
  hi: int
  scan: bool


def _segments_from_cuts(g: _Graph, cuts: Sequence[int], lo: int = 0, hi: int | None = None) -> list[_Seg]:
  """Segments of the range ``[lo, hi)`` from cut positions; every scan is its own segment."""
  hi = g.n if hi is None else hi
  scans = [i for i in g.scans if lo <= i < hi]
  bounds = sorted(set([lo, hi] + [c for c in cuts if lo < c < hi] + scans + [i + 1 for i in scans]))
  segs = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    if b > a:
      segs.append(_Seg(a, b, b - a == 1 and a in g.scans))
  return segs


def _last_use_in(g: _Graph, v, hi: int) -> int | None:
  """Last use of ``v`` before ``hi`` (the function's outputs count as a use at ``n`` when hi == n)."""
  us = g.uses.get(v)
  if not us:
    return None
  k = bisect.bisect_right(us, hi if hi == g.n else hi - 1) - 1
  return us[k] if k >= 0 else None


def _crossing(g: _Graph, segs: Sequence[_Seg], lo: int = 0, hi: int | None = None):
  """Values defined in one segment of ``[lo, hi)`` and used in a later one of the same range.

  For the whole function (``[0, n)``) the function's outputs count as crossing.
  """
  hi = g.n if hi is None else hi
  seg_of = {}
  for s, seg in enumerate(segs):
    for i in range(seg.lo, seg.hi):
      seg_of[i] = s
  out = set()
  jaxpr = g.closed.jaxpr
  for i in range(lo, hi):
    for v in jaxpr.eqns[i].outvars:
      lu = _last_use_in(g, v, hi)
      if lu is None or lu <= i:
        continue
      if lu == g.n or seg_of[lu] != seg_of[i]:
        out.add(v)
  return out, seg_of


def _crossing_profile(g: _Graph, lo: int = 0, hi: int | None = None) -> np.ndarray:
  """``prof[c - lo]``: bytes of values of ``[lo, hi)`` crossing the cut before eqn c."""
  hi = g.n if hi is None else hi
  diff = np.zeros(hi - lo + 2)
  jaxpr = g.closed.jaxpr
  for i in range(lo, hi):
    for v in jaxpr.eqns[i].outvars:
      lu = _last_use_in(g, v, hi)
      if lu is None or lu <= i:
        continue
      b = ljx.aval_bytes(v.aval)
      diff[i + 1 - lo] += b
      diff[min(lu, hi) + 1 - lo] -= b
  return np.cumsum(diff)[: hi - lo + 1]


def _balanced_cuts(g: _Graph, lo: int, hi: int, k: int, prof=None, cum=None) -> tuple[int, ...]:
  """``k - 1`` cuts of ``[lo, hi)`` splitting candidate bytes evenly, at cheap boundaries."""
  if prof is None:
    prof = _crossing_profile(g, lo, hi)
  if cum is None:
    cum = _cand_weights(g, lo, hi)
  total = cum[-1]
  n = hi - lo
  cuts = []
  for j in range(1, k):
    target = total * j / k if total > 0 else n * j / k
    c0 = int(np.searchsorted(cum, target)) if total > 0 else int(round(target))
    win = max(1, n // (3 * k))
    a, b = max(1, c0 - win), min(n - 1, c0 + win)
    if b < a:
      continue
    best = min(range(a, b + 1), key=lambda c: (prof[c], abs(c - c0)))
    cuts.append(lo + best)
  return tuple(sorted(set(cuts)))


def _cand_weights(g: _Graph, lo: int, hi: int) -> np.ndarray:
  weights = np.zeros(hi - lo)
  for c in g.cands.values():
    if lo <= c.segment_local < hi:
      weights[c.segment_local - lo] += c.nbytes
  for i, sc in g.scans.items():
    if lo <= i < hi:
      weights[i - lo] += sum(c.nbytes * c.count for c in sc.cands)
  return np.concatenate([[0.0], np.cumsum(weights)])


def _candidate_cut_sets(g: _Graph, lo: int = 0, hi: int | None = None) -> list[tuple[int, ...]]:
  hi = g.n if hi is None else hi
  prof = _crossing_profile(g, lo, hi)
  cum = _cand_weights(g, lo, hi)
  n_cand = sum(1 for c in g.cands.values() if lo <= c.segment_local < hi)
  sets = {()}
  for k in sorted({k for k in (2, 3, 4, 6, 8, 12, 16) if k <= max(n_cand, 1)}):
    sets.add(_balanced_cuts(g, lo, hi, k, prof, cum))
  return sorted(sets, key=len)


@dataclasses.dataclass
class _Layout:
  segs: list
  seg_of: dict
  crossing: set
  items: list          # list[(Item, _Cand, seg_index, scan_index or None)]
  problem: solver_lib.Problem
  lo: int = 0
  hi: int = 0


def _layout(g: _Graph, cuts: Sequence[int], cm: CostModel, offload: bool, lo: int = 0,
            hi: int | None = None) -> _Layout:
  """One level of checkpoint segments over ``[lo, hi)`` with per-residual decisions."""
  hi = g.n if hi is None else hi
  segs = _segments_from_cuts(g, cuts, lo, hi)
  crossing, seg_of = _crossing(g, segs, lo, hi)
  invars = set(g.closed.jaxpr.invars) | set(g.closed.jaxpr.constvars)
  fixed = sum(ljx.aval_bytes(v.aval) for v in crossing if v not in invars)
  jaxpr = g.closed.jaxpr
  items = []
  stop = set(g.cands) | crossing
  for s, seg in enumerate(segs):
    if seg.scan:
      sc = g.scans[seg.lo]
      if sc.cands:
        fixed += sc.carry_bytes * sc.length
      for c in sc.cands:
        it = solver_lib.Item(
            key=c.name, segment=s, saved_bytes=c.nbytes * c.count, transient_bytes=c.nbytes,
            recompute_time=cm.recompute_seconds(c.flops),
            transfer_time=cm.transfer_seconds(c.nbytes * c.count) if offload else math.inf,
            recompute_flops=c.flops)
        items.append((it, c, s, seg.lo))
      continue
    for i in range(seg.lo, seg.hi):
      for v in jaxpr.eqns[i].outvars:
        c = g.cands.get(v)
        if c is None or v in crossing:
          continue
        flops = _recompute_flops(jaxpr, g.def_idx, v, stop, seg.lo, seg.hi, g.flops)
        it = solver_lib.Item(
            key=c.name, segment=s, saved_bytes=c.nbytes, transient_bytes=c.nbytes,
            recompute_time=cm.recompute_seconds(flops),
            transfer_time=cm.transfer_seconds(c.nbytes) if offload else math.inf,
            recompute_flops=flops)
        items.append((it, c, s, None))
  problem = solver_lib.Problem(tuple(x[0] for x in items), int(fixed), len(segs))
  return _Layout(segs, seg_of, crossing, items, problem, lo, hi)


# ------------------------------------------------------- hierarchical structure


@dataclasses.dataclass
class _Node:
  """A range ``[lo, hi)`` of the top-level equations.

  A leaf carries a one-level :class:`_Layout` and its solution. An inner node
  splits its range into children, each a ``jax.checkpoint`` (nothing saved but
  its inputs) recomputed during the backward pass of the node; its ``fixed``
  bytes are the values crossing between its children.
  """
  lo: int
  hi: int
  peak: int
  cost: float            # seconds (recompute + transfer)
  flops: float           # recompute FLOPs
  layout: _Layout | None = None
  sol: Any = None
  children: list | None = None
  crossing: set | None = None
  fixed: int = 0

  def leaves(self):
    if self.children is None:
      yield self
    else:
      for c in self.children:
        yield from c.leaves()

  def depth(self) -> int:
    return 1 if self.children is None else 1 + max(c.depth() for c in self.children)

  def num_segments(self) -> int:
    return sum(len(lf.layout.segs) for lf in self.leaves())


def _removed_flops(lay: _Layout, sol, offload: bool) -> float:
  total = 0.0
  for (it, _, _, _), r in zip(lay.items, sol.removed):
    if r and not (offload and it.offload_is_cheaper):
      total += it.recompute_flops
  return total


class _TreeSearch:
  """Builds hierarchical checkpoint structures over a :class:`_Graph` and solves them."""

  def __init__(self, g: _Graph, cm: CostModel, offload: bool, solver: str):
    self.g, self.cm, self.offload, self.solver = g, cm, offload, solver
    self._layouts: dict = {}
    self._picks: dict = {}
    self._invars = set(g.closed.jaxpr.invars) | set(g.closed.jaxpr.constvars)
    fl = g.flops
    self._cum_flops = np.concatenate([[0.0], np.cumsum(fl)])
    pos = [c.segment_local for c in g.cands.values()] + list(g.scans)
    self._tail = (max(pos) + 1) if pos else g.n

  def fwd_flops(self, lo: int, hi: int) -> float:
    return float(self._cum_flops[hi] - self._cum_flops[lo])

  def layouts(self, lo: int, hi: int) -> list[_Layout]:
    key = (lo, hi)
    if key not in self._layouts:
      self._layouts[key] = [_layout(self.g, cuts, self.cm, self.offload, lo, hi)
                            for cuts in _candidate_cut_sets(self.g, lo, hi)]
    return self._layouts[key]

  def pick(self, lo: int, hi: int, budget: int, refine: int = 3):
    """Cheapest (layout, solution) of the range within ``budget``, or None."""
    key = (lo, hi, int(budget), refine)
    if key in self._picks:
      return self._picks[key]
    mode = self.solver
    scored = []
    for lay in self.layouts(lo, hi):
      if solver_lib.min_peak(lay.problem) > budget:
        continue
      sol = solver_lib.solve(lay.problem, budget, "greedy" if mode == "auto" else mode)
      if sol is not None:
        scored.append(((sol.cost, sol.peak, len(lay.segs)), lay, sol))
    scored.sort(key=lambda t: t[0])
    if mode == "auto":  # refine the most promising layouts exactly
      refined = []
      for k, lay, sol in scored[:refine]:
        if len(lay.problem.items) <= solver_lib.MILP_MAX_ITEMS:
          m = solver_lib.solve_milp(lay.problem, budget, time_limit=2.0)
          if m is not None and m.cost <= sol.cost:
            sol = m
        refined.append(((sol.cost, sol.peak, len(lay.segs)), lay, sol))
      scored = sorted(refined + scored[refine:], key=lambda t: t[0])
    best = (scored[0][1], scored[0][2]) if scored else None
    self._picks[key] = best
    return best

  def _leaf(self, lo, hi, budget, minimal: bool, refine: int):
    if minimal:
      lay = min(self.layouts(lo, hi), key=lambda l: (solver_lib.min_peak(l.problem), len(l.segs)))
      n = len(lay.problem.items)
      sol = solver_lib.Solution(tuple([True] * n), solver_lib.min_peak(lay.problem),
                                lay.problem.cost([True] * n), "min")
    else:
      got = self.pick(lo, hi, budget, refine)
      if got is None:
        return None
      lay, sol = got
    return _Node(lo, hi, int(sol.peak), float(sol.cost), _removed_flops(lay, sol, self.offload), lay, sol)

  def solve(self, lo: int, hi: int, depth: int, k: int, budget: float, minimal: bool = False):
    """Best node of at most ``depth`` levels (branching ``k``) fitting ``budget``, or None.

    ``minimal``: recompute everything (the smallest peak of this structure).
    """
    if depth <= 1 or hi - lo <= 1:
      return self._leaf(lo, hi, budget, minimal, 2 if (lo, hi) == (0, self.g.n) else 1)
    g = self.g
    tail = hi
    if (lo, hi) == (0, g.n):
      # The tail after the last residual (loss, head) makes cotangents of its own:
      # keep it at the top level rather than deep inside the nest.
      tail = max(min(self._tail, hi), lo + 1)
    cuts = _balanced_cuts(g, lo, tail, k) + ((tail,) if tail < hi else ())
    segs = _segments_from_cuts(g, cuts, lo, hi)
    if len(segs) <= 1:
      return self._leaf(lo, hi, budget, minimal, 1)
    crossing, _ = _crossing(g, segs, lo, hi)
    fixed = int(sum(ljx.aval_bytes(v.aval) for v in crossing if v not in self._invars))
    if not minimal and fixed > budget:
      return None
    children = []
    for seg in segs:
      c = self.solve(seg.lo, seg.hi, 1 if seg.lo >= tail else depth - 1, k, budget - fixed, minimal)
      if c is None:
        return None
      children.append(c)
    peak = fixed + max(c.peak for c in children)
    fwd = [self.fwd_flops(c.lo, c.hi) for c in children]
    cost = sum(c.cost + self.cm.recompute_seconds(f) for c, f in zip(children, fwd))
    flops = sum(c.flops + f for c, f in zip(children, fwd))
    return _Node(lo, hi, int(peak), float(cost), float(flops), children=children, crossing=crossing,
                 fixed=fixed)

  def best(self, depth: int, budget: int):
    """Cheapest structure of exactly ``depth`` levels (any branching) within ``budget``."""
    if depth <= 1:
      return self.solve(0, self.g.n, 1, 1, budget)
    found = []
    for k in (2, 3, 4):
      node = self.solve(0, self.g.n, depth, k, budget)
      if node is not None and node.depth() == depth:
        found.append(node)
    return min(found, key=lambda nd: (nd.cost, nd.peak)) if found else None

  def minimal(self, max_depth: int) -> list:
    out = [self.solve(0, self.g.n, 1, 1, math.inf, minimal=True)]
    for d in range(2, max_depth + 1):
      for k in (2, 3, 4):
        out.append(self.solve(0, self.g.n, d, k, math.inf, minimal=True))
    return sorted(out, key=lambda nd: (nd.peak, nd.depth()))


# ------------------------------------------------------------------ application


def _policy(saved: Sequence[str], offloaded: Sequence[str]):
  if offloaded:
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=list(saved), names_which_can_be_offloaded=list(offloaded),
        offload_src="device", offload_dst="pinned_host")
  return jax.checkpoint_policies.save_only_these_names(*saved)


def _io(g: _Graph, lo: int, hi: int):
  """(inputs read by ``[lo, hi)`` and defined elsewhere, values it defines used after ``hi``)."""
  jaxpr = g.closed.jaxpr
  ins, seen, defined = [], set(), set()
  for i in range(lo, hi):
    for a in jaxpr.eqns[i].invars:
      if not isinstance(a, jex_core.Literal) and a not in defined and a not in seen:
        seen.add(a)
        ins.append(a)
    defined.update(jaxpr.eqns[i].outvars)
  outs = [v for i in range(lo, hi) for v in jaxpr.eqns[i].outvars if g.last_use.get(v, -1) >= hi]
  return ins, outs


def _run_eqns(jaxpr, lo: int, hi: int, env: dict, names: dict) -> None:
  """Evaluates equations ``[lo, hi)`` into ``env``, naming the values in ``names``."""
  for eqn in jaxpr.eqns[lo:hi]:
    res = _bind(eqn, [_read(env, a) for a in eqn.invars])
    for v, x in zip(eqn.outvars, res):
      nm = names.get(v)
      env[v] = checkpoint_name(x, nm) if nm is not None else x


def _segment_call(g: _Graph, lo: int, hi: int, body: Callable, ckpt_policy):
  """``(ins, outs, fn)``: equations ``[lo, hi)`` as a function (a ``jax.checkpoint`` with a policy)."""
  ins, outs = _io(g, lo, hi)

  def f(*vals):
    local = dict(zip(ins, vals))
    body(local)
    return [local[v] for v in outs]
  return ins, outs, (jax.checkpoint(f, policy=ckpt_policy) if ckpt_policy is not None else f)


def _apply(g: _Graph, node: "_Node | _Layout | None", decision: dict) -> Callable:
  """Builds ``flat_fun(*leaves) -> flat outs`` applying the structure and ``decision``."""
  closed = g.closed
  jaxpr = closed.jaxpr
  if node is None:
    return lambda *args: _inline_eval(jaxpr, closed.consts, args)
  if isinstance(node, _Layout):
    node = _Node(node.lo, node.hi, 0, 0.0, 0.0, layout=node)
  saved_names = [n for n, d in decision.items() if d == "save"]
  off_names = [n for n, d in decision.items() if d == "offload"]
  policy = _policy(saved_names, off_names)
  nothing = jax.checkpoint_policies.nothing_saveable
  run_eqns = functools.partial(_run_eqns, jaxpr)
  as_call = functools.partial(_segment_call, g)

  def run_leaf(lay: _Layout, env, nested: bool):
    seg_names = {s: {} for s in range(len(lay.segs))}
    seg_removed = {s: False for s in range(len(lay.segs))}
    for it, c, s, _ in lay.items:
      d = decision[c.name]
      if d in ("save", "offload"):
        seg_names[s][c.var] = c.name
      if d != "save":
        seg_removed[s] = True
    for s, seg in enumerate(lay.segs):
      if seg.scan:
        eqn = jaxpr.eqns[seg.lo]
        outs = _run_scan(eqn, [_read(env, a) for a in eqn.invars], seg_names[s], policy, seg_removed[s])
        env.update(zip(eqn.outvars, outs))
        continue
      ins, outs, fn = as_call(seg.lo, seg.hi,
                              functools.partial(lambda loc, seg, nm: run_eqns(seg.lo, seg.hi, loc, nm),
                                                seg=seg, nm=seg_names[s]),
                              policy if (seg_removed[s] or nested) else None)
      env.update(zip(outs, fn(*[env[v] for v in ins])))

  def run_node(nd: _Node, env, nested=False):
    # Inside a nested region every segment is a checkpoint: otherwise the residuals
    # JAX's rules make on their own (e.g. ``3 * x**2`` for ``x**3``) would be kept
    # for the whole backward pass of the enclosing region.
    if nd.children is None:
      run_leaf(nd.layout, env, nested)
      return
    for ch in nd.children:
      ins, outs, fn = as_call(ch.lo, ch.hi, functools.partial(lambda loc, ch: run_node(ch, loc, True), ch=ch),
                              nothing)
      env.update(zip(outs, fn(*[env[v] for v in ins])))

  def flat_fun(*args):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    run_node(node, env)
    return [_read(env, a) for a in jaxpr.outvars]

  return flat_fun


def _run_scan(eqn, invals, names: dict, policy, checkpointed: bool):
  p = eqn.params
  body = p["jaxpr"]
  nc, ncar = p["num_consts"], p["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]

  def body_fn(consts, carry, x):
    outs = _eval_named(body.jaxpr, body.consts, list(consts) + list(carry) + list(x), names)
    return outs[:ncar], outs[ncar:]

  if checkpointed:
    body_fn = jax.checkpoint(body_fn, policy=policy)
  carry, ys = jax.lax.scan(lambda c, x: body_fn(consts, c, x), list(init), list(xs),
                           length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
  return list(carry) + list(ys)


# ------------------------------------------------------------------ save-set plans


@dataclasses.dataclass
class _ClosureGraph:
  """The exact save-set model (``_remat_closure``) of a :class:`_Graph`.

  Every array produced by a forward equation is a value (top level, and one
  iteration of each ``scan`` body, counted ``length`` times); ``scan`` equations
  stay whole (their bodies are checkpointed per iteration).
  """
  problem: closure_lib.Problem
  refs: list            # value id -> (scan top index or None, var)
  names: list           # value id -> checkpoint name
  eqn_ref: list         # problem eqn id -> (scan top index or None, eqn index)
  top_eqn: dict         # top-level eqn index -> problem eqn id
  crossing: list        # cut c -> top-level value ids defined before c and read at/after c
  whole_scans: bool = False


def _array_names(jaxpr, used, prefix: str) -> dict:
  names = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for k, v in enumerate(eqn.outvars):
      if v in used and hasattr(v.aval, "shape") and ljx.aval_bytes(v.aval) > 0:
        names[v] = f"{prefix}{i}.{k}"
  return names


def _used_vars(jaxpr) -> set:
  used = set()
  for e in jaxpr.eqns:
    used.update(a for a in e.invars if not isinstance(a, jex_core.Literal))
  used.update(a for a in jaxpr.outvars if not isinstance(a, jex_core.Literal))
  return used


def _closure_graph(g: _Graph, prefix: str, whole_scans: bool = False) -> _ClosureGraph:
  """The save-set model of ``g``.

  ``whole_scans``: each ``scan`` is one checkpoint region (no per-iteration
  checkpoint): its carries are then not kept per iteration but, where the
  backward needs them, saved by name or recomputed along the loop (a carry is
  the previous iteration's carry-out value). Otherwise each iteration is
  checkpointed and its carries are kept (``fixed_bytes``).
  """
  jaxpr = g.closed.jaxpr
  values, refs, names, eqns, eqn_ref = [], [], [], [], []
  vid: dict = {}
  top_eqn: dict = {}

  def add_level(jx, consts, scan_i, pre, mult, carries=None):
    nm = _array_names(jx, _used_vars(jx), pre)
    in_names = {}
    if carries is not None:  # carry-in k is the carry-out k of the previous iteration
      nc, ncar = carries
      in_names = {v: f"{pre}in{k}" for k, v in enumerate(jx.invars[nc:nc + ncar])
                  if hasattr(v.aval, "shape") and ljx.aval_bytes(v.aval) > 0}

    def fun(*a):
      a = [checkpoint_name(x, in_names[v]) if v in in_names else x for v, x in zip(jx.invars, a)]
      return _eval_named(jx, consts, a, nm)
    needed = _needed_names(fun, [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jx.invars],
                           list(nm.values()) + list(in_names.values()))
    first = len(eqns)
    for i, eqn in enumerate(jx.eqns):
      for v in eqn.outvars:
        if v in nm:
          vid[(scan_i, v)] = len(values)
          refs.append((scan_i, v))
          names.append(nm[v])
          values.append([ljx.aval_bytes(v.aval) * mult, nm[v] in needed, first + i, False])
    if carries is not None:
      for k, v in enumerate(jx.invars[nc:nc + ncar]):
        out = jx.outvars[k]
        if v in in_names and (scan_i, out) in vid:
          vid[(scan_i, v)] = vid[(scan_i, out)]
          if in_names[v] in needed:
            values[vid[(scan_i, out)]][1] = True
    pending = []
    for i, eqn in enumerate(jx.eqns):
      e_id = first + i
      outs = tuple(vid[(scan_i, v)] for v in eqn.outvars if v in nm)
      ins = tuple(vid[(scan_i, a)] for a in eqn.invars
                  if not isinstance(a, jex_core.Literal) and (scan_i, a) in vid)
      is_scan = scan_i is None and eqn.primitive.name == "scan"
      fl = 0.0 if is_scan else g.flops[i] * mult if scan_i is None else _eqn_flops(eqn) * mult
      eqns.append(closure_lib.Eqn(ins, outs, float(fl), not is_scan))
      eqn_ref.append((scan_i, i))
      if scan_i is None:
        top_eqn[i] = e_id
      if is_scan:
        pending.append(i)
        for u in ins:  # the inputs of a scan region are kept when the backward needs them
          if values[u][1]:
            values[u][3] = True
    return pending

  fixed = 0
  for i in add_level(jaxpr, g.closed.consts, None, prefix, 1):
    sc = g.scans[i]
    p = jaxpr.eqns[i].params
    nc, ncar = p["num_consts"], p["num_carry"]
    if whole_scans:
      add_level(sc.body.jaxpr, sc.body.consts, i, f"{prefix}s{i}/", sc.length, (nc, ncar))
      # recomputing the loop's results re-runs the loop: it needs the body's results
      e = top_eqn[i]
      body_outs = tuple(vid[(i, v)] for v in sc.body.jaxpr.outvars if (i, v) in vid)
      eqns[e] = closure_lib.Eqn(eqns[e].ins + body_outs, eqns[e].outs, 0.0, True)
      continue
    carry = sc.body.jaxpr.invars[nc:nc + ncar]
    fixed += sum(ljx.aval_bytes(v.aval) for v in carry if hasattr(v.aval, "shape")) * sc.length
    add_level(sc.body.jaxpr, sc.body.consts, i, f"{prefix}s{i}/", sc.length)
  problem = closure_lib.Problem(
      tuple(eqns), tuple(closure_lib.Value(int(b), bool(nd), int(e), bool(ms)) for b, nd, e, ms in values),
      int(fixed))
  crossing = [[] for _ in range(g.n + 1)]
  for (scan_i, v), k in vid.items():
    if scan_i is not None:
      continue
    lu = g.last_use.get(v)
    if lu is None:
      continue
    for c in range(g.def_idx[v] + 1, min(lu, g.n - 1) + 1):
      crossing[c].append(k)
  return _ClosureGraph(problem, refs, names, eqn_ref, top_eqn, crossing, whole_scans)


def _closure_segments(g: _Graph, cg: _ClosureGraph, cp: closure_lib.Plan) -> list[_Seg]:
  """Finest checkpoint regions of the top level for save set ``cp``."""
  # values the backward of eqns at/after c reads: plain residuals + inputs of recomputed eqns
  last_read = {}  # value id -> last top-level position of a recomputed eqn reading it
  for e in cp.recomputed:
    scan_i, i = cg.eqn_ref[e]
    pos = i if scan_i is None else scan_i
    for k in cg.problem.eqns[e].ins:
      last_read[k] = max(last_read.get(k, -1), pos)
  values = cg.problem.values
  cuts = [c for c in range(1, g.n)
          if all(k in cp.saved or not (values[k].needed or last_read.get(k, -1) >= c) for k in cg.crossing[c])]
  if cg.whole_scans:  # a loop may share its region with its neighbours
    bounds = [0] + cuts + [g.n]
    return [_Seg(a, b, False) for a, b in zip(bounds[:-1], bounds[1:])]
  return _segments_from_cuts(g, cuts)


def _run_scan_into(eqn, env: dict, names: dict, out_names: dict) -> None:
  """Runs a ``scan`` equation (body values named, no per-iteration checkpoint) into ``env``."""
  outs = _run_scan(eqn, [_read(env, a) for a in eqn.invars], names, None, False)
  for v, x in zip(eqn.outvars, outs):
    env[v] = checkpoint_name(x, out_names[v]) if v in out_names else x


def _apply_closure(g: _Graph, cg: _ClosureGraph, cp: closure_lib.Plan, segs: list[_Seg]) -> Callable:
  """``flat_fun``: each region a ``jax.checkpoint`` saving only ``cp.saved``."""
  jaxpr, closed = g.closed.jaxpr, g.closed
  top_names, body_names = {}, {i: {} for i in g.scans}
  for k in cp.saved:
    scan_i, v = cg.refs[k]
    (top_names if scan_i is None else body_names[scan_i])[v] = cg.names[k]
  policy = jax.checkpoint_policies.save_only_these_names(*[cg.names[k] for k in sorted(cp.saved)])

  def run_region(seg, env):  # equations of [lo, hi); loops run whole with named bodies
    for i in range(seg.lo, seg.hi):
      if i in g.scans:
        _run_scan_into(jaxpr.eqns[i], env, body_names[i], top_names)
      else:
        _run_eqns(jaxpr, i, i + 1, env, top_names)

  def flat_fun(*args):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    for seg in segs:
      if cg.whole_scans:
        ins, outs, fn = _segment_call(g, seg.lo, seg.hi, functools.partial(run_region, seg), policy)
        env.update(zip(outs, fn(*[env[v] for v in ins])))
        continue
      if seg.scan:
        eqn = jaxpr.eqns[seg.lo]
        env.update(zip(eqn.outvars, _run_scan(eqn, [_read(env, a) for a in eqn.invars],
                                              body_names[seg.lo], policy, True)))
        continue
      ins, outs, fn = _segment_call(
          g, seg.lo, seg.hi, functools.partial(_run_eqns, jaxpr, seg.lo, seg.hi, names=top_names), policy)
      env.update(zip(outs, fn(*[env[v] for v in ins])))
    return [_read(env, a) for a in jaxpr.outvars]

  return flat_fun


# ------------------------------------------------------------ NNX / pytree glue





def _split_nodes(args, kwargs):
  """Replaces NNX graph nodes by (graphdef, state) so everything is arrays."""
  nnx = nnx_module()
  is_node = is_graph_node
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_node)
  n_first = len(jax.tree_util.tree_leaves(args[0], is_leaf=is_node)) if args else 0
  nodes, pure = {}, []
  for i, x in enumerate(leaves):
    if is_node(x):
      gdef, state = nnx.split(x)
      nodes[i] = (x, gdef)
      pure.append(state)
    else:
      pure.append(x)
  return treedef, nodes, pure, n_first


def _hashable(gdef):
  """NNX graph definitions compare by structure (a new object per ``nnx.split``)."""
  try:
    hash(gdef)
    return gdef
  except TypeError:  # pragma: no cover - older flax
    return id(gdef)


def _make_pure(fun, treedef, nodes):
  """``pure(pure_leaves) -> (out, new_states)`` re-merging NNX nodes inside."""
  nnx = nnx_module()

  def pure(pure_leaves):
    leaves = list(pure_leaves)
    merged = {}
    for i, (_, gdef) in nodes.items():
      merged[i] = nnx.merge(gdef, leaves[i])
      leaves[i] = merged[i]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    out = fun(*args, **kwargs)
    new_states = {i: nnx.state(m) for i, m in merged.items()}
    return out, new_states

  return pure


def _spec(x):
  if isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  if isinstance(x, (bool, int, float, complex)):
    return jax.ShapeDtypeStruct((), jnp.asarray(x).dtype)
  return x


# ---------------------------------------------------------------------- planner


@dataclasses.dataclass
class _Compiled:
  plan: RematPlan
  flat_fun: Callable  # flat leaves -> flat outs
  out_tree: Any


def _measure(flat_fun, flat_specs, argnums_leaves):
  """(saved residual bytes on device excl. inputs, host bytes, activation peak, FLOPs) of ``flat_fun``.

  One measurement for everything (planner, ``RematPlan``, benchmark, tests):
  ``lepton_jax.jaxpr`` ``grad_memory`` of the loss w.r.t. the first argument's leaves,
  the same as ``ljx.grad_peak_bytes`` / ``ljx.saved_residual_bytes`` of the wrapped function.
  """
  if not argnums_leaves:
    return 0, 0, 0, 0.0

  def loss(*flat):
    out = flat_fun(*flat)[0]
    if jnp.ndim(out) == 0 and _is_inexact(out):
      return out  # exactly what jax.grad of the wrapped function differentiates
    return jnp.sum(jnp.asarray(out, jnp.float32))
  m = _grad_memory(loss, *flat_specs, argnums=tuple(argnums_leaves))
  return int(m.saved_bytes), int(m.offloaded_bytes), int(m.peak_bytes), float(m.flops)


class _Planner:
  """Plans for one (fun, options); caches per abstract signature."""

  def __init__(self, fun, budget, offload, solver, cost_model, budget_kind="peak"):
    self.fun = fun
    self.budget = budget
    self.budget_kind = budget_kind
    self.offload = offload
    self.solver = solver
    self.cost_model = cost_model
    self._cache: dict = {}
    self._lock = threading.Lock()
    self._prefix = f"ljr{id(self) % 100000}:"

  def clear_cache(self):
    self._cache.clear()

  def _budget_bytes(self, baseline: int) -> int:
    b = self.budget
    if isinstance(b, float):
      return int(math.floor(b * baseline))
    return int(b)

  def compiled(self, treedef, nodes, pure_leaves, n_first: int) -> _Compiled:
    specs = [jax.tree.map(_spec, x) for x in pure_leaves]
    flat_specs, in_tree = jax.tree_util.tree_flatten(specs)
    # plain jax.grad differentiates the first positional argument: its leaves
    n_first_flat = len(jax.tree_util.tree_leaves(specs[:n_first]))
    key = (treedef, in_tree, tuple((s.shape, str(s.dtype)) if hasattr(s, "shape") else s for s in flat_specs),
           tuple((i, _hashable(gd)) for i, (_, gd) in nodes.items()))
    hit = self._cache.get(key)
    if hit is not None:
      return hit
    pure = _make_pure(self.fun, treedef, nodes)

    def flat_user(*flat):
      return jax.tree_util.tree_flatten(pure(jax.tree_util.tree_unflatten(in_tree, flat)))[0]

    closed0, out_shape = jax.make_jaxpr(lambda *a: flat_user(*a), return_shape=True)(*flat_specs)
    # inline jit calls so that the top level is a flat sequence of equations
    closed = jax.make_jaxpr(lambda *a: _inline_eval(closed0.jaxpr, closed0.consts, a))(*flat_specs)
    out_tree = jax.eval_shape(pure, jax.tree_util.tree_unflatten(in_tree, flat_specs))
    out_tree = jax.tree_util.tree_structure(out_tree)
    comp = self._plan(closed, flat_specs, n_first_flat, out_tree)
    self._cache[key] = comp
    return comp

  def _plan(self, closed, flat_specs, n_first, out_tree) -> _Compiled:
    cm = self.cost_model or CostModel.default()
    # differentiate w.r.t. the first positional argument's leaves (plain jax.grad)
    argnums = [i for i in range(n_first) if _is_inexact(flat_specs[i])]
    if not argnums:
      argnums = [i for i, s in enumerate(flat_specs) if _is_inexact(s)]
    g = _build_graph(closed, self._prefix)
    plain = _apply(g, None, {})
    base_saved, _, baseline, base_flops = _measure(plain, flat_specs, argnums)
    baseline = max(baseline, base_saved)
    if self.budget_kind == "saved":
      budget = self._budget_bytes(base_saved)
      ctx = (g, flat_specs, argnums, budget, baseline, base_saved, cm, out_tree, base_flops)
      if budget >= base_saved:
        return self._finish(ctx, None, plain, "none", (base_saved, 0, baseline, base_flops))
      return self._plan_saved(g, ctx)
    budget = self._budget_bytes(baseline)
    ctx = (g, flat_specs, argnums, budget, baseline, base_saved, cm, out_tree, base_flops)

    # Budget at or above the plain peak: nothing to do.
    if budget >= baseline:
      return self._finish(ctx, None, plain, "none", (base_saved, 0, baseline, base_flops))
    search = _TreeSearch(g, cm, self.offload, self.solver)
    n_units = len(g.cands) + sum(len(s.cands) for s in g.scans.values())
    max_depth = max(1, min(_MAX_DEPTH, int(math.ceil(math.log2(max(n_units, 2))))))
    # Segment-tree plans first: XLA's compiled memory follows their few, coarse regions
    # (checked against memory_analysis()); the finer save-set regions can compile to more
    # temp memory than their jaxpr peak, so they serve when no tree plan fits.
    tree = self._tree_plan(g, search, ctx, max_depth)
    if tree is not None:
      node, fn, measured = tree
      return self._finish(ctx, node, fn, _node_solver(node), measured)
    clos = self._closure_plan(g, ctx)
    if clos is not None:
      return self._finish_closure(ctx, *clos)
    # No costed plan fits: try the recompute-everything structures with the smallest
    # peaks, and report the smallest budget one reaches (measured).
    smallest = None
    for node in search.minimal(max_depth)[:3]:
      fn = _apply(g, node, self._decisions(node))
      measured = _measure(fn, flat_specs, argnums)
      cand = measured[2]
      if cand <= budget:
        return self._finish(ctx, node, fn, "min", measured)
      smallest = cand if smallest is None else min(smallest, cand)
    smallest = int(smallest if smallest is not None else baseline)
    raise BudgetError(
        f"{_API}: budget={format_bytes(budget)} ({self.budget!r}) is below the smallest feasible "
        f"plan ({format_bytes(smallest)}, recompute everything with up to {max_depth} levels of "
        f"nested checkpoints; plain jax.grad peak is {format_bytes(baseline)}); pass "
        f"budget>={format_bytes(smallest)} (budget>={smallest} bytes, or a fraction >= "
        f"{math.ceil(1000 * smallest / max(baseline, 1)) / 1000:.3f})",
        smallest_feasible_bytes=smallest)

  def _tree_plan(self, g, search, ctx, max_depth):
    """Cheapest segment-tree plan (shallowest structure first) measured within budget."""
    _, flat_specs, argnums, budget, baseline, base_saved, _, _, _ = ctx
    # The model leaves out cotangents and XLA temporaries: start from plain grad's gap.
    # A plan is accepted on its measured peak (``_measure``), the model only ranks;
    # the model-vs-measured gap learnt on one structure seeds the next depth.
    learnt = max(0, baseline - base_saved)
    for depth in range(1, max_depth + 1):
      slack = learnt
      model_budget = budget - slack
      for _ in range(3):
        node = search.best(depth, model_budget)
        if node is None:
          break
        fn = _apply(g, node, self._decisions(node))
        measured = _measure(fn, flat_specs, argnums)
        if measured[2] <= budget:
          return node, fn, measured
        slack = max(slack, measured[2] - node.peak, 0)
        learnt = max(learnt, slack)
        model_budget = min(budget - slack, model_budget - 1)
    return None

  def _closure_plan(self, g, ctx):
    """Cheapest save-set plan over all forward intermediates (``_remat_closure``).

    Least-recompute save sets for decreasing saved-byte targets; the first whose
    measured peak fits the budget wins (larger targets recompute less).
    """
    _, flat_specs, argnums, budget, _, _, _, _, _ = ctx
    cg = _closure_graph(g, self._prefix)
    prob = cg.problem
    method = _closure_method(prob)
    top = closure_lib.closure(prob, range(len(prob.values))).saved_bytes
    targets = sorted({min(top, int(budget * f)) for f in _CLOSURE_TARGETS}, reverse=True)
    tried = set()
    for t in targets:
      cp = closure_lib.solve(prob, t, method=method, time_limit=2.0)
      if cp is None:
        break
      if cp.saved in tried:
        continue
      tried.add(cp.saved)
      segs = _closure_segments(g, cg, cp)
      fn = _apply_closure(g, cg, cp, segs)
      measured = _measure(fn, flat_specs, argnums)
      if measured[2] <= budget:
        return cg, cp, segs, fn, measured
    return None

  def _plan_saved(self, g, ctx):
    """``budget_kind="saved"``: least recompute with saved residual bytes within budget."""
    _, flat_specs, argnums, budget, baseline, base_saved, _, _, base_flops = ctx
    best, smallest = None, None
    # scans checkpointed per iteration (carries kept) or as whole loops (carries recomputed)
    for whole in ((False, True) if g.scans else (False,)):
      cg = _closure_graph(g, self._prefix, whole_scans=whole)
      prob = cg.problem
      method = _closure_method(prob)
      target = budget
      for _ in range(4):  # the measured residuals may exceed the model (a value JAX keeps on its own)
        cp = closure_lib.solve(prob, target, method=method, time_limit=5.0)
        if cp is None:
          break
        segs = _closure_segments(g, cg, cp)
        fn = _apply_closure(g, cg, cp, segs)
        measured = _measure(fn, flat_specs, argnums)
        if measured[0] <= budget:
          if best is None or measured[3] < best[-1][3]:
            best = (cg, cp, segs, fn, measured)
          break
        target -= measured[0] - budget
      least = closure_lib.closure(prob, ())
      fn = _apply_closure(g, cg, least, _closure_segments(g, cg, least))
      low = max(_measure(fn, flat_specs, argnums)[0], least.saved_bytes)
      smallest = low if smallest is None else min(smallest, low)
    if best is not None:
      return self._finish_closure(ctx, *best)
    raise BudgetError(
        f"{_API}: budget={format_bytes(budget)} ({self.budget!r}, budget_kind='saved') is below the "
        f"smallest feasible saved-residual bytes ({format_bytes(smallest)}: values that must stay on "
        f"device, e.g. scan carries; plain jax.grad saves {format_bytes(base_saved)}); pass "
        f"budget>={smallest} bytes (or a fraction >= "
        f"{math.ceil(1000 * smallest / max(base_saved, 1)) / 1000:.3f})",
        smallest_feasible_bytes=int(smallest))

  def _finish_closure(self, ctx, cg, cp, segs, fn, measured):
    g, flat_specs, argnums, budget, baseline, base_saved, cm, out_tree, base_flops = ctx
    dev, host, peak, flops = measured
    seg_of = {}
    for s, seg in enumerate(segs):
      for i in range(seg.lo, seg.hi):
        seg_of[i] = s
    decisions = []
    prob = cg.problem
    for k, val in enumerate(prob.values):
      if not (val.needed or k in cp.saved):
        continue
      scan_i, v = cg.refs[k]
      e = val.defined_by
      _, i = cg.eqn_ref[e]
      count = 1 if scan_i is None else g.scans[scan_i].length
      decisions.append(TensorDecision(
          cg.names[k], tuple(v.aval.shape), str(v.aval.dtype), count, int(val.nbytes),
          "save" if k in cp.saved else "recompute", seg_of.get(i if scan_i is None else scan_i, 0),
          float(prob.eqns[e].flops) if e in cp.recomputed else 0.0,
          (g.closed.jaxpr.eqns[i] if scan_i is None else g.scans[scan_i].body.jaxpr.eqns[i]).primitive.name))
    plan = RematPlan(
        budget_bytes=int(budget), baseline_bytes=int(baseline), peak_bytes=int(peak),
        saved_bytes=int(dev), offloaded_bytes=int(host), recompute_flops=max(flops - base_flops, 0.0),
        transfer_bytes=0, num_segments=len(segs), solver=f"saveset-{cp.method}",
        decisions=tuple(decisions), baseline_saved_bytes=int(base_saved),
        model_peak_bytes=int(cp.saved_bytes), measured_peak_bytes=int(peak), cost_model=cm, depth=1)
    return _Compiled(plan, fn, out_tree)

  def _decisions(self, node: "_Node") -> dict:
    decision = {}
    for leaf in node.leaves():
      for (it, c, s, _), r in zip(leaf.layout.items, leaf.sol.removed):
        if not r:
          decision[c.name] = "save"
        elif self.offload and it.offload_is_cheaper:
          decision[c.name] = "offload"
        else:
          decision[c.name] = "recompute"
    return decision

  def _finish(self, ctx, node, fn, solver_name, measured=None):
    g, flat_specs, argnums, budget, baseline, base_saved, cm, out_tree, base_flops = ctx
    if measured is None:
      measured = _measure(fn, flat_specs, argnums)
    dev, host, peak, flops = measured
    decisions = []
    transfer = 0
    jaxpr = g.closed.jaxpr
    if node is None:
      for c in g.cands.values():
        decisions.append(TensorDecision(c.name, tuple(c.var.aval.shape), str(c.var.aval.dtype), 1,
                                        c.nbytes, "save", 0, c.flops, c.primitive))
      model_peak, nseg, depth = baseline, 1, 0
    else:
      decision = self._decisions(node)
      invars = set(jaxpr.invars) | set(jaxpr.constvars)
      leaves = list(node.leaves())
      seg_base, nxt = {}, 0
      for leaf in leaves:
        seg_base[id(leaf)] = nxt
        nxt += len(leaf.layout.segs)
      boundary = set()
      stack = [node]
      while stack:
        nd = stack.pop()
        if nd.children is not None:
          boundary |= nd.crossing
          stack.extend(nd.children)
        else:
          boundary |= nd.layout.crossing

      def seg_index(i):
        for leaf in leaves:
          if leaf.lo <= i < leaf.hi:
            return seg_base[id(leaf)] + leaf.layout.seg_of.get(i, 0)
        return 0
      for v in sorted(set(boundary) - invars, key=lambda v: g.def_idx[v]):
        if not _is_inexact(v.aval):
          continue
        i = g.def_idx[v]
        decisions.append(TensorDecision(f"boundary@{i}", tuple(v.aval.shape), str(v.aval.dtype), 1,
                                        ljx.aval_bytes(v.aval), "boundary", seg_index(i), 0.0,
                                        jaxpr.eqns[i].primitive.name))
      for leaf in leaves:
        for it, c, s, _ in leaf.layout.items:
          d = decision[c.name]
          if d == "offload":
            transfer += 2 * it.saved_bytes
          decisions.append(TensorDecision(c.name, tuple(c.var.aval.shape), str(c.var.aval.dtype), c.count,
                                          it.saved_bytes, d, seg_base[id(leaf)] + s, it.recompute_flops,
                                          c.primitive))
      model_peak, nseg, depth = node.peak, node.num_segments(), node.depth()
    plan = RematPlan(
        budget_bytes=int(budget), baseline_bytes=int(baseline),
        peak_bytes=int(peak),
        saved_bytes=int(dev), offloaded_bytes=int(host), recompute_flops=max(flops - base_flops, 0.0),
        transfer_bytes=int(transfer), num_segments=nseg, solver=solver_name,
        decisions=tuple(decisions), baseline_saved_bytes=int(base_saved),
        model_peak_bytes=int(model_peak), measured_peak_bytes=int(peak), cost_model=cm,
        depth=int(depth))
    return _Compiled(plan, fn, out_tree)


def _closure_method(problem: closure_lib.Problem) -> str:
  """The save-set solver for ``problem``: the exact MILP (HiGHS is fast at these sizes) or the rounded LP."""
  return "lp" if len(problem.values) + len(problem.eqns) > _CLOSURE_MILP_MAX else "milp"


def _node_solver(node: "_Node") -> str:
  names = sorted({lf.sol.solver for lf in node.leaves()})
  return "+".join(names)


# ------------------------------------------------------------------ public API


def _validate_budget(budget):
  if isinstance(budget, bool) or budget is None:
    raise TypeError(f"{_API}: budget must be bytes (int), a size string like '512MiB', or a float "
                    f"fraction in (0, 1] of plain jax.grad's peak; got {budget!r}")
  if isinstance(budget, float):
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
      raise ValueError(f"{_API}: budget={budget!r} as a float is a fraction of plain jax.grad's "
                       "activation peak and must be in (0, 1]; pass bytes (int) or a string "
                       "like '512MiB' for an absolute budget")
    return budget
  if isinstance(budget, (int, np.integer)):
    return parse_bytes(int(budget), name="budget", api=_API)
  if isinstance(budget, str):
    return parse_bytes(budget, name="budget", api=_API)
  raise TypeError(f"{_API}: budget must be bytes (int), a size string like '512MiB', or a float "
                  f"fraction in (0, 1]; got {type(budget).__name__} {budget!r}")


class _RematPlanned:
  """The callable returned by :func:`remat_plan`."""

  def __init__(self, fun, planner: _Planner):
    functools.update_wrapper(self, fun)
    self._fun = fun
    self._planner = planner

  def __call__(self, *args, **kwargs):
    treedef, nodes, pure, n_first = _split_nodes(args, kwargs)
    comp = self._planner.compiled(treedef, nodes, pure, n_first)
    flat = jax.tree_util.tree_leaves(pure)
    outs = comp.flat_fun(*flat)
    out, new_states = jax.tree_util.tree_unflatten(comp.out_tree, outs)
    nnx = nnx_module()
    for i, (node, _) in nodes.items():
      nnx.update(node, new_states[i])
    return out

  def plan(self, *args, **kwargs) -> RematPlan:
    """The :class:`RematPlan` for these arguments (arrays or ``jax.ShapeDtypeStruct``)."""
    treedef, nodes, pure, n_first = _split_nodes(args, kwargs)
    return self._planner.compiled(treedef, nodes, pure, n_first).plan

  def clear_cache(self) -> None:
    self._planner.clear_cache()

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)


def remat_plan(fun: Callable | None = None, /, *, budget, offload: bool = False,
               solver: Literal["auto", "greedy", "milp"] = "auto",
               cost_model: CostModel | None = None,
               budget_kind: Literal["peak", "saved"] = "peak"):
  """Plans activation rematerialisation of ``fun`` under a device-memory budget.

  Each intermediate that ``jax.grad`` would save is kept on device, recomputed in
  the backward pass, or (``offload=True``) offloaded to ``pinned_host`` memory,
  minimising recompute + transfer time (``cost_model``) while the activation
  peak fits ``budget``. Two families of plans, each measured on the traced
  forward + backward pass: nested segment trees over the residuals of plain
  ``jax.grad`` (tried first), and exact least-recompute *save sets* over every
  forward intermediate (e.g. keep a matmul output, recompute the activation
  after it) cut into regions (when no tree fits, and for ``budget_kind="saved"``). The plan is applied with ``checkpoint_name`` and
  ``jax.checkpoint`` policies; values and gradients equal those of ``fun``.

  Args:
    fun: the function to differentiate (arrays, pytrees, Flax NNX modules).
    budget: bytes (``int``), a size string (``"512MiB"``), or a float in (0, 1]:
      that fraction of plain ``jax.grad``'s activation peak.
    offload: allow offloading residuals to host memory.
    solver: ``"auto"`` (MILP for small graphs, else greedy), ``"greedy"``, ``"milp"``:
      the solver of the segment-tree plans. Save-set plans use an exact MILP up to
      20k variables (HiGHS takes milliseconds there) and a rounded LP beyond.
    cost_model: device FLOP/s and host bandwidth (default by backend).
    budget_kind: what ``budget`` bounds. ``"peak"`` (default): the activation
      peak of the forward + backward pass (``RematPlan.peak_bytes``).
      ``"saved"``: only the residuals kept between forward and backward
      (``RematPlan.saved_bytes``; a float is then a fraction of plain
      ``jax.grad``'s saved bytes) -- the least-recompute save set over every
      forward intermediate, the axis on which JAX's built-in policies are
      usually compared; the peak is not bounded then.

  Returns:
    A function with ``fun``'s signature, plus ``.plan(*args) -> RematPlan``.

  Raises:
    BudgetError: (when planning) the budget is below the smallest feasible plan.

  >>> import jax, jax.numpy as jnp, lepton_jax as lj
  >>> @lj.remat_plan(budget=0.5)
  ... def loss(w, x):
  ...   for _ in range(8):
  ...     x = jnp.tanh(x @ w)
  ...   return jnp.sum(x)
  >>> g = jax.grad(loss)(jnp.eye(16) * 0.5, jnp.ones((4, 16)))
  """
  budget = _validate_budget(budget)
  if not isinstance(offload, bool):
    raise TypeError(f"{_API}: offload must be True or False, got {offload!r}")
  if solver not in _SOLVERS:
    raise ValueError(f"{_API}: solver={solver!r} is not one of {_SOLVERS}")
  if budget_kind not in _BUDGET_KINDS:
    raise ValueError(f"{_API}: budget_kind={budget_kind!r} is not one of {_BUDGET_KINDS} "
                     "('peak' bounds the activation peak, 'saved' the saved residual bytes)")
  if cost_model is not None and not isinstance(cost_model, CostModel):
    raise TypeError(f"{_API}: cost_model must be a lj.transforms.CostModel, got {type(cost_model).__name__}")
  if offload:
    kinds = [m.kind for m in jax.devices()[0].addressable_memories()]
    if "pinned_host" not in kinds:
      raise ValueError(f"{_API}: offload=True needs a 'pinned_host' memory space; "
                       f"{jax.devices()[0].platform} offers {kinds}. Use offload=False.")

  def wrap(f):
    if not callable(f):
      raise TypeError(f"{_API}: fun must be callable, got {type(f).__name__}")
    return _RematPlanned(f, _Planner(f, budget, offload, solver, cost_model, budget_kind))

  if fun is None:
    return wrap
  return wrap(fun)
