"""``lj.quantize``: post-training quantization of the weights feeding matmuls and convolutions.

Layout rule (the one used by ``quantize.freeze`` and by on-the-fly quantization): a weight is a
floating leaf with ``ndim >= 2`` whose **last axis is the output-channel axis** (Flax ``Linear``,
``Conv``, ``LinearGeneral``/``Einsum`` kernels ``(..., in, out)``).

* ``"int8"``: symmetric, one float32 scale per output channel (``absmax / 127`` over every other axis).
* ``"fp8"``: ``float8_e4m3fn`` values, one scale per output channel (``absmax / 448``).
* ``"int4"``: symmetric ``[-7, 7]``, one scale per group of ``group_size`` consecutive entries along
  axis ``-2`` (the contraction axis of Dense/Conv kernels) and output channel, chosen per group as
  the clipped absmax / 7 with the smallest squared error (ratios 1.0 ... 0.7); values packed two per
  ``int8`` byte (low nibble first, sign-extended on unpacking).

Which leaves are quantized when the function is called with float parameters: the leaves of the
parameter argument (``argnums``) that reach a ``dot_general``/``conv_general_dilated`` operand
directly (through ``jit`` calls, ``checkpoint`` bodies and no-op casts). Other uses of the same leaf
(a gather, an add) see the float value. With frozen parameters (``quantize.freeze``) every packed
leaf is used packed: matmuls consume it quantized, any other use dequantizes it.

Compute: when the weight's scale axis is a free (output) axis of the matmul, int8 weights run as
``x @ q`` with the per-channel scale applied to the result (with ``activations="int8"`` as an
``int8 x int8 -> int32`` dot, the real integer path); otherwise the weight is dequantized and the
matmul runs in float. All of it is XLA (on CPU: the dequantize is fused into the consumer).

Activations (``activations="int8"|"fp8"``): every weight matmul, also inside ``scan`` / ``while`` /
``cond`` bodies, gets one per-tensor input scale, the absmax of its input over the calibration
examples (inside a loop body: over every iteration too, collected through a host callback during
calibration; a scan over stacked layers therefore shares one scale across its layers). A site the
calibration never ran (an untaken branch) keeps float activations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, overload

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.compression._interp import Hook, evaluate
from lepton_jax.jaxpr._compat import Tracer
from lepton_jax.jaxpr._walk import aval_bytes

__all__ = ["quantize", "QuantizedArray", "QuantizeReport", "QuantizedWeight"]

_API = "lj.quantize"
_WEIGHTS = ("int8", "int4", "fp8")
_ACTIVATIONS = (None, "int8", "fp8")
_FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0


# ----------------------------------------------------------------- packed arrays


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
  """A packed weight: ``values`` (int8 / float8 / two int4 per int8 byte) and float32 ``scale``.

  Attributes:
    values, scale: the arrays (pytree children).
    kind: ``"int8"``, ``"int4"`` or ``"fp8"``.
    shape, dtype: shape and dtype of the float weight it stands for.
    group_size: int4 group length along axis ``-2`` (``None`` otherwise).
  """

  def __init__(self, values, scale, kind, shape, dtype, group_size=None):
    self.values, self.scale = values, scale
    self.kind, self.shape, self.dtype, self.group_size = kind, tuple(shape), np.dtype(dtype), group_size

  def tree_flatten(self):
    return (self.values, self.scale), (self.kind, self.shape, self.dtype.name, self.group_size)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return aval_bytes(self.values) + aval_bytes(self.scale)

  def __repr__(self) -> str:
    return f"QuantizedArray({self.kind}, shape={self.shape}, dtype={self.dtype.name}, bytes={self.nbytes})"

  def int_values(self):
    """The quantized values in the weight's shape (int8 for int8/int4, float8 for fp8)."""
    if self.kind != "int4":
      return self.values
    p = self.values
    lo = jnp.right_shift(jnp.left_shift(p, 4), 4)  # arithmetic shifts on int8 sign-extend
    hi = jnp.right_shift(p, 4)
    n = math.prod(self.shape)
    return jnp.stack([lo, hi], axis=-1).reshape(-1)[:n].reshape(self.shape)

  def dequantize(self):
    """The float weight ``values * scale`` in the original dtype."""
    q = self.int_values().astype(jnp.float32)
    if self.kind == "int4":
      g = self.group_size
      lead, i, o = self.shape[:-2], self.shape[-2], self.shape[-1]
      q = q.reshape(*lead, i // g, g, o) * self.scale
      return q.reshape(self.shape).astype(self.dtype)
    return (q * self.scale).astype(self.dtype)


def _group(i: int, group_size: int) -> int:
  """The largest divisor of ``i`` not above ``group_size``."""
  g = min(group_size, i)
  while i % g:
    g -= 1
  return g


#: Clipping ratios tried per int4 group: the scale is ``ratio * absmax / 7`` with the smallest squared
#: error over the group (round-to-nearest with absmax alone wastes levels on the one largest entry).
_INT4_CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _int4_scale(xg):
  """Per-group scale of ``xg`` (groups on axis -2): the MSE-best clipped absmax / 7."""
  top = jnp.max(jnp.abs(xg), axis=-2, keepdims=True)
  top = jnp.where(top > 0, top, 1.0)
  best_s, best_e = None, None
  for r in _INT4_CLIP:
    s = top * (r / 7.0)
    e = jnp.sum(jnp.square(jnp.clip(jnp.round(xg / s), -7, 7) * s - xg), axis=-2, keepdims=True)
    if best_s is None:
      best_s, best_e = s, e
    else:
      better = e < best_e
      best_s, best_e = jnp.where(better, s, best_s), jnp.where(better, e, best_e)
  return best_s


def _pack(w, kind: str, group_size: int) -> QuantizedArray:
  w = jnp.asarray(w)
  shape, dtype = w.shape, w.dtype
  x = w.astype(jnp.float32)
  if kind == "int4":
    lead, i, o = shape[:-2], shape[-2], shape[-1]
    g = _group(i, group_size)
    xg = x.reshape(*lead, i // g, g, o)
    scale = _int4_scale(xg)
    q = jnp.clip(jnp.round(xg / scale), -7, 7).astype(jnp.int8).reshape(-1)
    if q.size % 2:
      q = jnp.concatenate([q, jnp.zeros((1,), jnp.int8)])
    pairs = q.reshape(-1, 2)
    packed = jnp.bitwise_or(jnp.bitwise_and(pairs[:, 0], jnp.int8(0x0F)), jnp.left_shift(pairs[:, 1], 4))
    return QuantizedArray(packed.astype(jnp.int8), scale, kind, shape, dtype, g)
  axes = tuple(range(w.ndim - 1))
  top = 127.0 if kind == "int8" else _FP8_MAX
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / top
  scale = jnp.where(scale > 0, scale, 1.0)
  if kind == "int8":
    q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
  else:
    q = jnp.clip(x / scale, -_FP8_MAX, _FP8_MAX).astype(_FP8)
  return QuantizedArray(q, scale, kind, shape, dtype)


#: ``_pack`` compiled once per shape and format (eagerly, each of its ~40 small ops compiles on its own)
_pack_jit = jax.jit(_pack, static_argnums=(1, 2))


def _eligible(x) -> bool:
  return (not isinstance(x, QuantizedArray) and hasattr(x, "shape") and np.ndim(x) >= 2
          and jnp.issubdtype(jnp.result_type(x), jnp.floating))


def _check_kind(weights, api):
  if weights not in _WEIGHTS:
    raise ValueError(f"{api}: weights={weights!r} is not supported; valid: {', '.join(map(repr, _WEIGHTS))}")


def _check_group(group_size, api):
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"{api}: group_size={group_size!r} must be an int >= 1 (int4 group length along axis -2)")


def freeze(params, *, weights: str = "int8", group_size: int = 128):
  """Packs every floating leaf with ``ndim >= 2`` of ``params`` into a :class:`QuantizedArray`.

  Other leaves (biases, norm scales, integer leaves) are returned unchanged. The result is accepted
  by any ``lj.quantize``-d function in place of the float parameters (each packed leaf keeps its own
  format). Note the rule is by shape: an embedding table is packed too and dequantized where it is
  gathered.

  >>> import jax.numpy as jnp, lepton_jax as lj
  >>> p = lj.quantize.freeze({"w": jnp.ones((8, 4)), "b": jnp.zeros(4)})
  >>> p["w"].values.dtype, p["w"].nbytes, p["b"].shape
  (dtype('int8'), 48, (4,))
  """
  _check_kind(weights, "lj.quantize.freeze")
  _check_group(group_size, "lj.quantize.freeze")
  return jax.tree_util.tree_map(lambda x: _pack_jit(x, weights, group_size) if _eligible(x) else x, params,
                                is_leaf=lambda x: isinstance(x, QuantizedArray))


# ----------------------------------------------------------------- the rewrite


class _Weight:
  """A parameter leaf flowing through the evaluator (float array or QuantizedArray)."""

  def __init__(self, index, path, value, dequantized=False):
    self.index, self.path, self.value = index, path, value
    self.dequantized = dequantized  # a frozen weight's float values inside a loop / branch body

  def materialize(self):
    return self.value.dequantize() if isinstance(self.value, QuantizedArray) else self.value


def _scale_axis_out(eqn, w_is_rhs: bool, w_ndim: int):
  """Output axis carrying the weight's last (output-channel) axis, or ``None`` if not a free axis."""
  name, p = eqn.primitive.name, eqn.params
  last = w_ndim - 1
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    contract, batch = (rc, rb) if w_is_rhs else (lc, lb)
    if batch or last in contract:
      return None
    lhs_nd = len(eqn.invars[0].aval.shape)
    rhs_nd = len(eqn.invars[1].aval.shape)
    n_batch = len(lb)
    lhs_free = [d for d in range(lhs_nd) if d not in lc and d not in lb]
    rhs_free = [d for d in range(rhs_nd) if d not in rc and d not in rb]
    if w_is_rhs:
      return n_batch + len(lhs_free) + rhs_free.index(last)
    return n_batch + lhs_free.index(last)
  # conv: the kernel must be the rhs and its output-feature dim its last axis
  dn = p["dimension_numbers"]
  if not w_is_rhs or dn.rhs_spec[0] != last or p.get("batch_group_count", 1) != 1:
    return None
  return dn.out_spec[1]


def _fake_quant(x, scale, kind):
  if kind == "int8":
    return (jnp.clip(jnp.round(x / scale), -127, 127) * scale).astype(x.dtype)
  return (jnp.clip(x / scale, -_FP8_MAX, _FP8_MAX).astype(_FP8).astype(jnp.float32) * scale).astype(x.dtype)


@dataclasses.dataclass
class _Site:
  path: str
  index: int
  primitive: str
  path_kind: str   # "int8-dot", "fp8-dot", "scaled-dot", "dequantize"


class _QuantHook(Hook):
  inline_calls = True  # jit / checkpoint bodies are evaluated in place (activation sites stay top level)

  def __init__(self, weights, group_size, act_kind=None, act_scales=None, only=None, calibrate=False):
    self.weights, self.group_size = weights, group_size
    self.act_kind, self.act_scales = act_kind, act_scales
    self.only, self.calibrate = only, calibrate
    self.sites: list = []
    self.absmax: list = []      # calibration: (site, traced absmax) of top-level sites
    self.loop_absmax: dict = {}  # calibration: site -> host absmax over iterations (loop bodies)
    self.act_sites = 0

  def record(self, site, value):
    """Host side of a loop body's calibration callback: the running absmax of ``site``."""
    self.loop_absmax[site] = max(self.loop_absmax.get(site, 0.0), float(value))

  def materialize(self, x):
    return x.materialize() if isinstance(x, _Weight) else x

  def passthrough(self, eqn, invals):
    if len(invals) == 1 and isinstance(invals[0], _Weight):
      name = eqn.primitive.name
      if name == "copy" or name == "copy_p" or (
          name == "convert_element_type" and eqn.params["new_dtype"] == eqn.invars[0].aval.dtype):
        return invals[0]
    return None

  def carry_in(self, x):
    if not isinstance(x, _Weight):
      return None
    return (x.index, x.path, x.dequantized or isinstance(x.value, QuantizedArray))

  def enter(self, token, value):
    # Inside a loop / branch body the weight is the body's float input (a scan's xs: one slice per
    # iteration), quantized on the fly there (per-slice scales for stacked weights). A frozen
    # weight enters dequantized and is used as it is (its values already lie on its packed grid).
    return _Weight(token[0], token[1], value, dequantized=token[2])

  def matmul(self, eqn, invals, scope):
    if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
      return None
    lhs, rhs = invals
    if isinstance(rhs, _Weight):
      w, x, w_is_rhs = rhs, lhs, True
    elif isinstance(lhs, _Weight):
      w, x, w_is_rhs = lhs, rhs, False
    else:
      return None
    x = self.materialize(x)
    if self.only is not None and w.index not in self.only:
      return None  # caller materializes
    # Every weight matmul is an activation site, numbered in trace order (the calibration pass and
    # the quantized pass trace the same bodies in the same order). Its scale is the absmax of its
    # input over the calibration examples and, inside loop bodies, over every iteration (one scale
    # per site, shared by the iterations: a scan over stacked layers shares it across layers).
    site = None
    if self.calibrate or self.act_kind is not None:
      site, self.act_sites = self.act_sites, self.act_sites + 1
    if self.calibrate:
      m = jnp.max(jnp.abs(x)).astype(jnp.float32)
      if self.depth == 0:
        self.absmax.append((site, m))
      else:  # a loop / branch body: the per-iteration maxima leave the body through a host callback
        jax.debug.callback(functools.partial(self.record, site), m)
      self.sites.append(_Site(w.path, w.index, eqn.primitive.name, "calibrate"))
      return None
    # None: the site never ran in calibration (or lies past the calibrated ones: __call__ raises)
    s_x = self.act_scales[site] if site is not None and site < len(self.act_scales) else None
    if w.dequantized:
      # a frozen weight inside a loop / branch body: its float values lie on its packed grid
      self.sites.append(_Site(w.path, w.index, eqn.primitive.name, "dequantize"))
      if s_x is None:
        return None
      params = {k: v for k, v in eqn.params.items() if k != "preferred_element_type"}
      xq, wf = _fake_quant(x, s_x, self.act_kind), w.materialize().astype(jnp.result_type(x))
      y = eqn.primitive.bind(*((xq, wf) if w_is_rhs else (wf, xq)), **dict(params, preferred_element_type=None))
      return y.astype(eqn.outvars[0].aval.dtype)
    q = w.value if isinstance(w.value, QuantizedArray) else _pack(w.value, self.weights, self.group_size)
    out_axis = _scale_axis_out(eqn, w_is_rhs, q.ndim) if q.kind != "int4" else None
    out_dtype = eqn.outvars[0].aval.dtype
    params = {k: v for k, v in eqn.params.items() if k != "preferred_element_type"}
    order = (lambda a, b: (b, a)) if not w_is_rhs else (lambda a, b: (a, b))
    if out_axis is None:
      kind_used = "dequantize"
      wf = q.dequantize()
      if s_x is not None:
        x = _fake_quant(x, s_x, self.act_kind)
      y = eqn.primitive.bind(*order(x, wf.astype(jnp.result_type(x))), **dict(params, preferred_element_type=None))
    else:
      shape = [1] * len(eqn.outvars[0].aval.shape)
      shape[out_axis] = q.shape[-1]
      w_scale = q.scale.reshape(shape)
      if s_x is not None and self.act_kind == q.kind == "int8":
        kind_used = "int8-dot"
        xq = jnp.clip(jnp.round(x / s_x), -127, 127).astype(jnp.int8)
        acc = eqn.primitive.bind(*order(xq, q.values), **dict(params, preferred_element_type=np.dtype(jnp.int32)))
        y = acc.astype(jnp.float32) * (w_scale * s_x)
      elif s_x is not None and self.act_kind == q.kind == "fp8":
        kind_used = "fp8-dot"
        xq = jnp.clip(x / s_x, -_FP8_MAX, _FP8_MAX).astype(_FP8)
        acc = eqn.primitive.bind(*order(xq, q.values), **dict(params, preferred_element_type=np.dtype(jnp.float32)))
        y = acc * (w_scale * s_x)
      else:
        kind_used = "scaled-dot"
        if s_x is not None:
          x = _fake_quant(x, s_x, self.act_kind)
        xd = jnp.result_type(x)
        acc = eqn.primitive.bind(*order(x, q.int_values().astype(xd)), **dict(params, preferred_element_type=None))
        y = acc.astype(jnp.float32) * w_scale
    self.sites.append(_Site(w.path, w.index, eqn.primitive.name, kind_used))
    return y.astype(out_dtype)


# ----------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """One quantized parameter leaf.

  Attributes:
    path: key path inside the parameter argument (``"['dense']['kernel']"``).
    shape: float shape. kind: format. uses: matmul/conv sites consuming it.
    compute: how each site computes (``int8-dot``, ``fp8-dot``, ``scaled-dot``, ``dequantize``).
    bytes_before, bytes_after: float bytes and packed bytes (values + scales).
    output_error: relative L2 error of the function's output with only this weight quantized
      (weights only; ``nan`` when the parameters were passed frozen).
  """
  path: str
  shape: tuple
  kind: str
  uses: int
  compute: tuple
  bytes_before: int
  bytes_after: int
  output_error: float

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["shape"], d["compute"] = list(self.shape), list(self.compute)
    return d


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
  """What :func:`quantize` does for one batch.

  Attributes:
    weights_kind, activations_kind: the options.
    weights: :class:`QuantizedWeight` rows.
    bytes_before, bytes_after: totals over quantized weights.
    output_error: relative L2 error of the output with every weight (and activation) quantized.
  """
  weights_kind: str
  activations_kind: str | None
  weights: tuple
  bytes_before: int
  bytes_after: int
  output_error: float

  @property
  def compression(self) -> float:
    return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

  def to_dict(self) -> dict:
    return {"weights_kind": self.weights_kind, "activations_kind": self.activations_kind,
            "weights": [w.to_dict() for w in self.weights], "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after, "compression": self.compression, "output_error": self.output_error}

  def __str__(self) -> str:
    lines = [f"quantize: weights={self.weights_kind} activations={self.activations_kind} "
             f"({len(self.weights)} weights, {self.bytes_before:,} -> {self.bytes_after:,} bytes, "
             f"{self.compression:.2f}x, output rel. L2 error {self.output_error:.2e})",
             f"{'weight':<32}{'shape':<16}{'uses':>5}{'before':>12}{'after':>12}{'rel.err':>10}  compute"]
    for w in self.weights:
      lines.append(f"{w.path:<32}{str(w.shape):<16}{w.uses:>5}{w.bytes_before:>12,}{w.bytes_after:>12,}"
                   f"{w.output_error:>10.2e}  {','.join(sorted(set(w.compute)))}")
    return "\n".join(lines)


def _rel_l2(ref, got) -> float:
  a = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(ref)])
  b = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(got)])
  den = float(jnp.linalg.norm(a))
  return float(jnp.linalg.norm(a - b)) / (den if den > 0 else 1.0)


# ----------------------------------------------------------------- the transform


class _Quantized:
  """The callable returned by :func:`quantize`."""

  def __init__(self, fun, weights, activations, calibration, argnums, group_size):
    functools.update_wrapper(self, fun)
    self._fun, self.weights, self.activations = fun, weights, activations
    self.argnums, self.group_size = argnums, group_size
    self._calibration = calibration
    self._cache: dict = {}
    self._act_scales = None
    if activations is not None:
      self._act_scales = self._calibrate(calibration)

  # -- tracing

  def _prepare(self, args, kwargs):
    if self.argnums >= len(args):
      raise TypeError(f"{_API}: argnums={self.argnums} but {getattr(self._fun, '__name__', 'fun')} was called "
                      f"with {len(args)} positional arguments; pass the parameters positionally")
    is_q = lambda x: isinstance(x, QuantizedArray)
    p_with_path, p_tree = jax.tree_util.tree_flatten_with_path(args[self.argnums], is_leaf=is_q)
    p_leaves = [x for _, x in p_with_path]
    paths = [jax.tree_util.keystr(k) for k, _ in p_with_path]
    rest = args[:self.argnums] + args[self.argnums + 1:]
    r_leaves, r_tree = jax.tree_util.tree_flatten((rest, kwargs))
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) if is_q(x) else
             jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in p_leaves + r_leaves]
    key = (p_tree, r_tree, tuple((s.shape, s.dtype) for s in specs), tuple(
        (x.kind, x.group_size) if is_q(x) else None for x in p_leaves))
    entry = self._cache.get(key)
    if entry is None:
      n_p, argnums, fun = len(p_leaves), self.argnums, self._fun
      store = []

      def flat(*leaves):
        params = jax.tree_util.tree_unflatten(p_tree, leaves[:n_p])
        rest_, kw = jax.tree_util.tree_unflatten(r_tree, leaves[n_p:])
        a = rest_[:argnums] + (params,) + rest_[argnums:]
        outs, tree = jax.tree_util.tree_flatten(fun(*a, **kw))
        store.append(tree)
        return outs

      closed = jax.make_jaxpr(flat)(*specs)
      entry = (closed, store[-1])
      if not any(isinstance(c, Tracer) for c in closed.consts):
        self._cache[key] = entry
    closed, out_tree = entry
    inputs = [(_Weight(i, paths[i], x) if (is_q(x) or _eligible(x)) else x) for i, x in enumerate(p_leaves)]
    return closed, out_tree, inputs + r_leaves, paths, p_leaves

  def _run(self, args, kwargs, hook):
    closed, out_tree, inputs, _, _ = self._prepare(args, kwargs)
    outs = evaluate(closed.jaxpr, closed.consts, inputs, hook)
    return jax.tree_util.tree_unflatten(out_tree, [hook.materialize(o) for o in outs])

  def _hook(self, **kw):
    return _QuantHook(self.weights, self.group_size, self.activations, self._act_scales, **kw)

  def _calibrate(self, calibration):
    maxima = None
    for n, example in enumerate(calibration):
      if not isinstance(example, (tuple, list)):
        raise TypeError(f"{_API}: calibration must be an iterable of argument tuples (args for fun); element "
                        f"{n} is a {type(example).__name__}")
      hook = _QuantHook(self.weights, self.group_size, calibrate=True)

      def run(*a, hook=hook):
        self._run(a, {}, hook)
        return [m for _, m in hook.absmax]

      top_level = jax.jit(run)(*example)
      jax.effects_barrier()  # the loop bodies' callbacks have all run
      values = [None] * hook.act_sites  # None: a site that never ran (an untaken branch, an empty loop)
      for site, m in zip((s for s, _ in hook.absmax), top_level):
        values[site] = float(m)
      for site, m in hook.loop_absmax.items():
        values[site] = m
      if maxima is not None and len(values) != len(maxima):
        raise ValueError(f"{_API}: calibration example {n} reaches {len(values)} quantized matmuls, example 0 "
                         f"reached {len(maxima)}; calibration examples must share one structure")
      maxima = values if maxima is None else [
          b if a is None else a if b is None else max(a, b) for a, b in zip(maxima, values)]
    if maxima is None:
      raise ValueError(f"{_API}: calibration is empty; pass at least one example argument tuple")
    top = 127.0 if self.activations == "int8" else _FP8_MAX
    return [None if m is None else jnp.float32(m / top if m > 0 else 1.0) for m in maxima]

  # -- public

  def __call__(self, *args, **kwargs):
    hook = self._hook()
    out = self._run(args, kwargs, hook)
    if self._act_scales is not None and hook.act_sites != len(self._act_scales):
      raise ValueError(f"{_API}: this call reaches {hook.act_sites} quantized matmuls but calibration saw "
                       f"{len(self._act_scales)}; call with arguments of the calibrated structure")
    return out

  def freeze(self, params):
    """``lj.quantize.freeze(params)`` with this transform's ``weights`` and ``group_size``."""
    return freeze(params, weights=self.weights, group_size=self.group_size)

  def explain(self, *args, **kwargs) -> QuantizeReport:
    """Each quantized weight, its bytes before/after and output error on this batch.

    With no arguments, the first calibration example is used.
    """
    if not args and not kwargs:
      if not self._calibration:
        raise TypeError(f"{_API}.explain: pass example arguments (no calibration examples to fall back on)")
      args = tuple(self._calibration[0])
    # every run is compiled (run eagerly, each equation would compile on its own: seconds on CPU)
    ref = jax.jit(self._fun)(*args, **kwargs)
    hook = self._hook()
    full = jax.jit(lambda a, k: self._run(a, k, hook))(args, kwargs)
    _, _, _, paths, p_leaves = self._prepare(args, kwargs)
    indices = sorted({s.index for s in hook.sites})
    alone = [i for i in indices if not isinstance(p_leaves[i], QuantizedArray)]
    # weight-only error of each float leaf quantized alone: one program for all of them
    singles = jax.jit(lambda a, k: [self._run(a, k, _QuantHook(self.weights, self.group_size, only={i}))
                                    for i in alone])(args, kwargs) if alone else []
    errors = dict(zip(alone, (_rel_l2(ref, out) for out in singles)))
    rows = []
    for idx in indices:
      leaf = p_leaves[idx]
      if isinstance(leaf, QuantizedArray):
        q, before = leaf, math.prod(leaf.shape) * leaf.dtype.itemsize
      else:
        q, before = jax.eval_shape(lambda w: _pack(w, self.weights, self.group_size), leaf), aval_bytes(leaf)
      sites = [s for s in hook.sites if s.index == idx]
      rows.append(QuantizedWeight(paths[idx], tuple(q.shape), q.kind, len(sites), tuple(s.path_kind for s in sites),
                                  int(before), int(q.nbytes), errors.get(idx, float("nan"))))
    return QuantizeReport(self.weights, self.activations, tuple(rows), sum(r.bytes_before for r in rows),
                          sum(r.bytes_after for r in rows), _rel_l2(ref, full))

  def clear_cache(self) -> None:
    self._cache.clear()


class _QuantizeAPI:
  """``lj.quantize``: a transform with a ``freeze`` attribute (no state)."""

  freeze = staticmethod(freeze)
  QuantizedArray = QuantizedArray

  @overload
  def __call__(self, fun: Callable, /, *, weights: str = ..., activations: str | None = ...,
               calibration: Any = ..., argnums: int = ..., group_size: int = ...) -> Callable: ...

  @overload
  def __call__(self, fun: None = None, /, *, weights: str = ..., activations: str | None = ...,
               calibration: Any = ..., argnums: int = ..., group_size: int = ...) -> Callable: ...

  def __call__(self, fun=None, /, *, weights="int8", activations=None, calibration=None, argnums=0,
               group_size=128):
    """Post-training quantization of the weights (argument ``argnums``) feeding matmuls/convolutions.

    Args:
      fun: ``fun(params, *inputs)``; the parameter pytree is positional argument ``argnums``. It
        may be called with float parameters (quantized on the fly in the graph) or with
        ``lj.quantize.freeze(params)`` (stored packed).
      weights: ``"int8"`` (per-output-channel scales), ``"int4"`` (groups of ``group_size`` along
        the contraction axis, packed two per byte) or ``"fp8"`` (float8_e4m3fn, per-channel scales).
      activations: ``None``, ``"int8"`` or ``"fp8"``: per-tensor scale of each matmul's input,
        calibrated as the absmax over ``calibration`` (required then); inside loop bodies the
        absmax is also over iterations.
      calibration: an iterable of argument tuples for ``fun`` (run in float at decoration time).
      argnums: which positional argument holds the parameters.
      group_size: int4 group length.

    >>> import jax, jax.numpy as jnp, lepton_jax as lj
    >>> f = lj.quantize(lambda p, x: x @ p["w"])
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> bool(jnp.allclose(f({"w": w}, jnp.ones((2, 16))), jnp.ones((2, 16)) @ w, atol=0.1))
    True
    """
    _check_kind(weights, _API)
    if activations not in _ACTIVATIONS:
      raise ValueError(f"{_API}: activations={activations!r} is not supported; valid: "
                       f"{', '.join(map(repr, _ACTIVATIONS))}")
    _check_group(group_size, _API)
    if isinstance(argnums, bool) or not isinstance(argnums, (int, np.integer)) or argnums < 0:
      raise ValueError(f"{_API}: argnums={argnums!r} must be an int >= 0 (the parameters' position)")
    if activations is not None:
      if calibration is None:
        raise ValueError(f"{_API}: activations={activations!r} needs calibration=[(args...), ...] example "
                         "argument tuples to set the activation scales")
    if calibration is not None:
      try:
        calibration = list(calibration)
      except TypeError:
        raise TypeError(f"{_API}: calibration must be an iterable of argument tuples, got "
                        f"{type(calibration).__name__}") from None

    def wrap(f):
      if not callable(f):
        raise TypeError(f"{_API}: fun must be callable, got {type(f).__name__} {f!r}")
      return _Quantized(f, weights, activations, calibration, int(argnums), int(group_size))

    return wrap if fun is None else wrap(fun)

  def __repr__(self) -> str:
    return "lj.quantize"


quantize = _QuantizeAPI()
