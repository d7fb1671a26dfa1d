"""Cost model of a placement: per-device bytes and estimated collective bytes.

Collectives are estimated from the traced program (``DotRecord`` /
``ReduceRecord`` from :mod:`._dims`, which walks the jaxpr with
:func:`lepton_jax.jaxpr.walk`):

* a ``dot_general``/conv that contracts a sharded logical dimension leaves
  partial sums: an all-reduce of its (local) output, or a reduce-scatter when
  the result is a weight gradient whose parameter is sharded over those axes;
* a parameter stored FSDP-sharded is all-gathered before each matmul that
  reads it;
* a reduction over a sharded dimension all-reduces its output.

Ring algorithms are assumed: all-gather / reduce-scatter move ``b*(n-1)/n``
bytes per device, all-reduce twice that.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["leaf_shard_factor", "per_device_bytes", "param_option_comm", "estimate_collectives", "DotIndex"]


def leaf_shard_factor(spec: tuple, mi) -> int:
  return int(math.prod(mi.size(e) for e in spec if e))


def per_device_bytes(nbytes: int, spec: tuple, mi) -> int:
  return int(math.ceil(nbytes / leaf_shard_factor(spec, mi)))


def _compute_factor(spec: tuple, classes: tuple, class_axes: dict, mi) -> tuple:
  """(axes kept sharded during compute, FSDP axes that must be all-gathered)."""
  keep, gather = [], []
  for e, c in zip(spec, classes):
    want = set(class_axes.get(c, ()))
    for a in e:
      (keep if a in want else gather).append(a)
  return tuple(keep), tuple(gather)


def _ring(b: float, n: int) -> float:
  return b * (n - 1) / n if n > 1 else 0.0


def _same_classes(a: tuple, b: tuple) -> bool:
  return len(a) == len(b) and sorted(a) == sorted(b)


class DotIndex:
  """The dots of an analysis indexed for :func:`param_option_comm` (built once per plan).

  ``by_root``: input leaf -> ``[(dot, fraction of the leaf it reads)]`` of dots reading a view
  of it (a scan step reads ``1/L`` of a stacked ``[L, ...]`` leaf);
  ``wgrads``: sorted output classes -> dots that contract a batch class into an output with no
  batch class (weight gradients), with the batch classes they contract.
  """

  def __init__(self, an, batch_classes):
    self.by_root: dict = {}
    self.wgrads: dict = {}
    for d in an.dots:
      for r, frac in zip(d.lhs_roots + d.rhs_roots, d.fracs()):
        self.by_root.setdefault(r, []).append((d, frac))
      bat = [c for c in d.contract if c in batch_classes]
      if bat and not any(c in batch_classes for c in d.out_classes):
        self.wgrads.setdefault(tuple(sorted(d.out_classes)), []).append((d, tuple(bat)))


def param_option_comm(leaf_ids, spec, classes, nbytes_of, an, class_axes, batch_classes, mi,
                      index: DotIndex | None = None) -> float:
  """Collective bytes attributable to storing the leaves ``leaf_ids`` with ``spec``."""
  if index is None:
    index = DotIndex(an, batch_classes)
  total = 0.0
  keep, gather = _compute_factor(spec, classes, class_axes, mi)
  if gather:
    n_keep, n_g = mi.size(keep), mi.size(gather)
    for r in leaf_ids:
      for d, frac in index.by_root.get(r, ()):
        total += _ring(nbytes_of[r] * frac / n_keep, n_g) * d.multiplier
  spec_axes = {a for e in spec for a in e}
  n_keep = max(1, mi.size(keep))
  for d, bat in index.wgrads.get(tuple(sorted(classes)), ()):
    axes = sorted({a for c in bat for a in class_axes.get(c, ())})
    if not axes:
      continue
    n = mi.size(axes)
    out_local = d.out_bytes / n_keep
    if set(axes) <= spec_axes:
      total += _ring(out_local, n) * d.multiplier
    else:
      total += 2 * _ring(out_local, n) * d.multiplier
  return total


def estimate_collectives(an, mi, class_axes: dict, batch_classes, in_specs, roles, in_bytes) -> dict:
  """Estimated bytes moved per device per call, by collective kind."""
  ag = rs = ar = 0.0
  param_specs = [(in_specs[i], an.in_classes[i]) for i in range(len(in_specs)) if roles[i] == "param"]
  for d in an.dots:
    m = d.multiplier
    out_axes = sorted({a for c in d.out_classes for a in class_axes.get(c, ())})
    out_local = d.out_bytes / max(1, mi.size(out_axes))
    axes = sorted({a for c in d.contract for a in class_axes.get(c, ())})
    if axes:
      n = mi.size(axes)
      is_wgrad = (any(c in batch_classes for c in d.contract)
                  and not any(c in batch_classes for c in d.out_classes))
      scattered = is_wgrad and any(
          _same_classes(cl, d.out_classes) and set(axes) <= {a for e in sp for a in e}
          for sp, cl in param_specs)
      if scattered:
        rs += _ring(out_local, n) * m
      else:
        ar += 2 * _ring(out_local, n) * m
    for r, frac in zip(d.lhs_roots + d.rhs_roots, d.fracs()):
      if roles[r] != "param":
        continue
      keep, gather = _compute_factor(in_specs[r], an.in_classes[r], class_axes, mi)
      if gather:
        ag += _ring(in_bytes[r] * frac / mi.size(keep), mi.size(gather)) * m
  for red in an.reduces:
    axes = sorted({a for c in red.reduced for a in class_axes.get(c, ())})
    if axes:
      ar += 2 * _ring(red.out_bytes, mi.size(axes)) * red.multiplier
  out = {"all_gather": int(ag), "reduce_scatter": int(rs), "all_reduce": int(ar)}
  out["total"] = int(np.sum(list(out.values())))
  return out
