"""Joint forward + backward routing: hotspots inside a gradient program.

Role: when ``adaptive_jit`` traces ``jax.value_and_grad(loss)`` (or ``jax.grad``, ``nnx.grad``,
an optax step), each hotspot's forward sits in the program next to its backward (JAX's VJP of
the softmax attention, of a layer/RMS norm, of a softmax cross-entropy, of ``act(x @ w + b)``),
and the forward's intermediates -- attention probabilities, normalised activations, log-softmax
values, pre-activations -- are residuals read by the backward. Routing only the forward would
keep them alive (and compute them twice), so this pass replaces *both*: the forward by the
kernel's forward, and the backward by the kernel's own backward (``jax.vjp`` of the kernel),
which saves only what the kernel saves (flash attention: the output and the log-sum-exp; the
norms: mean and reciprocal std; cross-entropy: the log-sum-exp).

The hotspot-specific part is a *forward match* (:class:`JointForward`: the equations of the
forward, the root whose value the kernel computes, the inputs and the replacement), found by the
attention matcher of ``_route_kernels`` (uses restricted to the ancestors of ``P.V``) or by the
exact templates of ``_templates``. The rest is generic, on one jaxpr level (the driver applies
it to every nested level):

1. *Residuals*: forward values (other than the root) read outside the forward. A forward
   without residuals is a plain forward match (routed by the forward pass).
2. *Cotangent*: ``dO``, a value of the root's type, outside the forward, read (directly or
   through a few broadcasts / converts / reshapes) next to a residual; it may be a constant (the
   cotangent of a ``mean`` loss, folded). Candidates are tried earliest first.
3. *Backward region*: every later equation that reads a residual, ``dO`` or a value of the
   region, and otherwise only the forward's inputs, constants and literals. Every use of a
   residual must be in the region, or nothing is done.
4. *Identification and check*: on random inputs at the real shapes (a constant ``dO`` keeps its
   value), each differentiated input's kernel cotangent must equal a region value of the same
   type -- or the sum of up to three region values that the program accumulates together
   (JAX adds a cotangent's contributions one by one, interleaved with other uses of the input:
   the first gets the kernel's cotangent, the others zeros) -- on two independent draws.
   The region shrinks to what computes them; an input whose cotangent is found nowhere is taken
   as not differentiated, which the next check confirms: every other use of a residual or of a
   kept intermediate rejects the route (a cotangent computed elsewhere would read them).
   Anything that does not match exactly (within float tolerance) is left untouched.
5. *Compiled judge* (template hotspots): the original forward + backward and the kernel's are
   compiled on their own for the default backend; the route is kept only if XLA's temp bytes
   and FLOPs do not grow and one of them drops (a ``route_check`` record says why otherwise).
   ``adaptive_jit``'s pipeline then judges the whole program again.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._compiled import figures_of, measure_options
from lepton_jax.jaxpr._defuse import OUTPUT, DefUse
from lepton_jax.jaxpr._driver import Rewrite, known_consts, location
from lepton_jax.jaxpr._eval import eval_jaxpr, retrace

__all__ = ["JointForward", "route_joint_level", "attention_forwards", "random_inputs",
           "identified_region", "joint_replacements",
           "MAX_JOINT_ELEMENTS", "_clear_caches"]

#: Largest value (elements) of a joint region that is checked numerically; bigger regions are
#: not routed jointly (the check is what makes the replacement exact).
MAX_JOINT_ELEMENTS = 1 << 25
#: A cotangent may be split into at most this many accumulated region values.
_MAX_SPLIT = 3
_CHAIN_OPS = frozenset({"broadcast_in_dim", "convert_element_type", "reshape", "squeeze",
                        "expand_dims", "transpose", "neg", "mul", "div", "copy", "copy_p"})

# Numeric identifications and compiled verdicts keyed by the joint candidate's structure and
# shapes (identical layers are checked and compiled once): explicit, clearable caches (see
# _clear_caches).
_IDENT_CACHE: dict = {}
_JUDGE_CACHE: dict = {}


def _clear_caches() -> None:
  """Forgets cached joint identifications and compiled verdicts."""
  _IDENT_CACHE.clear()
  _JUDGE_CACHE.clear()


@dataclasses.dataclass
class JointForward:
  """One hotspot forward found in a gradient program.

  Attributes:
    pattern: the record's pattern (``"attention_fwd_bwd"``, ``"layer_norm_fwd_bwd"``, ...).
    root: eqn index whose (single) output the kernel computes.
    eqns: forward eqn indices replaced (root included).
    pre: eqns that belong to the forward for the check but are not removed.
    inputs: program atoms (or None) passed to ``repl`` in order.
    repl: ``repl(*inputs) -> root value`` (the kernel).
    judge: compare the compiled original and kernel regions before keeping the route.
    key: hashable description of the replacement (kernel, backend, options); with it, identical
      candidates share one numeric identification and one compiled verdict. None: no sharing.
  """
  pattern: str
  root: int
  eqns: set
  inputs: list
  repl: Callable
  pre: set = dataclasses.field(default_factory=set)
  judge: bool = False
  key: Any = None
  match: Any = None   # the attention matcher's description (attention forwards only)


@dataclasses.dataclass
class _Joint:
  fwd_match: JointForward
  fwd: set                   # forward eqn indices (matched + pre eqns)
  bwd: list                  # backward region eqn indices, program order
  do: Any                    # cotangent var of the forward output
  do_const: bool = False     # dO is a constant (its value is used in the check)
  outputs: list = dataclasses.field(default_factory=list)   # per target: region vars summed
  combos: list = dataclasses.field(default_factory=list)    # per target: kernel cotangents summed


def _ancestors(jaxpr, prod, idx: int, memo: dict) -> frozenset:
  if idx in memo:
    return memo[idx]
  out, stack = set(), [idx]
  while stack:
    i = stack.pop()
    for a in jaxpr.eqns[i].invars:
      j = prod.get(a) if isinstance(a, core.Var) else None
      if j is not None and j not in out:
        out.add(j)
        stack.append(j)
  memo[idx] = frozenset(out)
  return memo[idx]


def _find_forward(jaxpr, du: DefUse, known, match_fn, no_match) -> list:
  """Attention forwards whose intermediates are also read after the ``P.V`` product."""
  prod = du.producers
  memo: dict = {}
  found, taken = [], set()
  for d2, e2 in enumerate(jaxpr.eqns):
    if e2.primitive.name != "dot_general" or d2 in taken:
      continue
    anc = _ancestors(jaxpr, prod, d2, memo)
    keep = anc | {d2}
    uses = {v: [u for u in us if u in keep] for v, us in du.uses.items()}
    for d1 in sorted(anc):
      if jaxpr.eqns[d1].primitive.name != "dot_general" or d1 in taken:
        continue
      try:
        m = match_fn(jaxpr, uses, prod, d1, known)
      except no_match:
        continue
      if m.d2 != d2:
        continue
      fwd = set(m.eqns)
      inner = [v for i in fwd - {d2} for v in jaxpr.eqns[i].outvars]
      if any(u not in fwd for v in inner for u in du.users(v)):
        found.append(m)
        taken |= fwd
      break
  return found


def attention_forwards(closed, du: DefUse, *, match_fn, no_match, replacement_fn,
                       kernels: str) -> list[JointForward]:
  """The attention forwards of a gradient program as :class:`JointForward` s."""
  out = []
  for m in _find_forward(closed.jaxpr, du, known_consts(closed), match_fn, no_match):
    key = ("attention", m.q_perm, m.k_perm, m.v_perm, m.out_perm, m.bias_perm, m.mask_perm,
           m.bias_split, m.mask_split, m.mask2_perm, m.mask2_split, m.bias_shape, m.scale,
           m.head_b, m.groups, kernels, id(replacement_fn))
    out.append(JointForward("attention_fwd_bwd", m.d2, set(m.eqns),
                            [m.q, m.k, m.v, m.bias, m.mask, m.mask2], replacement_fn(m, kernels),
                            pre=set(m.pre_eqns), key=key, match=m))
  return out


def _consts_of(jaxpr) -> set:
  """Constvars and values computed from constants only (broadcast literals, iota, ...)."""
  consts = set(jaxpr.constvars)
  for e in jaxpr.eqns:
    if not e.effects and all(not isinstance(a, core.Var) or a in consts for a in e.invars):
      consts.update(v for v in e.outvars if core.is_var(v))
  return consts


def _same_type(a, b) -> bool:
  return tuple(a.aval.shape) == tuple(b.aval.shape) and a.aval.dtype == b.aval.dtype


def _folded_cotangents(c, root) -> list:
  """Possible values of a constant cotangent that constant folding only left broadcast (and
  perhaps negated) along trailing dims, as in ``mean(-sum(onehot * log_softmax))``: the array
  ``c`` constant along the dims after the root's, in both signs. The identification checks them."""
  rs, cs = tuple(root.aval.shape), tuple(c.shape)
  if len(cs) <= len(rs) or cs[:len(rs)] != rs or not np.issubdtype(c.dtype, np.floating):
    return []
  flat = c.reshape(rs + (-1,))
  if not np.all(flat == flat[..., :1]):
    return []
  v = flat[..., 0].astype(root.aval.dtype)
  aval = core.ShapedArray(rs, root.aval.dtype)
  return [core.Literal(v, aval), core.Literal(-v, aval)]


