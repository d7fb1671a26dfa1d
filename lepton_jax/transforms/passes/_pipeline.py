"""The ordered pass pipeline used by ``adaptive_jit``.

``passes="default"`` runs :data:`DEFAULT_PASSES`; a list runs the named passes in the
given order. A list entry is a pass name or ``(name, {option: value})``, e.g.
``("simplify", {"nan_unsafe": True})`` to allow ``x * 0 -> 0``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable, Sequence

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._compiled import CompiledFigures, compiled_figures
from lepton_jax.jaxpr._driver import Rewrite
from lepton_jax.transforms.passes._accumulate import accumulate
from lepton_jax.transforms.passes._cond import cond
from lepton_jax.transforms.passes._cse import cse
from lepton_jax.transforms.passes._dce import dce
from lepton_jax.transforms.passes._fold import fold
from lepton_jax.transforms.passes._route_kernels import route_kernels
from lepton_jax.transforms.passes._simplify import simplify

__all__ = ["PASSES", "DEFAULT_PASSES", "normalize_passes", "run_passes", "run_pipeline",
           "PipelineResult", "pass_gains", "compile_both"]

PassFn = Callable[..., tuple[core.ClosedJaxpr, list[Rewrite]]]

PASSES: dict[str, PassFn] = {
    "dce": dce,
    "cse": cse,
    "fold": fold,
    "simplify": simplify,
    "cond": cond,
    "route_kernels": route_kernels,
    "accumulate": accumulate,
}

#: Default order: fold constants so predicates become static, drop static branches,
#: simplify, merge duplicates (also outer values recomputed inside ``cond`` branches), drop dead
#: code, route hotspots, move linear accumulator work after ``scan`` loops, and clean up.
#: Measured on the compiled program (XLA:CPU): XLA itself removes dead code, duplicates within
#: a computation, dead loop carries and outputs, and hoists loop-invariant work (dots, RNG,
#: iota-built tables); it does not reuse outer values inside ``cond`` branches nor move linear
#: work out of loops -- the two rewrites here that change what XLA compiles.
DEFAULT_PASSES: tuple[str, ...] = ("fold", "cond", "simplify", "cse", "dce", "route_kernels",
                                   "accumulate", "dce")

_OPTIONS = {"fold": {"max_elements"}, "simplify": {"nan_unsafe"}, "dce": set(), "cse": set(),
            "cond": set(), "route_kernels": {"spot_check"}, "accumulate": set()}


def normalize_passes(passes: Any, *, api: str = "adaptive_jit") -> tuple[tuple[str, tuple], ...]:
  """Validates ``passes=`` and returns ``((name, sorted option items), ...)``."""
  valid = ", ".join(repr(p) for p in PASSES)
  if passes is None or (isinstance(passes, str) and passes.lower() == "none"):
    return ()
  if isinstance(passes, str):
    if passes == "default":
      return tuple((p, ()) for p in DEFAULT_PASSES)
    if passes in PASSES:
      return ((passes, ()),)
    raise ValueError(f"{api}: passes={passes!r} is not valid; use 'default', None, or a list of "
                     f"pass names from [{valid}]")
  if not isinstance(passes, Sequence):
    raise TypeError(f"{api}: passes must be 'default', None or a list of pass names from "
                    f"[{valid}], got {type(passes).__name__} {passes!r}")
  out = []
  for item in passes:
    opts: dict = {}
    name = item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
      name, opts = item
    if not isinstance(name, str) or name not in PASSES:
      raise ValueError(f"{api}: unknown pass {name!r} in passes={passes!r}; valid pass names are "
                       f"[{valid}] (or 'default' / None for the whole list)")
    bad = set(opts) - _OPTIONS[name]
    if bad:
      raise ValueError(f"{api}: pass {name!r} got unknown options {sorted(bad)}; valid options: "
                       f"{sorted(_OPTIONS[name]) or 'none'}")
    out.append((name, tuple(sorted(opts.items()))))
  return tuple(out)


def run_passes(closed: core.ClosedJaxpr, passes: tuple[tuple[str, tuple], ...], *,
               kernels: str | None = "auto") -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Runs the (normalized) passes in order; returns the new jaxpr and all rewrites.

  >>> import jax, jax.numpy as jnp
  >>> cj = jax.make_jaxpr(lambda x: (jnp.sin(x) * 1.0, jnp.cos(x))[0])(1.0)
  >>> new, recs = run_passes(cj, normalize_passes("default"))
  >>> len(new.jaxpr.eqns)
  1
  """
  records: list[Rewrite] = []
  for name, opts in passes:
    kw = dict(opts)
    if name == "route_kernels":
      if kernels is None:
        continue
      kw["kernels"] = kernels
    closed, recs = PASSES[name](closed, **kw)
    records.extend(recs)
  return closed, records


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  """What :func:`run_pipeline` decided, with the compiled figures it read on the way.

  Unpacks like the ``(closed, records)`` pair it used to be: ``new, records = run_pipeline(...)``.

  Attributes:
    closed: the rewritten program (the routed or the unrouted candidate).
    records: every rewrite applied to it (plus a ``rejected_by_compiled_memory`` note when the
      routed candidate lost).
    figures: XLA's :class:`~lepton_jax.jaxpr._compiled.CompiledFigures` of ``closed``, compiled
      for the default backend while deciding (or because ``figures=True`` was asked); ``None``
      when nothing was compiled (no routing and ``figures=False``, or traced constants).
    other_figures: the figures of the candidate that was not chosen, when both were compiled.
  """
  closed: core.ClosedJaxpr
  records: list
  figures: CompiledFigures | None = None
  other_figures: CompiledFigures | None = None

  def __iter__(self):
    return iter((self.closed, self.records))


