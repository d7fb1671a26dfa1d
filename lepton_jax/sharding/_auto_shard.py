"""``lj.auto_shard``: choose shardings for a function over a device mesh, then jit it."""

from __future__ import annotations

import functools
import time
import typing
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lepton_jax import jaxpr as ljx
from lepton_jax._errors import ShardingError
from lepton_jax._nnx import is_graph_node, nnx_module
from lepton_jax._utils import format_bytes, parse_bytes
from lepton_jax.sharding import _cost_model as cm
from lepton_jax.sharding._compiled import cached_lowered, compile_candidate, jaxpr_body
from lepton_jax.sharding._dims import analyze_dims
from lepton_jax.sharding._mesh import MeshInfo, resolve_mesh
from lepton_jax.sharding._plan import LeafPlan, ShardingPlan, spec_str, spec_to_pspec
from lepton_jax.sharding._strategies import STRATEGIES, find_roles, plan_placement

__all__ = ["auto_shard", "AutoShardFunction"]

_API = "auto_shard"
_COMM_WEIGHT = 0.5
_COLL_SLACK = 1.1
_ACT_MIN_BYTES = 1 << 20
_ACT_TOP_K = 64
_SELECTION_RULE = ("rule: compiled argument + temp bytes <= the best baseline's and collectives <= "
                   "1.1x that baseline's; no involuntary rematerialization if possible; then min "
                   "argument + temp + 0.5 x collective bytes. Screening: candidates are compiled in "
                   "order of argument bytes; one whose exact argument bytes already exceed the best "
                   "compiled argument + temp is not compiled (it cannot be better)")
_BUDGET_RULE = ("rule: compiled memory and estimate within memory_budget; then min collective bytes, "
                "then memory; if none fits, min compiled memory")


def _baselines(mi) -> tuple:
  """Named baselines compiled next to 'auto': tp only where a second axis can hold tensors."""
  return ("dp", "fsdp") + (("tp",) if (mi.tensor_axes or len(mi.names) > 1) else ()) + ("replicate",)


def _inter_index(an, k, j) -> int:
  for n, it in enumerate(an.intermediates):
    if it.eqn_index == k and it.out_index == j:
      return n
  raise KeyError((k, j))


def _activation_constraints(an, core, mi) -> dict:
  """``{(eqn, out): spec}``: the batch dim of large top-level intermediates over its data axes.

  Large = at least 1 MiB (at most the 64 largest of those); only results that carry a batch
  class that is sharded in ``core``; other dims are left to XLA (``None``). Programs without
  such intermediates get no constraint (and no extra candidate to compile).
  """
  sharded = {c: core.class_axes[c] for c in core.batch_classes if core.class_axes.get(c)}
  if not sharded:
    return {}
  found = []
  for it in an.intermediates:
    for d, c in enumerate(it.classes):
      if c in sharded and it.shape[d] % mi.size(sharded[c]) == 0:
        found.append((it.nbytes, it, d, sharded[c]))
        break
  if not found:
    return {}
  found.sort(key=lambda t: (-t[0], t[1].eqn_index, t[1].out_index))
  big = [f for f in found if f[0] >= _ACT_MIN_BYTES][:_ACT_TOP_K]
  out = {}
  for nb, it, d, axes in big:
    spec = [None] * len(it.shape)
    spec[d] = tuple(axes)
    out[(it.eqn_index, it.out_index)] = tuple(spec)
  return out


class _Candidate(typing.NamedTuple):
  name: str
  core: Any
  constraints: dict
  in_sh: tuple
  out_sh: tuple
  jitted: Any
  lowered: Any
  compiled: Any
  figures: Any          # CompiledFigures, or None when the candidate was screened out
  baseline: bool
  chosen: list = None   # [bool, note] set by _choose (a NamedTuple field must stay immutable)
  arg_bytes: int = 0    # exact per-device argument bytes of its input placement
  skipped: str = ""     # why it was not compiled

  def to_dict(self) -> dict:
    return {"name": self.name, "baseline": self.baseline, "chosen": bool(self.chosen and self.chosen[0]),
            "estimated_memory_bytes": int(self.core.memory["total"]),
            "estimated_collective_bytes": int(self.core.collectives["total"]),
            "argument_bytes_per_device": int(self.arg_bytes),
            "activation_constraints": len(self.constraints),
            "compiled": None if self.figures is None else self.figures.to_dict(),
            "note": self.skipped or (self.chosen[1] if self.chosen else "")}


