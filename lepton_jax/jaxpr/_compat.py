"""The one place lepton_jax touches JAX internals (``jax._src``).

Role: every other module imports jaxpr types and internal helpers from here, so a JAX upgrade
(0.10.x here, 0.11.x on the GPU machine) is absorbed in one file. Public spellings
(``jax.extend.core``, ``jax.core``) are preferred; ``jax._src`` is used only for what has no public
name, each with a comment saying why.
"""

from __future__ import annotations

import jax
import jax.core as _jax_core
import jax.extend.core as _jex_core

# Public (jax.extend.core / jax.core) jaxpr data types.
ClosedJaxpr = _jex_core.ClosedJaxpr
Jaxpr = _jex_core.Jaxpr
JaxprEqn = _jex_core.JaxprEqn
Literal = _jex_core.Literal
Var = _jex_core.Var
DropVar = _jex_core.DropVar
Primitive = _jex_core.Primitive
new_jaxpr_eqn = _jex_core.new_jaxpr_eqn
jaxpr_as_fun = _jex_core.jaxpr_as_fun
no_effects = _jex_core.no_effects
AbstractValue = _jax_core.AbstractValue
ShapedArray = _jax_core.ShapedArray
Tracer = _jax_core.Tracer
eval_jaxpr = _jax_core.eval_jaxpr

# Internal: no public equivalent.
from jax._src import core as core  # noqa: E402  (trace_ctx, EvalTrace, physical_aval, join_effects, get_aval)
from jax._src import source_info_util as source_info_util  # noqa: E402  (new_jaxpr_eqn's source_info)
from jax._src.interpreters import partial_eval as pe  # noqa: E402  (dce_jaxpr, dce_rules, has_effects)

try:  # saved_residuals is public only as print_saved_residuals
  from jax._src.ad_checkpoint import saved_residuals as saved_residuals  # noqa: E402
except ImportError:  # pragma: no cover - future JAX
  saved_residuals = None

try:
  from jax._src.lax.control_flow import loops as _loops  # noqa: E402
  while_p = _loops.while_p
except (ImportError, AttributeError):  # pragma: no cover
  while_p = None

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def get_aval(x):
  return core.get_aval(x)


def physical_aval(aval):
  return core.physical_aval(aval)


def join_effects(*effects):
  return core.join_effects(*effects)


def is_eval_context() -> bool:
  """True when no JAX transformation is being traced (eager evaluation)."""
  current = getattr(core.trace_ctx, "trace", None)
  return current is None or isinstance(current, core.EvalTrace)


def is_var(x) -> bool:
  """A real (not dropped) jaxpr variable."""
  return isinstance(x, Var) and not isinstance(x, DropVar)


def is_literal(x) -> bool:
  return isinstance(x, Literal)


def is_jaxpr(x) -> bool:
  return isinstance(x, (Jaxpr, ClosedJaxpr))


# The current trace (for "is this tracer still alive" checks in _trace).
trace_ctx = core.trace_ctx
EvalTrace = core.EvalTrace


# Mosaic GPU interpret mode, for lepton_jax.pallas_kernels (not public in jax 0.10).
def mosaic_gpu_interpret_params():
  """``InterpretGPUParams()`` for Mosaic GPU interpret mode, or None if this JAX lacks it."""
  from jax.experimental.pallas import mosaic_gpu as _plgpu
  public = getattr(_plgpu, "InterpretParams", None)
  if public is not None:
    return public()
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError:
    return None
  return InterpretGPUParams()


# Compute capability of an NVIDIA device kind, for cross-lowering under an abstract GPU device
# (lepton_jax.pallas_kernels): jax >= 0.11 keeps the table in Pallas' Triton gpu_info (not public);
# jax 0.10 has none (its Triton lowering assumed sm_90 without a GPU), so a few common kinds are
# listed here for it (longest names first: "A100" before "A10").
_GPU_KINDS = (("RTX 4090", "8.9"), ("GH200", "9.0"), ("H100", "9.0"), ("H200", "9.0"),
              ("GB200", "10.0"), ("B200", "10.0"), ("A100", "8.0"), ("A30", "8.0"), ("A10", "8.6"),
              ("L40", "8.9"), ("L4", "8.9"), ("T4", "7.5"))