def _cotangent_candidates(jaxpr, du: DefUse, jf: JointForward, fwd, resid, allowed, consts,
                          known=None, closed=None):
  """Values of the root's type that the backward combines with the residuals (see module doc),
  earliest first; then values recovered from folded constant cotangents (Literals)."""
  root = jaxpr.eqns[jf.root].outvars[0]
  inputs = {a for a in jf.inputs if isinstance(a, core.Var)}
  fwd_out = {v for i in fwd for v in jaxpr.eqns[i].outvars}
  cands: dict = {}

  def consider(a, depth):
    # The cotangent may be computed from the forward's inputs (loss weights from the labels)
    # or constants, but is no input, root, residual or other forward value.
    if not isinstance(a, core.Var) or a in inputs or a is root or a in resid or a in fwd_out:
      return
    if _same_type(a, root):
      cands[a] = du.producer(a) if du.producer(a) is not None else -1
      i = du.producer(a)   # ``-sum`` losses: the backward may read ``neg(dO)``; try dO itself too
      if i is not None and jaxpr.eqns[i].primitive.name == "neg" and depth < 3:
        consider(jaxpr.eqns[i].invars[0], depth + 1)
      return
    i = du.producer(a)
    if depth >= 3 or i is None or i in fwd:
      return
    e = jaxpr.eqns[i]
    if e.primitive.name not in _CHAIN_OPS or e.effects:
      return
    vs = [x for x in e.invars if isinstance(x, core.Var) and x not in consts]
    if len(vs) == 1:
      consider(vs[0], depth + 1)
    elif not vs:
      for x in e.invars:
        if isinstance(x, core.Var):
          consider(x, depth + 1)

  # Values computed from the residuals without the cotangent (e.g. relu's ``z > 0`` mask).
  pure, users = set(resid), set()
  first = min((u for v in resid for u in du.users(v) if u != OUTPUT and u not in fwd), default=None)
  for i in range(first if first is not None else len(jaxpr.eqns), len(jaxpr.eqns)):
    if i in fwd:
      continue
    e = jaxpr.eqns[i]
    vs = [a for a in e.invars if isinstance(a, core.Var)]
    if not any(a in pure for a in vs):
      continue
    users.add(i)
    if all(a in pure or a in allowed or a in consts for a in vs) and not e.effects:
      pure.update(v for v in e.outvars if core.is_var(v))
  folded = []
  for u in sorted(users):
    for a in jaxpr.eqns[u].invars:
      if isinstance(a, core.Var) and a not in pure:
        consider(a, 0)
        c = (known or {}).get(a)
        if c is not None and c.size <= MAX_JOINT_ELEMENTS and len(folded) < 4:
          folded += _folded_cotangents(c, root)
  out = sorted(cands, key=lambda a: (a in consts, cands[a]))   # computed values first
  for a in out:   # a constant cotangent may have been folded negated (``-sum`` / ``neg``)
    c = (known or {}).get(a)
    if c is None and a in consts and closed is not None and np.prod(a.aval.shape) <= 1 << 20:
      try:   # computed from constants by a few equations: evaluate them
        with jax.ensure_compile_time_eval():
          c = np.asarray(_subgraph(closed, [du.producer(a)], [], [a])()[0])
      except Exception:
        c = None
    if c is not None and np.issubdtype(c.dtype, np.floating) and len(folded) < 6:
      folded.append(core.Literal(-c, core.ShapedArray(tuple(c.shape), c.dtype)))
  return out + folded