def _choose(cands: list, budget, core_budget_ok) -> None:
  """Marks one compiled candidate chosen (see ``_SELECTION_RULE`` / ``_BUDGET_RULE``)."""
  mem = lambda c: c.figures.arg_temp
  dev = lambda c: c.figures.memory
  coll = lambda c: c.figures.collectives["total"]
  order = {id(c): k for k, c in enumerate(cands)}
  done = [c for c in cands if c.figures is not None]
  if budget is None:
    bases = [c for c in done if c.baseline] or done
    ref = min(bases, key=lambda c: (mem(c), coll(c), order[id(c)]))
    ok = [c for c in done if mem(c) <= mem(ref) and coll(c) <= _COLL_SLACK * coll(ref)]
    clean = [c for c in ok if c.figures.remat_warnings == 0]
    pool = clean or ok
    best = min(pool, key=lambda c: (mem(c) + _COMM_WEIGHT * coll(c), order[id(c)]))
    note = f"best baseline by compiled argument + temp bytes: {ref.name}"
  else:
    fit = [c for c in done if dev(c) <= budget and core_budget_ok(c)]
    if fit:
      best = min(fit, key=lambda c: (coll(c), dev(c), order[id(c)]))
      note = "fits memory_budget"
    else:
      best = min(done, key=lambda c: (dev(c), coll(c), order[id(c)]))
      note = "no candidate fits memory_budget when compiled: least memory"
  for k, c in enumerate(cands):
    cands[k] = c._replace(chosen=[c is best, note if c is best else ""])


def _norm_argnums(v, name) -> tuple:
  if v is None:
    return ()
  if isinstance(v, int) and not isinstance(v, bool):
    v = (v,)
  if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                  for i in v):
    raise TypeError(f"{_API}: {name} must be an int or a tuple of non-negative ints, got {v!r}")
  return tuple(sorted(set(v)))


