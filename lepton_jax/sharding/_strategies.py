"""Choosing a placement: leaf roles, tensor-parallel dimensions, FSDP search.

The planner works on the logical dimensions from :mod:`._dims`:

* **batch** dimensions: the leading dimension of inputs that is never a
  non-leading dimension of any input and that a matmul/conv keeps as a free
  (row) dimension. Batch leaves are split along it over the data axes.
* **tensor-parallel** dimensions (only with a ``"tensor"``/``"model"`` axis):
  a dimension that one weight produces (column-parallel) and another weight
  contracts (row-parallel) -- the Megatron pair -- chosen greedily by
  all-reduce bytes per parameter byte split.
* every other leaf (parameters, optimizer state, ...) is grouped with the leaves
  that have the same shape and logical dimensions (a parameter and its Adam
  moments form one group) and each group picks one option -- replicate, or
  FSDP on some dimension over the largest dividing set of axes -- minimising
  ``memory + 0.5 * collective bytes`` (no budget), or, with ``memory_budget``,
  the collective bytes subject to the budget (an exact multiple-choice
  knapsack ILP solved with HiGHS through ``scipy.optimize.milp``).

Everything is ordered by leaf index / mesh order / class id, so the same inputs
give the same plan on every process.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lepton_jax._errors import ShardingError
from lepton_jax._utils import format_bytes
from lepton_jax.sharding import _cost_model as cm

__all__ = ["STRATEGIES", "PlanCore", "plan_placement"]

STRATEGIES = ("auto", "dp", "fsdp", "tp", "replicate")
_COMM_WEIGHT = 0.5


@dataclasses.dataclass
class PlanCore:
  in_specs: list
  in_reasons: list
  in_roles: list
  out_specs: list
  out_reasons: list
  out_roles: list
  class_axes: dict
  batch_classes: frozenset
  tp_desc: tuple
  search: str
  collectives: dict
  memory: dict
  role_basis: str = ""

  def score(self, comm_weight: float = _COMM_WEIGHT) -> float:
    """The cost model's figure of merit: estimated per-device bytes + w x collective bytes."""
    return self.memory["total"] + comm_weight * self.collectives["total"]


def _shape_batch_classes(an) -> frozenset:
  """Fallback (no data flow to go by): batch = a leading input dim that is never a non-leading
  dim of an input, that a matmul/conv keeps free, and that no weight-like first matmul contracts."""
  lead, nonlead = set(), set()
  for cl in an.in_classes:
    if cl:
      lead.add(cl[0])
      nonlead.update(cl[1:])
  # A weight's first (forward) matmul contracts its leading dim (x @ W: W's rows);
  # a batch leaf's first matmul keeps it (x's rows).
  contracted_first = set()
  seen = set()
  for d in an.dots:
    for r in d.lhs_roots + d.rhs_roots:
      if r not in seen:
        seen.add(r)
        cl = an.in_classes[r]
        if cl and cl[0] in d.contract:
          contracted_first.add(cl[0])
  return frozenset(c for c in lead - nonlead - contracted_first
                   if c in an.free_classes and an.class_size.get(c, 0) > 1)


def _state_leaves(an, in_info, out_info) -> set:
  """Input leaves that the function *updates*: an output (not a pass-through view) has the same
  shape and the same logical dimensions. In a train step ``(params, opt_state, x, y) ->
  (new_params, new_opt_state, loss)`` these are the parameters and optimizer moments (an
  optax update is elementwise in them); for ``jax.grad(loss)(params, x)`` the gradients match
  the parameters. Data never comes back with its own dimensions in such functions."""
  outs = {}
  for j, (path, shape, dtype, nb) in enumerate(out_info):
    outs.setdefault((tuple(shape), tuple(an.out_classes[j])), []).append(j)
  state = set()
  for i, (path, shape, dtype, nb) in enumerate(in_info):
    if shape and math.prod(shape) > 1 and (tuple(shape), tuple(an.in_classes[i])) in outs:
      state.add(i)
  return state


