"""Search / planning for ``lj.remat_plan`` on the planner's model (no compiling here).

Role: one level of checkpoint segments with per-residual save / recompute / offload items
(``_Layout``, solved by ``_remat_solver``: greedy or MILP), nested segment trees over the
top-level equations (``_TreeSearch``: segments inside segments, each recomputed in its
parent's backward), and the per-node decisions. The model ranks candidate plans; the planner
(``_remat_planner``) compiles the best few and keeps only what the compiler fits in the budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from lepton_jax import jaxpr as ljx
from lepton_jax.transforms import _remat_closure as closure_lib
from lepton_jax.transforms import _remat_solver as solver_lib
from lepton_jax.transforms._remat_graph import (
    _Graph, _balanced_cuts, _candidate_cut_sets, _crossing, _recompute_flops, _segments_from_cuts)
from lepton_jax.transforms._remat_types import CostModel

_CLOSURE_MILP_MAX = 20000   # save-set MILP variables; larger graphs use the rounded LP (any solver=)


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



def _closure_method(problem: closure_lib.Problem) -> str:
  """The save-set solver for ``problem``: the exact MILP (HiGHS is fast at these sizes) or the rounded LP."""
  return "lp" if len(problem.values) + len(problem.eqns) > _CLOSURE_MILP_MAX else "milp"


def _node_solver(node: "_Node") -> str:
  names = sorted({lf.sol.solver for lf in node.leaves()})
  return "+".join(names)




def _decisions(node: "_Node", offload: bool) -> dict:
  """``{candidate name: "save" | "recompute" | "offload"}`` of a solved tree."""
  decision = {}
  for leaf in node.leaves():
    for (it, c, s, _), r in zip(leaf.layout.items, leaf.sol.removed):
      if not r:
        decision[c.name] = "save"
      elif offload and it.offload_is_cheaper:
        decision[c.name] = "offload"
      else:
        decision[c.name] = "recompute"
  return decision
