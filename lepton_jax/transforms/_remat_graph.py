"""Graph extraction for ``lj.remat_plan``: from a traced jaxpr to the planner's model.

Role: trace helpers (flat evaluation with ``jit`` inlined, naming values with
``checkpoint_name``), the candidate residuals plain ``jax.grad`` keeps (``_Graph``: JAX's own
partial evaluation says which; ``scan`` bodies per iteration), the segmentation helpers (cuts,
values crossing a cut), and the exact save-set model over every forward intermediate
(``_ClosureGraph``, solved by ``_remat_closure``). Bytes and FLOPs come from the shared analysis
layer (``lepton_jax.jaxpr``). No search and no application here.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lepton_jax import jaxpr as ljx
from lepton_jax.jaxpr import _compat
from lepton_jax.jaxpr._eval import bind_eqn
from lepton_jax.transforms import _remat_closure as closure_lib

_INLINE_PRIMS = ("pjit", "jit", "closed_call", "core_call")


# ------------------------------------------------------------------ jaxpr helpers


def _is_inexact(aval) -> bool:
  return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.inexact)


def _read(env, atom):
  if isinstance(atom, _compat.Literal):
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
      if isinstance(inner, _compat.ClosedJaxpr):
        outs = _inline_eval(inner.jaxpr, inner.consts, invals)
      else:
        outs = _inline_eval(inner, (), invals)
    else:
      outs = bind_eqn(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [_read(env, a) for a in jaxpr.outvars]


def name_value(x, name: str):
  """``checkpoint_name(x, name)`` for real floating values; other values (complex, integer) are
  returned unnamed (JAX's naming raises on complex values), so no policy saves them by name."""
  if jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return checkpoint_name(x, name)
  return x


def _eval_named(jaxpr, consts, args, names: dict):
  """Evaluates ``jaxpr`` tagging each var in ``names`` with ``checkpoint_name``."""
  env = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    outs = bind_eqn(eqn, [_read(env, a) for a in eqn.invars])
    for v, x in zip(eqn.outvars, outs):
      name = names.get(v)
      env[v] = name_value(x, name) if name is not None else x
  return [_read(env, a) for a in jaxpr.outvars]


def _saved_residuals(fun, *args):
  """JAX's saved-residual list ``[(aval, description)]`` (public only as ``print_saved_residuals``)."""
  return _compat.saved_residuals(fun, *args)


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
    stack.extend(a for a in eqn.invars if not isinstance(a, _compat.Literal))
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
      if not isinstance(a, _compat.Literal):
        last_use[a] = i
        uses.setdefault(a, []).append(i)
    for v in eqn.outvars:
      def_idx[v] = i
  for a in jaxpr.outvars:
    if not isinstance(a, _compat.Literal):
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
  nc, ncar = _compat.scan_counts(eqn.params)
  carry_bytes = sum(ljx.aval_bytes(v.aval) for v in bj.invars[nc:nc + ncar] if _is_inexact(v.aval))
  used = set()
  for e in bj.eqns:
    used.update(a for a in e.invars if not isinstance(a, _compat.Literal))
  used.update(a for a in bj.outvars if not isinstance(a, _compat.Literal))
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
    used.update(a for a in e.invars if not isinstance(a, _compat.Literal))
  used.update(a for a in jaxpr.outvars if not isinstance(a, _compat.Literal))
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
      a = [name_value(x, in_names[v]) if v in in_names else x for v, x in zip(jx.invars, a)]
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
                  if not isinstance(a, _compat.Literal) and (scan_i, a) in vid)
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
    nc, ncar = _compat.scan_counts(p)
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




# ------------------------------------------------------------------ repeated layers


def _layer_cuts(g: _Graph, min_layers: int = 2) -> tuple[tuple[int, ...], tuple[int, int]] | None:
  """Cuts at the boundaries of repeated layers of the top level, and the layers' range.

  A layer is the period ``p`` of the longest stretch of top-level equations that repeats itself
  (same primitive and output shapes as ``p`` equations later): unrolled ``for`` loops over
  blocks, Flax ``nnx.List`` / ``nn.Sequential`` layers. The phase of the cuts is where the
  fewest bytes cross (after a residual add). ``None`` when nothing repeats ``min_layers`` times.
  A ``scan`` is its own layer structure (its body per iteration) and is not looked for here.
  """
  jaxpr = g.closed.jaxpr
  n = g.n
  if n < 2 * min_layers:
    return None
  keys: dict = {}
  ids = np.array([keys.setdefault((e.primitive.name, tuple((tuple(v.aval.shape), str(v.aval.dtype))
                                                             for v in e.outvars if hasattr(v.aval, "shape"))),
                                  len(keys)) for e in jaxpr.eqns])
  best = None  # (covered, -p, start, p)
  for p in range(2, n // min_layers + 1):
    eq = (ids[:-p] == ids[p:]).astype(np.int8)
    if not eq.any():
      continue
    d = np.diff(np.concatenate([[0], eq, [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    k = int(np.argmax(ends - starts))
    run = int(ends[k] - starts[k])
    covered = (run + p) // p * p
    if covered // p < min_layers:
      continue
    cand = (covered, -p, int(starts[k]), p)
    if best is None or cand[:2] > best[:2]:
      best = cand
  if best is None:
    return None
  covered, _, start, p = best
  count = covered // p
  prof = _crossing_profile(g)

  def score(phase):
    cs = [start + phase + j * p for j in range(count + 1)]
    return sum(prof[c] if 0 < c < n else 0.0 for c in cs)
  # every repetition a whole layer first (a phase that pushes the last layer past the end loses
  # one), then the fewest bytes crossing the cuts
  phase = min(range(p), key=lambda f: (start + f + count * p > n, score(f), f))
  first = start + phase
  m = count if first + count * p <= n else count - 1
  if m < min_layers:
    return None
  bounds = [first + j * p for j in range(m + 1)]
  return tuple(c for c in bounds if 0 < c < n), (first, bounds[-1])