def find_roles(an, in_info, out_info) -> tuple:
  """``(roles, batch_classes, basis)``: roles from data flow, not shapes.

  1. *State* leaves (see :func:`_state_leaves`) are parameters / optimizer state.
  2. *Data seeds* are the other leaves: integer arrays (tokens, labels) and float arrays whose
     leading dimension a matmul/conv keeps free (inputs, regression targets).
  3. The batch classes are the seeds' leading logical dimensions (minus any that is a non-leading
     dimension of another seed, e.g. the positions of ``tokens[B, T]``); the union-find of
     :mod:`._dims` carries that label to every intermediate and output that has the dimension.
  4. Leaves that are neither are parameters too (frozen tables, constants): "dp" replicates them.

  When nothing is updated, or the non-updated leaves give no batch dimension (a forward-only
  ``f(w, x)``), the shape rule of :func:`_shape_batch_classes` decides instead.
  """
  state = _state_leaves(an, in_info, out_info)
  nonscalar = [i for i, x in enumerate(in_info) if x[1] and math.prod(x[1]) > 1]
  seeds = []
  for i in nonscalar:
    if i in state:
      continue
    cl = an.in_classes[i]
    kind = np.dtype(in_info[i][2]).kind
    if an.class_size.get(cl[0], 0) > 1 and (kind in "iub" or cl[0] in an.free_classes):
      seeds.append(i)
  nonlead = {c for i in seeds for c in an.in_classes[i][1:]}
  batch = frozenset(an.in_classes[i][0] for i in seeds) - nonlead
  state_dims = {c for i in state for c in an.in_classes[i]}
  batch = frozenset(c for c in batch if c not in state_dims)
  if state and batch:
    basis = (f"data flow: {len(state)} updated leaves are parameters/state, batch = leading dims "
             "of the other inputs")
  else:
    state = set()
    batch = _shape_batch_classes(an)
    basis = "shapes: no updated leaves give a batch dimension (forward-only function)"
  bsizes = {an.class_size[c] for c in batch}
  roles = []
  for i, ((path, shape, dtype, nb), cl) in enumerate(zip(in_info, an.in_classes)):
    if not shape or math.prod(shape) <= 1:
      roles.append("scalar")
    elif i in state:
      roles.append("param")
    elif cl[0] in batch:
      roles.append("batch")
    elif (np.dtype(dtype).kind in "iub" and shape[0] in bsizes
          and not any(c in an.free_classes for c in cl[1:])):
      roles.append("batch")  # integer labels / masks with the batch size up front
    else:
      roles.append("param")
  return roles, batch, basis


def _tp_candidates(an, mi, roles, batch_classes, nbytes, in_info, force: bool):
  """Greedy choice of the logical dims split over the tensor axes.

  A candidate is a logical dimension that the *first* matmul reading some weight
  produces (column-parallel) and that the first matmul reading another weight
  contracts (row-parallel). First uses are the forward pass; later uses of the
  same weight are its backward matmuls.
  """
  taxes = mi.tensor_axes
  if not taxes and force:
    taxes = (mi.names[-1],)
  if not taxes:
    return {}, (), taxes
  nt = mi.size(taxes)
  param_ids = [i for i, r in enumerate(roles) if r == "param"]
  col, row = set(), set()
  seen_roots = set()
  for d in an.dots:
    for roots, cls, other in ((d.lhs_roots, d.lhs_classes, d.rhs_classes),
                              (d.rhs_roots, d.rhs_classes, d.lhs_classes)):
      if roots and roles[roots[0]] == "param" and roots[0] not in seen_roots:
        seen_roots.add(roots[0])
        for c in cls:
          if c in d.contract:
            row.add(c)
          elif c not in other:
            col.add(c)
  cands = sorted(c for c in (col & row) if c not in batch_classes
                 and an.class_size.get(c, 0) % nt == 0 and an.class_size.get(c, 0) >= nt)
  scored = []
  for c in cands:
    comm = 0.0
    for d in an.dots:
      if c in d.contract:
        comm += 2 * d.out_bytes * (nt - 1) / nt * d.multiplier
    for r in an.reduces:
      if c in r.reduced:
        comm += 2 * r.out_bytes * (nt - 1) / nt * r.multiplier
    pbytes = sum(nbytes[i] for i in param_ids if c in an.in_classes[i])
    if pbytes:
      scored.append((comm / pbytes, c, comm))
  scored.sort()
  chosen = []
  for _, c, comm in scored:
    if any(c in an.in_classes[i] and any(o in an.in_classes[i] for o in chosen) for i in param_ids):
      continue
    chosen.append(c)
  class_axes = {c: taxes for c in chosen}
  desc = []
  for c in chosen:
    uses = [f"{in_info[i][0]} dim {an.in_classes[i].index(c)}" for i in param_ids
            if c in an.in_classes[i]][:3]
    desc.append(f"dimension of size {an.class_size[c]} over {taxes} (column/row matmul pair: "
                + ", ".join(uses) + ")")
  desc = tuple(desc)
  return class_axes, desc, taxes