def _leaf_desc(x):
  shape = tuple(int(s) for s in np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  return shape, jax.dtypes.canonicalize_dtype(dtype)


class _Entry(typing.NamedTuple):
  plan: ShardingPlan
  in_shardings: tuple
  out_shardings: tuple
  jitted: Any
  dyn_tree: Any
  out_tree: Any
  nnx_info: Any       # (graphdef, arg count, graph-node arg indices) or None
  lowered: Any = None   # the validated Lowered / Compiled of strategy="auto" (concrete mesh)
  compiled: Any = None


class AutoShardFunction:
  """The object :func:`auto_shard` returns: call it like the wrapped function.

  Attributes:
    mesh: the mesh it shards over.
    strategy / memory_budget: the options it was created with.
    model_axes: the mesh axes used for tensor parallelism (the others are data axes).
  """

  def __init__(self, fun, mesh, strategy, static_argnums, donate_argnums, memory_budget,
               model_axes=None):
    # Copy name/doc/__wrapped__ only: merging ``fun.__dict__`` (functools' default) would let
    # a wrapped callable's private attributes (``jax.grad(jax.jit(f))`` carries ``_fun``)
    # overwrite ours, so the inner, un-differentiated function would be called.
    functools.update_wrapper(self, fun, updated=())
    self._fun = fun
    self._mi: MeshInfo = resolve_mesh(mesh, api=_API, model_axes=model_axes)
    self.model_axes = self._mi.tensor_axes
    self.mesh = self._mi.mesh
    self.strategy = strategy
    self.memory_budget = memory_budget
    self._static = static_argnums
    self._donate = donate_argnums
    self._cache: dict = {}

  # ----------------------------------------------------------------- helpers
  def _split(self, args, kwargs):
    for i in self._static:
      if i >= len(args):
        raise TypeError(f"{_API}: static_argnums={self._static} but {self.__name__} was called with "
                        f"{len(args)} positional arguments")
    statics = tuple((i, args[i]) for i in self._static)
    try:
      hash(statics)
    except TypeError:
      raise TypeError(f"{_API}: static arguments {self._static} must be hashable, got "
                      f"{[type(a).__name__ for _, a in statics]}") from None
    dyn_args = tuple(None if i in self._static else a for i, a in enumerate(args))
    nnx_info = None
    graph_idx = tuple(i for i, a in enumerate(dyn_args) if is_graph_node(a))
    if graph_idx:
      nnx = nnx_module()
      graphdef, state = nnx.split(tuple(a if i in graph_idx else None for i, a in enumerate(dyn_args)))
      nnx_info = (graphdef, len(args), graph_idx)
      dyn = (state, tuple(None if i in graph_idx else a for i, a in enumerate(dyn_args)), kwargs)
    else:
      dyn = (None, dyn_args, kwargs)
    return statics, dyn, nnx_info

  def _flat_fun(self, statics, dyn_tree, nnx_info, out_box):
    fun = self._fun
    sdict = dict(statics)

    def flat(*leaves):
      state, dyn_args, kwargs = jax.tree_util.tree_unflatten(dyn_tree, leaves)
      if nnx_info is not None:
        nnx = nnx_module()
        graphdef, nargs, gidx = nnx_info
        nodes = nnx.merge(graphdef, state)
        dyn_args = tuple(nodes[i] if i in gidx else a for i, a in enumerate(dyn_args))
      args = tuple(sdict[i] if i in sdict else a for i, a in enumerate(dyn_args))
      out = fun(*args, **kwargs)
      if nnx_info is not None:
        nnx = nnx_module()
        new_state = nnx.split(tuple(a if i in nnx_info[2] else None for i, a in enumerate(args)))[1]
        out = (out, new_state)
      leaves_out, tree = jax.tree_util.tree_flatten(out)
      out_box.append(tree)
      return leaves_out
    return flat

  def _paths(self, dyn, nnx_info):
    with_path, _ = jax.tree_util.tree_flatten_with_path(dyn)
    paths, argidx = [], []
    for p, _ in with_path:
      root = getattr(p[0], "idx", 0)
      rest = p[1:]
      if root in (0, 1):
        paths.append("args" + jax.tree_util.keystr(tuple(rest)))
        k = rest[0] if rest else None
        idx = getattr(k, "idx", getattr(k, "key", None))
        argidx.append(idx if isinstance(idx, int) else None)
      else:
        paths.append("kwargs" + jax.tree_util.keystr(tuple(rest)))
        argidx.append(None)
    return paths, argidx

  # -------------------------------------------------------------- planning
  def _entry(self, args, kwargs) -> tuple[_Entry, list]:
    statics, dyn, nnx_info = self._split(args, kwargs)
    leaves, dyn_tree = jax.tree_util.tree_flatten(dyn)
    descs = []
    for x in leaves:
      if isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "shape") or isinstance(
          x, (bool, int, float, complex, np.number, np.bool_)):
        descs.append(_leaf_desc(x))
      else:
        descs.append(None)  # ljx.trace reports it with its path
    key = (dyn_tree, tuple(descs), statics, None if nnx_info is None else nnx_info[0])
    try:
      entry = self._cache.get(key)
    except TypeError:  # unhashable graphdef / statics
      key, entry = None, None
    if entry is None:
      entry = self._build(statics, dyn, dyn_tree, nnx_info, leaves)
      if key is not None:
        self._cache[key] = entry
    return entry, leaves

  def _build(self, statics, dyn, dyn_tree, nnx_info, leaves) -> _Entry:
    t0 = time.perf_counter()
    mi = self._mi
    out_box: list = []
    flat = self._flat_fun(statics, dyn_tree, nnx_info, out_box)
    abstract = [jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(
        getattr(x, "dtype", None) or np.asarray(x).dtype)) if not isinstance(x, jax.core.Tracer)
                else x for x in leaves] if all(
                    hasattr(x, "shape") or isinstance(x, (bool, int, float, complex, np.number))
                    for x in leaves) else leaves
    paths, argidx = self._paths(dyn, nnx_info)
    for p, x in zip(paths, leaves):
      if not (hasattr(x, "shape") and hasattr(x, "dtype")) and not isinstance(
          x, (bool, int, float, complex, np.number, np.bool_)):
        raise TypeError(
            f"{_API}: argument {p} is a {type(x).__name__} {x!r:.60}, not an array; every leaf must be "
            "a jax.Array, numpy array, scalar or jax.ShapeDtypeStruct. Mark it static with "
            "static_argnums or bind it with functools.partial.")
    try:
      traced = ljx.trace(flat, *abstract)
    except TypeError as e:
      raise TypeError(str(e).replace("lepton_jax.jaxpr.trace", _API)) from None
    out_tree = out_box[-1]
    in_info = []
    for p, aval in zip(paths, traced.in_avals):
      in_info.append((p, tuple(aval.shape), str(aval.dtype), ljx.aval_bytes(aval)))
    out_paths = []
    with_path = jax.tree_util.tree_flatten_with_path(
        jax.tree_util.tree_unflatten(out_tree, list(range(out_tree.num_leaves))))[0]
    for p, _ in with_path:
      if nnx_info is not None:
        head = getattr(p[0], "idx", 0)
        out_paths.append(("output" if head == 0 else "state:args") + jax.tree_util.keystr(tuple(p[1:])))
      else:
        out_paths.append("output" + jax.tree_util.keystr(tuple(p)))
    out_info = [(p, tuple(a.shape), str(a.dtype), ljx.aval_bytes(a))
                for p, a in zip(out_paths, traced.out_avals)]
    donated_leaves = {k for k, a in enumerate(argidx) if a is not None and a in self._donate}
    an = analyze_dims(traced.closed_jaxpr)
    act = int(ljx.peak_live_bytes(traced.closed_jaxpr))
    budget = self.memory_budget
    roles_info = find_roles(an, in_info, out_info)
    core = plan_placement(an, mi, in_info, out_info, self.strategy, budget, donated_leaves,
                          act, api=_API, roles_info=roles_info)
    mesh = self.mesh
    donate = sorted(donated_leaves)
    cands = None
    if self.strategy == "auto" and not mi.abstract:
      cands = self._validate(traced, an, in_info, out_info, donated_leaves, act, roles_info, core)
      chosen = next(c for c in cands if c.chosen[0])
      core, constraints = chosen.core, chosen.constraints
    else:
      constraints = {}
    in_plans, out_plans = [], []
    for (p, shape, dtype, nb), spec, why, role in zip(in_info, core.in_specs, core.in_reasons,
                                                      core.in_roles):
      in_plans.append(LeafPlan(p, shape, dtype, role, spec, why, nb, cm.per_device_bytes(nb, spec, mi)))
    for (p, shape, dtype, nb), spec, why, role in zip(out_info, core.out_specs, core.out_reasons,
                                                      core.out_roles):
      out_plans.append(LeafPlan(p, shape, dtype, role, spec, why, nb, cm.per_device_bytes(nb, spec, mi)))
    params = [l for l in in_plans if l.role == "param"]
    param_bytes = sum(l.bytes for l in params)
    search = core.search
    compiled_fig = None
    cand_dicts = ()
    if cands is not None:
      chosen = next(c for c in cands if c.chosen[0])
      compiled_fig = chosen.figures.to_dict()
      cand_dicts = tuple(c.to_dict() for c in cands)
      n_comp = sum(c.figures is not None for c in cands)
      search = (f"{core.search}; compiled check of {len(cands)} candidates kept '{chosen.name}' "
                f"({_SELECTION_RULE if budget is None else _BUDGET_RULE})")
      validation = (f"{n_comp} of {len(cands)} candidates compiled for the mesh's devices "
                    f"({len(cands) - n_comp} screened out by the argument-bytes bound); kept "
                    f"'{chosen.name}'")
    elif mi.abstract:
      validation = ("skipped: the mesh is an AbstractMesh (no devices to compile for); the plan is "
                    "the cost model's choice and was not checked against a compiled program")
    else:
      validation = f"none: strategy='{self.strategy}' is a named baseline (planned, not searched)"
    act_desc = tuple((an.intermediates[_inter_index(an, k, j)].primitive,
                      list(an.intermediates[_inter_index(an, k, j)].shape), spec_str(
                          tuple(() if e is None else e for e in spec)))
                     for (k, j), spec in sorted(constraints.items()))
    plan = ShardingPlan(
        strategy=self.strategy, mesh=mi.describe(),
        data_axes=tuple(a for a in mi.names if not any(a in v for c, v in core.class_axes.items()
                                                           if c not in core.batch_classes)),
        tensor_axes=tuple(sorted({a for c, v in core.class_axes.items() if c not in core.batch_classes
                                  for a in v}, key=mi.names.index)),
        inputs=tuple(in_plans), outputs=tuple(out_plans), tensor_parallel=core.tp_desc,
        param_bytes=int(param_bytes),
        param_bytes_per_device=int(sum(l.per_device_bytes for l in params)),
        replicated_param_bytes=int(sum(l.bytes for l in params if l.replicated)),
        input_bytes_per_device=int(core.memory["inputs"]),
        output_bytes_per_device=int(core.memory["outputs"]),
        activation_bytes_per_device=int(core.memory["activation"]),
        memory_bytes_per_device=int(core.memory["total"]), memory_budget=budget,
        collective_bytes=core.collectives, search=search,
        planning_seconds=time.perf_counter() - t0,
        plan_hash=ShardingPlan.compute_hash(self.strategy, mi.describe(), in_plans, out_plans),
        role_basis=core.role_basis, activation_constraints=act_desc, compiled=compiled_fig,
        candidates=cand_dicts, validation=validation)
    if cands is not None:
      chosen = next(c for c in cands if c.chosen[0])
      return _Entry(plan, chosen.in_sh, chosen.out_sh, chosen.jitted, dyn_tree, out_tree, nnx_info,
                    chosen.lowered, chosen.compiled)
    in_sh = tuple(NamedSharding(mesh, spec_to_pspec(l.spec)) for l in in_plans)
    out_sh = tuple(NamedSharding(mesh, spec_to_pspec(l.spec)) for l in out_plans)
    jitted = None
    if not mi.abstract:
      jitted = self._make_jit(jaxpr_body(traced.closed_jaxpr, {}, mesh, mi.explicit), in_sh, out_sh,
                              out_tree, donate)
    return _Entry(plan, in_sh, out_sh, jitted, dyn_tree, out_tree, nnx_info, None, None)

  def _validate(self, traced, an, in_info, out_info, donated, act, roles_info, auto_core) -> list:
    """Compiles the cost model's best candidates and the named baselines; marks the one kept."""
    mi = self._mi
    mesh = self.mesh
    budget = self.memory_budget
    names = []
    cores = []

    def add(name, core):
      sig = (tuple(core.in_specs), tuple(core.out_specs))
      if any(sig == (tuple(c.in_specs), tuple(c.out_specs)) for c in cores):
        names[[(tuple(c.in_specs), tuple(c.out_specs)) for c in cores].index(sig)] += f"={name}"
        return
      names.append(name)
      cores.append(core)

    add("auto", auto_core)
    model = [("auto/no-tp", dict(use_tp=False)), ("auto/memory", dict(comm_weight=0.0))]
    if not mi.tensor_axes:
      model = model[1:]
    for name, kw in model:
      add(name, plan_placement(an, mi, in_info, out_info, "auto", budget, donated, act, api=_API,
                               roles_info=roles_info, **kw))
    n_model = len(cores)
    for b in _baselines(mi):
      try:
        add(b, plan_placement(an, mi, in_info, out_info, b, None, donated, act, api=_API,
                              roles_info=roles_info))
      except ShardingError:
        continue   # e.g. "dp" with a batch no data axis divides: not a valid baseline here
    variants = [(n, c, {}) for n, c in zip(names, cores)]
    # Activation constraints on the cost model's best candidate (by its own score).
    best_model = min(range(n_model), key=lambda k: (cores[k].score(), k))
    cons = _activation_constraints(an, cores[best_model], mi)
    if cons:
      variants.append((names[best_model] + "+act", cores[best_model], cons))
    # Screening (no budget): compile in order of per-device argument bytes (exact, from the specs);
    # XLA's argument + temp is at least the argument bytes, so a candidate whose argument bytes
    # exceed the best compiled argument + temp cannot be better and is not compiled. The bound is
    # trusted only while every compiled candidate's argument bytes equal the computed ones.
    nbytes = [x[3] for x in in_info]
    arg_of = lambda core: int(sum(cm.per_device_bytes(nb, sp, mi) for nb, sp in zip(nbytes, core.in_specs)))
    order = sorted(range(len(variants)), key=lambda k: (arg_of(variants[k][1]), k))
    out = [None] * len(variants)
    best, exact = None, True
    for k in order:
      name, core, cons = variants[k]
      in_sh = tuple(NamedSharding(mesh, spec_to_pspec(sp)) for sp in core.in_specs)
      out_sh = tuple(NamedSharding(mesh, spec_to_pspec(sp)) for sp in core.out_specs)
      is_base = any(part in _baselines(mi) for part in name.split("="))
      ab = arg_of(core)
      if budget is None and exact and best is not None and ab > best:
        out[k] = _Candidate(name, core, cons, in_sh, out_sh, None, None, None, None, is_base, None, ab,
                            f"not compiled: its argument bytes {format_bytes(ab)} already exceed the "
                            f"best compiled argument + temp {format_bytes(best)}")
        continue
      jitted = self._make_jit(jaxpr_body(traced.closed_jaxpr, cons, mesh, mi.explicit), in_sh, out_sh,
                              None, sorted(donated))
      abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s, weak_type=getattr(a, "weak_type", False))
                  for a, s in zip(traced.in_avals, in_sh)]
      lowered, compiled, figs = compile_candidate(jitted, abstract, mesh)
      exact = exact and figs.argument == ab
      best = figs.arg_temp if best is None else min(best, figs.arg_temp)
      out[k] = _Candidate(name, core, cons, in_sh, out_sh, jitted, lowered, compiled, figs, is_base, None, ab)
    _choose(out, budget, core_budget_ok=lambda c: budget is None or c.core.memory["total"] <= budget)
    return out

  def _make_jit(self, flat, in_sh, out_sh, out_tree, donate):
    mi = self._mi
    if mi.explicit:
      out_specs = [s.spec for s in out_sh]

      def body(*leaves):
        inner = jax.sharding.auto_axes(lambda *xs: tuple(flat(*xs)), out_sharding=tuple(out_specs))
        with jax.sharding.use_abstract_mesh(mi.mesh.abstract_mesh):
          return list(inner(*leaves))
    else:
      body = flat
    return jax.jit(body, in_shardings=in_sh, out_shardings=list(out_sh), donate_argnums=tuple(donate))

  def _place(self, leaves, shardings, paths):
    out = []
    mesh_devs = None
    for k, (x, s) in enumerate(zip(leaves, shardings)):
      if isinstance(x, jax.core.Tracer):
        out.append(x)
        continue
      if isinstance(x, jax.Array):
        if x.sharding == s:
          out.append(x)
          continue
        if getattr(x, "committed", False) or not x.is_fully_addressable:
          if mesh_devs is None:
            mesh_devs = set(self.mesh.devices.flat)
          if not set(x.sharding.device_set) <= mesh_devs:
            raise ShardingError(
                f"{_API}: input {paths[k]} lives on devices {sorted(d.id for d in x.sharding.device_set)} "
                f"that are not all in the mesh {dict(zip(self._mi.names, self._mi.sizes))} "
                f"(devices {sorted(d.id for d in mesh_devs)}); move it with jax.device_put first or "
                "pass a mesh that contains those devices.")
        if not x.is_fully_addressable or s.is_fully_addressable:
          out.append(jax.device_put(x, s))
          continue
      if s.is_fully_addressable:
        out.append(jax.device_put(x, s))
      else:  # multi-process: host value identical on every process -> global array
        host = np.asarray(x)
        out.append(jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx]))
    return out

  # ------------------------------------------------------------ public API
  def __call__(self, *args, **kwargs):
    if self._mi.abstract:
      raise ShardingError(
          f"{_API}: {self.__name__} was given an AbstractMesh {self.mesh}; it can plan "
          "(.shardings/.explain with jax.ShapeDtypeStruct args) but not run. Pass a concrete "
          "jax.sharding.Mesh to call it.")
    entry, leaves = self._entry(args, kwargs)
    paths = [l.path for l in entry.plan.inputs]
    placed = self._place(leaves, entry.in_shardings, paths)
    outs = None
    if entry.compiled is not None and not any(isinstance(x, jax.core.Tracer) for x in placed):
      try:   # the executable validated while planning: no second compilation
        outs = entry.compiled(*placed)
      except TypeError:   # argument types differ from the planned ones (e.g. weak types)
        outs = None
    if outs is None:
      outs = entry.jitted(*placed)
    result = jax.tree_util.tree_unflatten(entry.out_tree, outs)
    if entry.nnx_info is not None:
      nnx = nnx_module()
      result, new_state = result
      for i in entry.nnx_info[2]:
        nnx.update(args[i], new_state[i])
    return result

  def explain(self, *args, **kwargs) -> ShardingPlan:
    """The :class:`ShardingPlan` for these arguments (arrays or ``jax.ShapeDtypeStruct``)."""
    return self._entry(args, kwargs)[0].plan

  plan = explain

  def shardings(self, *args, **kwargs):
    """``(in_shardings, out_shardings)`` as pytrees matching ``args`` and the output.

    ``in_shardings`` has ``None`` at static arguments. With keyword arguments it is
    ``(args_shardings, kwargs_shardings)``. For Flax NNX arguments the shardings of a
    module/optimizer are given as its ``nnx.State``.
    """
    entry, _ = self._entry(args, kwargs)
    state, first, kw = jax.tree_util.tree_unflatten(entry.dyn_tree, list(entry.in_shardings))
    if entry.nnx_info is not None:
      _, nargs, gidx = entry.nnx_info
      first = tuple(state[i] if i in gidx else a for i, a in enumerate(first))
    outs = jax.tree_util.tree_unflatten(entry.out_tree, list(entry.out_shardings))
    if entry.nnx_info is not None:
      outs = outs[0]
    if kwargs:
      return (first, kw), outs
    return first, outs

  def lower(self, *args, **kwargs) -> jax.stages.Lowered:
    """``jax.stages.Lowered`` of the sharded function (``.compile().memory_analysis()`` works)."""
    if self._mi.abstract:
      raise ShardingError(f"{_API}: cannot lower over an AbstractMesh; pass a concrete mesh")
    entry, leaves = self._entry(args, kwargs)
    abstract = []
    for x, s in zip(leaves, entry.in_shardings):
      if isinstance(x, jax.core.Tracer):
        abstract.append(x)
      else:
        shape, dtype = _leaf_desc(x)
        abstract.append(jax.ShapeDtypeStruct(shape, dtype, sharding=s))
    if entry.lowered is not None:
      return entry.lowered
    return cached_lowered(entry.jitted, abstract, self.mesh)

  def clear_cache(self) -> None:
    """Forgets cached plans and compiled functions."""
    self._cache.clear()

  def __repr__(self):
    return f"auto_shard({getattr(self._fun, '__name__', self._fun)!r}, strategy={self.strategy!r})"

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)


