"""Linear work on loop accumulators moves after the loop: ``acc += L(s_i)`` becomes
``acc_s += s_i`` in the loop and ``acc = acc0 + L(acc_s)`` once after it, when ``L`` is linear in
``s_i`` with loop-invariant coefficients.

Where it comes from: the backward of a ``scan`` whose body transforms a loop-invariant parameter
(``w * scale``, ``tanh(w) @ w``, a weight norm, a projected table) accumulates the parameter's
cotangent in a carry, and JAX's transpose applies the transform's transpose to every iteration's
cotangent before adding it up (``ct_w += L^T(ct_we_i)``) -- e.g. two ``[D, D]`` matmuls per
iteration for ``tanh(w) @ w``. XLA cannot move that out of the loop (it is not invariant; it is
linear, which XLA does not reason about). Summing the per-iteration cotangents first and applying
the transpose once is exact in real arithmetic (floating point: a different summation order).

Rules (on each ``scan`` body, bottom-up through the driver):

- an *accumulator* is a carry whose new value is an ``add``/``add_any`` chain of the old value and
  terms, where neither the old value nor the chain's partial sums is read anywhere else;
- each term is traced back through equations that are linear in exactly one loop-varying operand
  (``mul``/``dot_general`` with the other operand invariant, ``div`` by an invariant, ``neg``,
  ``transpose``, ``reshape``, ``broadcast_in_dim``, ``squeeze``, ``expand_dims``, ``reduce_sum``,
  ``convert_element_type`` to an equal or narrower float dtype, ``copy``, ``rev``; ``add``/``sub``/``add_any`` of
  two linear values) to *seeds*: loop-varying values made by anything else. An equation whose
  result is also read outside this linear region ends it;
- seeds are shared between accumulators (one new carry per seed, starting at zero); the region is
  replayed once after the loop on the summed seeds; when moving all accumulators does not pay
  off, the smallest ones are left in the loop first (a bias/norm-scale gradient reduced from a
  large per-iteration value is cheaper to reduce in the loop than to carry);
- applied only when it saves work per iteration (region FLOPs + the chain's adds exceed the seeds'
  adds), the new carries hold at most 4x the bytes of the removed ones, and every seed's float
  dtype is at least as wide as the accumulators' (summing stays as precise as before).
"""

from __future__ import annotations

import numpy as np

import jax
from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._driver import LevelBuilder, Rewrite, location, rewrite_nested, trace_eqns
from lepton_jax.jaxpr._registry import local_flops, primitive_info, subjaxpr_params

__all__ = ["accumulate"]

_UNARY = frozenset("""neg transpose reshape broadcast_in_dim squeeze expand_dims reduce_sum copy
copy_p rev convert_element_type""".split())
_SUMS = frozenset({"add", "add_any"})
# Random primitives that are pure functions of their (key) inputs.
_PURE_RANDOM = frozenset("""random_bits random_wrap random_unwrap random_fold_in random_split
random_seed threefry2x32 iota_2x32_shape rng_bit_generator""".split())
_BAD_KINDS = frozenset({"effect", "collective", "state", "opaque", "other"})


def _movable(eqn) -> bool:
  """Effect-free and deterministic, here and in every nested jaxpr."""
  if eqn.effects:
    return False
  info = primitive_info(eqn)
  name = eqn.primitive.name
  if info.kind == "random":
    if name not in _PURE_RANDOM:
      return False
  elif info.kind in _BAD_KINDS:
    return False
  for _, _, sub in subjaxpr_params(eqn):
    j = getattr(sub, "jaxpr", sub)
    if j.effects or not all(_movable(e) for e in j.eqns):
      return False
  return True


def _no_names(dbg):
  """``dbg`` without per-argument/result names (they no longer line up after a rewrite that
  changes a jaxpr's interface; JAX treats ``None`` as unknown)."""
  try:
    return dbg._replace(arg_names=None, result_paths=None)
  except Exception:  # pylint: disable=broad-except
    return dbg


def _is_float(aval) -> bool:
  try:
    return jax.dtypes.issubdtype(aval.dtype, np.floating)
  except Exception:  # pylint: disable=broad-except
    return False


def _size(aval) -> int:
  return int(np.prod(aval.shape)) if aval.shape else 1


def _nbytes(aval) -> int:
  return _size(aval) * np.dtype(aval.dtype).itemsize