def _regions(jaxpr, du: DefUse, jf: JointForward, known=None, closed=None) -> list:
  """Candidate backward regions of forward ``jf`` (one per cotangent candidate, see module doc):
  every later equation computable from the residuals, dO, the forward's inputs and constants."""
  fwd = set(jf.eqns) | set(jf.pre)
  root = jaxpr.eqns[jf.root].outvars[0]
  inputs = {a for a in jf.inputs if isinstance(a, core.Var)}
  consts = _consts_of(jaxpr)
  # Constants (a zeros broadcast that CSE shares between two norms) are not residuals.
  resid = {v for i in fwd for v in jaxpr.eqns[i].outvars if core.is_var(v) and v is not root
           and v not in consts and any(u not in fwd for u in du.users(v))}
  if not resid or any(OUTPUT in du.users(v) for v in resid):
    return []
  # Values computed from the inputs and constants only (the JVP's coefficients such as ``2 * x``
  # of ``square(x)`` are computed next to the forward) may be read by the backward too.
  derived = set(inputs)
  for i, e in enumerate(jaxpr.eqns):
    if i in fwd or e.effects:
      continue
    vs = [a for a in e.invars if isinstance(a, core.Var)]
    if vs and any(a in derived for a in vs) and all(a in derived or a in consts for a in vs):
      derived.update(v for v in e.outvars if core.is_var(v))
  allowed_side = (inputs | consts | derived | {root}
                  | {v for i in fwd for v in jaxpr.eqns[i].outvars})
  out = []
  for do in _cotangent_candidates(jaxpr, du, jf, fwd, resid, allowed_side, consts, known,
                                  closed)[:4]:
    region_vars = set(resid) | ({do} if isinstance(do, core.Var) else set())
    bwd = []
    start = min(u for v in resid for u in du.users(v) if u != OUTPUT and u not in fwd)
    p = du.producer(do)
    if p is not None:
      start = min(start, p + 1)
    for i in range(start, len(jaxpr.eqns)):
      if i in fwd:
        continue
      e = jaxpr.eqns[i]
      vars_in = [a for a in e.invars if isinstance(a, core.Var)]
      if not any(a in region_vars for a in vars_in):
        continue
      if not all(a in region_vars or a in allowed_side for a in vars_in) or e.effects:
        continue
      bwd.append(i)
      region_vars.update(v for v in e.outvars if core.is_var(v))
    bset = set(bwd)
    if any(u not in fwd and u not in bset for v in resid for u in du.users(v)):
      continue   # a residual is read by something we would not replace
    out.append(_Joint(jf, fwd, bwd, do, do_const=not isinstance(do, core.Var) or do in consts))
  return out


