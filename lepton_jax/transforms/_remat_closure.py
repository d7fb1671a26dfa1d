"""Exact save-set model of rematerialisation (no JAX here).

``jax.checkpoint(f, policy=save_only_these_names(*S))`` keeps the named values
``S`` that the backward pass needs and recomputes everything else it needs from
``S`` and the function's inputs. So a plan is just a *save set* over **all**
forward intermediates (not only the ones plain ``jax.grad`` keeps: saving a
matmul output and recomputing a cheap activation from it, as ``dots_saveable``
does, is in this space), and its cost follows exactly:

* ``needed``: values the backward pass reads (plain ``jax.grad``'s residuals);
* an equation is *recomputed* when one of its outputs is needed (by the backward
  pass or by another recomputed equation) and not saved;
* saved bytes = bytes of the saved values that are needed; recompute FLOPs = the
  FLOPs of the recomputed equations.

:func:`solve` finds the save set of least recompute FLOPs within a saved-bytes
budget: an exact MILP (scipy / HiGHS) -- binaries ``x_v`` (saved) and ``r_e``
(recomputed), ``x_v + r_def(v) >= 1`` for needed values, ``x_u + r_def(u) >= r_e``
for every input ``u`` of a recomputed equation, ``sum bytes * x <= budget`` -- or
its LP relaxation rounded and repaired (``method="lp"``, for large graphs).
Values produced by a non-recomputable equation (a ``scan`` kept as its own
region) must be saved when needed. The planner (``_remat_plan``) then cuts the
program into ``jax.checkpoint`` regions wherever everything crossing the cut
that is needed is saved, so recomputation happens region by region.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix, vstack

__all__ = ["Eqn", "Value", "Problem", "Plan", "closure", "solve"]


@dataclasses.dataclass(frozen=True)
class Eqn:
  """A forward equation: value ids read / defined (free inputs left out) and FLOPs."""
  ins: tuple[int, ...]
  outs: tuple[int, ...]
  flops: float
  recomputable: bool = True


@dataclasses.dataclass(frozen=True)
class Value:
  """A forward intermediate (bytes on device if saved, all trips of a scan)."""
  nbytes: int
  needed: bool
  defined_by: int     # index into Problem.eqns
  must_save: bool = False


@dataclasses.dataclass(frozen=True)
class Problem:
  eqns: tuple[Eqn, ...]
  values: tuple[Value, ...]
  fixed_bytes: int = 0   # always kept (scan carries of checkpointed bodies)


@dataclasses.dataclass(frozen=True)
class Plan:
  saved: frozenset        # value ids kept on device (only needed ones)
  recomputed: frozenset   # eqn ids recomputed in the backward pass
  saved_bytes: int        # including fixed bytes
  recompute_flops: float
  method: str


def closure(problem: Problem, saved: Sequence[int] | set, method: str = "given") -> Plan:
  """Exact consequences of saving ``saved``: what JAX recomputes and keeps."""
  saved = set(saved)
  eqns, values = problem.eqns, problem.values
  recomputed: set[int] = set()
  kept: set[int] = set()
  stack = [v for v, val in enumerate(values) if val.needed]
  seen = set()
  while stack:
    v = stack.pop()
    if v in seen:
      continue
    seen.add(v)
    e = values[v].defined_by
    if v in saved or not eqns[e].recomputable:
      kept.add(v)
      continue
    if e not in recomputed:
      recomputed.add(e)
      stack.extend(eqns[e].ins)
  nbytes = problem.fixed_bytes + sum(values[v].nbytes for v in kept)
  flops = float(sum(eqns[e].flops for e in recomputed))
  return Plan(frozenset(kept), frozenset(recomputed), int(nbytes), flops, method)


def _lp_arrays(problem: Problem):
  """Constraint matrix over ``[x_0..x_{V-1}, r_0..r_{E-1}]`` (rows ``>= lb``)."""
  nv, ne = len(problem.values), len(problem.eqns)
  rows, cols, data, lb = [], [], [], []
  r = 0

  def add(entries, lo):
    nonlocal r
    for c, d in entries:
      rows.append(r); cols.append(c); data.append(d)
    lb.append(lo)
    r += 1
  for v, val in enumerate(problem.values):
    e = val.defined_by
    rec = problem.eqns[e].recomputable and not val.must_save
    if val.needed or val.must_save:
      add([(v, 1.0)] + ([(nv + e, 1.0)] if rec else []), 1.0)
  for e, eq in enumerate(problem.eqns):
    if not eq.recomputable:
      continue
    for u in set(eq.ins):
      du = problem.values[u].defined_by
      rec_u = problem.eqns[du].recomputable and not problem.values[u].must_save
      add([(u, 1.0), (nv + e, -1.0)] + ([(nv + du, 1.0)] if rec_u else []), 0.0)
  a = coo_matrix((data, (rows, cols)), shape=(r, nv + ne)).tocsr()
  return a, np.array(lb)


def solve(problem: Problem, budget_bytes: int, *, method: str = "milp",
          time_limit: float = 5.0) -> Plan | None:
  """Least-recompute save set with saved bytes ``<= budget_bytes`` (None: infeasible).

  ``method``: ``"milp"`` (exact, HiGHS branch and bound within ``time_limit``;
  the best found so far when it runs out) or ``"lp"`` (LP relaxation, rounded up
  and repaired greedily -- polynomial, for large graphs).
  """
  nv, ne = len(problem.values), len(problem.eqns)
  cap = budget_bytes - problem.fixed_bytes
  forced = [v for v, val in enumerate(problem.values)
            if (val.needed or val.must_save)
            and (val.must_save or not problem.eqns[val.defined_by].recomputable)]
  if cap < sum(problem.values[v].nbytes for v in forced):
    return None
  full = closure(problem, range(nv), method)
  if full.saved_bytes <= budget_bytes:
    return full
  a, lb = _lp_arrays(problem)
  byt = np.array([float(v.nbytes) for v in problem.values] + [0.0] * ne)
  bscale = max(1.0, float(byt.max()))
  fl = np.array([0.0] * nv + [float(e.flops) for e in problem.eqns])
  fscale = max(1.0, float(fl.max()))
  # recompute FLOPs first; among equal ones, fewer saved bytes and fewer recomputed eqns
  c = fl / fscale + 1e-7 * byt / bscale + 1e-9 * np.concatenate([np.zeros(nv), np.ones(ne)])
  a_all = vstack([a, csr_matrix(byt[None, :] / bscale)]).tocsr()
  lo = np.concatenate([lb, [-np.inf]])
  hi = np.concatenate([np.full(len(lb), np.inf), [cap / bscale]])
  cons = LinearConstraint(a_all, lo, hi)
  bounds = Bounds(np.zeros(nv + ne), np.ones(nv + ne))
  if method == "milp":
    res = milp(c, constraints=cons, integrality=np.ones(nv + ne), bounds=bounds,
               options={"time_limit": time_limit, "presolve": True})
    if res.x is None:
      return None
    plan = closure(problem, [v for v in range(nv) if res.x[v] > 0.5], "milp")
    return plan if plan.saved_bytes <= budget_bytes else _repair(problem, plan, budget_bytes, "milp")
  res = milp(c, constraints=cons, integrality=np.zeros(nv + ne), bounds=bounds,
             options={"time_limit": time_limit, "presolve": True})
  if res.x is None:
    return None
  order = np.argsort(-res.x[:nv], kind="stable")
  saved, used = set(forced), sum(problem.values[v].nbytes for v in forced)
  for v in order:  # round: the LP's most-saved values first while they fit
    if res.x[v] < 0.5 or v in saved:
      continue
    b = problem.values[v].nbytes
    if used + b <= cap:
      saved.add(int(v)); used += b
  plan = closure(problem, saved, "lp")
  if plan.saved_bytes > budget_bytes:
    plan = _repair(problem, plan, budget_bytes, "lp")
  return None if plan is None else _fill(problem, plan, budget_bytes)


_SWAP_MAX_VALUES = 400  # pairwise swaps in ``_fill`` only on graphs up to this many values


def _fill(problem: Problem, plan: Plan, budget_bytes: int) -> Plan:
  """Adds / swaps in saved values while that lowers recompute FLOPs within the budget."""
  cur = plan
  for _ in range(4 * len(problem.values) + 1):
    best = None
    for v in _frontier(problem, cur):
      drops = sorted(cur.saved) if len(problem.values) <= _SWAP_MAX_VALUES else []
      for drop in [None] + drops:
        s = set(cur.saved) | {v}
        if drop is not None:
          s.discard(drop)
        trial = closure(problem, s, cur.method)
        if trial.saved_bytes > budget_bytes or trial.recompute_flops >= cur.recompute_flops:
          continue
        if best is None or (trial.recompute_flops, trial.saved_bytes) < (best.recompute_flops, best.saved_bytes):
          best = trial
        if drop is None:
          break  # adding alone already helps: no need to try swaps for v
    if best is None:
      return cur
    cur = best
  return cur


def _frontier(problem: Problem, plan: Plan) -> list[int]:
  """Unsaved values produced by recomputed equations (saving one can cut recompute)."""
  return sorted({v for e in plan.recomputed for v in problem.eqns[e].outs} - plan.saved)


def _repair(problem: Problem, plan: Plan, budget_bytes: int, method: str) -> Plan | None:
  """Drops saved values (least extra FLOPs per freed byte first) until the plan fits."""
  saved = set(plan.saved)
  forced = {v for v in saved if problem.values[v].must_save
            or not problem.eqns[problem.values[v].defined_by].recomputable}
  cur = plan
  while cur.saved_bytes > budget_bytes:
    best = None
    for v in sorted(saved - forced):
      trial = closure(problem, saved - {v}, method)
      freed = cur.saved_bytes - trial.saved_bytes
      if freed <= 0:
        continue
      score = (trial.recompute_flops - cur.recompute_flops) / freed
      if best is None or score < best[0]:
        best = (score, v, trial)
    if best is None:
      return None
    saved.discard(best[1])
    cur = best[2]
  return cur