@typing.overload
def auto_shard(fun: Callable, mesh=None, /, *, strategy: str = "auto", static_argnums=(),
               donate_argnums=(), memory_budget=None, model_axes=None) -> AutoShardFunction: ...


@typing.overload
def auto_shard(fun: None = None, mesh=None, /, *, strategy: str = "auto", static_argnums=(),
               donate_argnums=(), memory_budget=None,
               model_axes=None) -> Callable[[Callable], AutoShardFunction]: ...


def auto_shard(fun=None, mesh=None, /, *, strategy="auto", static_argnums=(), donate_argnums=(),
               memory_budget=None, model_axes=None):
  """Chooses shardings for ``fun``'s inputs and outputs over ``mesh`` and jits it.

  Batch-like inputs are split along their batch dimension over the data axes,
  parameters and optimizer state are FSDP-sharded on their largest divisible
  dimension, matmul pairs are split column-then-row over a ``"tensor"``/``"model"``
  axis, and anything left replicated says why (``.explain()``).

  Args:
    fun: the function (pytrees of arrays, or Flax NNX modules/optimizers, in and out).
    mesh: a ``jax.sharding.Mesh`` (Auto or Explicit axes; ``None``: all devices in 1-D),
      or an ``AbstractMesh`` for planning only.
    strategy: ``"auto"`` (cost-model search) or a baseline ``"dp"``, ``"fsdp"``,
      ``"tp"``, ``"replicate"``.
    static_argnums: positional arguments that are static (hashable, not traced).
    donate_argnums: positional arguments whose buffers may be reused for outputs.
    memory_budget: per-device bytes (int or ``"2GiB"``) the plan must fit: inputs,
      outputs and estimated activations. ``ShardingError`` if no plan fits.
    model_axes: mesh axis name(s) for tensor parallelism (default: the axes named
      ``"tensor"`` or ``"model"``; ``()``: none). All other axes are data axes
      (batch and FSDP). A name the mesh does not have raises ``ShardingError``.

  Returns:
    An :class:`AutoShardFunction` with ``.shardings``, ``.explain``, ``.lower``.

  >>> import jax, jax.numpy as jnp, lepton_jax as lj
  >>> f = lj.auto_shard(lambda w, x: jnp.tanh(x @ w).sum())
  >>> float(f(jnp.ones((4, 2)), jnp.ones((8, 4))))  # doctest: +SKIP
  15.2...
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"{_API}: strategy={strategy!r} is not one of {STRATEGIES}")
  static = _norm_argnums(static_argnums, "static_argnums")
  donate = _norm_argnums(donate_argnums, "donate_argnums")
  if set(static) & set(donate):
    raise ValueError(f"{_API}: arguments {sorted(set(static) & set(donate))} are both static and donated")
  budget = None if memory_budget is None else parse_bytes(memory_budget, name="memory_budget", api=_API)
  if budget is not None and strategy != "auto":
    raise ValueError(f"{_API}: memory_budget is only used by strategy='auto', got strategy={strategy!r}")
  if model_axes is not None:
    if isinstance(model_axes, str):
      model_axes = (model_axes,)
    if not isinstance(model_axes, (tuple, list)) or not all(isinstance(a, str) for a in model_axes):
      raise TypeError(f"{_API}: model_axes must be None, a mesh axis name or a tuple of names, got "
                      f"{model_axes!r}")
    model_axes = tuple(model_axes)
    if strategy in ("dp", "fsdp", "replicate") and model_axes:
      raise ValueError(f"{_API}: model_axes={model_axes} is only used by strategy='auto' or 'tp', "
                       f"got strategy={strategy!r}")
    if strategy == "tp" and not model_axes:
      raise ValueError(f"{_API}: strategy='tp' needs at least one model axis, got model_axes=()")
  if mesh is not None or fun is None or callable(fun):
    resolve_mesh(mesh, api=_API, model_axes=model_axes)  # validate now

  def wrap(f):
    if not callable(f):
      raise TypeError(f"{_API}: fun must be callable, got {type(f).__name__}")
    return AutoShardFunction(f, mesh, strategy, static, donate, budget, model_axes)

  if fun is None:
    return wrap
  if not callable(fun):
    if mesh is None and hasattr(fun, "axis_names"):  # auto_shard(mesh) used as decorator factory
      m = fun
      resolve_mesh(m, api=_API, model_axes=model_axes)
      return lambda f: AutoShardFunction(f, m, strategy, static, donate, budget, model_axes)
    raise TypeError(f"{_API}: fun must be callable, got {type(fun).__name__}")
  return wrap(fun)