def _subgraph(closed, ids, in_vars, out_vars) -> Callable:
  """The original equations ``ids`` as a function of ``in_vars`` returning ``out_vars`` (plus
  the equations computing, from constants only, any other value they read)."""
  jaxpr = closed.jaxpr
  du = DefUse(jaxpr)
  ids, have = set(ids), set(in_vars) | set(jaxpr.constvars)
  stack = list(ids)
  while stack:
    for a in jaxpr.eqns[stack.pop()].invars:
      p = du.producer(a)
      if isinstance(a, core.Var) and a not in have and p is not None and p not in ids:
        ids.add(p)
        stack.append(p)
  sub = jaxpr.replace(invars=list(in_vars), outvars=list(out_vars),
                      eqns=[e for i, e in enumerate(jaxpr.eqns) if i in ids])
  return lambda *vals: eval_jaxpr(sub, closed.consts, *vals)


def random_inputs(avals, seed: int = 0) -> list:
  """Random values for numeric checks (``None`` stays ``None``): bools mostly true, integers below
  the last dim of the first float input (so they are valid indices), floats standard normal."""
  rng = np.random.default_rng(seed)
  high = next((a.shape[-1] for a in avals if a is not None and a.shape
               and jnp.issubdtype(a.dtype, jnp.floating)), 2)
  out = []
  for a in avals:
    if a is None:
      out.append(None)
    elif a.dtype == np.bool_:
      out.append(rng.random(a.shape) < 0.8)
    elif jnp.issubdtype(a.dtype, jnp.integer):
      out.append(rng.integers(0, max(1, high), a.shape).astype(a.dtype))
    else:
      out.append(rng.standard_normal(a.shape).astype(np.float32).astype(a.dtype))
  return out


def _tol(dtype) -> float:
  return 2e-2 if jnp.dtype(dtype).itemsize < 4 else 2e-4


def _close(a, b, dtype) -> bool:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  t = _tol(dtype)
  if a.shape != b.shape:
    return False
  scale = max(1.0, float(np.abs(b).max(initial=0.0)))
  # Elementwise, and relative to the whole value's norm: a small term (the softmax of a large
  # vocabulary times a 1/N cotangent) must not vanish under an absolute tolerance.
  d = float(np.linalg.norm((a - b).ravel()))
  return bool(np.allclose(a, b, rtol=t, atol=t * scale)) and \
      d <= t * float(np.linalg.norm(b.ravel())) + 1e-7 * np.sqrt(max(b.size, 1))


