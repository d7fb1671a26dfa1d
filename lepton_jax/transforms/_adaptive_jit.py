"""``adaptive_jit``: a drop-in ``jax.jit`` that rewrites the traced jaxpr before compiling.

Pipeline per input signature: trace the function to a closed jaxpr, run the rewrite
passes (dead code, duplicates, constants, algebra, static branches, kernel routing), and
evaluate the rewritten jaxpr inside ``jax.jit``. Outer transformations (``jax.grad``,
``jax.vmap``, ``jax.jit``) see ordinary primitives, so they compose either way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable, Literal, Sequence, overload

import jax
import numpy as np
from lepton_jax.jaxpr._eval import eval_jaxpr

from lepton_jax import _nnx
from lepton_jax import jaxpr as ljx
from lepton_jax._utils import format_bytes
from lepton_jax._nnx import is_graph_node as _is_graph_node
from lepton_jax.transforms import _buckets
from lepton_jax.jaxpr._driver import Rewrite, count_eqns
from lepton_jax.transforms.passes._pipeline import compile_both, normalize_passes, run_pipeline

__all__ = ["adaptive_jit", "AdaptiveJitted", "CacheInfo", "ExplainReport"]

_API = "adaptive_jit"
_KERNELS = ("auto", "xla", "interpret", "pallas_gpu", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class CacheInfo:
  """Compilation statistics of one ``adaptive_jit`` function.

  Attributes:
    compiles: distinct input signatures traced, rewritten and compiled.
    hits: calls that reused an already compiled executable.
    calls: all calls.
    bucket_fallbacks: calls where bucketing was refused (run at the exact shape).
  """
  compiles: int
  hits: int
  calls: int
  bucket_fallbacks: int = 0

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExplainReport:
  """What ``adaptive_jit`` did to one input signature.

  Attributes:
    function: name of the wrapped function.
    passes: pass names in the order they ran.
    rewrites: one entry per rewrite (pass, pattern, location, count).
    flops_before / flops_after: FLOP estimates of the jaxpr before/after rewriting.
    peak_bytes_before / peak_bytes_after: peak live-intermediate estimates.
    eqns_before / eqns_after: number of equations (including nested ones).
    bucket: ``None`` or ``{"argnum", "axis", "length", "bucket"}`` when inputs were padded.
    compiled_temp_bytes_before / compiled_temp_bytes_after: XLA ``memory_analysis`` temp bytes of
      the program compiled without / with the rewrites (the judge; the estimates above guide).
    compiled_flops_before / compiled_flops_after: XLA ``cost_analysis`` FLOPs of the same.
  """
  function: str
  passes: tuple[str, ...]
  rewrites: tuple[Rewrite, ...]
  flops_before: float
  flops_after: float
  peak_bytes_before: int
  peak_bytes_after: int
  eqns_before: int
  eqns_after: int
  bucket: dict | None = None
  compiled_temp_bytes_before: int = 0
  compiled_temp_bytes_after: int = 0
  compiled_flops_before: float = 0.0
  compiled_flops_after: float = 0.0

  @property
  def flops_ratio(self) -> float:
    return self.flops_after / self.flops_before if self.flops_before else 1.0

  def counts(self) -> dict[tuple[str, str], int]:
    """Total ``count`` per ``(pass, pattern)``."""
    out: dict[tuple[str, str], int] = {}
    for r in self.rewrites:
      out[(r.pass_name, r.pattern)] = out.get((r.pass_name, r.pattern), 0) + r.count
    return out

  def to_dict(self) -> dict[str, Any]:
    return {
        "function": self.function, "passes": list(self.passes),
        "rewrites": [r.to_dict() for r in self.rewrites],
        "flops_before": float(self.flops_before), "flops_after": float(self.flops_after),
        "peak_bytes_before": int(self.peak_bytes_before),
        "peak_bytes_after": int(self.peak_bytes_after),
        "eqns_before": int(self.eqns_before), "eqns_after": int(self.eqns_after),
        "bucket": dict(self.bucket) if self.bucket else None,
        "compiled_temp_bytes_before": int(self.compiled_temp_bytes_before),
        "compiled_temp_bytes_after": int(self.compiled_temp_bytes_after),
        "compiled_flops_before": float(self.compiled_flops_before),
        "compiled_flops_after": float(self.compiled_flops_after),
    }

  def __str__(self) -> str:
    lines = [f"adaptive_jit explain: {self.function}",
             f"  passes: {', '.join(self.passes) or '(none)'}"]
    if self.bucket:
      lines.append(f"  bucket: arg {self.bucket['argnum']} axis {self.bucket['axis']}: "
                   f"{self.bucket['length']} -> {self.bucket['bucket']}")
    lines.append(f"  {'':18}{'before':>14}{'after':>14}{'ratio':>8}")

    def row(name, b, a, fmt):
      ratio = f"{a / b:.3f}" if b else "-"
      lines.append(f"  {name:18}{fmt(b):>14}{fmt(a):>14}{ratio:>8}")

    row("compiled temp", self.compiled_temp_bytes_before, self.compiled_temp_bytes_after,
        format_bytes)
    row("compiled FLOPs", self.compiled_flops_before, self.compiled_flops_after,
        lambda v: f"{v:.4g}")
    row("est. FLOPs", self.flops_before, self.flops_after, lambda v: f"{v:.4g}")
    row("est. peak memory", self.peak_bytes_before, self.peak_bytes_after, format_bytes)
    row("equations", self.eqns_before, self.eqns_after, str)
    if not self.rewrites:
      lines.append("  rewrites: none")
    else:
      lines.append(f"  {'pass':<14}{'pattern':<32}{'count':>6}  location")
      # Clean-up passes (dce, cse, fold, simplify) get one row per pattern; routes one per site.
      groups: dict = {}
      for r in self.rewrites:
        key = (r.pass_name, r.pattern) if r.pass_name != "route_kernels" else (r.pass_name, r.pattern, r.location)
        groups.setdefault(key, []).append(r)
      for rs in groups.values():
        r = rs[0]
        where = r.location if len(rs) == 1 else f"{r.location} (+{len(rs) - 1} more)"
        lines.append(f"  {r.pass_name:<14}{r.pattern:<32}{sum(x.count for x in rs):>6}  {where}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable per-call static information (a static argument of the inner jit)."""
  treedef: Any                  # treedef of the flattened (args, kwargs) with graph nodes as leaves
  node_pos: tuple[int, ...]     # flat positions that hold NNX graph nodes
  graphdef: Any                 # nnx GraphDef of those nodes (or None)
  donate_mask: tuple[bool, ...] # per non-node flat leaf: donated?
  static_pos: tuple[tuple[int, Any], ...]
  static_kw: tuple[tuple[str, Any], ...]
  nargs: int