def _linear_operands(eqn, varying) -> list | None:
  """The operands through which ``eqn`` is linear (all loop-varying), or None."""
  name = eqn.primitive.name
  vary = [isinstance(a, core.Var) and a in varying for a in eqn.invars]
  if not all(_is_float(v.aval) for v in eqn.outvars):
    return None
  if name in _UNARY:
    if len(eqn.invars) != 1 or not vary[0]:
      return None
    if name == "convert_element_type" and not (
        _is_float(eqn.invars[0].aval) and np.dtype(eqn.invars[0].aval.dtype).itemsize
        >= np.dtype(eqn.outvars[0].aval.dtype).itemsize):
      return None   # a widening convert ends the region: its (wide) output is the seed
    return [eqn.invars[0]]
  if name in ("mul", "dot_general") and len(eqn.invars) == 2 and sum(vary) == 1:
    return [eqn.invars[vary.index(True)]]
  if name == "div" and vary == [True, False]:
    return [eqn.invars[0]]
  if name in ("add", "add_any", "sub") and vary == [True, True]:
    return list(eqn.invars)
  return None


def _chain_terms(v, producer, body, c_in):
  """Terms of the add chain that makes ``v``; None unless ``c_in`` appears exactly once."""
  terms, chain, stack = [], [], [v]
  while stack:
    a = stack.pop()
    e = producer.get(a) if isinstance(a, core.Var) else None
    if e is not None and body.eqns[e].primitive.name in _SUMS and a is not c_in:
      chain.append(e)
      stack.extend(reversed(body.eqns[e].invars))
    else:
      terms.append(a)
  hits = [t for t in terms if t is c_in]
  if len(hits) != 1 or not chain:
    return None
  return [t for t in terms if t is not c_in], chain