def compile_both(fn, a, b):
  """``(fn(a), fn(b))``, the two run in parallel threads (XLA compiles release the GIL, so the
  two candidates of a compiled decision cost about one compile's wall time on two cores)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    fa = pool.submit(fn, a)
    fb = pool.submit(fn, b)
    return fa.result(), fb.result()


def run_pipeline(closed: core.ClosedJaxpr, passes: tuple[tuple[str, tuple], ...], *,
                 kernels: str | None = "auto", figures: bool = False) -> PipelineResult:
  """:func:`run_passes`, with kernel routing kept only if the compiled program is not worse.

  When routing replaced something, the program is also rewritten without routing and both are
  compiled for the default backend; if the routed program needs more temp memory than the
  unrouted one (XLA's ``memory_analysis``), the unrouted program is used and a
  ``("route_kernels", "rejected_by_compiled_memory")`` record says so (its location holds both
  figures). Programs with traced constants are not compiled here (routing is kept).

  Returns a :class:`PipelineResult` (unpacks as ``(closed, records)``) whose ``figures`` are the
  compiled figures of the chosen program when they were read; ``figures=True`` compiles the
  chosen program when the decision did not already (so a caller never compiles it twice).
  """
  names = [n for n, _ in passes]
  cut = names.index("route_kernels") if "route_kernels" in names else len(names)
  traced_consts = any(isinstance(c, core.Tracer) for c in closed.consts)
  # The passes before routing run once; the two candidates differ only from routing on.
  start, records = run_passes(closed, passes[:cut], kernels=kernels)
  new, routed_records = run_passes(start, passes[cut:], kernels=kernels)
  if (kernels is None or traced_consts
      or not any(r.pass_name == "route_kernels" for r in routed_records)):
    fig = compiled_figures(new) if figures and not traced_consts else None
    return PipelineResult(new, records + routed_records, fig)
  plain, plain_records = run_passes(start, passes[cut:], kernels=None)
  routed_fig, plain_fig = compile_both(compiled_figures, new, plain)
  if routed_fig.temp_bytes > plain_fig.temp_bytes:
    tried = sorted({r.pattern for r in routed_records if r.pass_name == "route_kernels"})
    note = Rewrite("route_kernels", "rejected_by_compiled_memory",
                   f"{', '.join(tried)}: temp {routed_fig.temp_bytes} B routed > "
                   f"{plain_fig.temp_bytes} B unrouted", 0)
    return PipelineResult(plain, records + plain_records + [note], plain_fig, routed_fig)
  return PipelineResult(new, records + routed_records, routed_fig, plain_fig)


def pass_gains(closed: core.ClosedJaxpr, passes: tuple[tuple[str, tuple], ...], *,
               kernels: str | None = None) -> list[tuple[str, int, CompiledFigures]]:
  """Compiled figures after each pass: ``[(name, rewrites, figures), ...]``, starting with
  ``("input", 0, figures of closed)``. A measuring tool (one compile per pass), not used when
  running the pipeline.

  >>> import jax, jax.numpy as jnp
  >>> cj = jax.make_jaxpr(lambda x: jnp.sin(x) * 1.0)(jnp.ones(3))
  >>> [(n, k) for n, k, _ in pass_gains(cj, normalize_passes(["simplify"]))]
  [('input', 0), ('simplify', 1)]
  """
  out = [("input", 0, compiled_figures(closed))]
  for name, opts in passes:
    closed, recs = run_passes(closed, ((name, opts),), kernels=kernels)
    out.append((name, len(recs), compiled_figures(closed)))
  return out