# Leaves that are never Flax NNX graph nodes.
_PLAIN_LEAF = (jax.Array, np.ndarray, np.generic, int, float, complex, bool, type(None))


class AdaptiveJitted:
  """The callable returned by :func:`adaptive_jit` (see there)."""

  def __init__(self, fun: Callable, *, static_argnums, static_argnames, donate_argnums, kernels,
               passes, buckets):
    if not callable(fun):
      raise TypeError(f"{_API}: fun must be callable, got {type(fun).__name__} {fun!r}")
    functools.update_wrapper(self, fun)
    self._fun = fun
    self._static_argnums, self._static_argnames = _resolve_static(fun, static_argnums,
                                                                  static_argnames)
    self._donate_argnums = _as_int_tuple(donate_argnums, "donate_argnums")
    if set(self._donate_argnums) & set(self._static_argnums):
      raise ValueError(f"{_API}: donate_argnums={self._donate_argnums} overlaps static_argnums="
                       f"{self._static_argnums}; an argument cannot be both static and donated")
    if kernels is not None and kernels not in _KERNELS:
      raise ValueError(f"{_API}: kernels={kernels!r} is not valid; use one of "
                       f"{list(_KERNELS)} or None (no kernel routing)")
    self._kernels = kernels
    self._passes = normalize_passes(passes, api=_API)
    self._buckets = _buckets.BucketSpec.parse(buckets, api=_API)
    self._make_jits()
    self._compiles = 0
    self._hits = 0
    self._calls = 0
    self._bucket_fallbacks = 0
    self._bucket_ctx = self._new_bucket_ctx()

  def _make_jits(self):
    # Slow path (NNX objects, buckets): flat leaves + a hashable _Static description.
    self._jitted = jax.jit(self._impl, static_argnums=(0,), donate_argnums=(1,))
    # Fast path (pytrees of arrays): the user's own calling convention, so cache hits take
    # jax.jit's C++ dispatch and ``lower()`` returns a Lowered callable with the user's args.
    self._fast = jax.jit(self._fast_impl, static_argnums=self._static_argnums,
                         static_argnames=self._static_argnames,
                         donate_argnums=self._donate_argnums)
    self._plain_treedefs: dict = {}   # treedef -> True when it holds no NNX graph node
    self._split_plain: dict = {}      # flattened structure -> True: no NNX graph node inside
    # Buckets: the bucket's masked program (static, one executable per bucket), true length n.
    self._masked = jax.jit(self._masked_impl, static_argnums=(0, 1), donate_argnums=(3,))

  # -- descriptor: usable as a method ------------------------------------------------
  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  # -- argument handling ---------------------------------------------------------------
  def _split(self, args, kwargs):
    nargs = len(args)
    static_pos = []
    dyn_args = list(args)
    for i in self._static_argnums:
      j = i if i >= 0 else nargs + i
      if 0 <= j < nargs:
        static_pos.append((j, args[j]))
        dyn_args[j] = None
    static_kw = []
    dyn_kwargs = dict(kwargs)
    for k in self._static_argnames:
      if k in dyn_kwargs:
        static_kw.append((k, dyn_kwargs.pop(k)))
    for name, v in static_pos + static_kw:
      try:
        hash(v)
      except TypeError:
        where = f"argument {name}" if isinstance(name, int) else f"argument {name!r}"
        raise TypeError(f"{_API}: static {where} must be hashable, got {type(v).__name__}; pass "
                        "a tuple instead of a list, or make the argument dynamic") from None
    # Arguments without Flax NNX objects (a structure seen before whose leaves are all arrays or
    # scalars) skip the per-node graph checks: this runs on every bucketed / NNX call.
    flat, treedef = jax.tree_util.tree_flatten((tuple(dyn_args), dyn_kwargs))
    if not (self._split_plain.get(treedef) and all(isinstance(x, _PLAIN_LEAF) for x in flat)):
      flat, treedef = jax.tree_util.tree_flatten((tuple(dyn_args), dyn_kwargs),
                                                 is_leaf=_is_graph_node)
    node_pos = tuple(i for i, x in enumerate(flat) if not isinstance(x, _PLAIN_LEAF)
                     and _is_graph_node(x))
    if not node_pos:
      self._split_plain[treedef] = True
    nodes = tuple(flat[i] for i in node_pos)
    in_nodes = set(node_pos)
    leaves = [x for i, x in enumerate(flat) if i not in in_nodes]
    # Which leaves come from donated arguments.
    donate_mask = []
    if self._donate_argnums:
      owner = _nnx.leaf_owners(dyn_args, dyn_kwargs)
      don = {i if i >= 0 else nargs + i for i in self._donate_argnums}
      donate_mask = [owner[i] in don for i, x in enumerate(flat) if i not in set(node_pos)]
    else:
      donate_mask = [False] * len(leaves)
    graphdef, state = None, None
    if nodes:
      from flax import nnx
      graphdef, state = nnx.split(nodes)
    static = _Static(treedef, node_pos, graphdef, tuple(donate_mask), tuple(static_pos),
                     tuple(static_kw), nargs)
    return static, leaves, nodes, state

  def _rebuild(self, static: _Static, leaves, nodes):
    it = iter(leaves)
    nit = iter(nodes)
    flat = [next(nit) if i in static.node_pos else next(it)
            for i in range(len(leaves) + len(nodes))]
    dyn_args, kwargs = jax.tree_util.tree_unflatten(static.treedef, flat)
    args = list(dyn_args)
    for j, v in static.static_pos:
      args[j] = v
    kwargs = dict(kwargs)
    kwargs.update(dict(static.static_kw))
    return args, kwargs

  def _flat_fun(self, static: _Static, holder: dict):
    """A function of the flat leaves (+ NNX state leaves) returning flat outputs."""
    n_leaves = len(static.donate_mask)

    def flat_fun(*flat_in):
      leaves, state_leaves = flat_in[:n_leaves], flat_in[n_leaves:]
      nodes = ()
      if static.graphdef is not None:
        from flax import nnx
        state = jax.tree_util.tree_unflatten(holder["state_tree"], state_leaves)
        nodes = nnx.merge(static.graphdef, state)
      args, kwargs = self._rebuild(static, leaves, nodes)
      out = self._fun(*args, **kwargs)
      if _contains_graph_node(out):
        raise TypeError(f"{_API}({self.__name__}): returning Flax NNX modules/objects is not "
                        "supported; return their state (nnx.state(module)) or arrays instead")
      new_state = None
      if static.graphdef is not None:
        from flax import nnx
        new_state = nnx.split(nodes)[1]
      out_flat, out_tree = jax.tree_util.tree_flatten((out, new_state))
      holder["out_tree"] = out_tree
      return out_flat

    return flat_fun

  def _trace(self, static: _Static, leaves, state):
    holder: dict = {}
    state_leaves: list = []
    if state is not None:
      state_leaves, holder["state_tree"] = jax.tree_util.tree_flatten(state)
    flat_fun = self._flat_fun(static, holder)
    closed = jax.make_jaxpr(flat_fun)(*leaves, *state_leaves)
    return closed, holder["out_tree"], list(state_leaves)

  def _impl(self, static: _Static, donated, kept, state):
    self._compiles += 1
    leaves = _interleave(static.donate_mask, donated, kept)
    closed, out_tree, state_leaves = self._trace(static, leaves, state)
    new, _ = run_pipeline(closed, self._passes, kernels=self._kernels)
    outs = eval_jaxpr(new.jaxpr, new.consts, *leaves, *state_leaves)
    return jax.tree_util.tree_unflatten(out_tree, outs)

  def _masked_impl(self, static: _Static, bucketed, n, donated, kept, state):
    """A bucket's program: the masked jaxpr (first input: the true length ``n``)."""
    self._compiles += 1
    return self._run_bucket(bucketed, n, _interleave(static.donate_mask, donated, kept), state)

  def _run_bucket(self, bucketed, n, leaves, state):
    """``(out, new_state)`` of the bucket's masked program (rewritten) at true length ``n``."""
    state_leaves = jax.tree_util.tree_leaves(state) if state is not None else []
    prog = bucketed.program
    new = prog.pipelined.closed if prog.pipelined is not None else \
        run_pipeline(prog.closed, self._passes, kernels=self._kernels).closed
    outs = eval_jaxpr(new.jaxpr, new.consts, n, *leaves, *state_leaves)
    return jax.tree_util.tree_unflatten(bucketed.out_tree, outs)

  def _fast_impl(self, *args, **kwargs):
    """Traced by ``self._fast``: the same pipeline as ``_impl`` on the user's arguments."""
    self._compiles += 1
    static, leaves, nodes, state = self._split(args, kwargs)
    closed, out_tree, state_leaves = self._trace(static, leaves, state)
    new, _ = run_pipeline(closed, self._passes, kernels=self._kernels)
    outs = eval_jaxpr(new.jaxpr, new.consts, *leaves, *state_leaves)
    out, new_state = jax.tree_util.tree_unflatten(out_tree, outs)
    if nodes:  # only reached by lower() with NNX objects (registered pytrees in Flax NNX)
      from flax import nnx
      nnx.update(nodes, new_state)
    return out

  def _is_plain(self, args, kwargs) -> bool:
    """True when the call may take the fast path (no buckets, no NNX objects)."""
    if self._buckets is not None:
      return False
    try:
      treedef = jax.tree_util.tree_structure((args, kwargs))
      plain = self._plain_treedefs.get(treedef)
    except TypeError:  # unhashable static parts of the structure
      return False
    if plain is None:
      plain = not any(_is_graph_node(x) for x in jax.tree_util.tree_leaves(
          (args, kwargs), is_leaf=_is_graph_node))
      self._plain_treedefs[treedef] = plain
    if plain and (self._static_argnums or self._static_argnames):
      try:
        for i in self._static_argnums:
          if -len(args) <= i < len(args):
            hash(args[i])
        for k in self._static_argnames:
          if k in kwargs:
            hash(kwargs[k])
      except TypeError:
        return False  # the slow path raises the descriptive error
    return plain

  def _prepare(self, args, kwargs):
    """Bucketing (padding) + splitting.

    Returns ``(static, donated, kept, nodes, state, post, bucketed)``; ``bucketed`` is ``None``
    or ``(Bucketed, n)`` (run the bucket's masked program with true length ``n``).
    """
    post = bucketed = None
    if self._buckets is not None:
      args, kwargs, post, fell_back, bucketed = _buckets.maybe_pad(self._bucket_ctx, args, kwargs)
      self._bucket_fallbacks += fell_back
    static, leaves, nodes, state = self._split(args, kwargs)
    donated = [x for x, d in zip(leaves, static.donate_mask) if d]
    kept = [x for x, d in zip(leaves, static.donate_mask) if not d]
    return static, donated, kept, nodes, state, post, bucketed

  # -- public API ----------------------------------------------------------------------
  def __call__(self, *args, **kwargs):
    if self._is_plain(args, kwargs):
      before = self._compiles
      out = self._fast(*args, **kwargs)
      self._calls += 1
      if self._compiles == before:
        self._hits += 1
      return out
    static, donated, kept, nodes, state, post, bucketed = self._prepare(args, kwargs)
    before = self._compiles
    if bucketed is not None:
      out, new_state = self._masked(static, bucketed[0], bucketed[1], donated, kept, state)
    else:
      out, new_state = self._jitted(static, donated, kept, state)
    self._calls += 1
    if self._compiles == before:
      self._hits += 1
    if nodes:
      from flax import nnx
      nnx.update(nodes, new_state)
    if post is not None:
      out = post(out)
    return out

  def lower(self, *args, **kwargs) -> jax.stages.Lowered:
    """Lowers for the given arguments, like ``jax.jit(f).lower``.

    Arguments may be arrays or ``jax.ShapeDtypeStruct``s. ``.compile()`` of the result is
    callable with the same (dynamic) arguments, and ``.memory_analysis()`` /
    ``.cost_analysis()`` describe the rewritten program. With ``buckets``, the arguments
    are padded to their bucket first: the result is the bucket's masked program with the given
    arguments' true length fixed (the compiled function takes padded arguments and returns
    bucket-size outputs, of which the first true-length positions are valid).
    Flax NNX objects are lowered as pytrees (like ``jax.jit``): calling the compiled
    function does not update them in place.

    >>> import jax.numpy as jnp
    >>> f = adaptive_jit(lambda x: x * 2)
    >>> f.lower(jnp.ones(3)).compile()(jnp.ones(3)).tolist()
    [2.0, 2.0, 2.0]
    """
    if self._buckets is not None:
      args, kwargs, _, _, bucketed = _buckets.maybe_pad(self._bucket_ctx, args, kwargs)
      if bucketed is not None:
        return self._lower_bucketed(bucketed, args, kwargs)
    try:
      return self._fast.lower(*args, **kwargs)
    except TypeError:
      if self._is_plain(args, kwargs):
        raise
    # NNX objects that are not registered pytrees (older Flax): the internal signature.
    static, donated, kept, _, state, _, _ = self._prepare(args, kwargs)
    return self._jitted.lower(static, donated, kept, state)

  def _lower_bucketed(self, bucketed, args, kwargs):
    """The bucket's program on the padded user arguments, with the true length fixed."""
    plan, n = bucketed

    def fn(*args, **kwargs):
      _, leaves, _, state = self._split(args, kwargs)
      return self._run_bucket(plan, n, leaves, state)[0]

    return jax.jit(fn, static_argnums=self._static_argnums,
                   static_argnames=self._static_argnames).lower(*args, **kwargs)

  def rewritten_jaxpr(self, *args, **kwargs) -> tuple["jax.extend.core.ClosedJaxpr", "jax.extend.core.ClosedJaxpr"]:
    """``(original, rewritten)`` closed jaxprs for these arguments (flat interface; with
    buckets, the bucket's masked program, whose first input is the true length)."""
    closed = self._closed_for(args, kwargs)
    new, _ = run_pipeline(closed, self._passes, kernels=self._kernels)
    return closed, new

  def _closed_for(self, args, kwargs):
    """The traced program these arguments run (the bucket's masked program when bucketed)."""
    static, donated, kept, _, state, _, bucketed = self._prepare(args, kwargs)
    if bucketed is not None:
      return bucketed[0].program.closed
    leaves = _interleave(static.donate_mask, _abstract(donated), _abstract(kept))
    closed, _, _ = self._trace(static, leaves, _abstract(state) if state is not None else None)
    return closed

  def explain(self, *args, **kwargs) -> ExplainReport:
    """Reports each rewrite, and the compiled program's temp bytes and FLOPs before and after
    (XLA's memory/cost analyses), plus the jaxpr estimates.

    >>> import jax.numpy as jnp
    >>> f = adaptive_jit(lambda x: jnp.sin(x) * 1.0)
    >>> [r.pattern for r in f.explain(jnp.ones(3)).rewrites]
    ['mul_by_one']
    """
    bucket_info = None
    if self._buckets is not None:
      bucket_info = _buckets.describe(self._bucket_ctx, args, kwargs)
    closed = self._closed_for(args, kwargs)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      new, records = res = run_pipeline(closed, self._passes, kernels=self._kernels,
                                        figures=True)
    for w in caught:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    figs = (None, None)
    if not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
      # The chosen program's figures come from the routing decision (no second compile).
      figs = (ljx.compiled_figures(closed), res.figures or ljx.compiled_figures(new))
    return ExplainReport(
        function=getattr(self, "__name__", "fun"),
        passes=tuple(n for n, _ in self._passes
                     if not (n == "route_kernels" and self._kernels is None)),
        rewrites=tuple(records),
        flops_before=float(ljx.jaxpr_cost(closed).flops),
        flops_after=float(ljx.jaxpr_cost(new).flops),
        peak_bytes_before=int(ljx.peak_live_bytes(closed)),
        peak_bytes_after=int(ljx.peak_live_bytes(new)),
        eqns_before=count_eqns(closed.jaxpr),
        eqns_after=count_eqns(new.jaxpr),
        bucket=bucket_info,
        compiled_temp_bytes_before=figs[0].temp_bytes if figs[0] else 0,
        compiled_temp_bytes_after=figs[1].temp_bytes if figs[1] else 0,
        compiled_flops_before=figs[0].flops if figs[0] else 0.0,
        compiled_flops_after=figs[1].flops if figs[1] else 0.0,
    )

  def cache_info(self) -> CacheInfo:
    """``CacheInfo(compiles, hits, calls, bucket_fallbacks)``.

    >>> f = adaptive_jit(lambda x: x + 1)
    >>> _ = f(1.0); _ = f(2.0)
    >>> f.cache_info().compiles, f.cache_info().hits
    (1, 1)
    """
    return CacheInfo(self._compiles, self._hits, self._calls, self._bucket_fallbacks)

  def clear_cache(self) -> None:
    """Drops compiled executables and statistics."""
    self._make_jits()
    self._compiles = self._hits = self._calls = self._bucket_fallbacks = 0
    self._bucket_ctx = self._new_bucket_ctx()

  def _new_bucket_ctx(self):
    if self._buckets is None:
      return None
    return _buckets.BucketContext(self.__name__, self._buckets, self._static_argnums,
                                  _buckets.BucketCache(), self._trace_abstract,
                                  self._choose_bucket_program if self._kernels is not None else None)

  def _choose_bucket_program(self, masked, routed):
    """The bucket program to run: ``routed`` (attention on the kernel with the true lengths) only
    if its compiled temp bytes (after this wrapper's pipeline) are below ``masked``'s."""
    if any(isinstance(c, jax.core.Tracer) for c in masked.closed.consts):
      return masked
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rm, rr = compile_both(
          lambda c: run_pipeline(c, self._passes, kernels=self._kernels, figures=True),
          masked.closed, routed.closed)
    fm, fr = rm.figures, rr.figures
    if fm is None or fr is None:
      masked.pipelined = rm
      return masked
    figs = (f"compiled temp {fr.temp_bytes} B with {routed.routed} attention(s) on the kernel "
            f"with the true lengths vs {fm.temp_bytes} B masked")
    if fr.temp_bytes < fm.temp_bytes:
      routed.pipelined, routed.note = rr, f"routed: {figs}"
      return routed
    masked.pipelined, masked.note = rm, f"kept masked: {figs}"
    return masked

  def _trace_abstract(self, args, kwargs):
    """``(static, closed_jaxpr, out_tree)`` of the function on (abstract) ``args``."""
    static, leaves, _, state = self._split(args, kwargs)
    state_abs = _abstract(state) if state is not None else None
    closed, out_tree, _ = self._trace(static, leaves, state_abs)
    return static, closed, out_tree