def gpu_compute_capability(device_kind: str) -> str | None:
  """``"9.0"``-style compute capability of ``device_kind`` (``"NVIDIA H100"``), or None if unknown."""
  try:
    from jax._src.pallas.triton import gpu_info as _gpu_info
  except ImportError:  # pragma: no cover - Pallas GPU without Triton
    _gpu_info = None
  find = getattr(_gpu_info, "gpu_version_from_device_kind", None)
  info_of = getattr(_gpu_info, "get_gpu_info_from_version", None)
  if find is not None and info_of is not None:  # jax >= 0.11
    version = find(str(device_kind))
    if version is not None:
      try:
        return str(info_of(version).arch_name)
      except ValueError:
        pass
  import re
  for kind, cc in _GPU_KINDS:
    if re.search(rf"\b{re.escape(kind)}\b", str(device_kind)):
      return cc
  return None


# scan's operand layout. jax 0.10: params ``num_consts`` / ``num_carry`` (and ``linear``, one flag per
# operand); jax 0.11: ``ft_in`` = (consts, carry, xs) and ``ft_out`` = (carry, ys) FlatTrees, no
# ``linear``. Feature-detected on the params themselves, so either version's equations are read.
def scan_counts(params) -> tuple[int, int]:
  """``(num_consts, num_carry)`` of a ``scan`` equation's params, on jax 0.10 and 0.11."""
  if "num_consts" in params:
    return int(params["num_consts"]), int(params["num_carry"])
  ft_in = params.get("ft_in")
  if ft_in is None:
    raise KeyError(f"scan params have neither num_consts/num_carry nor ft_in: {sorted(params)}")
  consts, carry, _ = ft_in.unpack()
  return len(consts), len(carry)


def scan_params(params, *, num_consts: int, num_carry: int, num_xs: int, num_ys: int,
                linear=None) -> dict:
  """``params`` of a ``scan`` with a new operand layout (``num_consts`` + ``num_carry`` +
  ``num_xs`` operands, ``num_carry`` + ``num_ys`` results), on jax 0.10 and 0.11.

  jax 0.10: sets ``num_consts`` / ``num_carry`` and ``linear`` (``linear`` given: one flag per
  operand; else all False when the params have it). jax 0.11: rebuilds ``ft_in`` / ``ft_out``,
  keeping a part's structure where its count is unchanged (``linear`` is ignored: 0.11 has none).
  """
  p = dict(params)
  n_in = num_consts + num_carry + num_xs
  if linear is not None and len(tuple(linear)) != n_in:
    raise ValueError(f"scan_params: linear has {len(tuple(linear))} flags for {n_in} operands")
  if "ft_in" not in p:
    p["num_consts"], p["num_carry"] = int(num_consts), int(num_carry)
    if "linear" in p:
      p["linear"] = tuple(bool(b) for b in linear) if linear is not None else (False,) * n_in
    return p
  from jax._src import flattree as _ft  # noqa: E402  (jax >= 0.11 only; no public name)
  old_in = p["ft_in"].unpack()
  old_out = p["ft_out"].unpack()
  keep = lambda old, n: old if len(old) == n else _ft.nones(n)
  p["ft_in"] = _ft.pack((keep(old_in[0], num_consts), keep(old_in[1], num_carry), keep(old_in[2], num_xs)))
  p["ft_out"] = _ft.pack((keep(old_out[0], num_carry), keep(old_out[1], num_ys)))
  return p


# jax 0.11 merged ClosedJaxpr into Jaxpr (``ClosedJaxpr`` is an alias; consts ride on the Jaxpr and
# ``.jaxpr`` returns itself), so ``isinstance(j, Jaxpr)`` no longer tells an open sub-jaxpr param
# from a closed one. Open params (jax 0.10 stores these as ``Jaxpr``; jax 0.11 keeps them without
# consts: remat's rules convert constvars to inputs) must not get consts attached by a rewrite.
JAXPR_MERGED = ClosedJaxpr is Jaxpr
_OPEN_PARAM_PRIMITIVES = frozenset({"remat", "remat2", "checkpoint", "shard_map", "run_state",
                                    "custom_lin", "custom_transpose_call"})


def is_open_jaxpr(j, primitive_name: str | None = None) -> bool:
  """Whether sub-jaxpr param ``j`` (of a ``primitive_name`` equation) is an open jaxpr: no consts,
  and a rewritten one must not carry consts either (jax 0.10: a ``Jaxpr``, not a ``ClosedJaxpr``;
  jax 0.11: no consts attached and a primitive whose sub-jaxpr was open on 0.10)."""
  if not JAXPR_MERGED:
    return isinstance(j, Jaxpr) and not isinstance(j, ClosedJaxpr)
  return not j.consts and primitive_name in _OPEN_PARAM_PRIMITIVES
