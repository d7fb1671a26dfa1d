"""Application of remat plans: from a plan to a function JAX differentiates.

Role: builds ``flat_fun(*leaves) -> flat outputs`` that re-runs the traced jaxpr with each
checkpoint region wrapped as the plan says. A region is a :func:`_region`: a ``jax.custom_vjp``
whose forward runs ``jax.vjp`` of ``jax.checkpoint(segment, policy)`` (so only what the policy
saves and the region's inputs are kept) and whose backward ties the recomputation to the
incoming cotangent -- ``jax.lax.optimization_barrier`` over (residuals, cotangent), plus, in
``form="cond"``, the pull-back inside a ``lax.cond`` whose predicate reads the cotangent (an
always-true predicate XLA does not fold; the untaken branch is constants only).
XLA:CPU drops optimization barriers (so CSE merges the recomputation back into the forward
and nothing is saved); conditional branches are separate computations that neither CSE nor
code motion merge with the forward, so on CPU ``"cond"`` is the form the compiler keeps. On
GPU/TPU the barrier is kept (``"barrier"``, no conditional). ``scan`` bodies keep
``jax.checkpoint`` per iteration (loops are kept apart on every backend).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.jaxpr import _compat
from lepton_jax.jaxpr._eval import bind_eqn
from lepton_jax.transforms import _remat_closure as closure_lib
from lepton_jax.transforms._remat_graph import (
    _ClosureGraph, _Graph, _Seg, _eval_named, _inline_eval, _read, _segments_from_cuts, name_value)
from lepton_jax.transforms._remat_search import _Layout, _Node

FORMS = ("cond", "barrier", "checkpoint")


def form_for(platform: str) -> str:
  """The region form XLA keeps on ``platform`` (measured: see this module's docstring)."""
  return "cond" if platform == "cpu" else "barrier"


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _region(f: Callable, policy, form: str) -> Callable:
  """``f`` (``*vals -> list``) as a checkpoint region whose recomputation waits for the cotangent."""
  ck = jax.checkpoint(f, policy=policy)
  if form == "checkpoint":
    return ck

  @jax.custom_vjp
  def region(*vals):
    return f(*vals)

  def fwd(*vals):
    out, pullback = jax.vjp(ck, *vals)
    # (dtypes as empty arrays: residuals must be JAX types)
    return out, (pullback, [(np.shape(v), _is_float(v), np.zeros((0,), jnp.result_type(v)) if _is_float(v) else None)
                           for v in vals])

  def bwd(res, ct):
    pullback, meta = res
    leaves, tree = jax.tree_util.tree_flatten(pullback)
    leaves, ct = jax.lax.optimization_barrier((leaves, ct))

    def pull(leaves, ct):  # cotangents of the float inputs only (no float0 through cond)
      cts = jax.tree_util.tree_unflatten(tree, leaves)(ct)
      return [c for c, (_, fl, _) in zip(cts, meta) if fl]
    probe = [c for c in jax.tree_util.tree_leaves(ct) if _is_float(c)]
    if form == "cond" and probe:
      s = jnp.sum(probe[0])
      # A predicate that is always true (every float equals itself or is NaN) but that XLA does
      # not fold: the pull-back runs in its own branch computation. The other branch is never
      # taken; it is a few constants, so the pull-back is traced, lowered and compiled once
      # (two copies of it made the candidates' HLO twice as large and their compiles ~30% slower).
      never = lambda leaves, ct: [jnp.zeros(shape, dt.dtype) for shape, fl, dt in meta if fl]
      got = jax.lax.cond((s == s) | (s != s), pull, never, leaves, ct)
    else:
      got = pull(leaves, ct)
    it = iter(got)
    return tuple(next(it) if fl else np.zeros(shape, jax.dtypes.float0) for shape, fl, _ in meta)

  region.defvjp(fwd, bwd)
  return region


def _apply_policy(g: _Graph, cuts: Sequence[int], policy, form: str,
                  layers: tuple[int, int] | None = None) -> Callable:
  """``flat_fun`` with the top level cut at ``cuts``, every segment a region with a JAX ``policy``
  (e.g. ``nothing_saveable`` / ``dots_saveable`` per segment); ``scan`` bodies per iteration.

  ``layers``: ``(lo, hi)``: only the segments inside that range are regions (a policy per layer,
  as a user writes it); the equations before and after run as they are.
  """
  jaxpr, closed = g.closed.jaxpr, g.closed
  segs = _segments_from_cuts(g, cuts)
  plain = (lambda seg: False) if layers is None else (lambda seg: seg.lo < layers[0] or seg.hi > layers[1])

  def flat_fun(*args):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    for seg in segs:
      if seg.scan:
        eqn = jaxpr.eqns[seg.lo]
        env.update(zip(eqn.outvars, _run_scan(eqn, [_read(env, a) for a in eqn.invars], {}, policy, True)))
        continue
      if plain(seg):
        _run_eqns(jaxpr, seg.lo, seg.hi, env, {})
        continue
      ins, outs, fn = _segment_call(
          g, seg.lo, seg.hi, functools.partial(_run_eqns, jaxpr, seg.lo, seg.hi, names={}), policy, form)
      env.update(zip(outs, fn(*[env[v] for v in ins])))
    return [_read(env, a) for a in jaxpr.outvars]

  return flat_fun


def _policy(saved: Sequence[str], offloaded: Sequence[str]):
  if offloaded:
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=list(saved), names_which_can_be_offloaded=list(offloaded),
        offload_src="device", offload_dst="pinned_host")
  return jax.checkpoint_policies.save_only_these_names(*saved)


