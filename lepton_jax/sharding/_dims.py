"""Logical-dimension analysis of a traced function.

Every array dimension of every jaxpr variable gets a node in a union-find; an
equation unifies the dimensions that must carry the same sharding for the
computation to stay local (elementwise operands, the matching dims of a
``dot_general``, a ``transpose``'s permutation, ...). The resulting classes are
"logical axes" (batch, model width, hidden width, vocabulary, ...). The planner
decides shardings per class and per input leaf; the cost model reads the
``dot_general``/reduction records collected here.

Built on :func:`lepton_jax.jaxpr.walk` / :func:`lepton_jax.jaxpr.sub_jaxprs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lepton_jax import jaxpr as ljx
from lepton_jax.jaxpr import _compat
from lepton_jax.jaxpr._registry import primitive_info

__all__ = ["DimAnalysis", "DotRecord", "Intermediate", "ReduceRecord", "analyze_dims"]



def _is_reduce(name: str) -> bool:
  """An ``axes``-reduction (the registry's reduction class, not the generic ``reduce``)."""
  return primitive_info(name).kind == "reduction" and name not in ("reduce", "reduce_and_")


@dataclasses.dataclass(frozen=True)
class DotRecord:
  """One ``dot_general`` / ``conv_general_dilated``: classes and sizes."""
  eqn_id: str
  multiplier: int
  contract: tuple            # classes contracted (present in both operands, absent in output)
  lhs_classes: tuple
  rhs_classes: tuple
  out_classes: tuple
  out_bytes: int
  lhs_roots: tuple           # input-leaf indices the lhs is a (view of), or ()
  rhs_roots: tuple
  root_frac: tuple = ()      # per entry of lhs_roots + rhs_roots: the fraction of the leaf read
  # (1 for a view of the whole leaf; 1/L for one layer's slice of a [L, ...] leaf that a scan
  # over L steps passes as ``xs``)

  def fracs(self) -> tuple:
    roots = self.lhs_roots + self.rhs_roots
    return self.root_frac if len(self.root_frac) == len(roots) else (1.0,) * len(roots)


@dataclasses.dataclass(frozen=True)
class ReduceRecord:
  eqn_id: str
  multiplier: int
  reduced: tuple
  out_bytes: int


class _UF:
  """Deterministic union-find: the representative is the smallest node index."""

  def __init__(self):
    self.parent: list[int] = []

  def make(self) -> int:
    self.parent.append(len(self.parent))
    return len(self.parent) - 1

  def find(self, a: int) -> int:
    p = self.parent
    root = a
    while p[root] != root:
      root = p[root]
    while p[a] != root:
      p[a], a = root, p[a]
    return root

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      lo, hi = (ra, rb) if ra < rb else (rb, ra)
      self.parent[hi] = lo


@dataclasses.dataclass
class DimAnalysis:
  """Result of :func:`analyze_dims` (internal, not part of the public API)."""
  in_classes: list            # per input leaf: tuple of class ids per dim
  out_classes: list           # per output leaf
  out_alias: list             # per output leaf: input-leaf index it is a view of, or None
  class_size: dict            # class -> dimension size
  dots: list                  # DotRecord
  reduces: list               # ReduceRecord
  free_classes: frozenset     # classes that are a free or batch dim of some dot / conv batch
  weight_uses: dict           # input-leaf index -> number of dot/conv operands that are views of it
  intermediates: list = dataclasses.field(default_factory=list)
  # ``Intermediate`` per top-level equation result (candidates for activation sharding constraints)


@dataclasses.dataclass(frozen=True)
class Intermediate:
  """A result of a top-level equation: where it is (equation index, output position), its classes."""
  eqn_index: int
  out_index: int
  shape: tuple
  nbytes: int
  classes: tuple
  primitive: str


def _is_var(x) -> bool:
  return _compat.is_var(x)


def _shape(x) -> tuple:
  return tuple(getattr(getattr(x, "aval", None), "shape", ()) or ())


class _Builder:

  def __init__(self):
    self.uf = _UF()
    self.nodes: dict = {}   # Var -> list of node ids (one per dim)
    self.sizes: list = []
    self.root_of: dict = {}  # Var -> input leaf index (for plain views of inputs)
    self.root_frac: dict = {}  # Var -> fraction of that leaf it holds (scan slices of stacked leaves)

  def share_root(self, src, dst, scale: float = 1.0) -> None:
    if _is_var(src) and src in self.root_of and _is_var(dst):
      self.root_of[dst] = self.root_of[src]
      self.root_frac[dst] = self.root_frac.get(src, 1.0) * scale

  def dims(self, v) -> list:
    if not _is_var(v):
      return []
    got = self.nodes.get(v)
    if got is None:
      shp = _shape(v)
      got = []
      for s in shp:
        got.append(self.uf.make())
        self.sizes.append(int(s) if isinstance(s, int) else -1)
      self.nodes[v] = got
    return got

  def unify(self, a, i, b, j) -> None:
    da, db = self.dims(a), self.dims(b)
    if i < len(da) and j < len(db) and self.sizes[da[i]] == self.sizes[db[j]]:
      self.uf.union(da[i], db[j])

  def unify_all(self, a, b) -> None:
    if _is_var(a) and _is_var(b) and _shape(a) == _shape(b):
      for i in range(len(_shape(a))):
        self.unify(a, i, b, i)

  def cls(self, v) -> tuple:
    return tuple(self.uf.find(n) for n in self.dims(v))


def _bind_sub(b: _Builder, eqn, sub) -> None:
  """Unifies a nested jaxpr's inputs/outputs with the equation's operands/results."""
  inner = sub.closed_jaxpr.jaxpr
  name = eqn.primitive.name
  ins, outs = list(eqn.invars), list(eqn.outvars)
  if name == "scan":
    nc, nk = _compat.scan_counts(eqn.params)
    for k, (o, iv) in enumerate(zip(ins, inner.invars)):
      if k < nc + nk:
        b.unify_all(o, iv)
        if k < nc:
          b.share_root(o, iv)
      else:  # xs: outer has a leading scan axis; the body reads one slice of it per step
        for d in range(len(_shape(iv))):
          b.unify(o, d + 1, iv, d)
        length = _shape(o)[0] if _shape(o) else 1
        b.share_root(o, iv, 1.0 / max(1, int(length)))
    for k, (o, ov) in enumerate(zip(outs, inner.outvars)):
      if k < nk:
        b.unify_all(o, ov)
      else:
        for d in range(len(_shape(ov))):
          b.unify(o, d + 1, ov, d)
    return
  if name == "while":
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    if sub.name == "body_jaxpr":
      pairs = list(zip(ins[cn:cn + bn], inner.invars[:bn])) + list(zip(ins[cn + bn:], inner.invars[bn:]))
      for o, ov in zip(outs, inner.outvars):
        b.unify_all(o, ov)
      for o, ov in zip(ins[cn + bn:], inner.outvars):
        b.unify_all(o, ov)
    else:
      pairs = list(zip(ins[:cn], inner.invars[:cn])) + list(zip(ins[cn + bn:], inner.invars[cn:]))
    for o, iv in pairs:
      b.unify_all(o, iv)
    return
  if name == "cond":
    ins = ins[1:]
  if len(ins) == len(inner.invars):
    for o, iv in zip(ins, inner.invars):
      b.unify_all(o, iv)
      if _shape(o) == _shape(iv):
        b.share_root(o, iv)
  if len(outs) == len(inner.outvars):
    for o, ov in zip(outs, inner.outvars):
      b.unify_all(o, ov)
      b.share_root(ov, o)


def _unify_eqn(b: _Builder, eqn) -> None:
  name = eqn.primitive.name
  p = eqn.params
  ins = [v for v in eqn.invars]
  outs = [v for v in eqn.outvars if _is_var(v)]
  if not outs:
    return
  out = outs[0]
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    lhs, rhs = ins
    for i, j in zip(lc, rc):
      b.unify(lhs, i, rhs, j)
    for i, j in zip(lb, rb):
      b.unify(lhs, i, rhs, j)
    nl, nr = len(_shape(lhs)), len(_shape(rhs))
    lf = [d for d in range(nl) if d not in lc and d not in lb]
    rf = [d for d in range(nr) if d not in rc and d not in rb]
    k = 0
    for d in lb:
      b.unify(lhs, d, out, k); k += 1
    for d in lf:
      b.unify(lhs, d, out, k); k += 1
    for d in rf:
      b.unify(rhs, d, out, k); k += 1
    return
  if name == "conv_general_dilated":
    lhs, rhs = ins
    dn = p["dimension_numbers"]
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    b.unify(lhs, lspec[0], out, ospec[0])
    b.unify(rhs, rspec[0], out, ospec[1])
    if p.get("feature_group_count", 1) == 1 and p.get("batch_group_count", 1) == 1:
      b.unify(lhs, lspec[1], rhs, rspec[1])
    return
  if name == "transpose":
    perm = p["permutation"]
    for i, d in enumerate(perm):
      b.unify(ins[0], d, out, i)
    return
  if name == "broadcast_in_dim":
    for i, d in enumerate(p["broadcast_dimensions"]):
      b.unify(ins[0], i, out, d)
    return
  if name == "reshape":
    si, so = _shape(ins[0]), _shape(out)
    i = 0
    while i < min(len(si), len(so)) and si[i] == so[i]:
      b.unify(ins[0], i, out, i); i += 1
    j = 1
    while j <= min(len(si), len(so)) - i and si[-j] == so[-j]:
      b.unify(ins[0], len(si) - j, out, len(so) - j); j += 1
    return
  if name == "squeeze":
    dims = set(d % max(1, len(_shape(ins[0]))) for d in p["dimensions"])
    kept = [d for d in range(len(_shape(ins[0]))) if d not in dims]
    for k, d in enumerate(kept):
      b.unify(ins[0], d, out, k)
    return
  if _is_reduce(name):
    axes = set(p.get("axes", ()))
    kept = [d for d in range(len(_shape(ins[0]))) if d not in axes]
    for k, d in enumerate(kept):
      b.unify(ins[0], d, out, k)
    return
  if name == "gather":
    dn = p["dimension_numbers"]
    operand, idx = ins[0], ins[1]
    ss = p["slice_sizes"]
    collapsed = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()) or ())
    win = [d for d in range(len(_shape(operand))) if d not in collapsed]
    for od, d in zip(dn.offset_dims, win):
      if ss[d] == _shape(operand)[d]:
        b.unify(operand, d, out, od)
    batch_out = [d for d in range(len(_shape(out))) if d not in dn.offset_dims]
    idx_dims = list(range(len(_shape(idx)) - 1))
    for od, idim in zip(batch_out, idx_dims):
      b.unify(idx, idim, out, od)
    return
  if name in ("scatter-add", "scatter_add", "scatter", "scatter-mul", "scatter_mul", "scatter_min",
              "scatter_max", "scatter-min", "scatter-max"):
    b.unify_all(ins[0], out)
    return
  if name == "concatenate":
    ax = p["dimension"]
    for v in ins:
      for d in range(len(_shape(out))):
        if d != ax:
          b.unify(v, d, out, d)
    return
  if name == "pad":
    for d, (lo, hi, it) in enumerate(p["padding_config"]):
      if lo == 0 and hi == 0 and it == 0:
        b.unify(ins[0], d, out, d)
    return
  if name == "split":
    ax = p["axis"]
    for o in outs:
      for d in range(len(_shape(o))):
        if d != ax:
          b.unify(ins[0], d, o, d)
    return
  if ljx.sub_jaxprs(eqn):
    return  # bound in _bind_sub
  # Generic: elementwise-like. Operands of the output's rank unify positionally
  # where the sizes agree (this covers n-ary elementwise ops, select_n, cumsum,
  # sort, slices of unchanged dims, reduce_window's batch/channel dims, ...).
  rank = len(_shape(out))
  for o in outs:
    if len(_shape(o)) != rank:
      continue
    for v in ins:
      if _is_var(v) and len(_shape(v)) == rank:
        for d in range(rank):
          b.unify(v, d, o, d)


