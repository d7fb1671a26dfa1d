"""``lj.mixed_precision``: matmuls and convolutions in a low-precision compute dtype.

The function is traced to a jaxpr (once per argument structure, shapes and dtypes), and every
``dot_general`` / ``conv_general_dilated`` whose floating inputs are float32 is replaced by the same
operation on ``compute_dtype`` inputs with ``preferred_element_type=accum_dtype``; the result is cast
back to the original dtype. Nothing else is touched: exp/log, reductions, norms, softmax and losses
stay float32, and parameters and gradients keep their dtypes.

The replacement carries its own derivative rule (``jax.custom_jvp``): tangents are cast to
``compute_dtype`` and multiplied in ``compute_dtype``, so both forward-mode (``jax.jvp``,
``jax.jacfwd``) and reverse-mode (``jax.grad``: the transposed tangent matmuls, again in
``compute_dtype``; the matrix units accumulate in float32) work, and the saved residuals are the
``compute_dtype`` operands (half the bytes of float32). ``jax.jit``, ``jax.vmap`` and
``jax.checkpoint`` compose.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from lepton_jax.compression import _common
from lepton_jax.compression._interp import Hook, evaluate
from lepton_jax.jaxpr._compat import eval_jaxpr

__all__ = ["mixed_precision", "MixedPrecisionReport", "ConvertedOp", "DynamicLossScale"]

_API = "lj.mixed_precision"
_COMPUTE = ("bfloat16", "float16")
_ACCUM = ("float32", "bfloat16", "float16")
_KEEP_DEFAULT = ("norm", "softmax", "loss")


def _dtype_name(value, name, valid):
  try:
    d = jnp.dtype(value).name
  except TypeError:
    d = None
  if d not in valid:
    raise ValueError(f"{_API}: {name}={value!r} is not supported; valid: {', '.join(map(repr, valid))}")
  return d


# ----------------------------------------------------------------- the replacement op


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
  primitive: Any
  params: dict
  compute: Any
  accum: Any
  out_dtype: Any
  lhs_dtype: Any
  rhs_dtype: Any


def _bind(spec: _Spec, a, b, preferred):
  return spec.primitive.bind(a, b, **dict(spec.params, preferred_element_type=np.dtype(preferred)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _low_precision_op(lhs, rhs, spec: _Spec):
  lc, rc = lhs.astype(spec.compute), rhs.astype(spec.compute)
  return _bind(spec, lc, rc, spec.accum).astype(spec.out_dtype)


def _jvp(spec, primals, tangents):
  """Primal with ``accum`` accumulation; tangent bilinear in ``compute`` operands.

  Each tangent term is a ``compute x compute -> compute`` matmul cast to the output dtype, so its
  transpose (the backward pass under ``jax.grad``) is again ``compute``-dtype matmuls: the cotangent
  is cast to ``compute`` and the residuals are the ``compute`` operands (half of float32). Zero
  tangents are symbolic: differentiating only by the weights costs no extra matmul.
  """
  lhs, rhs = primals
  tl, tr = tangents
  lc, rc = lhs.astype(spec.compute), rhs.astype(spec.compute)
  y = _bind(spec, lc, rc, spec.accum).astype(spec.out_dtype)
  terms = []
  if not isinstance(tl, SymbolicZero):
    terms.append(_bind(spec, tl.astype(spec.compute), rc, spec.compute).astype(spec.out_dtype))
  if not isinstance(tr, SymbolicZero):
    terms.append(_bind(spec, lc, tr.astype(spec.compute), spec.compute).astype(spec.out_dtype))
  if not terms:
    return y, jnp.zeros_like(y)
  return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


_low_precision_op.defjvp(_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class ConvertedOp:
  """One matmul/convolution the rewrite saw.

  Attributes:
    primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
    lhs_shape, rhs_shape, out_shape: operand and result shapes.
    converted: whether it now runs in ``compute_dtype``.
    reason: why not (``""`` when converted).
    scope: enclosing named calls / name scopes.
  """
  primitive: str
  lhs_shape: tuple
  rhs_shape: tuple
  out_shape: tuple
  converted: bool
  reason: str
  scope: str

  def to_dict(self) -> dict:
    return {"primitive": self.primitive, "lhs_shape": list(self.lhs_shape), "rhs_shape": list(self.rhs_shape),
            "out_shape": list(self.out_shape), "converted": self.converted, "reason": self.reason,
            "scope": self.scope}


def _figures_str(before: dict, after: dict) -> list:
  lines = [f"{'compiled (forward)':<20}{'plain':>16}{'mixed':>16}{'ratio':>8}"]
  for k in ("temp_bytes", "argument_bytes", "output_bytes", "flops", "bytes_accessed"):
    b, a = before.get(k, 0), after.get(k, 0)
    r = f"{a / b:.3f}" if b else "-"
    lines.append(f"{k:<20}{b:>16,.0f}{a:>16,.0f}{r:>8}")
  return lines


@dataclasses.dataclass(frozen=True)
class MixedPrecisionReport:
  """What :func:`mixed_precision` did for one argument signature.

  Attributes:
    compute_dtype, accum_dtype: the policy.
    ops: every matmul/convolution seen (:class:`ConvertedOp`), converted or not.
    skipped_calls: custom_jvp/custom_vjp/shard_map calls containing matmuls, left unchanged.
    before, after: compiled figures of ``jax.jit(fun)`` and ``jax.jit(mixed_precision(fun))``
      (``temp_bytes``, ``argument_bytes``, ``output_bytes``, ``flops``, ``bytes_accessed``).
    backend: the backend compiled for.
  """
  compute_dtype: str
  accum_dtype: str
  ops: tuple
  skipped_calls: tuple
  before: dict
  after: dict
  backend: str

  @property
  def converted(self) -> int:
    return sum(op.converted for op in self.ops)

  def to_dict(self) -> dict:
    return {"compute_dtype": self.compute_dtype, "accum_dtype": self.accum_dtype,
            "ops": [op.to_dict() for op in self.ops], "skipped_calls": list(self.skipped_calls),
            "converted": self.converted, "before": dict(self.before), "after": dict(self.after),
            "backend": self.backend}

  def __str__(self) -> str:
    lines = [f"mixed_precision: compute={self.compute_dtype} accum={self.accum_dtype} "
             f"({self.converted}/{len(self.ops)} matmuls/convs converted, backend={self.backend})",
             f"{'primitive':<22}{'lhs':<18}{'rhs':<18}{'out':<18}{'status'}"]
    for op in self.ops:
      status = "converted" if op.converted else f"kept: {op.reason}"
      lines.append(f"{op.primitive:<22}{str(op.lhs_shape):<18}{str(op.rhs_shape):<18}{str(op.out_shape):<18}{status}")
    for s in self.skipped_calls:
      lines.append(f"left unchanged: {s}")
    lines.extend(_figures_str(self.before, self.after))
    return "\n".join(lines)


# ----------------------------------------------------------------- the rewrite


class _MixedHook(Hook):

  def __init__(self, compute, accum, keep):
    self.compute, self.accum, self.keep = compute, accum, keep
    self.ops: list = []
    self.skipped: list = []

  def _record(self, eqn, invals, converted, reason, scope):
    self.ops.append(ConvertedOp(
        primitive=eqn.primitive.name, lhs_shape=tuple(np.shape(invals[0])), rhs_shape=tuple(np.shape(invals[1])),
        out_shape=tuple(eqn.outvars[0].aval.shape), converted=converted, reason=reason,
        scope="/".join(s for s in scope if s)))

  def matmul(self, eqn, invals, scope):
    if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
      return None
    lhs, rhs = invals
    dts = [jnp.result_type(x) for x in (lhs, rhs)]
    f32, low = np.dtype("float32"), np.dtype(self.compute)
    if not all(jnp.issubdtype(d, jnp.floating) for d in dts):
      self._record(eqn, invals, False, "non-float operands", scope)
      return None
    if not all(d in (f32, low) for d in dts) or all(d == low for d in dts):
      self._record(eqn, invals, False, f"operands {dts[0].name} x {dts[1].name} (only float32 is converted)", scope)
      return None
    precision = eqn.params.get("precision")
    ps = precision if isinstance(precision, tuple) else (precision,)
    if any(p == jax.lax.Precision.HIGHEST or str(p).upper().endswith("HIGHEST") for p in ps if p is not None):
      self._record(eqn, invals, False, "precision=HIGHEST requested", scope)
      return None
    text = " ".join(scope).lower()
    hit = [k for k in self.keep if k.lower() in text]
    if hit:
      self._record(eqn, invals, False, f"inside a '{hit[0]}' scope (keep)", scope)
      return None
    params = {k: v for k, v in eqn.params.items() if k != "preferred_element_type"}
    spec = _Spec(eqn.primitive, params, low, np.dtype(self.accum), eqn.outvars[0].aval.dtype, dts[0], dts[1])
    self._record(eqn, invals, True, "", scope)
    return _low_precision_op(lhs, rhs, spec)

  def opaque(self, eqn, scope):
    self.skipped.append(f"{eqn.primitive.name} '{eqn.params.get('name', '')}' (custom derivative body kept as is)")


@dataclasses.dataclass
class _Entry:
  closed: Any
  out_tree: Any
  ops: tuple
  skipped: tuple


class _MixedPrecision:
  """The callable returned by :func:`mixed_precision`."""

  def __init__(self, fun, compute, accum, keep):
    functools.update_wrapper(self, fun)
    self._fun, self.compute_dtype, self.accum_dtype, self.keep = fun, compute, accum, keep
    self._cache: dict = {}

  def _entry(self, flat: _common.Flat) -> _Entry:
    cacheable = not _common.has_tracer(flat.leaves)  # leaves are never cached; consts may hold tracers
    key = flat.key()
    hit = self._cache.get(key)
    if hit is not None:
      return hit
    pure, store = _common.pure_function(self._fun, flat)
    specs = [_common.spec_of(x) for x in flat.leaves]
    closed = jax.make_jaxpr(pure)(*specs)
    hook = _MixedHook(self.compute_dtype, self.accum_dtype, self.keep)
    rewritten = jax.make_jaxpr(lambda *a: evaluate(closed.jaxpr, closed.consts, a, hook))(*specs)
    entry = _Entry(rewritten, store[-1], tuple(hook.ops), tuple(hook.skipped))
    if cacheable and not _common.has_tracer(rewritten.consts):
      self._cache[key] = entry
    return entry

  def __call__(self, *args, **kwargs):
    flat = _common.flatten_call(args, kwargs)
    entry = self._entry(flat)
    outs = eval_jaxpr(entry.closed.jaxpr, entry.closed.consts, *flat.leaves)
    out, states = jax.tree_util.tree_unflatten(entry.out_tree, outs)
    _common.update_nodes(flat, states)
    return out

  def lower(self, *args, **kwargs):
    """``jax.jit(self).lower(...)`` (array arguments)."""
    return jax.jit(self).lower(*args, **kwargs)

  def explain(self, *args, **kwargs) -> MixedPrecisionReport:
    """The :class:`MixedPrecisionReport` for these arguments (compiles plain and mixed forwards)."""
    flat = _common.flatten_call(args, kwargs)
    entry = self._entry(flat)
    if flat.nodes:
      before = after = {}
    else:
      before = _common.compiled_figures(self._fun, *args, **kwargs)
      after = _common.compiled_figures(self, *args, **kwargs)
    return MixedPrecisionReport(self.compute_dtype, self.accum_dtype, entry.ops, entry.skipped, before, after,
                                jax.default_backend())

  def clear_cache(self) -> None:
    self._cache.clear()

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)


@overload
def mixed_precision(fun: Callable, /, *, compute_dtype: str = ..., accum_dtype: str = ...,
                    keep: Sequence[str] = ...) -> Callable: ...


@overload
def mixed_precision(fun: None = None, /, *, compute_dtype: str = ..., accum_dtype: str = ...,
                    keep: Sequence[str] = ...) -> Callable[[Callable], Callable]: ...


def mixed_precision(fun=None, /, *, compute_dtype="bfloat16", accum_dtype="float32", keep=_KEEP_DEFAULT):
  """Runs the matmuls and convolutions of ``fun`` in ``compute_dtype`` with ``accum_dtype`` accumulation.

  Every ``dot_general`` / ``conv_general_dilated`` (also inside ``jit``, ``checkpoint``, ``scan``,
  ``while`` and ``cond`` bodies) whose floating operands are float32 takes ``compute_dtype`` operands
  and accumulates in ``accum_dtype``; its result is cast back to float32. All other operations
  (norms, softmax, exp/log, reductions, losses) run as written, in float32. Parameters, outputs and
  gradients keep their dtypes; the backward matmuls also run in ``compute_dtype``.

  Not converted (listed in ``.explain()`` with the reason): matmuls inside a named call or
  ``jax.named_scope`` whose name contains a ``keep`` word (case-insensitive; e.g. a
  ``jax.jit``-ed ``loss`` or ``log_softmax``), matmuls with ``precision=HIGHEST``, non-float32
  matmuls, and matmuls inside ``custom_jvp``/``custom_vjp`` functions (their derivative rule
  would no longer match). ``jax.jvp`` and ``jax.grad`` both differentiate the rewrite (tangent and
  cotangent matmuls in ``compute_dtype``).

  Args:
    fun: the function (pytrees of arrays and NNX objects in, pytree out).
    compute_dtype: ``"bfloat16"`` or ``"float16"`` (pair float16 with :class:`DynamicLossScale`).
    accum_dtype: ``"float32"`` (default) or the compute dtype.
    keep: name words whose scopes stay float32.

  >>> import jax, jax.numpy as jnp, lepton_jax as lj
  >>> f = lj.mixed_precision(lambda w, x: jnp.tanh(x @ w))
  >>> f(jnp.ones((4, 4)), jnp.ones((2, 4))).dtype
  dtype('float32')
  """
  compute = _dtype_name(compute_dtype, "compute_dtype", _COMPUTE)
  accum = _dtype_name(accum_dtype, "accum_dtype", _ACCUM)
  if accum not in ("float32", compute):
    raise ValueError(f"{_API}: accum_dtype={accum_dtype!r} must be 'float32' or the compute_dtype {compute!r}")
  if isinstance(keep, str):
    keep = (keep,)
  try:
    keep = tuple(keep)
  except TypeError:
    raise TypeError(f"{_API}: keep must be a sequence of name words like ('norm', 'softmax', 'loss'), "
                    f"got {type(keep).__name__} {keep!r}") from None
  for k in keep:
    if not isinstance(k, str) or not k:
      raise ValueError(f"{_API}: keep must hold non-empty strings (scope name words), got {k!r} in {keep!r}")

  def wrap(f):
    if not callable(f):
      raise TypeError(f"{_API}: fun must be callable, got {type(f).__name__} {f!r}")
    return _MixedPrecision(f, compute, accum, keep)

  return wrap if fun is None else wrap(fun)


# ----------------------------------------------------------------- loss scaling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
  """Dynamic loss scaling for float16 training (the jmp recipe), as a pytree.

  Multiply the loss by ``scale``, divide the gradients by it (``unscale``), then ``adjust`` with
  whether all gradients were finite: on overflow the scale is divided by ``factor`` (not below
  ``min_loss_scale``) and the step should be skipped; after ``period`` finite steps it is
  multiplied by ``factor``.

  >>> import jax.numpy as jnp, lepton_jax as lj
  >>> s = lj.DynamicLossScale(loss_scale=jnp.float32(2.0 ** 15))
  >>> float(s.adjust(jnp.bool_(False)).loss_scale)
  16384.0
  """
  loss_scale: Any
  counter: Any = dataclasses.field(default_factory=lambda: np.zeros((), np.int32))
  period: int = dataclasses.field(default=2000, metadata={"static": True})
  factor: float = dataclasses.field(default=2.0, metadata={"static": True})
  min_loss_scale: float = dataclasses.field(default=1.0, metadata={"static": True})

  def __post_init__(self):
    if isinstance(self.period, bool) or not isinstance(self.period, (int, np.integer)) or self.period < 1:
      raise ValueError(f"DynamicLossScale: period={self.period!r} must be an int >= 1")
    if not isinstance(self.factor, (int, float)) or not self.factor > 1:
      raise ValueError(f"DynamicLossScale: factor={self.factor!r} must be > 1")
    if not isinstance(self.min_loss_scale, (int, float)) or not self.min_loss_scale > 0:
      raise ValueError(f"DynamicLossScale: min_loss_scale={self.min_loss_scale!r} must be > 0")

  def scale(self, tree):
    """``tree * loss_scale`` (each leaf in its own dtype)."""
    s = jnp.asarray(self.loss_scale)
    return jax.tree_util.tree_map(lambda x: x * s.astype(jnp.result_type(x)), tree)

  def unscale(self, tree):
    """``tree / loss_scale``, computed in float32 and cast back to each leaf's dtype."""
    inv = 1.0 / jnp.asarray(self.loss_scale, jnp.float32)
    return jax.tree_util.tree_map(lambda x: (x.astype(jnp.float32) * inv).astype(jnp.result_type(x)), tree)

  @staticmethod
  def all_finite(tree) -> jax.Array:
    """A scalar bool: every element of every leaf is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
      return jnp.bool_(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()

  def adjust(self, grads_finite) -> "DynamicLossScale":
    """The next state given whether this step's gradients were all finite."""
    finite = jnp.asarray(grads_finite, bool)
    scale = jnp.asarray(self.loss_scale, jnp.float32)
    counter = jnp.asarray(self.counter, jnp.int32)
    grow = finite & (counter + 1 >= self.period)
    new_scale = jnp.where(finite, jnp.where(grow, scale * self.factor, scale),
                          jnp.maximum(scale / self.factor, self.min_loss_scale))
    new_counter = jnp.where(finite & ~grow, counter + 1, 0).astype(jnp.int32)
    return dataclasses.replace(self, loss_scale=new_scale, counter=new_counter)