def _io(g: _Graph, lo: int, hi: int):
  """(inputs read by ``[lo, hi)`` and defined elsewhere, values it defines used after ``hi``)."""
  jaxpr = g.closed.jaxpr
  ins, seen, defined = [], set(), set()
  for i in range(lo, hi):
    for a in jaxpr.eqns[i].invars:
      if not isinstance(a, _compat.Literal) and a not in defined and a not in seen:
        seen.add(a)
        ins.append(a)
    defined.update(jaxpr.eqns[i].outvars)
  outs = [v for i in range(lo, hi) for v in jaxpr.eqns[i].outvars if g.last_use.get(v, -1) >= hi]
  return ins, outs


def _run_eqns(jaxpr, lo: int, hi: int, env: dict, names: dict) -> None:
  """Evaluates equations ``[lo, hi)`` into ``env``, naming the values in ``names``."""
  for eqn in jaxpr.eqns[lo:hi]:
    res = bind_eqn(eqn, [_read(env, a) for a in eqn.invars])
    for v, x in zip(eqn.outvars, res):
      nm = names.get(v)
      env[v] = name_value(x, nm) if nm is not None else x


def _segment_call(g: _Graph, lo: int, hi: int, body: Callable, ckpt_policy, form: str = "checkpoint"):
  """``(ins, outs, fn)``: equations ``[lo, hi)`` as a function, a :func:`_region` when ``ckpt_policy``."""
  ins, outs = _io(g, lo, hi)

  def f(*vals):
    local = dict(zip(ins, vals))
    body(local)
    return [local[v] for v in outs]
  return ins, outs, (_region(f, ckpt_policy, form) if ckpt_policy is not None else f)


def _apply(g: _Graph, node: "_Node | _Layout | None", decision: dict, form: str = "checkpoint") -> Callable:
  """Builds ``flat_fun(*leaves) -> flat outs`` applying the structure and ``decision``.

  Each checkpoint region is a :func:`_region` of ``form`` (offloading plans always use
  ``jax.checkpoint``'s own offload policy).
  """
  closed = g.closed
  jaxpr = closed.jaxpr
  if node is None:
    return lambda *args: _inline_eval(jaxpr, closed.consts, args)
  if isinstance(node, _Layout):
    node = _Node(node.lo, node.hi, 0, 0.0, 0.0, layout=node)
  saved_names = [n for n, d in decision.items() if d == "save"]
  off_names = [n for n, d in decision.items() if d == "offload"]
  policy = _policy(saved_names, off_names)
  nothing = jax.checkpoint_policies.nothing_saveable
  run_eqns = functools.partial(_run_eqns, jaxpr)
  as_call = functools.partial(_segment_call, g, form="checkpoint" if off_names else form)

  def run_leaf(lay: _Layout, env, nested: bool):
    seg_names = {s: {} for s in range(len(lay.segs))}
    seg_removed = {s: False for s in range(len(lay.segs))}
    for it, c, s, _ in lay.items:
      d = decision[c.name]
      if d in ("save", "offload"):
        seg_names[s][c.var] = c.name
      if d != "save":
        seg_removed[s] = True
    for s, seg in enumerate(lay.segs):
      if seg.scan:
        eqn = jaxpr.eqns[seg.lo]
        outs = _run_scan(eqn, [_read(env, a) for a in eqn.invars], seg_names[s], policy, seg_removed[s])
        env.update(zip(eqn.outvars, outs))
        continue
      ins, outs, fn = as_call(seg.lo, seg.hi,
                              functools.partial(lambda loc, seg, nm: run_eqns(seg.lo, seg.hi, loc, nm),
                                                seg=seg, nm=seg_names[s]),
                              policy if (seg_removed[s] or nested) else None)
      env.update(zip(outs, fn(*[env[v] for v in ins])))

  def run_node(nd: _Node, env, nested=False):
    # Inside a nested region every segment is a checkpoint: otherwise the residuals
    # JAX's rules make on their own (e.g. ``3 * x**2`` for ``x**3``) would be kept
    # for the whole backward pass of the enclosing region.
    if nd.children is None:
      run_leaf(nd.layout, env, nested)
      return
    for ch in nd.children:
      ins, outs, fn = as_call(ch.lo, ch.hi, functools.partial(lambda loc, ch: run_node(ch, loc, True), ch=ch),
                              nothing)
      env.update(zip(outs, fn(*[env[v] for v in ins])))

  def flat_fun(*args):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    run_node(node, env)
    return [_read(env, a) for a in jaxpr.outvars]

  return flat_fun


