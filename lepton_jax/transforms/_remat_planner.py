"""The planner of ``lj.remat_plan``: a fixed candidate set per program, judged by the compiler.

Role: for one argument signature, traces the function (NNX nodes split into state) and looks up
its :class:`_Structure` -- shared by every budget and every wrapper of the same program (keyed by
the printed jaxpr, input avals, constants and options; ``_clear_caches()`` forgets them). A
structure holds the model (``_remat_graph``), plain ``jax.grad``'s default compile (the
baseline), and a budget-independent candidate set: JAX's ``nothing_saveable`` / ``dots_saveable``
applied per repeated layer (and per ``scan`` iteration), whole-function ``jax.checkpoint`` off
CPU, the search's (``_remat_search``) cheapest segment trees at fixed fractions of the model's
peak, and recompute-everything floors. Each is compiled once (``SCREEN_OPTIONS``): a candidate's
compile starts in a worker thread as soon as it is lowered, so the Python work (tracing, lowering,
the tree search) overlaps XLA's compiles, and candidates that lower to the same program share one.
A budget picks the least-cost candidate whose compiled temp bytes fit -- never one that does
not -- so a larger budget never recomputes more, and a policy that would dominate a plan is
itself in the set. If none fits, ``BudgetError`` names the smallest compiled temp bytes
of the set (a budget at which planning succeeds).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import math
import os
import threading
import time
import zlib
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
    _layer_cuts, _segments_from_cuts)
from lepton_jax.transforms._remat_measure import (
    Measured, compile_lowered, lower_grad, model_grad_memory)
from lepton_jax.transforms._remat_search import _closure_method, _decisions, _node_solver, _TreeSearch
from lepton_jax.transforms._remat_types import Candidate, CostModel, RematPlan, TensorDecision

_API = "lj.remat_plan"
_MAX_DEPTH = 2                    # nesting of segment trees (each level re-runs its range once more)
# Model-peak targets (of plain grad's model) of tree candidates. (A tree at 0.75 of the model peak
# compiled to 0.95-1.4x plain grad's temp on all five CPU benchmark models and never was on the
# compiled Pareto front: the calibrated trees below cover the upper budgets instead.)
_TREE_FRACTIONS = (0.25, 0.5)
_POLICIES = ("nothing_saveable", "dots_saveable")
# balanced-segment counts (dots_saveable over 3 segments: 0.73x temp at 0.997x FLOPs on the
# benchmark's CNN, where the plan at budget 0.75 recomputed 1.14x without it)
_POLICY_SEGMENTS = {"nothing_saveable": (2, 4), "dots_saveable": (3, 4)}
_CALIBRATED_FRACTIONS = (0.45, 0.7, 0.9, 0.3, 0.6)  # compiled-temp targets of calibrated trees (in turn)
_MAX_CALIBRATED = 3               # calibrated tree plans compiled (one parallel round)
_FLOOR_TREES = 1                  # recompute-everything trees (the smallest peak)
_MAX_STRUCTURES = 32              # program structures kept by the process-wide cache
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
  layers: tuple | None = None  # (lo, hi) of the per-layer regions of a policy candidate


@dataclasses.dataclass
class _Ctx:
  """One planning run (one budget) over a shared :class:`_Structure`."""
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


class _Structure:
  """Everything planning knows about one traced program, shared by every budget.

  Keyed by the program's structure (printed jaxpr, input avals, constants' bytes, backend and
  planner options): the model graph, plain ``jax.grad``'s default compile (the baseline), and the
  *candidate set* -- JAX's policies per layer, segment-tree plans at fixed model fractions and
  recompute-everything floors -- each compiled once (``SCREEN_OPTIONS``: the default compile's
  temp bytes and FLOPs at about half its compile time). A budget only selects from this fixed
  set, so a larger budget never gets a plan that recomputes more than a smaller one does.
  """

  def __init__(self, closed, flat_specs, argnums, prefix, offload, solver, cm, platform):
    self.g = _build_graph(closed, prefix)
    self.prefix = prefix
    self.flat_specs, self.argnums = list(flat_specs), list(argnums)
    self.offload, self.solver, self.cm, self.platform = offload, solver, cm, platform
    self.form = form_for(platform)
    g = self.g
    self.plain = _Option(("plain",), "no remat (plain jax.grad)", lambda: _apply(g, None, {}), 0.0, "none", "none")
    self.fns: dict = {("plain",): self.plain.build()}
    self.screened: dict = {}                         # option key -> compiled Measured
    self.pending: dict = {}                          # option key -> Future of a screening compile
    self.programs: dict = {}                         # sha1 of the lowered program -> option key
    self.models: dict = {}                           # option key -> model_grad_memory(...)
    self.options: list | None = None                 # the candidate set, once built
    self.lock = threading.RLock()
    # plain jax.grad compiles in a worker while its jaxpr model is computed here
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      self.pool = pool
      self._submit(self.plain)
      self.base_saved, _, model_base, _ = model_grad_memory(self.fns[("plain",)], self.flat_specs, self.argnums)
      self.base = self._result(self.plain)
    self.pool = None
    self.model_base = max(model_base, self.base_saved)

  # -------------------------------------------------------------- candidate set

  def candidates(self) -> list:
    """The candidate set, each compiled. Python work (building, tracing and lowering candidates,
    the tree search) runs here while earlier candidates compile in worker threads (XLA releases
    the GIL): each candidate is submitted as soon as it is lowered."""
    with self.lock:
      if self.options is None:
        with concurrent.futures.ThreadPoolExecutor(_COMPILE_THREADS) as pool:
          self.pool = pool
          try:
            opts = self._make_options()
            opts += self._calibrated_trees(opts)
            for o in opts:
              self._result(o)
          finally:
            self.pool = None
        self.options = opts
      return self.options

  def _calibrated_trees(self, opts: list) -> list:
    """Tree plans aimed at compiled fractions of plain grad's temp that the set does not reach yet.

    The model's bytes are not XLA's: each compiled tree gives compiled bytes per modelled byte; a
    target's model budget is divided by the ratio of the compiled tree nearest to it. Fixed
    targets, not the caller's budget: the candidate set stays the same for every budget.
    """
    base = self.base.temp_bytes
    trees = [(self._result(o).temp_bytes, o.node.peak) for o in opts if o.key[0] == "tree" and o.node.peak > 0]
    if not trees:
      return []
    temps = [t for t, _ in trees]
    search = self._search
    seen = {o.key for o in opts}
    new = []
    for frac in _CALIBRATED_FRACTIONS:
      goal = frac * base
      if any(0.85 * goal <= t <= goal for t in temps):
        continue  # a candidate already sits just under this target
      temp, peak = min(trees, key=lambda tp: abs(tp[0] - goal))
      o = self._tree_option(search, int(goal * peak / max(temp, 1)), self._max_depth)
      if o is not None and o.key not in seen:
        seen.add(o.key)
        new.append(o)
        self._submit(o)
      if len(new) >= _MAX_CALIBRATED:
        break
    return new

  def _make_options(self) -> list:
    g = self.g
    opts, seen = [], set()

    def add(o):  # (compiling starts at once, in a worker)
      if o is not None and o.key not in seen:
        seen.add(o.key)
        opts.append(o)
        self._submit(o)
    layers = _layer_cuts(g)
    for name in _POLICIES:
      if layers is not None or g.scans:  # JAX's policy per layer, as a user writes it
        add(self._policy_option(name, layers))
      # and per balanced segment over the whole program (the head and loss inside regions too,
      # unlike per layer; a few regions of several layers: fewer boundaries kept)
      for o in self._policy_options(name, _POLICY_SEGMENTS[name], whole=False):
        add(o)
      if self.platform != "cpu":
        # Whole-function jax.checkpoint keeps its savings only where XLA keeps optimization
        # barriers; XLA:CPU compiles it to plain jax.grad's program (benchmarks/remat.py
        # measures it), so there it is not a candidate.
        add(_Option(("whole", name), f"jax.checkpoint({name})",
                    lambda p=getattr(jax.checkpoint_policies, name): _apply_policy(g, (), p, "checkpoint"),
                    math.inf, name, "checkpoint", policy_name=name))
    search = self._search = _TreeSearch(g, self.cm, self.offload, self.solver)
    n_units = len(g.cands) + sum(len(s.cands) for s in g.scans.values())
    max_depth = self._max_depth = max(1, min(_MAX_DEPTH, int(math.ceil(math.log2(max(n_units, 2))))))
    for frac in _TREE_FRACTIONS:
      add(self._tree_option(search, int(frac * self.model_base), max_depth))
    strip = len(self.prefix)
    for nd in search.minimal(max_depth)[:_FLOOR_TREES]:
      add(_Option(("min", _node_key(nd, strip)), f"recompute all, d{nd.depth()} x{nd.num_segments()}",
                  lambda nd=nd: _apply(g, nd, _decisions(nd, False), self.form), nd.cost, "min",
                  self.form, nd, _decisions(nd, False)))
    return opts

  def _tree_option(self, search: _TreeSearch, target: int, max_depth: int) -> _Option | None:
    """The model's cheapest segment-tree plan (any depth) within model peak ``target``."""
    g, strip = self.g, len(self.prefix)
    if target < 1:
      return None
    nodes = [nd for nd in (search.best(d, target) for d in range(1, max_depth + 1)) if nd is not None]
    if not nodes:
      return None
    node = min(nodes, key=lambda nd: (nd.cost, nd.peak, nd.depth()))
    dec = _decisions(node, self.offload)
    if all(d == "save" for d in dec.values()) and node.children is None:
      return None  # nothing removed: plain jax.grad (already a candidate)
    return _Option(
        ("tree", _node_key(node, strip)), f"tree d{node.depth()} x{node.num_segments()} (model {format_bytes(node.peak)})",
        lambda: _apply(g, node, dec, self.form), node.cost, _node_solver(node),
        "checkpoint" if "offload" in dec.values() else self.form, node, dec)

  def _policy_option(self, name: str, layers) -> _Option:
    g = self.g
    policy = getattr(jax.checkpoint_policies, name)
    cuts, rng = layers if layers is not None else ((), (0, 0))
    nl = sum(1 for sg in _segments_from_cuts(g, cuts) if rng[0] <= sg.lo and sg.hi <= rng[1] and not sg.scan)
    what = f"{nl} layers" if layers is not None else ""
    if g.scans:
      what = (what + " + " if what else "") + f"{len(g.scans)} scan bod{'y' if len(g.scans) == 1 else 'ies'}"
    return _Option(("layers", name, cuts, rng), f"{name} per layer ({what})",
                   lambda: _apply_policy(g, cuts, policy, self.form, layers=rng), math.inf, name,
                   self.form, cuts=cuts, policy_name=name, layers=rng)

  def _policy_options(self, name: str, ks, whole: bool) -> list[_Option]:
    g = self.g
    policy = getattr(jax.checkpoint_policies, name)
    out = []
    for k in ks:
      cuts = _balanced_cuts(g, 0, g.n, k)
      nseg = len(_segments_from_cuts(g, cuts))
      out.append(_Option(("policy", name, cuts), f"{name} per segment x{nseg}",
                         lambda cuts=cuts: _apply_policy(g, cuts, policy, self.form), math.inf, name,
                         self.form, cuts=cuts, policy_name=name))
    return out

  # -------------------------------------------------------------- measuring

  def fn(self, opt: _Option) -> Callable:
    with self.lock:
      if opt.key not in self.fns:
        self.fns[opt.key] = opt.build()
      return self.fns[opt.key]

  def _submit(self, opt: _Option) -> None:
    """Lowers ``opt`` here and starts its screening compile (``SCREEN_OPTIONS``) in ``self.pool``
    (compiled here when there is none)."""
    if opt.key in self.screened or opt.key in self.pending:
      return
    lowered = lower_grad(self.fn(opt), self.flat_specs, self.argnums)
    # Candidates that lower to the same program (e.g. a recompute-everything floor and a tree
    # that removes every residual) share one compile.
    text = hashlib.sha1(lowered.as_text().encode()).hexdigest()
    same = self.programs.get(text)
    if same is not None:
      if same in self.screened:
        self.screened[opt.key] = self.screened[same]
      else:
        self.pending[opt.key] = self.pending[same]
      return
    self.programs[text] = opt.key
    if self.pool is None:
      self.screened[opt.key] = compile_lowered(lowered, fast=True)
    else:
      self.pending[opt.key] = self.pool.submit(compile_lowered, lowered, True)

  def _result(self, opt: _Option) -> Measured:
    """The compiled figures of a submitted ``opt`` (waits for its compile)."""
    if opt.key not in self.screened:
      fut = self.pending.pop(opt.key, None)  # (a Future may be shared by equal programs)
      if fut is None:
        self._submit(opt)
      else:
        self.screened[opt.key] = fut.result()
    return self.screened[opt.key]

  def verified(self, opt: _Option) -> Measured:
    """The compiled figures of ``opt`` (see ``_remat_measure.SCREEN_OPTIONS``: the same temp bytes
    and FLOPs as the user's default ``jax.jit(jax.grad(...))``)."""
    with self.lock:
      return self._result(opt)

  def model(self, opt: _Option):
    with self.lock:
      if opt.key not in self.models:
        self.models[opt.key] = model_grad_memory(self.fn(opt), self.flat_specs, self.argnums)
      return self.models[opt.key]

  def seconds(self, m: Measured, opt: _Option) -> float:
    """Model time of a candidate: its compiled FLOPs (the same for every budget: a fixed order),
    plus offloaded bytes over the stated host bandwidth."""
    return self.cm.recompute_seconds(m.flops) + self.transfer_bytes(opt) / self.cm.host_bandwidth

  def transfer_bytes(self, opt: _Option) -> int:
    if not opt.decision or opt.node is None:
      return 0
    return int(sum(2 * it.saved_bytes for leaf in opt.node.leaves() for it, _, _, _ in leaf.layout.items
                   if opt.decision.get(it.key) == "offload"))

  # -------------------------------------------------------------- selection

  def select(self, budget: int):
    """``(option, Measured)`` of least cost (then least temp) whose compiled temp fits ``budget``,
    or None. The candidate set and its figures do not depend on the budget, so neither does the
    order: a larger budget picks the same plan or a cheaper one."""
    opts = self.candidates()
    fits = [(self.seconds(self.screened[o.key], o), self.screened[o.key].temp_bytes, k, o)
            for k, o in enumerate(opts) if self.screened[o.key].temp_bytes <= budget]
    if not fits:
      return None
    o = min(fits, key=lambda t: t[:3])[3]
    return o, self.screened[o.key]

  def smallest(self) -> tuple[int, str]:
    """The smallest compiled temp bytes of the candidate set, as (bytes, label)."""
    opts = self.candidates()
    got = [(self.screened[o.key].temp_bytes, o.label) for o in opts]
    return min(got) if got else (self.base.temp_bytes, "no remat")


