"""The planner of ``lj.remat_plan``: candidates from the model, judged by the compiler.

Role: for one argument signature, traces the function (NNX nodes split into state), builds the
model (``_remat_graph``), compiles plain ``jax.grad`` for the baseline, asks the search
(``_remat_search``) for the few best segment-tree plans at budgets calibrated to what XLA
compiled for the baseline, adds JAX's own policies as candidates (``dots_saveable`` and
``nothing_saveable`` per segment, whole-function ``jax.checkpoint``), compiles a bounded number
of them (``_remat_measure``), and returns the least-recompute plan whose compiled temp bytes
fit the budget -- never one that does not. If none fits, ``BudgetError`` names the smallest
compiled temp bytes found (a budget at which planning succeeds).
"""

from __future__ import annotations

import dataclasses
import math
import concurrent.futures
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import jaxpr as ljx
from lepton_jax._errors import BudgetError
from lepton_jax._nnx import graphdef_key, is_graph_node, merged_call, split_nodes
from lepton_jax._utils import format_bytes
from lepton_jax.transforms import _remat_closure as closure_lib
from lepton_jax.transforms._remat_apply import _apply, _apply_closure, _apply_policy, form_for
from lepton_jax.transforms._remat_graph import (
    _balanced_cuts, _build_graph, _closure_graph, _closure_segments, _inline_eval, _is_inexact,
    _segments_from_cuts)
from lepton_jax.transforms._remat_measure import (
    CompileCache, Measured, compile_grad, compile_lowered, lower_grad, model_grad_memory)
from lepton_jax.transforms._remat_search import _closure_method, _decisions, _node_solver, _TreeSearch
from lepton_jax.transforms._remat_types import Candidate, CostModel, RematPlan, TensorDecision

_API = "lj.remat_plan"
_MAX_DEPTH = 5
_MAX_TREE_COMPILES = 3            # model-ranked tree plans compiled per planning run (recalibrated)
_POLICY_SEGMENTS = (4,)           # per-segment dots_saveable candidates (segment counts)
_FLOOR_SEGMENTS = (2, 4)          # per-segment nothing_saveable candidates (segment counts)
_FLOOR_TREES = 1                  # recompute-everything nested trees, when nothing else fits
_COMPILE_THREADS = max(1, min(4, os.cpu_count() or 1))


# ------------------------------------------------------------ NNX / pytree glue


def _split_nodes(args, kwargs):
  """Replaces NNX graph nodes by their state (``_nnx.split_nodes``); also the number of leaves
  of the first (differentiated) argument."""
  treedef, nodes, pure = split_nodes(args, kwargs)
  n_first = len(jax.tree_util.tree_leaves(args[0], is_leaf=is_graph_node)) if args else 0
  return treedef, nodes, pure, n_first


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


@dataclasses.dataclass
class _Option:
  """A candidate plan before compiling: how to build it and what it is."""
  key: tuple                   # structure (compile-cache key, independent of checkpoint names)
  label: str
  build: Callable[[], Callable]
  rank: float                  # model cost (seconds), for ordering
  solver: str
  form: str
  node: Any = None             # _Node of a tree plan
  decision: dict | None = None
  cuts: tuple = ()
  policy_name: str = ""


@dataclasses.dataclass
class _Ctx:
  g: Any
  flat_specs: list
  argnums: list
  sig: Any
  budget: int
  base: Measured
  base_saved: int
  model_base: int
  cm: CostModel
  out_tree: Any
  form: str
  platform: str
  t0: float
  tried: list = dataclasses.field(default_factory=list)   # [(option, Measured)]


def _node_key(nd, strip: int) -> tuple:
  if nd.children is None:
    segs = tuple((s.lo, s.hi) for s in nd.layout.segs)
    dec = tuple(sorted((it.key[strip:], bool(r)) for it, r in zip(nd.layout.problem.items, nd.sol.removed)))
    return ("leaf", nd.lo, nd.hi, segs, dec)
  return ("node", nd.lo, nd.hi, tuple(_node_key(c, strip) for c in nd.children))


