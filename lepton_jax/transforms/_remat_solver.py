"""Solvers for the remat planning problem on an abstract graph (no JAX here).

The planner (``_remat_plan``) reduces a traced function to a :class:`Problem`:

* the computation is cut into *segments*; each segment is a ``jax.checkpoint``
  region (a top-level slice of the jaxpr, or one iteration of a ``scan`` body);
* ``fixed_bytes`` are residuals that are always kept on device (values crossing
  segment boundaries, scan carries per iteration);
* every :class:`Item` is an intermediate that plain ``jax.grad`` would save.
  It is either *kept* (saved on device between forward and backward) or
  *removed*: recomputed in its segment's backward, or offloaded to host memory
  and brought back for that backward.

Memory model (bytes on device during the backward pass)::

  peak = fixed + sum(kept.saved_bytes) + max_j sum(removed items of segment j).transient_bytes

(all kept residuals are alive at the start of the backward pass; a segment's
removed items are re-materialised together while its backward runs).
Cost model: a removed item costs ``min(recompute_time, transfer_time)`` where
``recompute_time = flops / device_flops`` and ``transfer_time = 2 * bytes /
host_bandwidth`` (only when offload is allowed).

Given a transient cap ``M``, the problem is a covering knapsack: remove at least
``need(M) = total_saved - (budget - fixed - M)`` bytes with per-segment removed
transient bytes ``<= M`` at minimal cost. ``solve_greedy`` scans caps and fills
by cost per byte; ``solve_milp`` solves the exact MILP with HiGHS.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["Item", "Problem", "Solution", "solve_greedy", "solve_milp", "solve", "min_peak"]


@dataclasses.dataclass(frozen=True)
class Item:
  """One candidate residual.

  Attributes:
    key: identifier (the planner's checkpoint name).
    segment: index of its segment.
    saved_bytes: device bytes it occupies between forward and backward if kept
      (``bytes * trip_count`` inside a scan).
    transient_bytes: bytes re-materialised in its segment's backward if removed.
    recompute_time: seconds to recompute it (all trips).
    transfer_time: seconds to offload and fetch it (all trips); ``inf`` when not allowed.
    recompute_flops: FLOPs of recomputing it (all trips), reported in the plan.
  """
  key: str
  segment: int
  saved_bytes: int
  transient_bytes: int
  recompute_time: float
  transfer_time: float
  recompute_flops: float

  @property
  def cost(self) -> float:
    return min(self.recompute_time, self.transfer_time)

  @property
  def offload_is_cheaper(self) -> bool:
    return self.transfer_time < self.recompute_time


@dataclasses.dataclass(frozen=True)
class Problem:
  items: tuple[Item, ...]
  fixed_bytes: int
  num_segments: int

  def total_saved(self) -> int:
    return int(sum(i.saved_bytes for i in self.items))

  def segment_transient(self, removed: Sequence[bool]) -> list[int]:
    seg = [0] * self.num_segments
    for it, r in zip(self.items, removed):
      if r:
        seg[it.segment] += it.transient_bytes
    return seg

  def peak(self, removed: Sequence[bool]) -> int:
    kept = sum(it.saved_bytes for it, r in zip(self.items, removed) if not r)
    seg = self.segment_transient(removed)
    return int(self.fixed_bytes + kept + (max(seg) if seg else 0))

  def cost(self, removed: Sequence[bool]) -> float:
    return float(sum(it.cost for it, r in zip(self.items, removed) if r))


@dataclasses.dataclass(frozen=True)
class Solution:
  removed: tuple[bool, ...]
  peak: int
  cost: float
  solver: str


def min_peak(problem: Problem) -> int:
  """Smallest peak of any decision on ``problem`` (remove everything)."""
  return problem.peak([True] * len(problem.items))


def _caps(problem: Problem, budget: int) -> list[int]:
  """Candidate transient caps ``M`` for the greedy solver."""
  per_seg: dict[int, list[int]] = {}
  for it in problem.items:
    per_seg.setdefault(it.segment, []).append(it.transient_bytes)
  caps = {0}
  for sizes in per_seg.values():
    # prefix sums of the segment's items, cheapest-per-byte first and largest first
    for order in (sorted(sizes), sorted(sizes, reverse=True)):
      caps.update(np.cumsum(order).tolist())
  room = budget - problem.fixed_bytes
  caps = sorted(c for c in caps if 0 <= c <= max(room, 0))
  if len(caps) > 96:
    idx = np.unique(np.linspace(0, len(caps) - 1, 96).astype(int))
    caps = [caps[i] for i in idx]
  return caps


def _greedy_for_cap(problem: Problem, budget: int, cap: int, order: list[int]) -> list[bool] | None:
  items = problem.items
  need = problem.total_saved() - (budget - problem.fixed_bytes - cap)
  removed = [False] * len(items)
  if need <= 0:
    return removed
  seg_used = [0] * problem.num_segments
  got = 0
  for i in order:
    it = items[i]
    if it.saved_bytes <= 0:
      continue
    if seg_used[it.segment] + it.transient_bytes > cap:
      continue
    removed[i] = True
    seg_used[it.segment] += it.transient_bytes
    got += it.saved_bytes
    if got >= need:
      break
  if got < need:
    return None
  # Drop pass: un-remove the most expensive items that are not needed.
  for i in sorted((i for i in range(len(items)) if removed[i]), key=lambda i: -items[i].cost):
    if got - items[i].saved_bytes >= need:
      removed[i] = False
      got -= items[i].saved_bytes
  return removed


def solve_greedy(problem: Problem, budget: int) -> Solution | None:
  """Greedy over transient caps; returns ``None`` when no plan fits ``budget``."""
  items = problem.items
  if problem.peak([False] * len(items)) <= budget:
    return Solution(tuple([False] * len(items)), problem.peak([False] * len(items)), 0.0, "greedy")
  orders = [
      sorted(range(len(items)), key=lambda i: (items[i].cost / max(items[i].saved_bytes, 1), -items[i].saved_bytes)),
      sorted(range(len(items)), key=lambda i: (items[i].cost / max(items[i].saved_bytes, 1)) *
             (items[i].transient_bytes / max(items[i].saved_bytes, 1))),
  ]
  best: Solution | None = None
  for cap in _caps(problem, budget):
    for order in orders:
      removed = _greedy_for_cap(problem, budget, cap, order)
      if removed is None:
        continue
      peak = problem.peak(removed)
      if peak > budget:
        continue
      cost = problem.cost(removed)
      if best is None or (cost, peak) < (best.cost, best.peak):
        best = Solution(tuple(removed), peak, cost, "greedy")
  if best is not None and len(items) <= 400:
    best = _improve_by_swaps(problem, budget, best)
  return best


class _State:
  """Incremental peak of a decision vector (kept bytes + per-segment transients)."""

  def __init__(self, problem: Problem, removed: Sequence[bool]):
    self.p = problem
    self.removed = list(removed)
    self.kept = sum(it.saved_bytes for it, r in zip(problem.items, removed) if not r)
    self.seg = problem.segment_transient(removed)

  def peak(self) -> int:
    return int(self.p.fixed_bytes + self.kept + (max(self.seg) if self.seg else 0))

  def flip(self, i: int) -> None:
    it = self.p.items[i]
    if self.removed[i]:
      self.kept += it.saved_bytes
      self.seg[it.segment] -= it.transient_bytes
    else:
      self.kept -= it.saved_bytes
      self.seg[it.segment] += it.transient_bytes
    self.removed[i] = not self.removed[i]


def _improve_by_swaps(problem: Problem, budget: int, sol: Solution) -> Solution:
  """Local search: keep a removed item / remove a cheaper kept one while it fits."""
  st = _State(problem, sol.removed)
  items = problem.items
  cost = [it.cost for it in items]
  by_cost = sorted(range(len(items)), key=lambda j: cost[j])
  for _ in range(20):
    changed = False
    for i in sorted((i for i in range(len(items)) if st.removed[i]), key=lambda i: -cost[i]):
      st.flip(i)  # keep i
      if st.peak() <= budget:
        changed = True
        continue
      done = False
      for j in by_cost:
        if cost[j] >= cost[i]:
          break
        if st.removed[j] or j == i:
          continue
        st.flip(j)
        if st.peak() <= budget:
          done = changed = True
          break
        st.flip(j)
      if not done:
        st.flip(i)
    if not changed:
      break
  removed = st.removed
  return Solution(tuple(removed), problem.peak(removed), problem.cost(removed), sol.solver)


def solve_milp(problem: Problem, budget: int, *, time_limit: float = 20.0) -> Solution | None:
  """Exact MILP (scipy / HiGHS). Variables: ``x_v`` (removed) and ``M`` (max transient)."""
  items = problem.items
  n = len(items)
  if problem.peak([False] * n) <= budget:
    return Solution(tuple([False] * n), problem.peak([False] * n), 0.0, "milp")
  if n == 0:
    return None
  scale = max(1.0, float(max(it.saved_bytes for it in items)))
  c = np.array([it.cost for it in items] + [0.0])
  cost_scale = max(c.max(), 1e-30)
  c = c / cost_scale
  rows, lb, ub = [], [], []
  segs = sorted({it.segment for it in items})
  for s in segs:
    row = np.zeros(n + 1)
    for i, it in enumerate(items):
      if it.segment == s:
        row[i] = it.transient_bytes / scale
    row[n] = -1.0
    rows.append(row); lb.append(-np.inf); ub.append(0.0)
  row = np.zeros(n + 1)
  for i, it in enumerate(items):
    row[i] = -it.saved_bytes / scale
  row[n] = 1.0
  rows.append(row); lb.append(-np.inf)
  ub.append((budget - problem.fixed_bytes - problem.total_saved()) / scale)
  integrality = np.array([1] * n + [0])
  bounds = Bounds(np.zeros(n + 1), np.array([1.0] * n + [np.inf]))
  res = milp(c, constraints=LinearConstraint(np.array(rows), lb, ub), integrality=integrality,
             bounds=bounds, options={"time_limit": time_limit, "presolve": True})
  if res.x is None:
    return None
  removed = [bool(v > 0.5) for v in res.x[:n]]
  peak = problem.peak(removed)
  if peak > budget:  # numerical slack in the scaled constraints
    return None
  return Solution(tuple(removed), peak, problem.cost(removed), "milp")


MILP_MAX_ITEMS = 300


def solve(problem: Problem, budget: int, solver: str) -> Solution | None:
  """Dispatches ``solver`` in ``"auto" | "greedy" | "milp"``."""
  if solver == "greedy":
    return solve_greedy(problem, budget)
  if solver == "milp":
    return solve_milp(problem, budget)
  if len(problem.items) <= MILP_MAX_ITEMS:
    sol = solve_milp(problem, budget, time_limit=5.0)
    if sol is not None:
      return sol
  return solve_greedy(problem, budget)


def is_finite(x: float) -> bool:
  return not math.isinf(x) and not math.isnan(x)