def _structure_key(closed, flat_specs, argnums, offload, solver, cm, platform) -> tuple:
  consts = []
  for c in closed.consts:
    try:  # the constants' bytes: programs that differ only in a captured array do not share
      a = np.ascontiguousarray(np.asarray(c))
      consts.append((a.shape, str(a.dtype), hashlib.sha1(a.view(np.uint8)).hexdigest()))
    except (TypeError, ValueError):  # not viewable as bytes (e.g. PRNG key arrays): never shared
      consts.append(("id", id(c)))
  avals = tuple((tuple(s.shape), str(s.dtype)) if hasattr(s, "shape") else repr(s) for s in flat_specs)
  return (str(closed.jaxpr), avals, tuple(consts), tuple(argnums), offload, solver, cm, platform)


class _StructureCache:
  """Process-wide LRU of :class:`_Structure` by program structure (cleared by ``_clear_caches``)."""

  def __init__(self, max_entries: int):
    self._max = max_entries
    self._data: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key, make: Callable[[], _Structure]) -> _Structure:
    with self._lock:
      hit = self._data.get(key)
      if hit is not None:
        self._data.move_to_end(key)
        return hit
    st = make()
    with self._lock:
      hit = self._data.setdefault(key, st)
      self._data.move_to_end(key)
      while len(self._data) > self._max:
        self._data.popitem(last=False)
      return hit

  def clear(self) -> None:
    with self._lock:
      self._data.clear()

  def __len__(self) -> int:
    return len(self._data)