def _run_scan(eqn, invals, names: dict, policy, checkpointed: bool):
  p = eqn.params
  body = p["jaxpr"]
  nc, ncar = _compat.scan_counts(p)
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]

  def body_fn(consts, carry, x):
    outs = _eval_named(body.jaxpr, body.consts, list(consts) + list(carry) + list(x), names)
    return outs[:ncar], outs[ncar:]

  if checkpointed:
    body_fn = jax.checkpoint(body_fn, policy=policy)
  carry, ys = jax.lax.scan(lambda c, x: body_fn(consts, c, x), list(init), list(xs),
                           length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
  return list(carry) + list(ys)



def _run_scan_into(eqn, env: dict, names: dict, out_names: dict) -> None:
  """Runs a ``scan`` equation (body values named, no per-iteration checkpoint) into ``env``."""
  outs = _run_scan(eqn, [_read(env, a) for a in eqn.invars], names, None, False)
  for v, x in zip(eqn.outvars, outs):
    env[v] = name_value(x, out_names[v]) if v in out_names else x


def _apply_closure(g: _Graph, cg: _ClosureGraph, cp: closure_lib.Plan, segs: list[_Seg],
                   form: str = "checkpoint") -> Callable:
  """``flat_fun``: each region a :func:`_region` of ``form`` saving only ``cp.saved``."""
  jaxpr, closed = g.closed.jaxpr, g.closed
  top_names, body_names = {}, {i: {} for i in g.scans}
  for k in cp.saved:
    scan_i, v = cg.refs[k]
    (top_names if scan_i is None else body_names[scan_i])[v] = cg.names[k]
  policy = jax.checkpoint_policies.save_only_these_names(*[cg.names[k] for k in sorted(cp.saved)])

  def run_region(seg, env):  # equations of [lo, hi); loops run whole with named bodies
    for i in range(seg.lo, seg.hi):
      if i in g.scans:
        _run_scan_into(jaxpr.eqns[i], env, body_names[i], top_names)
      else:
        _run_eqns(jaxpr, i, i + 1, env, top_names)

  def flat_fun(*args):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    for seg in segs:
      if cg.whole_scans:
        ins, outs, fn = _segment_call(g, seg.lo, seg.hi, functools.partial(run_region, seg), policy, form)
        env.update(zip(outs, fn(*[env[v] for v in ins])))
        continue
      if seg.scan:
        eqn = jaxpr.eqns[seg.lo]
        env.update(zip(eqn.outvars, _run_scan(eqn, [_read(env, a) for a in eqn.invars],
                                              body_names[seg.lo], policy, True)))
        continue
      ins, outs, fn = _segment_call(
          g, seg.lo, seg.hi, functools.partial(_run_eqns, jaxpr, seg.lo, seg.hi, names=top_names), policy, form)
      env.update(zip(outs, fn(*[env[v] for v in ins])))
    return [_read(env, a) for a in jaxpr.outvars]

  return flat_fun