def _abstract(tree):
  def f(x):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval"):
      aval = jax.typeof(x)
      return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))
    return x
  return jax.tree_util.tree_map(f, tree)


def _interleave(mask, donated, kept):
  d, k = iter(donated), iter(kept)
  return [next(d) if m else next(k) for m in mask]


def _contains_graph_node(tree) -> bool:
  return any(_is_graph_node(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_graph_node))


def _as_int_tuple(v, name) -> tuple[int, ...]:
  if v is None:
    return ()
  if isinstance(v, int) and not isinstance(v, bool):
    return (v,)
  if isinstance(v, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
    return tuple(v)
  raise TypeError(f"{_API}: {name} must be an int or a sequence of ints, got {v!r}")


def _names_tuple(static_argnames) -> tuple[str, ...]:
  if isinstance(static_argnames, str):
    return (static_argnames,)
  if static_argnames is None:
    return ()
  if isinstance(static_argnames, Sequence) and all(isinstance(n, str) for n in static_argnames):
    return tuple(static_argnames)
  raise TypeError(f"{_API}: static_argnames must be a str or a sequence of str, got "
                  f"{static_argnames!r}")


def _resolve_static(fun, static_argnums, static_argnames):
  nums = _as_int_tuple(static_argnums, "static_argnums")
  names = _names_tuple(static_argnames)
  try:
    sig = inspect.signature(fun)
  except (TypeError, ValueError):
    return nums, names
  params = list(sig.parameters.values())
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  nums_set, names_set = set(nums), set(names)
  for n in names:
    if n not in sig.parameters and not any(p.kind == p.VAR_KEYWORD for p in params):
      raise ValueError(f"{_API}: static_argnames contains {n!r}, which is not a parameter of "
                       f"{getattr(fun, '__name__', fun)}{sig}")
    for i, p in enumerate(positional):
      if p.name == n and p.kind == p.POSITIONAL_OR_KEYWORD:
        nums_set.add(i)
  for i in nums:
    if 0 <= i < len(positional) and positional[i].kind == positional[i].POSITIONAL_OR_KEYWORD:
      names_set.add(positional[i].name)
  return tuple(sorted(nums_set)), tuple(sorted(names_set))


@overload
def adaptive_jit(fun: Callable, /, *, static_argnums: int | Sequence[int] = (),
                 static_argnames: str | Sequence[str] = (), donate_argnums: int | Sequence[int] = (),
                 kernels: Literal["auto", "xla", "interpret", "pallas_gpu", "pallas_tpu"] | None = "auto",
                 passes: str | Sequence[Any] | None = "default",
                 buckets: dict | None = None) -> AdaptiveJitted: ...


@overload
def adaptive_jit(fun: None = None, /, *, static_argnums: int | Sequence[int] = (),
                 static_argnames: str | Sequence[str] = (), donate_argnums: int | Sequence[int] = (),
                 kernels: Literal["auto", "xla", "interpret", "pallas_gpu", "pallas_tpu"] | None = "auto",
                 passes: str | Sequence[Any] | None = "default",
                 buckets: dict | None = None) -> Callable[[Callable], AdaptiveJitted]: ...


def adaptive_jit(fun=None, /, *, static_argnums=(), static_argnames=(), donate_argnums=(),
                 kernels="auto", passes="default", buckets=None):
  """A drop-in ``jax.jit`` that rewrites the traced jaxpr before compiling.

  Removes unused computation (also unused outputs/carries of ``jit``/``scan``/``cond``/
  ``while`` bodies), merges duplicates, folds constants, simplifies algebra, inlines
  ``cond`` branches with a static predicate and routes hotspots (attention, norms,
  softmax cross-entropy, matmul+bias+activation) to ``lepton_jax.pallas_kernels``.

  Args:
    fun: the function; arguments are pytrees of arrays and/or Flax NNX objects (whose
      in-place updates are visible to the caller afterwards, like ``nnx.jit``).
    static_argnums: positional arguments treated as compile-time constants (hashable).
    static_argnames: keyword arguments treated as compile-time constants.
    donate_argnums: positional arguments whose buffers may be reused for outputs.
    kernels: ``"auto"`` (Pallas on GPU/TPU, XLA on CPU), ``"xla"``, ``"interpret"``,
      ``"pallas_gpu"``, ``"pallas_tpu"`` or ``None`` (no routing).
    passes: ``"default"``, ``None``/``"none"``, or a list of pass names from
      ``dce, cse, fold, simplify, cond, route_kernels`` (entries may be
      ``(name, {options})``, e.g. ``("simplify", {"nan_unsafe": True})``).
    buckets: ``None`` or ``{"argnum": i, "axis": a, "sizes": "pow2" | [sizes...]}``: pad
      that axis of argument ``i`` up to the next bucket so varying lengths share one
      executable. Only applied when padding provably cannot change the unpadded outputs
      (every operation is position-wise along that axis); otherwise the call runs at the
      exact shape with a warning.

  Returns:
    An :class:`AdaptiveJitted` callable with ``.lower``, ``.explain`` and ``.cache_info``.

  >>> import jax.numpy as jnp
  >>> @adaptive_jit
  ... def f(x):
  ...   unused = jnp.exp(x) @ x.T
  ...   return jnp.sin(x) + jnp.sin(x)
  >>> f(jnp.ones((2, 2))).shape
  (2, 2)
  """
  if fun is None:
    # Validate the options now (when the decorator is applied), not at the first call.
    AdaptiveJitted(lambda *a, **k: None, static_argnums=static_argnums,
                   static_argnames=(), donate_argnums=donate_argnums, kernels=kernels,
                   passes=passes, buckets=buckets)
    _names_tuple(static_argnames)
    return lambda f: AdaptiveJitted(f, static_argnums=static_argnums,
                                    static_argnames=static_argnames,
                                    donate_argnums=donate_argnums, kernels=kernels,
                                    passes=passes, buckets=buckets)
  return AdaptiveJitted(fun, static_argnums=static_argnums, static_argnames=static_argnames,
                        donate_argnums=donate_argnums, kernels=kernels, passes=passes,
                        buckets=buckets)
