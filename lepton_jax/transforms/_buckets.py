"""Shape buckets for ``adaptive_jit``: pad one axis to a bucket size, mask, slice outputs back.

A call whose bucketed axis has true length ``n`` runs the bucket's program at size ``P >= n`` with
``n`` passed at run time (a traced int32 scalar, not a static shape), so every length in a bucket
shares one compiled executable. The bucket's program is built by :mod:`._bucket_mask` from the
function's trace at ``P`` and at a probe length: position-wise operations pass the padded axis
along, operations that mix positions along it (reductions, softmax, means, contractions such as
attention's ``P @ V`` or a weight gradient, embedding-gradient scatter-adds, reverse cumulative
ops) are rewritten to ignore the padding, length-dependent literals become functions of ``n``,
and outputs along the axis are sliced back to the true length. Values and gradients equal the
unpadded computation (``adaptive_jit(jax.value_and_grad(loss), buckets=...)`` included).

Each new true length is traced once (no compile) and checked against the bucket's program; a
program that cannot be bucketed exactly (the axis merged with another by a reshape, a sort or a
convolution along it, random numbers drawn along it, ...) is refused once per function and
argument structure, with the reason and the equation's source line, and is remembered: later
calls run at their exact shape without analysing again.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np
from lepton_jax import _nnx
from lepton_jax.jaxpr import _compat as core
from lepton_jax.transforms._bucket_mask import MaskedProgram, UnsafeBucketing, build_masked

__all__ = ["BucketSpec", "BucketCache", "BucketContext", "Bucketed", "maybe_pad", "describe",
           "bucket_size", "UnsafeBucketing"]


@dataclasses.dataclass(frozen=True)
class BucketSpec:
  """A parsed ``buckets=`` spec. ``sizes``: ``"pow2"``, a sorted tuple, or ``("multiple", m)``."""
  argnum: int
  axis: int
  sizes: Any

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
    valid = ("use 'pow2', a list of positive ints such as [64, 128, 256], or "
             "{'multiple': 64}")
    if isinstance(sizes, str):
      if sizes != "pow2":
        raise ValueError(f"{api}: buckets['sizes']={sizes!r} is not valid; {valid}")
      return BucketSpec(argnum, axis, "pow2")
    if isinstance(sizes, dict):
      m = sizes.get("multiple")
      if set(sizes) != {"multiple"} or not isinstance(m, int) or isinstance(m, bool) or m <= 0:
        raise ValueError(f"{api}: buckets['sizes']={sizes!r} is not valid; {valid}")
      return BucketSpec(argnum, axis, ("multiple", m))
    try:
      lst = sorted({int(s) for s in sizes})
    except (TypeError, ValueError):
      raise TypeError(f"{api}: buckets['sizes'] must be 'pow2', a list of positive ints or "
                      f"{{'multiple': m}}, got {sizes!r}") from None
    if not lst or lst[0] <= 0 or any(isinstance(s, bool) or int(s) != s for s in sizes):
      raise ValueError(f"{api}: buckets['sizes'] must be a non-empty list of positive ints, got "
                       f"{sizes!r}")
    return BucketSpec(argnum, axis, tuple(lst))


def bucket_size(spec: BucketSpec, n: int) -> int:
  """The bucket for length ``n`` (``n`` itself when above the largest listed size).

  >>> bucket_size(BucketSpec(0, 0, "pow2"), 33)
  64
  >>> bucket_size(BucketSpec(0, 0, ("multiple", 64)), 65)
  128
  """
  n = int(n)
  if spec.sizes == "pow2":
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
  if isinstance(spec.sizes, tuple) and spec.sizes and spec.sizes[0] == "multiple":
    m = spec.sizes[1]
    return max(m, -(-n // m) * m)
  for s in spec.sizes:
    if s >= n:
      return s
  return n


def _probe_length(spec: BucketSpec, P: int) -> int | None:
  """Another length in bucket ``P`` (to build its program when the first call is at ``P``)."""
  q = P - 1
  return q if q >= 1 and bucket_size(spec, q) == P else None


class BucketCache:
  """Per-function bucketing state (explicit and clearable).

  Attributes:
    plans: padded signature -> :class:`Bucketed` (the bucket's masked program), or the refusal
      reason (a str).
    lengths: true-length signature -> the bucket's :class:`Bucketed`, or a refusal reason.
    refused: signature with the bucketed size erased -> reason: refused once, never analysed again.
  """

  def __init__(self):
    self.plans: dict = {}
    self.lengths: dict = {}
    self.refused: dict = {}

  def clear(self):
    self.plans.clear()
    self.lengths.clear()
    self.refused.clear()


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
    choose: ``choose(masked, routed) -> MaskedProgram``: picks, on the compiled programs, between
      the bucket's masked program and the one whose attentions the kernel computes with the true
      lengths; ``None``: no attention routing.
  """
  name: str
  spec: BucketSpec
  static_argnums: tuple
  cache: BucketCache
  trace: Any
  choose: Any = None

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
    if isinstance(x, jax.Array):   # the common case, cheaply (this runs on every call)
      key.append(("a", x.shape, x.dtype, x.weak_type))
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
      key.append(("a", tuple(np.shape(x)), np.dtype(x.dtype), getattr(jax.typeof(x), "weak_type", False)))
    else:
      try:
        hash(x)
        key.append(("s", type(x), x))
      except TypeError:
        key.append(("o", id(x)))
  return (treedef, tuple(key))


def _erased_key(args, kwargs, argnum, axis):
  """The call signature with the bucketed argument's size along ``axis`` erased."""
  rest = tuple(None if i == argnum else a for i, a in enumerate(args))
  shapes = []
  for x in jax.tree_util.tree_leaves(args[argnum]):
    shape = list(np.shape(x))
    shape[axis if axis >= 0 else len(shape) + axis] = -1
    shapes.append((tuple(shape), str(jax.numpy.result_type(x))))
  return (_signature_key(rest, kwargs), jax.tree_util.tree_structure(args[argnum]), tuple(shapes))


@dataclasses.dataclass(eq=False)
class Bucketed:
  """A bucket's program: the masked program and how its flat outputs map back to pytrees.

  Hashed by identity (``eq=False``): it is a static argument of the wrapper's inner jit (one
  executable per bucket and argument structure).
  """
  program: MaskedProgram
  out_tree: Any
  n_user_out: int
  trace_p: Any = None   # the trace at the bucket size (reused to check new lengths)


def _in_tags(jitted: BucketContext, static, args_p, kwargs, n_invars):
  """``{axis: 0}`` for the flat inputs that are leaves of the bucketed argument, ``{}`` else."""
  spec = jitted.spec
  dyn_args = list(args_p)
  for j, _ in static.static_pos:
    dyn_args[j] = None
  dyn_kwargs = {k: v for k, v in kwargs.items() if k not in dict(static.static_kw)}
  flat, _ = jax.tree_util.tree_flatten((tuple(dyn_args), dyn_kwargs), is_leaf=_nnx.is_graph_node)
  owners = _nnx.leaf_owners(dyn_args, dyn_kwargs)
  tags = []
  for i, x in enumerate(flat):
    if i in static.node_pos:
      continue
    if owners[i] == spec.argnum:
      tags.append({spec.axis if spec.axis >= 0 else len(np.shape(x)) + spec.axis: 0})
    else:
      tags.append({})
  return tags + [{}] * (n_invars - len(tags))


def _build(jitted: BucketContext, args, kwargs, P: int, Q: int, trace_p=None, route=True):
  """The bucket's :class:`Bucketed` from the traces at ``P`` and ``Q`` (raises UnsafeBucketing).

  With ``route`` and a ``choose`` in the context, a second program whose attentions run on the
  kernel with the true lengths is built and the compiled programs decide between the two."""
  spec = jitted.spec
  args_p = list(args)
  args_p[spec.argnum] = _abstract_pad(args[spec.argnum], spec.axis, P)
  args_q = list(args)
  args_q[spec.argnum] = _abstract_pad(args[spec.argnum], spec.axis, Q)
  try:
    st_p, cl_p, tree_p = trace_p or jitted.trace(tuple(args_p), kwargs)
    _, cl_q, tree_q = jitted.trace(tuple(args_q), kwargs)
  except Exception as e:  # tracing at the bucket size failed
    raise UnsafeBucketing(f"tracing at another length failed: {type(e).__name__}: {e}") from None
  if tree_p != tree_q:
    raise UnsafeBucketing("the output structure changes with the length")
  tags = _in_tags(jitted, st_p, args_p, kwargs, len(cl_p.jaxpr.invars))
  program = build_masked(cl_p, cl_q, P, Q, tags)
  if route and jitted.choose is not None:
    try:
      routed = build_masked(cl_p, cl_q, P, Q, tags, route_attention=True)
    except UnsafeBucketing:
      routed = None
    if routed is not None:
      # New lengths are checked against the unrouted walk's rules.
      routed = dataclasses.replace(routed, rules=program.rules)
      program = jitted.choose(program, routed)
  n_user = tree_p.children()[0].num_leaves
  for t in program.out_tags[n_user:]:
    if t:
      raise UnsafeBucketing("an updated Flax NNX state has the padded axis")
  return Bucketed(program, tree_p, n_user, (st_p, cl_p, tree_p))


def _warn(jitted: BucketContext, L, P, reason):
  spec = jitted.spec
  warnings.warn(f"adaptive_jit({jitted.name}): not bucketing argument {spec.argnum} axis "
                f"{spec.axis} ({L} -> {P}) because padding could change the results: {reason}. "
                "Running at the exact shape (this function and argument structure will not be "
                "analysed again).", RuntimeWarning, stacklevel=5)


def _plan_for(jitted: BucketContext, args, kwargs, L: int, P: int):
  """The :class:`Bucketed` to run length ``L`` in bucket ``P``, or a refusal reason (str)."""
  spec = jitted.spec
  cache = jitted.cache
  try:
    key_l = _signature_key(tuple(args), kwargs)
    hit = cache.lengths.get(key_l)     # the steady state: a length seen before (plan or refusal)
  except TypeError:
    return "the arguments' structure is not hashable"
  if hit is not None:
    return hit
  try:
    base = _erased_key(args, kwargs, spec.argnum, spec.axis)
    hash(base)
  except TypeError:
    return "the arguments' structure is not hashable"
  if base in cache.refused:
    cache.lengths[key_l] = cache.refused[base]
    return cache.refused[base]
  args_p = list(args)
  args_p[spec.argnum] = _abstract_pad(args[spec.argnum], spec.axis, P)
  key_p = _signature_key(tuple(args_p), kwargs)
  plan = cache.plans.get(key_p)
  try:
    if plan is None:
      probe = L if L != P else _probe_length(spec, P)
      if probe is None:
        cache.lengths[key_l] = "the bucket has a single length"
        return cache.lengths[key_l]
      plan = _build(jitted, args, kwargs, P, probe)
      cache.plans[key_p] = plan
    elif L != P:
      # A new length in a known bucket: its rules must be the bucket's (one trace, no compile).
      other = _build(jitted, args, kwargs, P, L, trace_p=plan.trace_p, route=False)
      if other.program.rules != plan.program.rules:
        raise UnsafeBucketing(f"the program at length {L} differs from the one at the other "
                              f"lengths of bucket {P} beyond its size")
  except UnsafeBucketing as e:
    reason = str(e)
    cache.refused[base] = cache.lengths[key_l] = reason
    _warn(jitted, L, P, reason)
    return reason
  cache.lengths[key_l] = plan
  return plan


def maybe_pad(jitted: BucketContext, args, kwargs):
  """Pads the bucketed argument when the bucket's masked program applies.

  Returns ``(args, kwargs, post, fell_back, bucketed)``: ``bucketed`` is ``(Bucketed, n)`` to run
  the bucket's program with true length ``n`` on the padded ``args`` (then ``post`` slices the
  outputs back), or ``None`` to run the function as is; ``fell_back`` is True when bucketing was
  refused.
  """
  spec = jitted.spec
  all_leaves = jax.tree_util.tree_leaves((args, kwargs))
  if any(isinstance(x, core.Tracer) for x in all_leaves):
    return args, kwargs, None, False, None   # under an outer transformation: exact shapes
  _, L = _bucket_leaves(jitted, args)
  P = bucket_size(spec, L)
  plan = _plan_for(jitted, args, kwargs, L, P)
  if isinstance(plan, str):
    return args, kwargs, None, plan != "the bucket has a single length", None
  new_args = list(args)
  new_args[spec.argnum] = _pad_tree(args[spec.argnum], spec.axis, P)
  out_tags = plan.program.out_tags[:plan.n_user_out]

  def post(out):
    leaves, treedef = jax.tree_util.tree_flatten(out)
    sliced = []
    for x, t in zip(leaves, out_tags):
      for d, c in t.items():
        x = _slice_back(x, L + c, d)
      sliced.append(x)
    return jax.tree_util.tree_unflatten(treedef, sliced)

  return tuple(new_args), kwargs, post, False, (plan, np.int32(L))


def describe(jitted: BucketContext, args, kwargs) -> dict | None:
  """Bucket info for ``explain`` (``None`` under an outer transformation)."""
  spec = jitted.spec
  if any(isinstance(x, core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs))):
    return None
  _, L = _bucket_leaves(jitted, args)
  P = bucket_size(spec, L)
  plan = _plan_for(jitted, args, kwargs, L, P)
  info = {"argnum": spec.argnum, "axis": spec.axis, "length": int(L),
          "bucket": int(L if isinstance(plan, str) else P)}
  if isinstance(plan, str) and plan != "the bucket has a single length":
    info["refused"] = plan
  if not isinstance(plan, str) and plan.program.note:
    info["attention"] = plan.program.note
  return info