class _Planner:
  """Plans for one (fun, options); caches plans per abstract signature and compiles per candidate."""

  def __init__(self, fun, budget, offload, solver, cost_model, budget_kind="peak"):
    self.fun = fun
    self.budget = budget
    self.budget_kind = budget_kind
    self.offload = offload
    self.solver = solver
    self.cost_model = cost_model
    self._cache: dict = {}
    self._compiles = CompileCache()
    self._lock = threading.Lock()
    self._prefix = f"ljr{id(self) % 100000}:"

  def clear_cache(self):
    self._cache.clear()
    self._compiles.clear()

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
           tuple((i, graphdef_key(gd)) for i, (_, gd) in nodes.items()))
    hit = self._cache.get(key)
    if hit is not None:
      return hit
    with self._lock:
      hit = self._cache.get(key)
      if hit is not None:
        return hit
      pure = merged_call(self.fun, treedef, nodes)

      def flat_user(*flat):
        return jax.tree_util.tree_flatten(pure(jax.tree_util.tree_unflatten(in_tree, flat)))[0]

      closed0 = jax.make_jaxpr(flat_user)(*flat_specs)
      # inline jit calls so that the top level is a flat sequence of equations
      closed = jax.make_jaxpr(lambda *a: _inline_eval(closed0.jaxpr, closed0.consts, a))(*flat_specs)
      out_tree = jax.tree_util.tree_structure(
          jax.eval_shape(pure, jax.tree_util.tree_unflatten(in_tree, flat_specs)))
      comp = self._plan(closed, flat_specs, n_first_flat, out_tree, key)
      self._cache[key] = comp
      return comp

  # ------------------------------------------------------------------ measuring

  def _measure_many(self, ctx: _Ctx, opts: list) -> list[tuple[Measured, Callable]]:
    """Screening compiles (``SCREEN_OPTIONS``) of ``opts``: lowered here, compiled in parallel."""
    fns = [o.build() for o in opts]
    todo = {}
    for i, (o, fn) in enumerate(zip(opts, fns)):
      if self._compiles.peek((ctx.sig, o.key, "fast")) is None:
        todo[i] = lower_grad(fn, ctx.flat_specs, ctx.argnums)
    if len(todo) > 1:
      with concurrent.futures.ThreadPoolExecutor(min(len(todo), _COMPILE_THREADS)) as pool:
        done = dict(zip(todo, pool.map(lambda lo: compile_lowered(lo, fast=True), todo.values())))
    else:
      done = {i: compile_lowered(lo, fast=True) for i, lo in todo.items()}
    out = []
    for i, (o, fn) in enumerate(zip(opts, fns)):
      m = self._compiles.get((ctx.sig, o.key, "fast"), lambda i=i: done[i])
      ctx.tried.append((o, m))
      out.append((m, fn))
    return out

  def _verify(self, ctx: _Ctx, opt: _Option, fn: Callable) -> Measured:
    """The default-options compile of ``opt`` (what the user's ``jax.jit(jax.grad(...))`` gets)."""
    return self._compiles.get((ctx.sig, opt.key, "full"), lambda: compile_grad(fn, ctx.flat_specs, ctx.argnums))

  def _seconds(self, ctx: _Ctx, m: Measured, opt: _Option) -> float:
    extra = max(m.flops - ctx.base.flops, 0.0)
    transfer = 0
    if opt.decision:
      transfer = sum(2 * it.saved_bytes for leaf in opt.node.leaves() for it, _, _, _ in leaf.layout.items
                     if opt.decision.get(it.key) == "offload")
    return ctx.cm.recompute_seconds(extra) + transfer / ctx.cm.host_bandwidth

  # ------------------------------------------------------------------ planning

  def _plan(self, closed, flat_specs, n_first, out_tree, sig) -> _Compiled:
    t0 = time.perf_counter()
    cm = self.cost_model or CostModel.default()
    # differentiate w.r.t. the first positional argument's leaves (plain jax.grad)
    argnums = [i for i in range(n_first) if _is_inexact(flat_specs[i])]
    if not argnums:
      argnums = [i for i, s in enumerate(flat_specs) if _is_inexact(s)]
    g = _build_graph(closed, self._prefix)
    platform = jax.default_backend()
    plain = _Option(("plain",), "no remat (plain jax.grad)", lambda: _apply(g, None, {}), 0.0, "none", "none")
    plain_fn = plain.build()
    base = self._compiles.get((sig, plain.key, "full"), lambda: compile_grad(plain_fn, flat_specs, argnums))
    base_saved, _, model_base, _ = model_grad_memory(plain_fn, flat_specs, argnums)
    ctx = _Ctx(g, list(flat_specs), argnums, sig, 0, base, base_saved, max(model_base, base_saved), cm,
               out_tree, form_for(platform), platform, t0)
    ctx.tried.append((plain, base))
    if self.budget_kind == "saved":
      return self._plan_saved(ctx, plain_fn)
    ctx.budget = budget = self._budget_bytes(base.temp_bytes)
    if budget >= base.temp_bytes:  # plain jax.grad fits: nothing to do
      return self._finish(ctx, plain, plain_fn, base)
    got = self._search(ctx, budget)
    if got is not None:
      return self._finish(ctx, *got)
    fits_at = self._smallest(ctx)
    smallest = fits_at[0]
    raise BudgetError(
        f"{_API}: budget={format_bytes(budget)} ({self.budget!r}) is below the smallest feasible "
        f"plan ({format_bytes(smallest)} compiled temp bytes, {fits_at[1]}; plain jax.grad compiles to "
        f"{format_bytes(base.temp_bytes)} on {platform}); pass budget>={format_bytes(smallest)} "
        f"(budget>={smallest} bytes, or a fraction >= "
        f"{math.ceil(1000 * smallest / max(base.temp_bytes, 1)) / 1000:.3f})",
        smallest_feasible_bytes=int(smallest))

  def _tree_option(self, ctx: _Ctx, search: _TreeSearch, target: int, max_depth: int) -> _Option | None:
    """The model's cheapest segment-tree plan (any depth) within model peak ``target``."""
    g, strip = ctx.g, len(self._prefix)
    nodes = [nd for nd in (search.best(d, target) for d in range(1, max_depth + 1)) if nd is not None]
    if not nodes:
      return None
    node = min(nodes, key=lambda nd: (nd.cost, nd.peak, nd.depth()))
    dec = _decisions(node, self.offload)
    return _Option(
        ("tree", _node_key(node, strip)), f"tree d{node.depth()} x{node.num_segments()} (model {format_bytes(node.peak)})",
        lambda: _apply(g, node, dec, ctx.form), node.cost, _node_solver(node),
        "checkpoint" if "offload" in dec.values() else ctx.form, node, dec)

  def _policy_options(self, ctx: _Ctx, name: str, ks, whole: bool) -> list[_Option]:
    g = ctx.g
    policy = getattr(jax.checkpoint_policies, name)
    out = []
    for k in ks:
      cuts = _balanced_cuts(g, 0, g.n, k)
      nseg = len(_segments_from_cuts(g, cuts))
      out.append(_Option(("policy", name, cuts), f"{name} per segment x{nseg}",
                         lambda cuts=cuts: _apply_policy(g, cuts, policy, ctx.form), math.inf, name,
                         ctx.form, cuts=cuts, policy_name=name))
    if whole:
      out.append(_Option(("whole", name), f"jax.checkpoint({name})",
                         lambda: _apply_policy(g, (), policy, "checkpoint"), math.inf, name, "checkpoint",
                         policy_name=name))
    return out

  def _search(self, ctx: _Ctx, budget: int):
    """(option, flat_fun, measured) of the least-cost candidate fitting ``budget``, or None.

    Tree plans: the model's cheapest plan at a model budget, compiled; when it does not fit,
    the model is recalibrated on it (compiled bytes per modelled byte of that plan) and the
    search asked again, at most ``_MAX_TREE_COMPILES`` times. JAX's policies (budget-independent)
    are always compiled; recompute-everything trees only when nothing else fits.
    """
    g = ctx.g
    search = _TreeSearch(g, ctx.cm, self.offload, self.solver)
    n_units = len(g.cands) + sum(len(s.cands) for s in g.scans.values())
    max_depth = max(1, min(_MAX_DEPTH, int(math.ceil(math.log2(max(n_units, 2))))))
    fits = []

    def consider(*opts):
      got = self._measure_many(ctx, list(opts))
      for opt, (m, fn) in zip(opts, got):
        if m.temp_bytes <= budget:
          fits.append((self._seconds(ctx, m, opt), opt, fn, m))
      return got[-1][0]

    target = budget * ctx.model_base / max(ctx.base.temp_bytes, 1)
    seen = set()
    for _ in range(2 * _MAX_TREE_COMPILES):
      if len(seen) >= _MAX_TREE_COMPILES or target < 1:
        break
      opt = self._tree_option(ctx, search, int(target), max_depth)
      if opt is None:
        break
      if opt.key in seen:  # same plan as before: ask the model for less
        target *= 0.85
        continue
      seen.add(opt.key)
      m = consider(opt)
      if m.temp_bytes <= budget:
        break
      per_byte = m.temp_bytes / max(opt.node.peak, 1)   # what the compiler made of this plan
      target = min(budget / max(per_byte, 1e-9), target * 0.9)
    # Whole-function jax.checkpoint keeps its savings only where XLA keeps optimization barriers;
    # XLA:CPU compiles it to plain jax.grad's program (benchmarks/remat.py measures it), so there
    # it is not compiled again here.
    whole = ctx.platform != "cpu"
    consider(*(self._policy_options(ctx, "dots_saveable", _POLICY_SEGMENTS, whole=whole)
               + self._policy_options(ctx, "nothing_saveable", _FLOOR_SEGMENTS, whole=whole)))
    if not fits:
      strip = len(self._prefix)
      consider(*[_Option(("min", _node_key(nd, strip)), f"recompute all, d{nd.depth()} x{nd.num_segments()}",
                         lambda nd=nd: _apply(g, nd, _decisions(nd, False), ctx.form), nd.cost, "min",
                         ctx.form, nd, _decisions(nd, False))
                 for nd in search.minimal(max_depth)[:_FLOOR_TREES]])
    # the cheapest screened fit, confirmed by a default-options compile
    for _, opt, fn, _ in sorted(fits, key=lambda t: (t[0], t[3].temp_bytes)):
      m = self._verify(ctx, opt, fn)
      if m.temp_bytes <= budget:
        return opt, fn, m
    return None

  def _smallest(self, ctx: _Ctx) -> tuple[int, str]:
    """The smallest compiled temp bytes among the candidates tried, as (bytes, label).

    Budget-independent candidates (JAX policies, recompute-everything trees) are tried again at
    any budget when nothing else fits, so their minimum is always achievable; a smaller figure
    from a budget-dependent tree plan is reported only if planning at it succeeds.
    """
    fixed = [(m.temp_bytes, o.label) for o, m in ctx.tried if o.key[0] in ("policy", "whole", "min")]
    others = [(m.temp_bytes, o.label) for o, m in ctx.tried if o.key[0] == "tree"]
    best = min(fixed) if fixed else (ctx.base.temp_bytes, "no remat")
    if others and min(others)[0] < best[0]:
      n_tried = len(ctx.tried)
      got = self._search(ctx, min(others)[0])
      del ctx.tried[n_tried:]
      if got is not None:
        return got[2].temp_bytes, got[0].label
    return best

  # ------------------------------------------------------------------ results

  def _finish(self, ctx: _Ctx, opt: _Option, fn: Callable, m: Measured) -> _Compiled:
    g, cm = ctx.g, ctx.cm
    dev, host, peak, _ = model_grad_memory(fn, ctx.flat_specs, ctx.argnums)
    decisions, transfer, nseg, depth, model_peak = [], 0, 1, 1, peak
    if opt.node is not None:
      decisions, transfer = _tree_decisions(g, opt.node, opt.decision)
      nseg, depth, model_peak = opt.node.num_segments(), opt.node.depth(), opt.node.peak
    elif opt.key == ("plain",):
      decisions = [TensorDecision(c.name, tuple(c.var.aval.shape), str(c.var.aval.dtype), 1, c.nbytes, "save",
                                  0, c.flops, c.primitive) for c in g.cands.values()]
      depth, model_peak = 0, ctx.model_base
    else:  # a JAX policy per segment: dots_saveable keeps matmul / conv outputs
      segs = _segments_from_cuts(g, opt.cuts)
      nseg = len(segs)
      seg_of = {i: s for s, seg in enumerate(segs) for i in range(seg.lo, seg.hi)}
      keep = ("dot_general", "conv_general_dilated") if opt.policy_name == "dots_saveable" else ()
      for c in g.cands.values():
        d = "save" if c.primitive in keep else "recompute"
        decisions.append(TensorDecision(c.name, tuple(c.var.aval.shape), str(c.var.aval.dtype), 1, c.nbytes, d,
                                        seg_of.get(c.segment_local, 0), 0.0 if d == "save" else c.flops,
                                        c.primitive))
    tried = tuple(Candidate(o.label, int(x.temp_bytes), max(x.flops - ctx.base.flops, 0.0),
                            bool(x.temp_bytes <= ctx.budget)) for o, x in ctx.tried)
    plan = RematPlan(
        budget_bytes=int(ctx.budget), baseline_bytes=int(ctx.base.temp_bytes), peak_bytes=int(peak),
        saved_bytes=int(dev), offloaded_bytes=int(host), recompute_flops=max(m.flops - ctx.base.flops, 0.0),
        transfer_bytes=int(transfer), num_segments=int(nseg), solver=opt.solver, decisions=tuple(decisions),
        baseline_saved_bytes=int(ctx.base_saved), model_peak_bytes=int(model_peak), measured_peak_bytes=int(peak),
        cost_model=cm, depth=int(depth), compiled_bytes=int(m.temp_bytes),
        baseline_compiled_bytes=int(ctx.base.temp_bytes), form=opt.form, platform=ctx.platform,
        candidates=tried, planning_seconds=float(time.perf_counter() - ctx.t0))
    return _Compiled(plan, fn, ctx.out_tree)

  # ------------------------------------------------------------- budget_kind="saved"

  def _plan_saved(self, ctx: _Ctx, plain_fn: Callable) -> _Compiled:
    """``budget_kind="saved"``: least recompute with saved residual bytes (JAX's accounting of the
    jaxpr) within budget; applied with ``jax.checkpoint`` regions, reported with compiled numbers."""
    g, base_saved = ctx.g, ctx.base_saved
    ctx.budget = budget = self._budget_bytes(base_saved)
    plain = ctx.tried[0][0]
    if budget >= base_saved:
      return self._finish(ctx, plain, plain_fn, ctx.base)
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
        measured = model_grad_memory(fn, ctx.flat_specs, ctx.argnums)
        if measured[0] <= budget:
          if best is None or measured[3] < best[-1][3]:
            best = (cg, cp, segs, fn, measured)
          break
        target -= measured[0] - budget
      least = closure_lib.closure(prob, ())
      fn = _apply_closure(g, cg, least, _closure_segments(g, cg, least))
      low = max(model_grad_memory(fn, ctx.flat_specs, ctx.argnums)[0], least.saved_bytes)
      smallest = low if smallest is None else min(smallest, low)
    if best is None:
      raise BudgetError(
          f"{_API}: budget={format_bytes(budget)} ({self.budget!r}, budget_kind='saved') is below the "
          f"smallest feasible saved-residual bytes ({format_bytes(smallest)}: values that must stay on "
          f"device, e.g. scan carries; plain jax.grad saves {format_bytes(base_saved)}); pass "
          f"budget>={smallest} bytes (or a fraction >= "
          f"{math.ceil(1000 * smallest / max(base_saved, 1)) / 1000:.3f})",
          smallest_feasible_bytes=int(smallest))
    cg, cp, segs, fn, measured = best
    opt = _Option(("saveset", tuple(sorted(cp.saved)), cg.whole_scans), f"save set ({cp.method})",
                  lambda: fn, 0.0, f"saveset-{cp.method}", "checkpoint")
    m = self._verify(ctx, opt, fn)
    comp = self._finish(ctx, opt, fn, m)
    return dataclasses.replace(comp, plan=dataclasses.replace(
        comp.plan, decisions=_closure_decisions(g, cg, cp, segs), num_segments=len(segs),
        model_peak_bytes=int(cp.saved_bytes)))