def _kernel_fwd(repl, args, diff_pos):
  """``(o, vjp)`` of the kernel replacement ``repl(*args)`` w.r.t. ``args[diff_pos]``."""
  def f(*d):
    a = list(args)
    for p, x in zip(diff_pos, d):
      a[p] = x
    return repl(*a)
  return jax.vjp(f, *[args[p] for p in diff_pos])


def _accumulated_together(jaxpr, du: DefUse, vs, region: set) -> bool:
  """Whether the region values ``vs`` reach one common value through single-use ``add`` /
  ``add_any`` chains outside the region (so replacing them by values with the same sum changes
  nothing downstream)."""
  chains = []
  for v in vs:
    seen, cur = {v}, v
    while True:
      us = [u for u in du.users(cur) if u not in region]
      if len(us) != 1 or us[0] == OUTPUT or jaxpr.eqns[us[0]].primitive.name not in ("add", "add_any"):
        break
      e = jaxpr.eqns[us[0]]
      if not all(_same_type(a, cur) for a in e.invars if isinstance(a, core.Var)) or \
          not _same_type(e.outvars[0], cur):
        break
      cur = e.outvars[0]
      seen.add(cur)
    chains.append(seen)
  return bool(set.intersection(*chains))


def _diff_targets(ins):
  """Positions of the differentiable inputs, and one target per distinct input variable:
  ``(var, [indices into the kernel's cotangents])`` (their sum is the variable's cotangent)."""
  diff_pos = [p for p, a in enumerate(ins) if isinstance(a, core.Var)
              and jnp.issubdtype(a.aval.dtype, jnp.floating)]
  targets: list = []
  for p in diff_pos:
    t = next((t for t in targets if t[0] is ins[p]), None)
    if t is None:
      targets.append((ins[p], [diff_pos.index(p)]))
    else:
      t[1].append(diff_pos.index(p))
  return diff_pos, targets


def _struct_key(closed, du: DefUse, j: _Joint):
  """The joint candidate's structure (eqns, params, how operands connect, avals, constant values):
  identical layers share it, so their numeric identification is done once."""
  jaxpr = closed.jaxpr
  jf = j.fwd_match
  ids = sorted(j.fwd | set(j.bwd))
  pos = {i: n for n, i in enumerate(ids)}
  known = known_consts(closed)
  ins = {id(a): k for k, a in enumerate(jf.inputs) if isinstance(a, core.Var)}
  try:
    def ref(a):
      if a is j.do:
        return ("d", repr(a.aval), np.asarray(a.val).tobytes() if isinstance(a, core.Literal) else None)
      if isinstance(a, core.Literal):
        return ("l", repr(a.val), repr(a.aval))
      if id(a) in ins:
        return ("i", ins[id(a)], repr(a.aval))
      p = du.producer(a)
      if p in pos:
        return ("e", pos[p], jaxpr.eqns[p].outvars.index(a))
      c = known.get(a)
      if c is not None and c.size <= 1 << 16:
        return ("c", repr(a.aval), c.tobytes())
      return ("o", repr(a.aval), p)
    parts = tuple((jaxpr.eqns[i].primitive.name,
                   repr(sorted((k, repr(v)) for k, v in jaxpr.eqns[i].params.items())),
                   tuple(ref(a) for a in jaxpr.eqns[i].invars),
                   tuple(repr(v.aval) for v in jaxpr.eqns[i].outvars)) for i in ids)
    return (jf.key, pos[jf.root], tuple(ref(a) if a is not None else None for a in jf.inputs),
            ref(j.do), parts), ids
  except Exception:
    return None, ids


def _identify(closed, du: DefUse, j: _Joint, cache: dict | None = None) -> str | None:
  """Finds, by value, the region's cotangents of the forward's inputs and shrinks the region to
  what computes them; fills ``j.outputs`` / ``j.combos``. Returns why not, or None.

  ``cache`` (structure key -> found cotangents or the reason) skips the numeric part for a
  candidate identical to one seen before."""
  key, ids = _struct_key(closed, du, j) if cache is not None and j.fwd_match.key is not None \
      else (None, [])
  if key is not None and key in cache:
    hit = cache[key]
    if isinstance(hit, str):
      return hit
    outputs = [[closed.jaxpr.eqns[ids[p]].outvars[k] for p, k in vs] for vs in hit[0]]
    return _finish(closed.jaxpr, du, j, outputs, hit[1])
  found = _find_cotangents(closed, du, j)
  if isinstance(found, str):
    if key is not None:
      cache[key] = found
    return found
  outputs, combos = found
  if key is not None:
    where = {id(v): (ids.index(du.producer(v)), closed.jaxpr.eqns[du.producer(v)].outvars.index(v))
             for vs in outputs for v in vs}
    cache[key] = ([[where[id(v)] for v in vs] for vs in outputs], combos)
  return _finish(closed.jaxpr, du, j, outputs, combos)