def _plan(body: core.Jaxpr, nc: int, ncarry: int):
  """Finds accumulators and their linear regions; returns a plan dict or None."""
  invars = body.invars
  producer = {v: i for i, e in enumerate(body.eqns) for v in e.outvars}
  uses: dict = {}
  for i, e in enumerate(body.eqns):
    for a in e.invars:
      if isinstance(a, core.Var):
        uses.setdefault(a, []).append(i)
  out_uses: dict = {}
  for k, a in enumerate(body.outvars):
    if isinstance(a, core.Var):
      out_uses.setdefault(a, []).append(k)
  # Invariant values: loop constants and what movable equations make from them.
  invariant = set(invars[:nc])
  for e in body.eqns:
    if all(isinstance(a, core.Literal) or a in invariant for a in e.invars) and _movable(e):
      invariant.update(e.outvars)
  varying = {v for e in body.eqns for v in e.outvars if v not in invariant}
  varying.update(invars[nc:])

  accs = []   # (carry index, terms, chain eqn indices)
  for j in range(ncarry):
    c_in, c_out = invars[nc + j], body.outvars[j]
    if not isinstance(c_out, core.Var) or len(out_uses.get(c_out, [])) != 1:
      continue
    if not _is_float(c_in.aval):
      continue
    found = _chain_terms(c_out, producer, body, c_in)
    if found is None:
      continue
    terms, chain = found
    chain_set = set(chain)
    if uses.get(c_in, []) and not set(uses[c_in]) <= chain_set:
      continue
    inner = [body.eqns[i].outvars[0] for i in chain if body.eqns[i].outvars[0] is not c_out]
    if any(set(uses.get(v, [])) - chain_set or out_uses.get(v) for v in inner):
      continue
    if not terms or not all(isinstance(t, core.Var) and t in varying
                            and t.aval.shape == c_in.aval.shape for t in terms):
      continue
    accs.append((j, terms, chain))
  if not accs:
    return None
  def solve(accs):
    """The region, seeds and savings check for a set of accumulators (None: not worth it)."""
    chain_eqns = {i for _, _, ch in accs for i in ch}
    term_vars = {t for _, ts, _ in accs for t in ts}
    # Region: linear equations between seeds and terms, cut where a value is read elsewhere.
    region: set[int] = set()
    stack = list(term_vars)
    while stack:
      v = stack.pop()
      i = producer.get(v)
      if i is None or i in region:
        continue
      ops = _linear_operands(body.eqns[i], varying)
      if ops is None:
        continue
      region.add(i)
      stack.extend(ops)
    while True:
      bad = {i for i in region for v in body.eqns[i].outvars
             if out_uses.get(v) or (set(uses.get(v, [])) - region - chain_eqns)
             or (v not in term_vars and set(uses.get(v, [])) & chain_eqns)}
      if not bad:
        break
      region -= bad
      # Equations that only fed a removed one are no longer reached from the terms.
      reach: set[int] = set()
      stack = [producer[t] for t in term_vars if producer.get(t) in region]
      while stack:
        i = stack.pop()
        if i in reach:
          continue
        reach.add(i)
        stack.extend(producer[a] for a in _linear_operands(body.eqns[i], varying)
                     if producer.get(a) in region)
      region = reach
    made = {v for i in region for v in body.eqns[i].outvars}
    seeds, seen = [], set()
    for i in sorted(region):
      for a in _linear_operands(body.eqns[i], varying):
        if a not in made and a not in seen:
          seen.add(a)
          seeds.append(a)
    for t in sorted(term_vars, key=lambda t: producer.get(t, -1)):
      if t not in made and t not in seen:
        seen.add(t)
        seeds.append(t)
    # Saving per iteration, and the memory the new carries cost.
    region_flops = sum(sum(local_flops(body.eqns[i])) for i in region)
    chain_adds = sum(_size(body.eqns[i].outvars[0].aval) for i in chain_eqns)
    seed_adds = sum(_size(s.aval) for s in seeds)
    removed_bytes = sum(_nbytes(invars[nc + j].aval) for j, _, _ in accs)
    if region_flops + chain_adds <= seed_adds or sum(_nbytes(s.aval) for s in seeds) > 4 * removed_bytes:
      return None
    # Seeds are summed in their own dtype: never narrower than the accumulators (a bf16 cotangent
    # converted to an f32 accumulator keeps being summed in f32 per iteration).
    acc_dtypes = {np.dtype(invars[nc + j].aval.dtype) for j, _, _ in accs}
    if not all(_is_float(s.aval) and all(np.dtype(s.aval.dtype).itemsize >= d.itemsize
                                         for d in acc_dtypes) for s in seeds):
      return None
    return dict(accs=accs, region=sorted(region), seeds=seeds, invariant=invariant,
                producer=producer, chain_eqns=chain_eqns,
                gain=region_flops + chain_adds - seed_adds, seed_elems=seed_adds)

  # All accumulators together (seeds are shared); when that does not pay off, leave out the
  # smallest accumulators first (a bias or norm-scale gradient reduced from a large seed).
  kept = sorted(accs, key=lambda acc: -_nbytes(invars[nc + acc[0]].aval))
  plan = None
  while kept and plan is None:
    plan = solve(kept)
    if plan is None:
      kept = kept[:-1]
  if plan is None:
    return None
  # Keep an accumulator only if what it saves per iteration exceeds the carry it adds.
  for acc in sorted(kept, key=lambda acc: _nbytes(invars[nc + acc[0]].aval)):
    if len(plan["accs"]) == 1:
      break
    without = solve([a for a in plan["accs"] if a is not acc])
    if without is not None and (plan["gain"] - without["gain"]
                                <= plan["seed_elems"] - without["seed_elems"]):
      plan = without
  return plan


