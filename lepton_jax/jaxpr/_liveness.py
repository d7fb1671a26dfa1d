"""Liveness and peak-memory estimates, for a jaxpr and for the forward+backward of grad.

Model: equations run one at a time in the given order. While an equation runs,
every value defined earlier and still needed later is live, plus its inputs and
its outputs, plus the internal peak of its nested sub-jaxprs (a ``jit``,
``remat``, ``scan`` body, ``cond`` branch...; the largest of them). After it, the
values it read for the last time are freed, and so are outputs nobody reads.
There is no aliasing, fusion or buffer reuse: this is the memory of an unfused,
eager-style schedule, which is what remat planning needs to compare schedules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from lepton_jax.jaxpr import _compat as jax_core

from lepton_jax.jaxpr._cost import jaxpr_cost
from lepton_jax.jaxpr._trace import validate_args
from lepton_jax.jaxpr._walk import aval_bytes, as_closed, sub_jaxprs

__all__ = ["Liveness", "liveness", "peak_live_bytes", "grad_peak_bytes", "saved_residual_bytes",
           "Residual", "saved_residuals", "grad_jaxpr", "GradMemory", "grad_memory"]


@dataclasses.dataclass(frozen=True)
class Liveness:
  """Result of :func:`liveness`.

  Attributes:
    peak_bytes: the largest entry of ``live_bytes`` (or the bytes live before
      the first equation when there are none).
    peak_index: position in the order (index into ``live_bytes``) where the
      peak happens; ``-1`` when the jaxpr has no equations.
    live_bytes: bytes live while each equation (in the given order) runs.
    order: the equation order used (indices into ``jaxpr.eqns``).
  """
  peak_bytes: int
  peak_index: int
  live_bytes: tuple
  order: tuple

  def to_dict(self) -> dict:
    return {"peak_bytes": self.peak_bytes, "peak_index": self.peak_index,
            "live_bytes": list(self.live_bytes), "order": list(self.order)}


def _unwrap(j):
  if hasattr(j, "closed_jaxpr") and not isinstance(j, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
    j = j.closed_jaxpr
  return as_closed(j).jaxpr


def _is_var(v) -> bool:
  return isinstance(v, jax_core.Var) and not isinstance(v, jax_core.DropVar)


def _on_host(x) -> bool:
  space = getattr(getattr(x, "aval", x), "memory_space", None)
  return space is not None and "host" in str(space).lower()


def _dev_bytes(x) -> int:
  """Device bytes of a value: values placed in host memory (offloaded) count 0."""
  return 0 if _on_host(x) else aval_bytes(x)


_LOOPS = frozenset({"scan", "while", "shard_map"})


def _inner_peak(sub, with_outputs, cache) -> int:
  """``with_outputs``: bool, or a tuple of bools (count inner output i?)."""
  key = (id(sub.closed_jaxpr.jaxpr), with_outputs)
  if key not in cache:
    cache[key] = _liveness(sub.closed_jaxpr.jaxpr, None, False, with_outputs, cache).peak_bytes
  return cache[key]


def _nested_extra(eqn, out_bytes, cache, out_counted=True) -> int:
  """Bytes the equation occupies while running, beyond what was live before it.

  Calls (``jit``, ``remat``, custom derivatives, ``cond`` branches) run once and
  produce the outer outputs themselves: ``max(outputs, inner peak incl. outputs)``.
  Loop bodies produce per-iteration values while the outer outputs (stacked
  ``ys``, carries) exist: ``outputs + inner peak excl. its outputs``.
  """
  subs = sub_jaxprs(eqn)
  if not subs:
    return out_bytes
  if eqn.primitive.name in _LOOPS:
    return out_bytes + max(_inner_peak(s, False, cache) for s in subs)
  peaks = []
  for s in subs:
    n_out = len(s.closed_jaxpr.jaxpr.outvars)
    mask = tuple(out_counted) if n_out == len(out_counted) else True
    peaks.append(_inner_peak(s, mask, cache))
  return max(out_bytes, max(peaks))


def _check_order(jaxpr, order) -> tuple:
  n = len(jaxpr.eqns)
  if order is None:
    return tuple(range(n))
  try:
    order = tuple(int(i) for i in order)
  except (TypeError, ValueError):
    raise TypeError(f"lepton_jax.jaxpr.liveness: order must be a sequence of equation indices, got {order!r}") from None
  if sorted(order) != list(range(n)):
    raise ValueError(
        f"lepton_jax.jaxpr.liveness: order must be a permutation of range({n}) (one entry per equation), "
        f"got {len(order)} entries {list(order)[:10]}{'...' if len(order) > 10 else ''}")
  defined = set(v for v in list(jaxpr.invars) + list(jaxpr.constvars))
  for pos, i in enumerate(order):
    eqn = jaxpr.eqns[i]
    for v in eqn.invars:
      if _is_var(v) and v not in defined:
        raise ValueError(
            f"lepton_jax.jaxpr.liveness: order is not a valid schedule: equation {i} "
            f"({eqn.primitive.name}, position {pos}) reads {v} before the equation that defines it; "
            "pass a topological order of the dataflow graph")
    defined.update(eqn.outvars)
  return order


def _liveness(jaxpr, order, include_inputs, include_outputs, cache, held=None) -> Liveness:
  """``held``: optional list of ``(bytes, input vars)`` groups (each group one buffer,
  e.g. a residual handed from the forward to the backward pass). Each group is counted
  from the start and freed after the last read of any of its vars (right away
  when none is read), unlike other inputs, which the caller holds throughout."""
  order = _check_order(jaxpr, order)
  eqns = [jaxpr.eqns[i] for i in order]
  end = len(eqns)
  outputs = set(v for v in jaxpr.outvars if _is_var(v))
  if isinstance(include_outputs, tuple):  # per-output mask (from an enclosing call)
    excluded_out = set(v for v, keep in zip(jaxpr.outvars, include_outputs) if _is_var(v) and not keep)
  else:
    excluded_out = set() if include_outputs else outputs
  last = {}
  for pos, eqn in enumerate(eqns):
    for v in eqn.invars:
      if _is_var(v):
        last[v] = pos
  inputs = [v for v in list(jaxpr.constvars) + list(jaxpr.invars) if _is_var(v)]
  input_set = set(inputs)
  counted = lambda v: (include_inputs or v not in input_set) and v not in excluded_out
  live = {}
  for v in inputs:
    if counted(v) and v not in live:
      live[v] = _dev_bytes(v)
  # bucket frees by position
  frees: dict[int, list] = {}
  unread = []
  for k, (nbytes, group) in enumerate(held or ()):
    group = [v for v in group if _is_var(v)]
    if not group or any(v in live or v in outputs for v in group):
      continue
    key = ("held", k)
    live[key] = int(nbytes)
    pos = max(last.get(v, -1) for v in group)
    (frees.setdefault(pos, []) if pos >= 0 else unread).append(key)
  cur = sum(live.values())
  initial = cur
  for key in unread:  # live at the start (the forward/backward boundary), never read
    cur -= live.pop(key)
  for v, pos in last.items():
    if v not in outputs and v not in input_set:  # the caller holds inputs throughout
      frees.setdefault(pos, []).append(v)
  live_bytes = []
  for pos, eqn in enumerate(eqns):
    before = cur
    transient = 0
    for v in eqn.outvars:
      if isinstance(v, jax_core.DropVar):
        transient += _dev_bytes(v)
      elif v not in live and counted(v):
        live[v] = _dev_bytes(v)
        cur += live[v]
    out_counted = tuple(counted(v) if _is_var(v) else True for v in eqn.outvars)
    live_bytes.append(before + _nested_extra(eqn, cur - before + transient, cache, out_counted))
    for v in frees.get(pos, ()):
      if v in live:
        cur -= live.pop(v)
    for v in eqn.outvars:  # outputs nobody reads
      if _is_var(v) and v not in last and v not in outputs and v in live:
        cur -= live.pop(v)
  if live_bytes:
    peak = max(live_bytes)
    idx = live_bytes.index(peak)
    if initial > peak:
      peak, idx = initial, -1
  else:
    peak, idx = initial, -1
  return Liveness(int(peak), int(idx), tuple(int(b) for b in live_bytes), tuple(order))


def liveness(jaxpr, order: Sequence[int] | None = None, include_inputs: bool = False,
             include_outputs: bool = True) -> Liveness:
  """Bytes live while each equation runs, for a given equation order.

  Args:
    jaxpr: a ``ClosedJaxpr``, ``Jaxpr`` or :class:`Traced`.
    order: a topological order of ``jaxpr.eqns`` (indices); default program order.
    include_inputs: count the jaxpr's inputs and constants; they are held by the
      caller, so they stay live for the whole computation.
    include_outputs: count the jaxpr's outputs (``False`` to leave out, e.g.,
      the gradients of a backward pass).

  Returns:
    A :class:`Liveness`.

  Raises:
    ValueError: ``order`` is not a permutation or reads a value before it is defined.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> j = jax.make_jaxpr(lambda x: jnp.sin(jnp.cos(x)))(jnp.ones(256))
  >>> ljx.liveness(j).live_bytes  # cos: its 1 KiB output; sin: cos's output + its own
  (1024, 2048)
  """
  return _liveness(_unwrap(jaxpr), order, include_inputs, include_outputs, {})


def peak_live_bytes(jaxpr, order: Sequence[int] | None = None, include_inputs: bool = False,
                    include_outputs: bool = True) -> int:
  """Peak of :func:`liveness` (bytes).

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> ljx.peak_live_bytes(jax.make_jaxpr(lambda x: jnp.sin(jnp.cos(x)))(jnp.ones(256)))
  2048
  """
  return liveness(jaxpr, order, include_inputs, include_outputs).peak_bytes


def _argnums_tuple(argnums, nargs, api) -> tuple:
  if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple, list)):
    raise TypeError(f"{api}: argnums must be an int or a tuple of ints, got {argnums!r}")
  t = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  for a in t:
    if isinstance(a, bool) or not isinstance(a, int) or not -nargs <= a < nargs:
      raise ValueError(f"{api}: argnums={argnums!r} is out of range for {nargs} positional arguments; "
                       f"use indices in [{-nargs}, {nargs})")
  return tuple(a % nargs for a in t)


def _prepare(fun, args, argnums, policy, api):
  if not callable(fun):
    raise TypeError(f"{api}: fun must be callable, got {type(fun).__name__}")
  if not args:
    raise TypeError(f"{api}: needs at least one positional argument to differentiate")
  argnums = _argnums_tuple(argnums, len(args), api)
  if policy is not None and not callable(policy):
    raise TypeError(f"{api}: policy must be None or a jax.checkpoint_policies policy (a callable), got {policy!r}")
  validate_args(tuple(args), {}, api=api)
  f = fun if policy is None else jax.checkpoint(fun, policy=policy)
  leaves, tree = jax.tree_util.tree_flatten(tuple(args))

  def split(flat):
    a = list(jax.tree_util.tree_unflatten(tree, flat))
    diff = [a[i] for i in argnums]

    def h(*d):
      b = list(a)
      for i, di in zip(argnums, d):
        b[i] = di
      return f(*b)
    return h, diff
  return split, leaves


def grad_jaxpr(fun: Callable, *args, argnums=0, policy=None):
  """Closed jaxpr of the forward + backward pass (``vjp`` with a ones cotangent).

  For a scalar ``fun`` this is the jaxpr of ``jax.grad(fun, argnums)``. Inputs are
  the flattened ``args``; outputs are the gradients.
  """
  api = "lepton_jax.jaxpr.grad_jaxpr"
  split, leaves = _prepare(fun, args, argnums, policy, api)

  def g(*flat):
    h, diff = split(flat)
    out, vjp_fn = jax.vjp(h, *diff)
    ct = jax.tree.map(lambda o: jax.numpy.ones_like(o), out)
    return vjp_fn(ct)
  return jax.make_jaxpr(g)(*leaves)


@dataclasses.dataclass(frozen=True)
class GradMemory:
  """Activation memory of the forward + backward pass (see :func:`grad_memory`).

  Attributes:
    peak_bytes: ``max(forward_peak_bytes, backward_peak_bytes)``.
    forward_peak_bytes: peak while the forward pass runs (residuals live from
      their definition to the end of the forward pass).
    backward_peak_bytes: peak while the backward pass runs; it starts with every
      saved residual live (so it is at least ``saved_bytes``) and frees each
      after its last read.
    saved_bytes: device bytes of the residuals saved between forward and backward,
      inputs, constants and literals excluded (JAX's saved-residual accounting).
    offloaded_bytes: bytes of saved residuals placed in host memory.
    flops: FLOPs (+ transcendentals) of the forward and backward jaxprs together
      (``jaxpr_cost``), so recomputation shows as the difference to plain ``jax.grad``.
  """
  peak_bytes: int
  forward_peak_bytes: int
  backward_peak_bytes: int
  saved_bytes: int
  offloaded_bytes: int
  flops: float = 0.0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def grad_memory(fun: Callable, *args, argnums=0, policy=None) -> GradMemory:
  """Activation peak and saved residuals of ``jax.grad(fun, argnums)``, from one trace.

  The forward pass (``jax.vjp``) and the backward pass (the ``vjp`` function
  applied to ones cotangents) are traced separately; the residuals JAX saves are
  the outputs of the first and the inputs of the second. :func:`liveness` runs
  on each, leaving out the function's inputs (parameters, batch) and the final
  gradients. At the boundary every saved residual is live, including ones the
  backward never reads (JAX keeps them in the ``vjp`` closure), so
  ``peak_bytes >= saved_bytes`` always holds. Values in host memory
  (offloaded residuals) are not counted as device bytes.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> m = ljx.grad_memory(lambda w, x: jnp.sum(jnp.tanh(x @ w)), jnp.ones((64, 64)), jnp.ones((8, 64)))
  >>> m.saved_bytes, m.peak_bytes >= m.saved_bytes
  (4096, True)
  """
  api = "lepton_jax.jaxpr.grad_memory"
  split, leaves = _prepare(fun, args, argnums, policy, api)
  box = {}

  def fwd(*flat):
    h, diff = split(flat)
    out, vjp_fn = jax.vjp(h, *diff)
    res, box["res_tree"] = jax.tree_util.tree_flatten(vjp_fn)
    outs, box["out_tree"] = jax.tree_util.tree_flatten(out)
    box["n_res"] = len(res)
    return list(res) + list(outs)
  fj = jax.make_jaxpr(fwd)(*leaves)
  n_res = box["n_res"]
  fwd_jaxpr = fj.jaxpr
  res_atoms = list(fwd_jaxpr.outvars[:n_res])
  out_avals = [v.aval for v in fwd_jaxpr.outvars[n_res:]]
  res_specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=getattr(v.aval, "weak_type", False))
               for v in res_atoms]

  def bwd(*res):
    vjp_fn = jax.tree_util.tree_unflatten(box["res_tree"], res)
    ct = jax.tree_util.tree_unflatten(box["out_tree"], [jax.numpy.ones(a.shape, a.dtype) for a in out_avals])
    return vjp_fn(ct)
  bj = jax.make_jaxpr(bwd)(*res_specs).jaxpr
  # residuals: produced by forward equations (not inputs, constants, literals); one buffer per var
  inputs = set(fwd_jaxpr.invars) | set(fwd_jaxpr.constvars)
  groups: dict = {}
  for atom, bvar in zip(res_atoms, bj.invars):
    if _is_var(atom) and atom not in inputs:
      groups.setdefault(atom, []).append(bvar)
  saved = sum(_dev_bytes(a) for a in groups)
  offloaded = sum(aval_bytes(a) for a in groups if _on_host(a))
  cache = {}
  fwd_peak = _liveness(fwd_jaxpr, None, False, True, cache).peak_bytes
  # (traced with device avals: offloaded residuals count 0 until brought back)
  held = [(_dev_bytes(a), vs) for a, vs in groups.items()]
  bwd_peak = _liveness(bj, None, False, False, cache, held=held).peak_bytes
  fl = sum(float(c.flops + c.transcendentals) for c in (jaxpr_cost(fj), jaxpr_cost(bj)))
  return GradMemory(int(max(fwd_peak, bwd_peak)), int(fwd_peak), int(bwd_peak), int(saved), int(offloaded), fl)


def grad_peak_bytes(fun: Callable, *args, argnums=0, policy=None) -> int:
  """Activation peak of the forward + backward pass of ``fun``.

  The forward and backward of ``jax.grad(fun, argnums)`` (a ``vjp`` with ones
  cotangents for non-scalar outputs) are analysed with :func:`liveness`, leaving
  out the inputs (parameters, batch) and the final gradients: what is counted is
  the bytes of intermediates live at once, which is what ``remat`` changes. At the
  forward/backward boundary all saved residuals are live (see :func:`grad_memory`),
  so the peak is never below :func:`saved_residual_bytes`.

  Args:
    fun: function of arrays to differentiate (float outputs).
    *args: its positional arguments (pytrees of arrays).
    argnums: which positional arguments are differentiated.
    policy: optional ``jax.checkpoint_policies`` policy applied with
      ``jax.checkpoint(fun, policy=policy)``.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> f = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
  >>> ljx.grad_peak_bytes(f, jnp.ones((64, 64)), jnp.ones((8, 64))) > 0
  True
  """
  return grad_memory(fun, *args, argnums=argnums, policy=policy).peak_bytes


@dataclasses.dataclass(frozen=True)
class Residual:
  """One value saved by the forward pass for the backward pass."""
  shape: tuple
  dtype: str
  bytes: int
  source: str  # "input", "constant", "literal", or "output of <primitive>"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def saved_residuals(fun: Callable, *args, argnums=0, policy=None) -> list[Residual]:
  """The residuals JAX's autodiff saves between forward and backward of ``fun``.

  Same accounting as ``jax.ad_checkpoint.saved_residuals`` (unique values the
  ``vjp`` closure holds), restricted to ``argnums``.
  """
  api = "lepton_jax.jaxpr.saved_residuals"
  split, leaves = _prepare(fun, args, argnums, policy, api)

  def g(*flat):
    h, diff = split(flat)
    _, vjp_fn = jax.vjp(h, *diff)
    return jax.tree_util.tree_leaves(vjp_fn)
  closed = jax.make_jaxpr(g)(*leaves)
  jaxpr = closed.jaxpr
  producers = {}
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      producers[v] = eqn.primitive.name
  invars, constvars = set(jaxpr.invars), set(jaxpr.constvars)
  seen, out = set(), []
  for v in jaxpr.outvars:
    if isinstance(v, jax_core.Literal):
      src = "literal"
    else:
      if v in seen:
        continue
      seen.add(v)
      src = ("input" if v in invars else "constant" if v in constvars
             else f"output of {producers.get(v, '?')}")
    aval = v.aval
    out.append(Residual(tuple(getattr(aval, "shape", ())), str(getattr(aval, "dtype", "")), aval_bytes(aval), src))
  return out


def saved_residual_bytes(fun: Callable, *args, argnums=0, policy=None, exclude_inputs: bool = True) -> int:
  """Bytes of the residuals saved between the forward and backward of ``fun``.

  Args:
    fun, args, argnums, policy: as in :func:`grad_peak_bytes`.
    exclude_inputs: leave out residuals that are the function's own inputs,
      closed-over constants and literals (they are alive anyway).

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> f = lambda w, x: jnp.sum(jnp.tanh(x @ w))
  >>> ljx.saved_residual_bytes(f, jnp.ones((64, 64)), jnp.ones((8, 64)))  # tanh(y), 1 - tanh(y)**2
  4096
  """
  res = saved_residuals(fun, *args, argnums=argnums, policy=policy)
  if exclude_inputs:
    res = [r for r in res if r.source.startswith("output of")]
  return int(sum(r.bytes for r in res))