def _find_cotangents(closed, du: DefUse, j: _Joint):
  """``(outputs, combos)``: per differentiable input variable, the region values whose sum is its
  kernel cotangent, and which kernel cotangents sum to it; or why not (a string)."""
  jaxpr = closed.jaxpr
  jf = j.fwd_match
  ins = list(jf.inputs)
  diff_pos, targets = _diff_targets(ins)
  if not diff_pos:
    return "no differentiable input"
  rand = [] if j.do_const else [j.do]
  uniq = []
  for a in ins + rand:
    if isinstance(a, core.Var) and not any(a is u for u in uniq):
      uniq.append(a)
  region_out = [v for i in j.bwd for v in jaxpr.eqns[i].outvars if core.is_var(v)]
  sizes = [int(np.prod(getattr(v.aval, "shape", ()))) for i in j.fwd | set(j.bwd)
           for v in jaxpr.eqns[i].outvars if hasattr(v.aval, "shape")]
  if max(sizes, default=0) > MAX_JOINT_ELEMENTS:
    return "too large to check"
  if any(isinstance(c, core.Tracer) for c in closed.consts):
    return "traced constants"
  root = jaxpr.eqns[jf.root].outvars[0]
  # Only region values typed like some target can be (part of) a cotangent.
  cand_vars = [v for v in region_out if any(_same_type(v, t[0]) for t in targets)]
  sub = _subgraph(closed, j.fwd | set(j.bwd), uniq, [root, j.do] + cand_vars)

  def both(*vals):
    env = dict(zip(map(id, uniq), vals))
    want = sub(*vals)
    get = lambda a: None if a is None else (a.val if isinstance(a, core.Literal) else env[id(a)])
    o, vjp = _kernel_fwd(jf.repl, [get(a) for a in ins], diff_pos)
    return want, o, list(vjp(want[1].astype(o.dtype)))

  avals = [a.aval for a in uniq]
  try:
    with jax.ensure_compile_time_eval():
      exe = jax.jit(both)
      draws = [random_inputs(avals, seed) for seed in (0, 1)]
      if jax.default_backend() == "cpu":
        exe = exe.lower(*draws[0]).compile({"xla_backend_optimization_level": 0})
      results = [jax.tree.map(np.asarray, exe(*d)) for d in draws]
  except Exception as e:  # the kernel refused these shapes/dtypes
    return f"{type(e).__name__}: {e}"
  (want, o, cts), (want2, o2, cts2) = results
  dtype = root.aval.dtype
  if not (_close(o, want[0], dtype) and _close(o2, want2[0], dtype)):
    return "forward differs"
  vals = {id(v): (a, b) for v, a, b in zip(cand_vars, want[2:], want2[2:])}
  bset = set(j.bwd)
  outputs, combos, used = [], [], set()
  for var, pos in targets:
    tv, tv2 = sum(cts[n] for n in pos), sum(cts2[n] for n in pos)
    pool = [v for v in cand_vars if _same_type(v, var) and id(v) not in used]
    # Values read outside the region come first; sums are only tried among those.
    out_pool = [v for v in pool if any(u == OUTPUT or u not in bset for u in du.users(v))]
    hit = None
    for r in range(1, _MAX_SPLIT + 1):
      for combo in itertools.combinations(out_pool + [v for v in pool if v not in out_pool]
                                          if r == 1 else out_pool[:12], r):
        a = sum(vals[id(v)][0] for v in combo)
        b = sum(vals[id(v)][1] for v in combo)
        if _close(tv, a, var.aval.dtype) and _close(tv2, b, var.aval.dtype) and \
            (r == 1 or _accumulated_together(jaxpr, du, combo, bset)):
          hit = list(combo)
          break
      if hit is not None:
        break
    if hit is None:
      # The program may not differentiate this input (a mask-derived bias, a frozen scale);
      # the checks in _finish reject the route if it does compute its cotangent elsewhere.
      continue
    used.update(id(v) for v in hit)
    outputs.append(hit)
    combos.append(tuple(pos))
  if not outputs:
    return "no value of the backward equals the kernel's cotangent"
  return outputs, combos


