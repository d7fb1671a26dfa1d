"""Shape buckets for ``adaptive_jit``: pad one axis to a bucket size, slice outputs back.

Padding is only applied when it provably cannot change the unpadded results:

1. *Position-wise flow*: a dependency analysis of the jaxpr traced at the bucket size
   tracks where the padded axis goes. Every operation touching it must treat positions
   independently (elementwise ops, broadcasts, transposes, reductions/contractions over
   *other* axes, reshapes that keep the axis whole, ...). Anything that mixes positions
   along it (a reduction, softmax or contraction over it, a scan, sort, gather, conv,
   cumulative op, ...) makes bucketing unsafe.
2. *Length independence*: the jaxpr traced at the true length and at the bucket size
   must be identical up to that size (same equations, parameters and literal values), so
   no value depends on the length itself (e.g. ``x / x.shape[1]``).

Every output that carries the padded axis is sliced back to the true length; outputs
without it must have the same shape at both sizes. When a check fails the call runs at
its exact shape and a warning names the reason (once per signature).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np
from lepton_jax import _nnx
from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._registry import primitive_info, subjaxpr_params

__all__ = ["BucketSpec", "BucketCache", "maybe_pad", "describe", "bucket_size",
           "position_flow", "UnsafeBucketing"]


class UnsafeBucketing(Exception):
  """Padding could change results (the message says why)."""


@dataclasses.dataclass(frozen=True)
class BucketSpec:
  argnum: int
  axis: int
  sizes: str | tuple[int, ...]

  @staticmethod
  def parse(spec: Any, *, api: str = "adaptive_jit") -> "BucketSpec | None":
    if spec is None:
      return None
    if not isinstance(spec, dict):
      raise TypeError(f"{api}: buckets must be None or a dict like "
                      f"{{'argnum': 1, 'axis': 1, 'sizes': 'pow2'}}, got {type(spec).__name__}")
    unknown = set(spec) - {"argnum", "axis", "sizes"}
    if unknown:
      raise ValueError(f"{api}: buckets has unknown keys {sorted(unknown)}; valid keys are "
                       "'argnum', 'axis', 'sizes'")
    argnum, axis, sizes = spec.get("argnum", 0), spec.get("axis", 0), spec.get("sizes", "pow2")
    for name, v in (("argnum", argnum), ("axis", axis)):
      if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{api}: buckets[{name!r}] must be an int, got {v!r}")
    if argnum < 0:
      raise ValueError(f"{api}: buckets['argnum'] must be >= 0 (a positional argument), got "
                       f"{argnum}")
    if isinstance(sizes, str):
      if sizes != "pow2":
        raise ValueError(f"{api}: buckets['sizes']={sizes!r} is not valid; use 'pow2' or a list "
                         "of positive ints such as [64, 128, 256]")
      return BucketSpec(argnum, axis, "pow2")
    try:
      lst = sorted({int(s) for s in sizes})
    except (TypeError, ValueError):
      raise TypeError(f"{api}: buckets['sizes'] must be 'pow2' or a list of positive ints, got "
                      f"{sizes!r}") from None
    if not lst or lst[0] <= 0 or any(isinstance(s, bool) or int(s) != s for s in sizes):
      raise ValueError(f"{api}: buckets['sizes'] must be a non-empty list of positive ints, got "
                       f"{sizes!r}")
    return BucketSpec(argnum, axis, tuple(lst))


def bucket_size(spec: BucketSpec, n: int) -> int:
  """The bucket for length ``n`` (``n`` itself when above the largest listed size).

  >>> bucket_size(BucketSpec(0, 0, "pow2"), 33)
  64
  """
  if spec.sizes == "pow2":
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
  for s in spec.sizes:
    if s >= n:
      return s
  return n


class BucketCache:
  """Per-function cache of bucketing decisions (explicit and clearable)."""

  def __init__(self):
    self.decisions: dict = {}
    self.traces: dict = {}     # traces at a bucket size, shared by all lengths in it

  def clear(self):
    self.decisions.clear()
    self.traces.clear()


# ------------------------------------------------------------------------------------
# Position-wise dependency analysis
# ------------------------------------------------------------------------------------

def _tag_of(a, tags):
  return None if isinstance(a, core.Literal) else tags.get(a)


def position_flow(jaxpr: core.Jaxpr, in_tags: list[int | None]) -> list[int | None]:
  """Propagates the padded-axis position through ``jaxpr``; raises UnsafeBucketing."""
  tags: dict = {v: t for v, t in zip(jaxpr.invars, in_tags) if t is not None}
  for eqn in jaxpr.eqns:
    ins = [_tag_of(a, tags) for a in eqn.invars]
    if all(t is None for t in ins):
      continue
    outs = _eqn_flow(eqn, ins)
    for v, t in zip(eqn.outvars, outs):
      if t is not None and not isinstance(v, core.DropVar):
        tags[v] = t
  return [_tag_of(a, tags) for a in jaxpr.outvars]


def _eqn_flow(eqn: core.JaxprEqn, ins: list[int | None]) -> list[int | None]:
  name = eqn.primitive.name
  p = eqn.params
  tagged = [(i, t) for i, t in enumerate(ins) if t is not None]
  d = tagged[0][1]
  where = f"'{name}'"
  kind = primitive_info(name).kind
  if kind == "elementwise":
    if any(t != d for _, t in tagged):
      raise UnsafeBucketing(f"{where} combines the padded axis at different positions")
    out = eqn.outvars[0].aval
    if len(out.shape) != len(eqn.invars[tagged[0][0]].aval.shape):
      raise UnsafeBucketing(f"{where} changes rank around the padded axis")
    return [d] * len(eqn.outvars)
  if name == "broadcast_in_dim":
    bd = tuple(p["broadcast_dimensions"])
    return [bd[d]]
  if name == "transpose":
    return [tuple(p["permutation"]).index(d)]
  if kind == "reduction":
    axes = tuple(p.get("axes", p.get("dimensions", ())))
    if d in axes:
      raise UnsafeBucketing(f"{where} reduces over the padded axis")
    return [d - sum(1 for a in axes if a < d)] * len(eqn.outvars)
  if name == "squeeze":
    dims = tuple(p["dimensions"])
    if d in dims:
      raise UnsafeBucketing(f"{where} squeezes the padded axis")
    return [d - sum(1 for a in dims if a < d)]
  if name == "reshape":
    if p.get("dimensions") not in (None, ()):
      raise UnsafeBucketing(f"{where} with dimensions is not supported along the padded axis")
    ishape = eqn.invars[0].aval.shape
    oshape = eqn.outvars[0].aval.shape
    pre = int(np.prod(ishape[:d]))
    acc = 1
    for k, s in enumerate(oshape):
      if acc == pre and s == ishape[d] and int(np.prod(oshape[k + 1:])) == int(np.prod(ishape[d + 1:])):
        return [k]
      acc *= s
    raise UnsafeBucketing(f"{where} merges or splits the padded axis")
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    lr = len(eqn.invars[0].aval.shape)
    rr = len(eqn.invars[1].aval.shape)
    nb = len(lb)
    lfree = [i for i in range(lr) if i not in lc and i not in lb]
    rfree = [i for i in range(rr) if i not in rc and i not in rb]
    outs = set()
    for i, t in tagged:
      c, b, free, off = (lc, lb, lfree, nb) if i == 0 else (rc, rb, rfree, nb + len(lfree))
      if t in c:
        raise UnsafeBucketing(f"{where} contracts over the padded axis")
      outs.add(b.index(t) if t in b else off + free.index(t))
    if len(outs) != 1:
      raise UnsafeBucketing(f"{where} pairs the padded axis with a different axis")
    return [outs.pop()]
  if name == "slice":
    start, limit = p["start_indices"], p["limit_indices"]
    strides = p["strides"] or (1,) * len(start)
    size = eqn.invars[0].aval.shape[d]
    if start[d] != 0 or limit[d] != size or strides[d] != 1:
      raise UnsafeBucketing(f"{where} slices along the padded axis")
    return [d]
  if name == "concatenate":
    if p["dimension"] == d or any(t != d for _, t in tagged):
      raise UnsafeBucketing(f"{where} concatenates along the padded axis")
    return [d]
  if name == "pad":
    lo, hi, interior = p["padding_config"][d]
    if (lo, hi, interior) != (0, 0, 0) or tagged[0][0] != 0:
      raise UnsafeBucketing(f"{where} pads along the padded axis")
    return [d]
  if kind == "cumulative":
    if p["axis"] == d:
      raise UnsafeBucketing(f"{where} accumulates along the padded axis")
    return [d]
  subs = subjaxpr_params(eqn) if kind == "call" else []
  if len(subs) == 1:
    sub = subs[0][2]
    sub_jaxpr = sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub
    if len(sub_jaxpr.invars) != len(ins):
      raise UnsafeBucketing(f"{where}: unexpected sub-jaxpr arity")
    return position_flow(sub_jaxpr, ins)
  if name == "cond":
    if ins[0] is not None:
      raise UnsafeBucketing(f"{where} branches on a value along the padded axis")
    results = [position_flow(b.jaxpr, ins[1:]) for b in p["branches"]]
    if any(r != results[0] for r in results):
      raise UnsafeBucketing(f"{where} branches disagree on the padded axis")
    return results[0]
  raise UnsafeBucketing(f"'{name}' is not known to be position-wise along the padded axis")


# ------------------------------------------------------------------------------------
# Length independence: jaxpr at length L == jaxpr at bucket P (modulo L -> P)
# ------------------------------------------------------------------------------------

def _map_ints(v, L, P):
  if isinstance(v, bool):
    return v
  if isinstance(v, (int, np.integer)):
    return P if int(v) == L else v
  if isinstance(v, tuple):
    return tuple(_map_ints(x, L, P) for x in v)
  if isinstance(v, list):
    return [_map_ints(x, L, P) for x in v]
  return v


def _same_aval(a, b, L, P) -> bool:
  sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
  if sa is None or sb is None:
    return str(a) == str(b)
  return tuple(_map_ints(tuple(sa), L, P)) == tuple(sb) and a.dtype == b.dtype


def _same_param(x, y, L, P) -> bool:
  if isinstance(x, core.ClosedJaxpr) and isinstance(y, core.ClosedJaxpr):
    return _same_jaxpr(x.jaxpr, y.jaxpr, L, P, x.consts, y.consts)
  if isinstance(x, core.Jaxpr) and isinstance(y, core.Jaxpr):
    return _same_jaxpr(x, y, L, P, (), ())
  if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
    return len(x) == len(y) and all(_same_param(a, b, L, P) for a, b in zip(x, y))
  if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
    return False
  if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(y, "shape"):
    return _same_aval(x, y, L, P)
  try:
    return bool(_map_ints(x, L, P) == y)
  except Exception:
    return x is y


def _same_const(a, b) -> bool:
  if isinstance(a, core.Tracer) or isinstance(b, core.Tracer):
    return a is b
  try:
    a, b = np.asarray(a), np.asarray(b)
  except Exception:
    return a is b
  return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


# Derivative-rule params of custom_jvp/custom_vjp calls: callables re-created on every
# trace, so they never compare equal. They are only used when the call is differentiated,
# and bucketing only runs on concrete (untransformed) arguments, where the executable
# evaluates ``call_jaxpr`` alone (under ``jax.grad(adaptive_jit(f))`` inputs are tracers
# and run at the exact shape; in ``adaptive_jit(jax.grad(f))`` the rules are already
# applied in the traced jaxpr). ``call_jaxpr`` itself is still compared.
_RULE_PARAMS = {
    "custom_jvp_call": ("jvp_jaxpr_fun", "jvp_jaxpr_thunk", "jvp"),
    "custom_vjp_call": ("fwd_jaxpr_thunk", "bwd", "out_trees", "fwd", "fun_jaxpr_thunk"),
    "custom_vjp_call_jaxpr": ("fwd_jaxpr_thunk", "bwd", "out_trees"),
}


def _same_jaxpr(j1: core.Jaxpr, j2: core.Jaxpr, L, P, c1, c2) -> bool:
  if (len(j1.eqns) != len(j2.eqns) or len(j1.invars) != len(j2.invars)
      or len(j1.outvars) != len(j2.outvars) or len(j1.constvars) != len(j2.constvars)):
    return False
  if not all(_same_const(a, b) for a, b in zip(c1, c2)):
    return False
  vmap = {}
  for a, b in zip(list(j1.constvars) + list(j1.invars), list(j2.constvars) + list(j2.invars)):
    if not _same_aval(a.aval, b.aval, L, P):
      return False
    vmap[a] = b

  def same_atom(a, b):
    if isinstance(a, core.Literal) or isinstance(b, core.Literal):
      return (isinstance(a, core.Literal) and isinstance(b, core.Literal)
              and _same_const(a.val, b.val))
    return vmap.get(a) is b

  for e1, e2 in zip(j1.eqns, j2.eqns):
    if e1.primitive is not e2.primitive or len(e1.invars) != len(e2.invars):
      return False
    if not all(same_atom(a, b) for a, b in zip(e1.invars, e2.invars)):
      return False
    if set(e1.params) != set(e2.params):
      return False
    skip = _RULE_PARAMS.get(e1.primitive.name, ())
    if not all(_same_param(e1.params[k], e2.params[k], L, P) for k in e1.params
               if k not in skip):
      return False
    for a, b in zip(e1.outvars, e2.outvars):
      if not _same_aval(a.aval, b.aval, L, P):
        return False
      vmap[a] = b
  return all(same_atom(a, b) for a, b in zip(j1.outvars, j2.outvars))


# ------------------------------------------------------------------------------------
# The decision, fed by the wrapper (no access to its internals)
# ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BucketContext:
  """What the bucketing decision needs from the jit wrapper, passed in explicitly.

  Attributes:
    name: the wrapped function's name (for messages).
    spec: the parsed ``buckets=`` spec.
    static_argnums: the wrapper's static positional arguments.
    cache: decisions and traces (owned by the wrapper, cleared with its cache).
    trace: ``trace(args, kwargs) -> (static, closed_jaxpr, out_tree)`` on abstract arguments;
      ``static`` has ``static_pos``, ``static_kw`` and ``node_pos`` (positions of NNX objects).
  """
  name: str
  spec: BucketSpec
  static_argnums: tuple
  cache: BucketCache
  trace: Any

def _bucket_leaves(jitted: BucketContext, args):
  spec = jitted.spec
  if spec.argnum >= len(args):
    raise TypeError(f"adaptive_jit({jitted.name}): buckets['argnum']={spec.argnum} but only "
                    f"{len(args)} positional arguments were given; pass the bucketed argument "
                    "positionally")
  if spec.argnum in jitted.static_argnums:
    raise ValueError(f"adaptive_jit({jitted.name}): buckets['argnum']={spec.argnum} is a "
                     "static argument; bucket a dynamic array argument")
  leaves = jax.tree_util.tree_leaves(args[spec.argnum])
  lengths = set()
  for x in leaves:
    shape = np.shape(x)
    ax = spec.axis if spec.axis >= 0 else len(shape) + spec.axis
    if not 0 <= ax < len(shape):
      raise ValueError(f"adaptive_jit({jitted.name}): buckets['axis']={spec.axis} is out of "
                       f"range for argument {spec.argnum} with shape {shape}")
    lengths.add(shape[ax])
  if len(lengths) != 1:
    raise ValueError(f"adaptive_jit({jitted.name}): all arrays of argument {spec.argnum} must "
                     f"have the same size along buckets['axis']={spec.axis}, got {sorted(lengths)}")
  return leaves, lengths.pop()


def _pad_tree(tree, axis, P):
  def pad(x):
    ax = axis if axis >= 0 else np.ndim(x) + axis
    n = np.shape(x)[ax]
    if n == P:
      return x
    widths = [(0, 0)] * np.ndim(x)
    widths[ax] = (0, P - n)
    if _on_host(x):  # no per-length XLA compile for the pad
      # Keep the caller's committedness: a committed copy of an uncommitted input would
      # make the inner jit compile the same bucket twice.
      committed = isinstance(x, jax.Array) and getattr(x, "committed", True)
      return jax.device_put(np.pad(np.asarray(x), widths), x.sharding if committed else None)
    return jax.numpy.pad(x, widths)
  return jax.tree_util.tree_map(pad, tree)


def _on_host(x) -> bool:
  if isinstance(x, np.ndarray):
    return True
  try:
    return (isinstance(x, jax.Array) and x.is_fully_addressable
            and all(d.platform == "cpu" for d in x.devices()))
  except Exception:
    return False


def _slice_back(x, L, axis):
  if _on_host(x):  # CPU: a host-side slice avoids one XLA compile per length
    idx = [slice(None)] * np.ndim(x)
    idx[axis] = slice(0, L)
    return jax.device_put(np.asarray(x)[tuple(idx)], x.sharding)
  return jax.lax.slice_in_dim(x, 0, L, axis=axis)


def _abstract_pad(tree, axis, P):
  def f(x):
    shape = list(np.shape(x))
    ax = axis if axis >= 0 else len(shape) + axis
    shape[ax] = P
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype,
                                weak_type=getattr(jax.typeof(x), "weak_type", False))
  return jax.tree_util.tree_map(f, tree)


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                     weak_type=getattr(jax.typeof(x), "weak_type", False))
      if hasattr(x, "dtype") else x, tree)


def _signature_key(args, kwargs):
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  key = []
  for x in leaves:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      key.append(("a", tuple(np.shape(x)), str(x.dtype), getattr(jax.typeof(x), "weak_type", False)))
    else:
      try:
        hash(x)
        key.append(("s", type(x), x))
      except TypeError:
        key.append(("o", id(x)))
  return (treedef, tuple(key))


def _decide(jitted: BucketContext, args, kwargs, L, P):
  """Returns (ok, reason, out_tags) for padding argument argnum from L to P."""
  spec = jitted.spec
  try:
    key = (_signature_key(args, kwargs), L, P)
    hash(key)
  except TypeError:
    key = None
  cache = jitted.cache.decisions
  if key is not None and key in cache:
    return cache[key]
  try:
    args_l = list(args)
    args_l[spec.argnum] = _abstract(args[spec.argnum])
    args_p = list(args)
    args_p[spec.argnum] = _abstract_pad(args[spec.argnum], spec.axis, P)
    traces = []
    for a in (args_l, args_p):
      tkey = None
      if a is args_p and key is not None:
        tkey = _signature_key(tuple(a), kwargs)
        if tkey in jitted.cache.traces:
          traces.append(jitted.cache.traces[tkey])
          continue
      traces.append(jitted.trace(tuple(a), kwargs))
      if tkey is not None:
        jitted.cache.traces[tkey] = traces[-1]
    (st_l, cl_l, tree_l), (st_p, cl_p, tree_p) = traces
    if tree_l != tree_p or not _same_jaxpr(cl_l.jaxpr, cl_p.jaxpr, L, P, cl_l.consts, cl_p.consts):
      raise UnsafeBucketing("the computation depends on the length itself (the jaxprs at the "
                            f"true length {L} and at the bucket {P} differ beyond that size)")
    # Input tags: leaves of the bucketed argument carry the axis.
    dyn_args = list(args_p)
    for j, _ in st_p.static_pos:
      dyn_args[j] = None
    flat, _ = jax.tree_util.tree_flatten((tuple(dyn_args), {k: v for k, v in kwargs.items()
                                                            if k not in dict(st_p.static_kw)}),
                                         is_leaf=_nnx.is_graph_node)
    owners = _nnx.leaf_owners(dyn_args, {k: v for k, v in kwargs.items()
                                         if k not in dict(st_p.static_kw)})
    in_tags = []
    for i, x in enumerate(flat):
      if i in st_p.node_pos:
        continue
      if owners[i] == spec.argnum:
        in_tags.append(spec.axis if spec.axis >= 0 else len(np.shape(x)) + spec.axis)
      else:
        in_tags.append(None)
    in_tags += [None] * (len(cl_p.jaxpr.invars) - len(in_tags))
    out_tags = position_flow(cl_p.jaxpr, in_tags)
    n_user_out = tree_p.children()[0].num_leaves
    for i, (t, vl, vp) in enumerate(zip(out_tags, cl_l.out_avals, cl_p.out_avals)):
      if t is None and tuple(vl.shape) != tuple(vp.shape):
        raise UnsafeBucketing(f"output {i} has a length-dependent shape not tied to the padded axis")
      if t is not None and i >= n_user_out:
        raise UnsafeBucketing("an updated Flax NNX state depends on the padded axis")
    result = (True, "", tuple(out_tags[:n_user_out]))
  except UnsafeBucketing as e:
    result = (False, str(e), ())
  except Exception as e:  # tracing at the bucket size failed
    result = (False, f"tracing at the bucket size failed: {type(e).__name__}: {e}", ())
  if key is not None:
    cache[key] = result
    if not result[0]:
      warnings.warn(f"adaptive_jit({jitted.name}): not bucketing argument {spec.argnum} axis "
                    f"{spec.axis} ({L} -> {P}) because padding could change the results: "
                    f"{result[1]}. Running at the exact shape.", RuntimeWarning, stacklevel=4)
  return result


def maybe_pad(jitted: BucketContext, args, kwargs):
  """Pads the bucketed argument if safe.

  Returns ``(args, kwargs, post_fn | None, fell_back)``: ``fell_back`` is True when padding was
  refused (the call runs at the exact shape).
  """
  spec = jitted.spec
  all_leaves = jax.tree_util.tree_leaves((args, kwargs))
  if any(isinstance(x, core.Tracer) for x in all_leaves):
    return args, kwargs, None, False   # under an outer transformation: exact shapes
  _, L = _bucket_leaves(jitted, args)
  P = bucket_size(spec, L)
  if P == L:
    return args, kwargs, None, False
  ok, _, out_tags = _decide(jitted, args, kwargs, L, P)
  if not ok:
    return args, kwargs, None, True
  new_args = list(args)
  new_args[spec.argnum] = _pad_tree(args[spec.argnum], spec.axis, P)

  def post(out):
    leaves, treedef = jax.tree_util.tree_flatten(out)
    sliced = [x if t is None else _slice_back(x, L, t)
              for x, t in zip(leaves, out_tags)]
    return jax.tree_util.tree_unflatten(treedef, sliced)

  return tuple(new_args), kwargs, post, False


def describe(jitted: BucketContext, args, kwargs) -> dict | None:
  """Bucket info for ``explain`` (``None`` when no padding applies)."""
  spec = jitted.spec
  if any(isinstance(x, core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs))):
    return None
  _, L = _bucket_leaves(jitted, args)
  P = bucket_size(spec, L)
  ok = True if P == L else _decide(jitted, args, kwargs, L, P)[0]
  return {"argnum": spec.argnum, "axis": spec.axis, "length": int(L),
          "bucket": int(P if ok else L)}