def _options(shape, classes, mi, fsdp_axes, class_axes, allow_shard: bool):
  """Candidate specs for one parameter group, most-sharded first."""
  base, used = [], set()
  for c in classes:  # a mesh axis may split only one dim (a class can repeat: conv in/out channels)
    axes = tuple(class_axes.get(c, ()))
    if used & set(axes):
      axes = ()
    used |= set(axes)
    base.append(axes)
  tdims = [d for d, e in enumerate(base) if e]
  opts = []
  # TP dims must actually divide (they do: candidates are divisible by n_t).
  opts.append((tuple(base), "replicated over the data axes" if tdims else "replicated"))
  if not allow_shard or not fsdp_axes:
    return opts
  seen = {tuple(base)}
  order = sorted(range(len(shape)), key=lambda d: (bool(base[d]), -shape[d], d))
  for d in order:
    size = shape[d] // (mi.size(base[d]) if base[d] else 1)
    if base[d] and shape[d] % mi.size(base[d]):
      continue
    sub = mi.best_subset(tuple(a for a in fsdp_axes if a not in base[d]), size)
    if not sub:
      continue
    spec = list(base)
    spec[d] = tuple(base[d]) + tuple(sub)
    spec = tuple(spec)
    if spec in seen:
      continue
    seen.add(spec)
    opts.append((spec, f"FSDP on dim {d} (size {shape[d]}) over {sub}"))
  return opts


def _batch_spec(shape, mi, batch_axes):
  sub = mi.best_subset(tuple(batch_axes), shape[0]) if batch_axes else ()
  spec = [()] * len(shape)
  if sub:
    spec[0] = tuple(sub)
  return tuple(spec), sub


def _solve_budget(groups, fixed_mem: float, budget: int):
  """Exact multiple-choice knapsack (min comm s.t. memory <= budget) with HiGHS."""
  from scipy import optimize, sparse
  nvar = sum(len(g) for g in groups)
  c = np.zeros(nvar)
  mem = np.zeros(nvar)
  rows, cols = [], []
  k = 0
  for gi, g in enumerate(groups):
    for (m, comm) in g:
      c[k] = comm + 1e-6 * m
      mem[k] = m
      rows.append(gi)
      cols.append(k)
      k += 1
  eq = sparse.csr_matrix((np.ones(nvar), (rows, cols)), shape=(len(groups), nvar))
  cons = [optimize.LinearConstraint(eq, 1, 1),
          optimize.LinearConstraint(mem[None, :], -np.inf, budget - fixed_mem)]
  res = optimize.milp(c, constraints=cons, integrality=np.ones(nvar), bounds=optimize.Bounds(0, 1),
                      options={"time_limit": 5.0, "disp": False})
  if res.x is None:
    return None
  x = np.round(res.x).astype(int)
  choice, k = [], 0
  for g in groups:
    idx = [j for j in range(len(g)) if x[k + j] == 1]
    choice.append(idx[0] if idx else 0)
    k += len(g)
  return choice