def _finish(jaxpr, du: DefUse, j: _Joint, outputs, combos) -> str | None:
  """Shrinks the region to what computes the identified cotangents and checks that nothing else
  reads its residuals or intermediates; fills ``j``. Returns why not, or None."""
  diff_pos, _ = _diff_targets(list(j.fwd_match.inputs))
  root = jaxpr.eqns[j.fwd_match.root].outvars[0]
  bset = set(j.bwd)
  if any(len(hit) > 1 and not _accumulated_together(jaxpr, du, hit, bset) for hit in outputs):
    return "a split cotangent is not accumulated in one place"
  # The region shrinks to the ancestors (within it) of the identified cotangents.
  flat = [v for hit in outputs for v in hit]
  keep, stack = set(), [du.producer(v) for v in flat]
  while stack:
    i = stack.pop()
    if i in keep or i not in bset:
      continue
    keep.add(i)
    stack.extend(du.producer(a) for a in jaxpr.eqns[i].invars
                 if isinstance(a, core.Var) and du.producer(a) is not None)
  fwd = j.fwd
  consts = _consts_of(jaxpr)
  resid = {v for i in fwd for v in jaxpr.eqns[i].outvars if v is not root and v not in consts}
  if any(u not in fwd and u not in keep and u != OUTPUT for v in resid for u in du.users(v)) or \
      any(u == OUTPUT for v in resid for u in du.users(v)):
    return "a residual is also read outside the backward"
  outs = {id(v) for v in flat}
  for i in keep:
    for v in jaxpr.eqns[i].outvars:
      if core.is_var(v) and id(v) not in outs and any(u not in keep for u in du.users(v)):
        return "an intermediate of the backward is read elsewhere"
  j.bwd = sorted(keep)
  j.outputs = outputs
  j.combos = [(diff_pos, c) for c in combos]
  return None


def _judge_key(jaxpr, j: _Joint):
  try:
    parts = []
    for i in sorted(j.fwd | set(j.bwd)):
      e = jaxpr.eqns[i]
      parts.append((e.primitive.name, repr(sorted((k, repr(v)) for k, v in e.params.items())),
                    tuple(repr(a.aval) for a in e.invars)))
    if j.fwd_match.key is None:
      return None
    return (j.fwd_match.pattern, j.fwd_match.key, tuple(parts),
            tuple(None if not isinstance(a, core.Var) else repr(a.aval) for a in j.fwd_match.inputs))
  except Exception:
    return None


def _judge(closed, j: _Joint, kernels: str) -> str | None:
  """Compiles the original forward + backward region and the kernel's on their own (default
  backend) and returns why the kernel is not better (XLA temp bytes / FLOPs), or None."""
  jaxpr = closed.jaxpr
  key = (_judge_key(jaxpr, j), kernels, jax.default_backend())
  if key[0] is not None and key in _JUDGE_CACHE:
    return _JUDGE_CACHE[key]
  jf = j.fwd_match
  ins = [a for a in jf.inputs]
  rand = [] if j.do_const else [j.do]
  uniq = []
  for a in ins + rand:
    if isinstance(a, core.Var) and not any(a is u for u in uniq):
      uniq.append(a)
  root = jaxpr.eqns[jf.root].outvars[0]
  flat = [v for hit in j.outputs for v in hit]
  sub = _subgraph(closed, j.fwd | set(j.bwd), uniq, [root, j.do] + flat)
  diff_pos = j.combos[0][0]

  def original(*vals):
    w = sub(*vals)
    return [w[0]] + w[2:]

  def kernel(*vals):
    env = dict(zip(map(id, uniq), vals))
    get = lambda a: None if a is None else (a.val if isinstance(a, core.Literal) else env[id(a)])
    do = sub(*vals)[1] if j.do_const else env[id(j.do)]
    o, vjp = _kernel_fwd(jf.repl, [get(a) for a in ins], diff_pos)
    return [o] + list(vjp(do.astype(o.dtype)))

  specs = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) for a in uniq]
  try:
    def figures(f):
      with jax.ensure_compile_time_eval():
        return figures_of(f, *specs, compiler_options=measure_options())
    from lepton_jax.transforms.passes._pipeline import compile_both
    fo, fk = compile_both(figures, original, kernel)
  except Exception as e:
    verdict = f"not compiled ({type(e).__name__})"
  else:
    flop_ok = fk.flops <= fo.flops * 1.02
    temp_ok = fk.temp_bytes <= fo.temp_bytes
    better = fk.temp_bytes < fo.temp_bytes or fk.flops < fo.flops * 0.98
    verdict = None if (flop_ok and temp_ok and better) else (
        f"temp {fk.temp_bytes} B / {fk.flops:.3g} FLOPs routed vs {fo.temp_bytes} B / "
        f"{fo.flops:.3g} FLOPs original")
  if key[0] is not None:
    _JUDGE_CACHE[key] = verdict
  return verdict