def _rewrite_scan(eqn):
  body: core.ClosedJaxpr = eqn.params["jaxpr"]
  if body.consts or body.jaxpr.constvars or eqn.params["length"] == 0:
    return None
  nc, ncarry = core.scan_counts(eqn.params)
  jaxpr = body.jaxpr
  plan = _plan(jaxpr, nc, ncarry)
  if plan is None:
    return None
  accs, region, seeds = plan["accs"], plan["region"], plan["seeds"]
  acc_idx = {j for j, _, _ in accs}
  drop = set(region) | plan["chain_eqns"]
  invars = jaxpr.invars
  # New body: old carries minus accumulators, plus one carry per seed.
  new_acc_in = [core.Var(s.aval) for s in seeds]
  new_acc_out = [core.Var(s.aval) for s in seeds]
  add_eqns = []
  for s, a_in, a_out in zip(seeds, new_acc_in, new_acc_out):
    traced = trace_eqns(lambda x, y: jax.lax.add(x, y), [a_in, s])
    if traced is None:
      return None
    es, (o,) = traced
    add_eqns.extend(e.replace(outvars=[a_out if v is o else v for v in e.outvars]) for e in es)
  kept_carries = [j for j in range(ncarry) if j not in acc_idx]
  body_invars = (list(invars[:nc]) + [invars[nc + j] for j in kept_carries] + new_acc_in
                 + list(invars[nc + ncarry:]))
  body_outvars = ([jaxpr.outvars[j] for j in kept_carries] + new_acc_out
                  + list(jaxpr.outvars[ncarry:]))
  body_eqns = [e for i, e in enumerate(jaxpr.eqns) if i not in drop] + add_eqns
  new_body = jaxpr.replace(invars=body_invars, outvars=body_outvars, eqns=body_eqns,
                           debug_info=_no_names(jaxpr.debug_info))
  # Outer: zeros for the new carries, the new scan, then the region once and the final sums.
  pre = []
  zero_atoms = []
  for s in seeds:
    traced = trace_eqns(lambda: jax.numpy.zeros(s.aval.shape, s.aval.dtype), [])
    if traced is None:
      return None
    es, (z,) = traced
    pre.extend(es)
    zero_atoms.append(z)
  ein = eqn.invars
  outer_in = (list(ein[:nc]) + [ein[nc + j] for j in kept_carries] + zero_atoms
              + list(ein[nc + ncarry:]))
  summed = [core.Var(s.aval) for s in seeds]
  scan_out = ([eqn.outvars[j] for j in kept_carries] + summed + list(eqn.outvars[ncarry:]))
  lin = eqn.params.get("linear")  # jax 0.10 only
  if lin is not None:
    lin = tuple(lin)
    lin = (lin[:nc] + tuple(lin[nc + j] for j in kept_carries)
           + (False,) * len(seeds) + lin[nc + ncarry:])
  params = core.scan_params(dict(eqn.params, jaxpr=core.ClosedJaxpr(new_body, ())), num_consts=nc,
                            num_carry=len(kept_carries) + len(seeds), num_xs=len(ein) - nc - ncarry,
                            num_ys=len(eqn.outvars) - ncarry, linear=lin)
  new_scan = eqn.replace(invars=outer_in, outvars=scan_out, params=params)
  # Replay: invariant operands come from the loop constants (or invariant equations, copied).
  env: dict = dict(zip(invars[:nc], ein[:nc]))
  env.update(zip(seeds, summed))
  producer = plan["producer"]
  post = []

  def copy(e):  # e after the loop, on renamed variables (its inputs copied first)
    for b in e.invars:
      need(b)
    outs = [core.Var(v.aval) for v in e.outvars]
    env.update(zip(e.outvars, outs))
    post.append(e.replace(invars=[b if isinstance(b, core.Literal) else env[b] for b in e.invars],
                          outvars=outs))

  def need(a):
    if not (isinstance(a, core.Literal) or a in env):
      copy(jaxpr.eqns[producer[a]])

  for i in region:
    copy(jaxpr.eqns[i])
  for j, terms, _ in accs:
    total = ein[nc + j]
    for t in terms:
      traced = trace_eqns(lambda x, y: jax.lax.add(x, y), [total, env[t]])
      if traced is None:
        return None
      es, (total,) = traced
      post.extend(es)
    final = eqn.outvars[j]
    if post and total is post[-1].outvars[0]:
      post[-1] = post[-1].replace(outvars=[final])
    else:  # no terms after the loop (cannot happen: a chain has terms)
      return None
  return pre, new_scan, post, len(drop)


def _acc_level(closed: core.ClosedJaxpr, path: str, records: list[Rewrite]) -> core.ClosedJaxpr:
  b = LevelBuilder(closed)
  for i, eqn in enumerate(closed.jaxpr.eqns):
    eqn = b.read(eqn)
    res = _rewrite_scan(eqn) if eqn.primitive.name == "scan" and not eqn.effects else None
    if res is None:
      b.emit(eqn)
      continue
    pre, new, post, n = res
    for e in pre + [new] + post:
      b.emit(e)
    b.changed = True
    records.append(Rewrite("accumulate", "linear_after_loop", location(f"{path}{i}", eqn), n))
  return b.build()


def accumulate(closed: core.ClosedJaxpr, **_) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Moves linear work on ``scan`` accumulators after the loop (see module doc).

  Args:
    closed: the jaxpr to rewrite; its interface is kept.

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax, jax.numpy as jnp
  >>> def loss(w, xs):
  ...   body = lambda c, x: (c + jnp.tanh(x @ (jnp.tanh(w) @ w)).sum(), None)
  ...   return jax.lax.scan(body, 0.0, xs)[0]
  >>> cj = jax.make_jaxpr(jax.grad(loss))(jnp.ones((4, 4)), jnp.ones((3, 2, 4)))
  >>> [r.pattern for r in accumulate(cj)[1]]
  ['linear_after_loop']
  """
  records: list[Rewrite] = []
  return rewrite_nested(closed, _acc_level, records), records