_STRUCTURES = _StructureCache(_MAX_STRUCTURES)


def _clear_caches() -> None:
  """Forgets every planned program structure (models, candidate sets, compiled figures)."""
  _STRUCTURES.clear()


class _Planner:
  """Plans for one (fun, options); caches plans per abstract signature. The candidate set and its
  compiled figures are shared with every other planner of the same program structure."""

  def __init__(self, fun, budget, offload, solver, cost_model, budget_kind="peak"):
    self.fun = fun
    self.budget = budget
    self.budget_kind = budget_kind
    self.offload = offload
    self.solver = solver
    self.cost_model = cost_model
    self._cache: dict = {}
    self._lock = threading.Lock()

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
           tuple((i, graphdef_key(gd)) for i, (_, gd) in nodes.items()))
    hit = self._cache.get(key)
    if hit is not None:
      return hit
    with self._lock:
      hit = self._cache.get(key)
      if hit is not None:
        return hit
      t0 = time.perf_counter()
      pure = merged_call(self.fun, treedef, nodes)

      def flat_user(*flat):
        return jax.tree_util.tree_flatten(pure(jax.tree_util.tree_unflatten(in_tree, flat)))[0]

      closed0 = jax.make_jaxpr(flat_user)(*flat_specs)
      # inline jit calls so that the top level is a flat sequence of equations
      closed = jax.make_jaxpr(lambda *a: _inline_eval(closed0.jaxpr, closed0.consts, a))(*flat_specs)
      out_tree = jax.tree_util.tree_structure(
          jax.eval_shape(pure, jax.tree_util.tree_unflatten(in_tree, flat_specs)))
      comp = self._plan(closed, flat_specs, n_first_flat, out_tree, key, t0)
      self._cache[key] = comp
      return comp

  # ------------------------------------------------------------------ planning

  def _plan(self, closed, flat_specs, n_first, out_tree, sig, t0) -> _Compiled:
    cm = self.cost_model or CostModel.default()
    # differentiate w.r.t. the first positional argument's leaves (plain jax.grad)
    argnums = [i for i in range(n_first) if _is_inexact(flat_specs[i])]
    if not argnums:
      argnums = [i for i, s in enumerate(flat_specs) if _is_inexact(s)]
    platform = jax.default_backend()
    skey = _structure_key(closed, flat_specs, argnums, self.offload, self.solver, cm, platform)
    prefix = f"ljr{zlib.crc32(repr(skey[:2]).encode()) % 100000}:"
    st = _STRUCTURES.get(skey, lambda: _Structure(closed, flat_specs, argnums, prefix, self.offload,
                                                  self.solver, cm, platform))
    ctx = _Ctx(st.g, list(flat_specs), argnums, sig, 0, st.base, st.base_saved, st.model_base, cm,
               out_tree, st.form, platform, t0)
    if self.budget_kind == "saved":
      ctx.tried.append((st.plain, st.base))
      return self._plan_saved(ctx, st, st.fns[("plain",)])
    ctx.budget = budget = self._budget_bytes(st.base.temp_bytes)
    if budget >= st.base.temp_bytes:  # plain jax.grad fits: nothing to do
      ctx.tried.append((st.plain, st.base))
      return self._finish(ctx, st, st.plain, st.base)
    got = st.select(budget)
    ctx.tried = [(st.plain, st.base)] + [(o, st.screened[o.key]) for o in st.candidates()]
    if got is not None:
      return self._finish(ctx, st, *got)
    smallest, label = st.smallest()
    if st.base.temp_bytes <= smallest:  # plain jax.grad is a plan too (on tiny programs, the least)
      smallest, label = st.base.temp_bytes, "plain jax.grad, no rematerialization"
    raise BudgetError(
        f"{_API}: budget={format_bytes(budget)} ({self.budget!r}) is below the smallest feasible "
        f"plan ({format_bytes(smallest)} compiled temp bytes, {label}; plain jax.grad compiles to "
        f"{format_bytes(st.base.temp_bytes)} on {platform}); pass budget>={format_bytes(smallest)} "
        f"(budget>={smallest} bytes, or a fraction >= "
        f"{math.ceil(1000 * smallest / max(st.base.temp_bytes, 1)) / 1000:.3f})",
        smallest_feasible_bytes=int(smallest))

  # ------------------------------------------------------------------ results

  def _finish(self, ctx: _Ctx, st: _Structure, opt: _Option, m: Measured) -> _Compiled:
    g, cm = ctx.g, ctx.cm
    fn = st.fn(opt)
    dev, host, peak, _ = st.model(opt)
    decisions, transfer, nseg, depth, model_peak = [], 0, 1, 1, peak
    if opt.node is not None:
      decisions, transfer = _tree_decisions(g, opt.node, opt.decision)
      nseg, depth, model_peak = opt.node.num_segments(), opt.node.depth(), opt.node.peak
    elif opt.key == ("plain",):
      decisions = [TensorDecision(c.name, tuple(c.var.aval.shape), str(c.var.aval.dtype), 1, c.nbytes, "save",
                                  0, c.flops, c.primitive) for c in g.cands.values()]
      depth, model_peak = 0, ctx.model_base
    elif opt.key[0] == "saveset":
      pass  # rows filled in by _plan_saved
    else:  # a JAX policy per layer / segment: dots_saveable keeps matmul / conv outputs
      segs = _segments_from_cuts(g, opt.cuts)
      lo, hi = opt.layers if opt.layers is not None else (0, g.n)
      wrapped = [s for s in segs if s.scan or lo <= s.lo and s.hi <= hi]
      nseg = len(wrapped)
      seg_of = {i: k for k, seg in enumerate(wrapped) for i in range(seg.lo, seg.hi)}
      keep = ("dot_general", "conv_general_dilated") if opt.policy_name == "dots_saveable" else ()
      for c in g.cands.values():
        inside = c.segment_local in seg_of
        d = "save" if (c.primitive in keep or not inside) else "recompute"
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

  def _plan_saved(self, ctx: _Ctx, st: _Structure, plain_fn: Callable) -> _Compiled:
    """``budget_kind="saved"``: least recompute with saved residual bytes (JAX's accounting of the
    jaxpr) within budget; applied with ``jax.checkpoint`` regions, reported with compiled numbers."""
    g, base_saved = ctx.g, ctx.base_saved
    ctx.budget = budget = self._budget_bytes(base_saved)
    plain = ctx.tried[0][0]
    if budget >= base_saved:
      return self._finish(ctx, st, plain, ctx.base)
    best, smallest = None, None
    # scans checkpointed per iteration (carries kept) or as whole loops (carries recomputed)
    for whole in ((False, True) if g.scans else (False,)):
      cg = _closure_graph(g, st.prefix, whole_scans=whole)
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
    with st.lock:
      st.fns[opt.key] = fn
      st.models[opt.key] = measured
    m = st.verified(opt)
    comp = self._finish(ctx, st, opt, m)
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