def identified_region(closed, du: DefUse, jf: JointForward, known, used: set,
                      accept: Callable = lambda cand: True):
  """The first backward region of forward ``jf`` that the numeric identification accepts and that
  shares no equation with ``used`` (and passes ``accept``), or None."""
  for cand in _regions(closed.jaxpr, du, jf, known, closed):
    if accept(cand) and _identify(closed, du, cand, _IDENT_CACHE) is None and \
        not (cand.fwd | set(cand.bwd)) & used:
      return cand
  return None


def joint_replacements(jaxpr, du: DefUse, j: _Joint, consts: set, kernel_for: Callable):
  """``(fwd_fn, bwd_fn, first_out, skip)`` replacing an identified forward + backward region:
  ``fwd_fn(read)`` computes the forward root with the kernel ``kernel_for(read)`` (called when the
  program is evaluated) and keeps its VJP; ``bwd_fn(read)``, at the region's first output
  equation ``first_out``, writes the region's outputs from the kernel's cotangents; ``skip`` are
  the other region equations (forward equations computing constants stay: another part of the
  program may share them, and dead ones go with the next dce)."""
  jf = j.fwd_match
  cell: dict = {}
  root_dtype = jaxpr.eqns[jf.root].outvars[0].aval.dtype

  def fwd_fn(read):
    ins = [None if a is None else read(a) for a in jf.inputs]
    o, cell["vjp"] = _kernel_fwd(kernel_for(read), ins, j.combos[0][0])
    return [o]

  def bwd_fn(read):
    cts = cell["vjp"](read(j.do).astype(root_dtype))
    out = {}
    for ys, (_, combo) in zip(j.outputs, j.combos):
      out[ys[0]] = sum(cts[n] for n in combo).astype(ys[0].aval.dtype)
      for y in ys[1:]:
        out[y] = jnp.zeros(y.aval.shape, y.aval.dtype)
    return out

  first_out = min(du.producer(y) for ys in j.outputs for y in ys)
  skip = {i for i in set(jf.eqns) - {jf.root}
          if not any(v in consts for v in jaxpr.eqns[i].outvars)} | (set(j.bwd) - {first_out})
  return fwd_fn, bwd_fn, first_out, skip


def route_joint_level(closed, path: str, records: list, *, forwards: Callable, kernels: str,
                      spot_check: bool = True):
  """Routes hotspot forward + backward pairs of one jaxpr level (see module doc).

  ``forwards(closed, du) -> [JointForward]`` finds the hotspot forwards of the level.
  """
  if not spot_check:   # the joint replacement is only ever applied after its numeric check
    return closed
  jaxpr = closed.jaxpr
  du = DefUse(jaxpr)
  found = forwards(closed, du)
  if not found:
    return closed
  known = known_consts(closed)
  consts = _consts_of(jaxpr)
  replace, skip, used = {}, set(), set()
  for jf in found:
    if (set(jf.eqns) | set(jf.pre)) & used:
      continue
    j = identified_region(closed, du, jf, known, used)
    if j is None:
      continue
    here = location(f"{path}{jf.root}", jaxpr.eqns[jf.root])
    if jf.judge:
      why = _judge(closed, j, kernels)
      if why is not None:
        records.append(Rewrite("route_check", f"{jf.pattern}_kept_original", f"{here}: {why}", 0))
        continue
    used |= j.fwd | set(j.bwd)
    fwd_fn, bwd_fn, first_out, region_skip = joint_replacements(
        jaxpr, du, j, consts, lambda read, jf=jf: jf.repl)
    replace[jf.root] = fwd_fn
    replace[first_out] = bwd_fn
    skip |= region_skip
    records.append(Rewrite("route_kernels", jf.pattern, here, len(jf.eqns) + len(j.bwd)))
  if not replace:
    return closed
  return retrace(closed, replace=replace, skip=frozenset(skip))