def analyze_dims(closed_jaxpr) -> DimAnalysis:
  """Union-find over the dimensions of every variable in ``closed_jaxpr``."""
  b = _Builder()
  jaxpr = closed_jaxpr.jaxpr
  for k, v in enumerate(jaxpr.invars):
    b.dims(v)
    b.root_of[v] = k
  refs = list(ljx.walk(closed_jaxpr))
  for ref in refs:
    eqn = ref.eqn
    _unify_eqn(b, eqn)
    for sub in ljx.sub_jaxprs(eqn):
      _bind_sub(b, eqn, sub)
    name = eqn.primitive.name
    if primitive_info(name).view and eqn.invars and _is_var(eqn.invars[0]) and eqn.invars[0] in b.root_of:
      for o in eqn.outvars:
        b.share_root(eqn.invars[0], o)
  # Second pass: records (after all unifications, so class ids are final).
  dots, reduces = [], []
  free = set()
  weight_uses: dict = {}
  for ref in refs:
    eqn = ref.eqn
    name = eqn.primitive.name
    outs = [v for v in eqn.outvars if _is_var(v)]
    if name in ("dot_general", "conv_general_dilated") and outs:
      lhs, rhs = eqn.invars
      lcl, rcl, ocl = b.cls(lhs), b.cls(rhs), b.cls(outs[0])
      if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        for d in range(len(lcl)):
          if d not in lc:
            free.add(lcl[d])
        for d in range(len(rcl)):
          if d not in rc:
            free.add(rcl[d])
        contract = tuple(sorted({lcl[d] for d in lc} - set(ocl)))
      else:
        dn = eqn.params["dimension_numbers"]
        free.add(lcl[dn.lhs_spec[0]])
        contract = tuple(sorted(({lcl[dn.lhs_spec[1]]} & {rcl[dn.rhs_spec[1]]}) - set(ocl)))
      lr = (b.root_of[lhs],) if _is_var(lhs) and lhs in b.root_of else ()
      rr = (b.root_of[rhs],) if _is_var(rhs) and rhs in b.root_of else ()
      fr = tuple(b.root_frac.get(v, 1.0) for v, r in ((lhs, lr), (rhs, rr)) if r)
      for r in lr + rr:
        weight_uses[r] = weight_uses.get(r, 0) + ref.multiplier
      dots.append(DotRecord(ref.id, ref.multiplier, contract, lcl, rcl, ocl,
                            ljx.aval_bytes(outs[0]), lr, rr, fr))
    elif _is_reduce(name) and outs and name not in ("argmax", "argmin"):
      icl = b.cls(eqn.invars[0])
      axes = eqn.params.get("axes", ())
      reduces.append(ReduceRecord(ref.id, ref.multiplier, tuple(sorted({icl[a] for a in axes})),
                                  ljx.aval_bytes(outs[0])))
  class_size = {}
  for n in range(len(b.sizes)):
    class_size.setdefault(b.uf.find(n), b.sizes[n])
  in_classes = [b.cls(v) for v in jaxpr.invars]
  out_classes, out_alias = [], []
  for v in jaxpr.outvars:
    out_classes.append(b.cls(v) if _is_var(v) else tuple())
    out_alias.append(b.root_of.get(v) if _is_var(v) and v in jaxpr.invars else None)
  inter = []
  for k, eqn in enumerate(jaxpr.eqns):
    for j, o in enumerate(eqn.outvars):
      if _is_var(o) and _shape(o):
        inter.append(Intermediate(k, j, _shape(o), int(ljx.aval_bytes(o)), b.cls(o), eqn.primitive.name))
  return DimAnalysis(in_classes, out_classes, out_alias, class_size, dots, reduces,
                     frozenset(free), weight_uses, inter)
