"""Joint forward + backward routing: attention inside a gradient program.

Role: when ``adaptive_jit`` traces ``jax.value_and_grad(loss)`` (or ``jax.grad``, ``nnx.grad``,
an optax step), each attention's forward sits in the program next to its backward (JAX's VJP of
the softmax attention), and the forward's intermediates -- the ``[.., q, k]`` probabilities,
the softmax sums -- are residuals read by the backward. Routing only the forward would keep
them alive, so this pass replaces *both*: the forward by the kernel's forward, and the backward
by the kernel's own backward (``jax.vjp`` of the kernel), which saves only what the kernel
saves (for flash attention: the output and the log-sum-exp).

How a joint match is found, on one jaxpr level (the driver applies it to every nested level):

1. *Forward*: the attention matcher of ``_route_kernels`` run with the uses of each value
   restricted to the ancestors of a candidate ``P.V`` product, so uses by the backward do not
   count. Matches whose intermediates are used by nothing else are plain forward matches
   (routed by the forward pass) and are left alone here.
2. *Cotangent*: ``dO`` is the one value, outside the forward, that the backward's first
   equations combine with the forward's residuals and that has the forward output's type.
3. *Backward region*: every later equation that reads a residual, ``dO`` or a value of the
   region, and otherwise only the attention's inputs, constants and literals. The values it
   hands to the rest of the program are its outputs (trailing layout-only equations are left to
   the program). Every use of a residual must be in the region, or nothing is done.
4. *Identification and check*: on random inputs at the real shapes, each region output is
   identified as a sum of the kernel's cotangents for ``(q, k, v[, bias])`` of the same type
   (self-attention's ``q is k is v`` gives their sum); then the whole joint replacement is
   compared with the original forward + backward on a second, independent draw. Anything that
   does not match exactly (within float tolerance) is left untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._defuse import OUTPUT, DefUse
from lepton_jax.jaxpr._driver import Rewrite, known_consts, location
from lepton_jax.jaxpr._eval import eval_jaxpr, retrace

__all__ = ["route_joint_level", "random_inputs", "MAX_JOINT_ELEMENTS"]

#: Largest value (elements) of a joint region that is checked numerically; bigger regions are
#: not routed jointly (the check is what makes the replacement exact).
MAX_JOINT_ELEMENTS = 1 << 25
_LAYOUT = frozenset({"transpose", "reshape", "squeeze", "expand_dims", "convert_element_type",
                     "copy", "copy_p"})


@dataclasses.dataclass
class _Joint:
  match: Any                 # the forward _AttnMatch
  fwd: set                   # forward eqn indices (matched + pre eqns)
  bwd: list                  # backward region eqn indices, program order
  do: Any                    # cotangent var of the forward output
  outputs: list = dataclasses.field(default_factory=list)   # cotangent vars the region returns
  combos: list = dataclasses.field(default_factory=list)    # per output: kernel cotangents summed


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


def _region(jaxpr, du: DefUse, m) -> _Joint | None:
  """The candidate backward region of forward match ``m`` (see module doc), or None: every later
  equation computable from the residuals, dO, the attention inputs and constants."""
  fwd = set(m.eqns) | set(m.pre_eqns)
  root = jaxpr.eqns[m.d2].outvars[0]
  inputs = {a for a in (m.q, m.k, m.v, m.bias, m.mask) if isinstance(a, core.Var)}
  resid = {v for i in fwd for v in jaxpr.eqns[i].outvars
           if v is not root and any(u not in fwd for u in du.users(v))}
  if not resid:
    return None
  consts = set(jaxpr.constvars)
  for e in jaxpr.eqns:  # values computed from constants only (broadcast literals, iota, ...)
    if not e.effects and all(not isinstance(a, core.Var) or a in consts for a in e.invars):
      consts.update(v for v in e.outvars if core.is_var(v))
  allowed_side = inputs | consts | {root} | {v for i in fwd for v in jaxpr.eqns[i].outvars}
  # 2. the cotangent: an outside value of the output's type read next to a residual (the
  # earliest such value when several have that type: later ones are computed from it)
  cands = {}
  for v in resid:
    for u in du.users(v):
      if u == OUTPUT or u in fwd:
        continue
      for a in jaxpr.eqns[u].invars:
        if (isinstance(a, core.Var) and a not in inputs and a is not root and a not in resid
            and (a in consts or a not in allowed_side)
            and a.aval.shape == root.aval.shape and a.aval.dtype == root.aval.dtype):
          cands[a] = du.producer(a) if du.producer(a) is not None else -1
  if not cands:
    return None
  do = min(cands, key=cands.get)
  # 3. the backward region
  region_vars = set(resid) | {do}
  bwd = []
  start = min(u for v in resid for u in du.users(v) if u != OUTPUT and u not in fwd)
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
  if any(u not in fwd and u not in set(bwd) for v in resid for u in du.users(v)):
    return None   # a residual is read by something we would not replace
  return _Joint(m, fwd, bwd, do)


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
  scale = max(1.0, float(np.abs(b).max(initial=0.0)))
  return a.shape == b.shape and bool(np.allclose(a, b, rtol=t, atol=t * scale))


def _kernel_fwd(repl, args, mask, diff_pos):
  """``(o, vjp)`` of the kernel replacement ``repl(q, k, v, bias, mask)`` w.r.t. ``args[diff_pos]``."""
  def f(*d):
    a = list(args)
    for p, x in zip(diff_pos, d):
      a[p] = x
    return repl(a[0], a[1], a[2], a[3], mask)
  return jax.vjp(f, *[args[p] for p in diff_pos])


def _kernel_vjp(repl, m, diff_pos):
  """``fn(q, k, v, bias, mask, do) -> (o, cotangents of the inputs at diff_pos)``."""
  def fn(q, k, v, bias, mask, do):
    o, vjp = _kernel_fwd(repl, [q, k, v, bias], mask, diff_pos)
    return o, vjp(do.astype(o.dtype))
  return fn


def _identify(closed, du: DefUse, j: _Joint, repl) -> str | None:
  """Finds, by value, the region's cotangents of the attention inputs and shrinks the region to
  what computes them; fills ``j.outputs`` / ``j.combos``. Returns why not, or None."""
  jaxpr = closed.jaxpr
  m = j.match
  ins = [m.q, m.k, m.v, m.bias, m.mask]
  diff_pos = [p for p in range(4) if ins[p] is not None and jnp.issubdtype(ins[p].aval.dtype, jnp.floating)]
  # One target per distinct input variable: the sum of its kernel cotangents.
  targets: list = []
  for p in diff_pos:
    t = next((t for t in targets if t[0] is ins[p]), None)
    if t is None:
      targets.append((ins[p], [diff_pos.index(p)]))
    else:
      t[1].append(diff_pos.index(p))
  uniq = []
  for a in ins + [j.do]:
    if a is not None and not any(a is u for u in uniq):
      uniq.append(a)
  region_out = [v for i in j.bwd for v in jaxpr.eqns[i].outvars if core.is_var(v)]
  sizes = [int(np.prod(getattr(v.aval, "shape", ()))) for i in j.fwd | set(j.bwd)
           for v in jaxpr.eqns[i].outvars if hasattr(v.aval, "shape")]
  if max(sizes, default=0) > MAX_JOINT_ELEMENTS:
    return "too large to check"
  if any(isinstance(c, core.Tracer) for c in closed.consts):
    return "traced constants"
  root = jaxpr.eqns[m.d2].outvars[0]
  # Only region values typed like some target can be a cotangent.
  cand_vars = [v for v in region_out if any(
      tuple(v.aval.shape) == tuple(t[0].aval.shape) and v.aval.dtype == t[0].aval.dtype
      for t in targets)]
  sub = _subgraph(closed, j.fwd | set(j.bwd), uniq, [root] + cand_vars)
  joint = _kernel_vjp(repl, m, diff_pos)

  def both(*vals):
    env = dict(zip(map(id, uniq), vals))
    get = lambda a: None if a is None else env[id(a)]
    o, cts = joint(*(get(a) for a in ins), get(j.do))
    return sub(*vals), o, list(cts)

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
  outputs, combos = [], []
  for var, pos in targets:
    tv, tv2 = sum(cts[n] for n in pos), sum(cts2[n] for n in pos)
    hit = next((v for v, a, b in zip(cand_vars, want[1:], want2[1:])
                if tuple(v.aval.shape) == tuple(var.aval.shape) and v.aval.dtype == var.aval.dtype
                and _close(tv, a, v.aval.dtype) and _close(tv2, b, v.aval.dtype)), None)
    if hit is None:
      return "no value of the backward equals the kernel's cotangent"
    if any(hit is o_ for o_ in outputs):
      return "one value stands for two cotangents"
    outputs.append(hit)
    combos.append(tuple(pos))
  # The region shrinks to the ancestors (within it) of the identified cotangents.
  bset = set(j.bwd)
  keep, stack = set(), [du.producer(v) for v in outputs]
  while stack:
    i = stack.pop()
    if i in keep or i not in bset:
      continue
    keep.add(i)
    stack.extend(du.producer(a) for a in jaxpr.eqns[i].invars
                 if isinstance(a, core.Var) and du.producer(a) is not None)
  fwd = j.fwd
  resid = {v for i in fwd for v in jaxpr.eqns[i].outvars if v is not root}
  if any(u not in fwd and u not in keep and u != OUTPUT for v in resid for u in du.users(v)) or \
      any(u == OUTPUT for v in resid for u in du.users(v)):
    return "a residual is also read outside the attention backward"
  outs = set(outputs)
  for i in keep:
    for v in jaxpr.eqns[i].outvars:
      if core.is_var(v) and v not in outs and any(u not in keep for u in du.users(v)):
        return "an intermediate of the backward is read elsewhere"
  j.bwd = sorted(keep)
  j.outputs = outputs
  j.combos = [(diff_pos, c) for c in combos]
  return None


def route_joint_level(closed, path: str, records: list, *, kernels: str, match_fn, no_match,
                      replacement_fn, spot_check: bool = True):
  """Routes attention forward + backward pairs of one jaxpr level (see module doc)."""
  if not spot_check:   # the joint replacement is only ever applied after its numeric check
    return closed
  jaxpr = closed.jaxpr
  du = DefUse(jaxpr)
  known = known_consts(closed)
  forwards = _find_forward(jaxpr, du, known, match_fn, no_match)
  if not forwards:
    return closed
  replace, skip, used = {}, set(), set()
  for m in forwards:
    repl = replacement_fn(m, kernels)
    j = _region(jaxpr, du, m)
    if j is None or (j.fwd | set(j.bwd)) & used or _identify(closed, du, j, repl) is not None:
      continue
    used |= j.fwd | set(j.bwd)
    cell: dict = {}
    diff_pos = j.combos[0][0]

    def fwd_fn(read, m=m, cell=cell):
      ins = [None if a is None else read(a) for a in (m.q, m.k, m.v, m.bias, m.mask)]
      o, cell["vjp"] = _kernel_fwd(cell["repl"], ins[:4], ins[4], cell["diff_pos"])
      return [o]

    def bwd_fn(read, j=j, cell=cell):
      cts = cell["vjp"](read(j.do).astype(jaxpr.eqns[j.match.d2].outvars[0].aval.dtype))
      return {y: sum(cts[n] for n in combo).astype(y.aval.dtype)
              for y, (_, combo) in zip(j.outputs, j.combos)}

    cell["diff_pos"], cell["repl"] = diff_pos, repl
    replace[m.d2] = fwd_fn
    first_out = min(du.producer(y) for y in j.outputs)
    replace[first_out] = bwd_fn
    skip |= (set(m.eqns) - {m.d2}) | (set(j.bwd) - {first_out})
    records.append(Rewrite("route_kernels", "attention_fwd_bwd",
                           location(f"{path}{m.d2}", jaxpr.eqns[m.d2]),
                           len(m.eqns) + len(j.bwd)))
  if not replace:
    return closed
  return retrace(closed, replace=replace, skip=frozenset(skip))