def _tree_decisions(g, node, decision: dict) -> tuple[list, int]:
  """Rows of a segment-tree plan (boundary values, then each residual) and offloaded transfer bytes."""
  jaxpr = g.closed.jaxpr
  invars = set(jaxpr.invars) | set(jaxpr.constvars)
  leaves = list(node.leaves())
  seg_base, nxt = {}, 0
  for leaf in leaves:
    seg_base[id(leaf)] = nxt
    nxt += len(leaf.layout.segs)
  boundary, stack = set(), [node]
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
  out, transfer = [], 0
  for v in sorted(set(boundary) - invars, key=lambda v: g.def_idx[v]):
    if not _is_inexact(v.aval):
      continue
    i = g.def_idx[v]
    out.append(TensorDecision(f"boundary@{i}", tuple(v.aval.shape), str(v.aval.dtype), 1, ljx.aval_bytes(v.aval),
                              "boundary", seg_index(i), 0.0, jaxpr.eqns[i].primitive.name))
  for leaf in leaves:
    for it, c, s, _ in leaf.layout.items:
      d = decision[c.name]
      if d == "offload":
        transfer += 2 * it.saved_bytes
      out.append(TensorDecision(c.name, tuple(c.var.aval.shape), str(c.var.aval.dtype), c.count, it.saved_bytes,
                                d, seg_base[id(leaf)] + s, it.recompute_flops, c.primitive))
  return out, transfer


def _closure_decisions(g, cg, cp, segs) -> tuple:
  seg_of = {i: s for s, seg in enumerate(segs) for i in range(seg.lo, seg.hi)}
  out = []
  prob = cg.problem
  for k, val in enumerate(prob.values):
    if not (val.needed or k in cp.saved):
      continue
    scan_i, v = cg.refs[k]
    e = val.defined_by
    _, i = cg.eqn_ref[e]
    count = 1 if scan_i is None else g.scans[scan_i].length
    out.append(TensorDecision(
        cg.names[k], tuple(v.aval.shape), str(v.aval.dtype), count, int(val.nbytes),
        "save" if k in cp.saved else "recompute", seg_of.get(i if scan_i is None else scan_i, 0),
        float(prob.eqns[e].flops) if e in cp.recomputed else 0.0,
        (g.closed.jaxpr.eqns[i] if scan_i is None else g.scans[scan_i].body.jaxpr.eqns[i]).primitive.name))
  return tuple(out)