def plan_placement(an, mi, in_info, out_info, strategy: str, budget, donated: set,
                   activation_bytes, api: str = "auto_shard", *, use_tp: bool = True,
                   comm_weight: float = _COMM_WEIGHT, roles_info=None) -> PlanCore:
  """Chooses specs for every input/output leaf. See the module docstring.

  ``use_tp=False`` / ``comm_weight`` give the other ``"auto"`` candidates (no tensor
  parallelism; memory-only when ``comm_weight=0``). ``roles_info``: a precomputed
  :func:`find_roles` result.
  """
  roles, batch_classes, basis = roles_info or find_roles(an, in_info, out_info)
  roles = list(roles)
  nbytes = [x[3] for x in in_info]
  class_axes: dict = {}
  tp_desc: tuple = ()
  if strategy in ("auto", "tp") and use_tp and (mi.tensor_axes or strategy == "tp"):
    class_axes, tp_desc, _ = _tp_candidates(an, mi, roles, batch_classes, nbytes, in_info, force=strategy == "tp")
  tp_axes = tuple(sorted({a for v in class_axes.values() for a in v}, key=mi.names.index))
  if strategy == "replicate":
    batch_axes = ()
  elif tp_axes:
    batch_axes = tuple(a for a in mi.names if a not in tp_axes)
  else:
    batch_axes = mi.names
  for c in sorted(batch_classes):
    sub = mi.best_subset(batch_axes, an.class_size[c]) if batch_axes else ()
    if sub:
      class_axes[c] = sub

  in_specs = [None] * len(in_info)
  reasons = [""] * len(in_info)
  for i, ((path, shape, dtype, nb), role) in enumerate(zip(in_info, roles)):
    if role == "scalar":
      in_specs[i] = tuple(() for _ in shape)
      reasons[i] = "replicated: scalar / single element (too small to split)"
    elif role == "batch":
      spec, sub = _batch_spec(shape, mi, batch_axes)
      in_specs[i] = spec
      if strategy == "replicate":
        reasons[i] = "replicated: strategy='replicate'"
      elif sub:
        reasons[i] = f"batch: dim 0 (size {shape[0]}) over {sub}"
      else:
        if strategy == "dp" and mi.size(tuple(batch_axes)) > 1:
          raise ShardingError(
              f"{api}: input {path} has batch dimension {shape[0]}, which is not divisible by any of "
              f"the data axes {dict(zip(batch_axes, [mi.size((a,)) for a in batch_axes]))}; with "
              "strategy='dp' every batch leaf must be split. Use a batch size divisible by the data "
              "axes or strategy='auto'.")
        reasons[i] = (f"replicated: batch dim {shape[0]} not divisible by any of the data axes "
                      f"{batch_axes}")

  # Parameter groups: same shape + same logical dims (a param and its optimizer moments).
  groups: dict = {}
  for i, role in enumerate(roles):
    if role == "param":
      key = (tuple(in_info[i][1]), tuple(an.in_classes[i]))
      groups.setdefault(key, []).append(i)
  gkeys = sorted(groups, key=lambda k: groups[k][0])
  out_groups = {}
  for j, (path, shape, dtype, nb) in enumerate(out_info):
    key = (tuple(shape), tuple(an.out_classes[j]))
    if an.out_alias[j] is None and key in groups:
      out_groups.setdefault(key, []).append(j)

  group_opts = []
  dot_index = cm.DotIndex(an, batch_classes)
  for key in gkeys:
    shape, classes = key
    if strategy in ("auto", "fsdp"):
      fsdp_axes = tuple(a for a in mi.names if not any(a in class_axes.get(c, ()) for c in classes))
      if strategy == "fsdp":
        fsdp_axes = mi.names
    else:
      fsdp_axes = ()
    base_axes = class_axes if strategy in ("auto", "tp") else {}
    opts = _options(shape, classes, mi, fsdp_axes,
                    {c: v for c, v in base_axes.items() if c not in batch_classes},
                    allow_shard=strategy in ("auto", "fsdp"))
    members = groups[key]
    gb = sum(nbytes[i] for i in members)
    outs_b = sum(out_info[j][3] for j in out_groups.get(key, ()))
    scored = []
    for spec, why in opts:
      f = cm.leaf_shard_factor(spec, mi)
      mem = (gb + outs_b) / f
      comm = cm.param_option_comm(members, spec, classes, dict(enumerate(nbytes)), an,
                                  class_axes, batch_classes, mi, dot_index)
      scored.append((mem, comm, spec, why))
    group_opts.append(scored)

  # Memory of everything that is not a parameter group (fixed by the choices above).
  fixed = 0.0
  for i, spec in enumerate(in_specs):
    if spec is not None:
      fixed += nbytes[i] / cm.leaf_shard_factor(spec, mi)
  act = 0.0
  if activation_bytes:
    bshard = max([mi.size(class_axes[c]) for c in batch_classes if c in class_axes] or [1])
    act = activation_bytes / bshard
  fixed += act

  search = f"per-group argmin of memory + {comm_weight:g} x collective bytes"
  if strategy != "auto":
    search = f"named baseline '{strategy}'"
    choice = [0 if strategy in ("dp", "replicate", "tp") or len(s) == 1 else
              min(range(len(s)), key=lambda k: (s[k][0], k)) for s in group_opts]
  elif budget is None:
    choice = [min(range(len(s)), key=lambda k: (s[k][0] + comm_weight * s[k][1], k))
              for s in group_opts]
  else:
    min_mem = fixed + sum(min(o[0] for o in s) for s in group_opts)
    if min_mem > budget:
      worst = None
      for key, s in zip(gkeys, group_opts):
        m = min(o[0] for o in s)
        if m > budget and (worst is None or m > worst[1]):
          worst = (key, m)
      if worst is not None:
        path = in_info[groups[worst[0]][0]][0]
        raise ShardingError(
            f"{api}: memory_budget={format_bytes(budget)} per device is impossible: leaf {path} "
            f"(shape {worst[0][0]}) alone needs at least {format_bytes(worst[1])} per device on mesh "
            f"{dict(zip(mi.names, mi.sizes))}. The smallest feasible budget is "
            f"{format_bytes(min_mem)} ({int(math.ceil(min_mem))} bytes); raise memory_budget or use "
            "a larger mesh.")
      raise ShardingError(
          f"{api}: memory_budget={format_bytes(budget)} per device is impossible on mesh "
          f"{dict(zip(mi.names, mi.sizes))}: the most-sharded plan needs {format_bytes(min_mem)} "
          f"({int(math.ceil(min_mem))} bytes) per device (inputs, outputs and ~{format_bytes(act)} "
          "of activations). Raise memory_budget to at least that or use a larger mesh.")
    choice = _solve_budget([[(o[0], o[1]) for o in s] for s in group_opts], fixed, budget)
    search = "ILP (HiGHS) min collective bytes s.t. memory_budget"
    if choice is None:  # fall back to the most-sharded plan, which fits
      choice = [min(range(len(s)), key=lambda k: (s[k][0], k)) for s in group_opts]
      search = "most-sharded plan (ILP gave no solution in time)"

  group_spec = {}
  for key, s, k in zip(gkeys, group_opts, choice):
    mem, comm, spec, why = s[k]
    if not any(spec):
      shape = key[0]
      if strategy in ("dp", "replicate", "tp"):
        why = f"replicated: strategy='{strategy}'"
      elif len(s) == 1:
        why = (f"replicated: no dimension of shape {shape} is divisible by any of the axes "
               f"{mi.names} (sizes {mi.sizes})")
      else:
        why = "replicated: cheaper in the cost model (collective bytes outweigh the memory saved)"
    elif strategy == "auto" and len(s) > 1:
      why = f"param: {why}" + (" + tensor parallel" if any(c in class_axes for c in key[1]) else "")
    group_spec[key] = (spec, why)
    for i in groups[key]:
      in_specs[i] = spec
      reasons[i] = why

  # Outputs.
  out_specs, out_reasons, out_roles = [], [], []
  for j, (path, shape, dtype, nb) in enumerate(out_info):
    cl = an.out_classes[j]
    key = (tuple(shape), tuple(cl))
    alias = an.out_alias[j]
    if alias is not None:
      out_specs.append(in_specs[alias]); out_reasons.append(f"same as input {in_info[alias][0]}")
      out_roles.append(roles[alias])
    elif key in group_spec:
      out_specs.append(group_spec[key][0]); out_reasons.append("same as the matching input group")
      out_roles.append("param")
    elif not shape or math.prod(shape) <= 1:
      out_specs.append(tuple(() for _ in shape)); out_reasons.append("replicated: scalar")
      out_roles.append("scalar")
    elif cl and cl[0] in batch_classes and strategy != "replicate":
      spec, sub = _batch_spec(shape, mi, batch_axes)
      out_specs.append(spec)
      out_reasons.append(f"batch: dim 0 over {sub}" if sub else "replicated: batch dim not divisible")
      out_roles.append("batch")
    elif strategy in ("auto", "fsdp"):
      base = {c: v for c, v in class_axes.items() if c not in batch_classes}
      opts = _options(shape, cl, mi, mi.names, base, allow_shard=True)
      spec, why = opts[1] if len(opts) > 1 else opts[0]
      out_specs.append(spec); out_reasons.append(why if any(spec) else "replicated: not divisible")
      out_roles.append("output")
    else:
      out_specs.append(tuple(() for _ in shape))
      out_reasons.append(f"replicated: strategy='{strategy}'"); out_roles.append("output")

  coll = cm.estimate_collectives(an, mi, class_axes, batch_classes, in_specs, roles, nbytes)
  in_dev = sum(cm.per_device_bytes(nbytes[i], in_specs[i], mi) for i in range(len(in_info)))
  aliased = {a for a in an.out_alias if a is not None}
  out_dev = sum(cm.per_device_bytes(out_info[j][3], out_specs[j], mi) for j in range(len(out_info))
                if an.out_alias[j] is None)
  don = sum(cm.per_device_bytes(nbytes[k], in_specs[k], mi) for k in donated if k not in aliased)
  out_dev = max(0, out_dev - don)
  memory = {"activation": act, "inputs": in_dev, "outputs": out_dev, "total": in_dev + out_dev + act}
  return PlanCore(in_specs, reasons, roles, out_specs, out_reasons, out_roles, class_axes,
                  batch_classes, tp_desc, search, coll, memory, basis)
