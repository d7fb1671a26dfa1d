"""Hotspot routing: exact matches of softmax attention -> ``pallas_kernels.flash_attention``
(norms, cross-entropy and matmul+bias+activation: see ``_templates``).

The matcher works on the jaxpr's data flow, not on one spelling, so
``jax.nn.dot_product_attention`` (XLA implementation, including grouped-query heads and
causal/explicit masks), ``einsum + softmax + einsum`` and Flax linen / NNX
``dot_product_attention`` all normalise to the same structure::

    S0 = dot_general(Q, K)          contracting one head dim, any batch dims
    S  = S0 [* c | / c]* [+ bias] [where(mask, ., fill)]{0,2}   (+ layout-only transposes/reshapes)
    P  = softmax(S, axis=k)         the jax.nn.softmax graph (max, sub, exp, sum, div)
    O  = dot_general(P, V)          contracting k with V's sequence axis

Every dimension is tracked by label (batch dims, query dims, key dim), so masks and biases
(possibly broadcast along size-1 dims) are passed to the kernel in its ``[batch, heads, q,
k]`` layout and the output is put back in the program's layout. ``Q`` may be either operand
of the first ``dot_general`` (the softmax axis and ``P.V`` decide which holds the keys).
Grouped-query attention needs nothing special when the group is a query dim (GQA
``jax.nn.dot_product_attention``, ``einsum("btkgd,bskd->bkgts")``); K and V written as
``jnp.repeat(x, groups, axis=h)`` along the same batch (head) label are un-repeated and use
the kernel's own GQA (``jnp.tile`` / another order is not a repeat). Low-precision inputs
may have float32 scores and softmax with the probabilities cast back before ``P.V``, or a
softmax whose sum is taken in float32. Anything else -- softmax over another axis, a mask
applied after the softmax, a scale applied after the bias, an intermediate used
elsewhere, a ``-inf`` fill -- is not a match. Each replacement is checked (output shape/dtype, and a
numeric comparison on random inputs when it is small enough); a failed check keeps the
original sub-graph and warns.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
import lepton_jax.pallas_kernels as lpk
from lepton_jax.pallas_kernels._attention import attention_valid_lengths
from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._defuse import DefUse
from lepton_jax.jaxpr._driver import Rewrite, inline_calls, known_consts, location, rewrite_nested
from lepton_jax.jaxpr._eval import eval_jaxpr, retrace
from lepton_jax.transforms.passes import _templates
from lepton_jax.transforms.passes import _route_joint
from lepton_jax.transforms.passes._route_joint import (JointForward, attention_forwards, random_inputs,
                                                     route_joint_level)

__all__ = ["route_kernels", "find_attention", "clear_spot_check_cache"]


_FILL_MAX = -1e9       # a mask fill must be finite and at most this
# Numeric spot checks run the matched sub-graph and its replacement once at the real shapes;
# they are skipped when the sub-graph's largest value (e.g. the attention scores) is bigger.
_SPOT_CHECK_MAX_SCORES = 1 << 20


@dataclasses.dataclass
class _AttnMatch:
  d1: int                      # eqn index of Q.K
  d2: int                      # eqn index of P.V
  eqns: list[int]              # all matched eqn indices
  q: Any
  k: Any
  v: Any
  q_perm: tuple[int, ...]      # transpose Q -> [batch..., qfree..., d]
  k_perm: tuple[int, ...]
  v_perm: tuple[int, ...]
  batch_sizes: tuple[int, ...]
  q_sizes: tuple[int, ...]
  kv_len: int
  head_dim: int
  v_dim: int
  scale: float
  bias: Any = None
  bias_perm: tuple[int, ...] | None = None
  mask: Any = None
  mask_perm: tuple[int, ...] | None = None
  out_perm: tuple[int, ...] = ()   # canonical [batch..., qfree..., dv] -> D2 output layout
  bias_shape: tuple[int, ...] | None = None   # the scores' shape the bias broadcasts to
  # Grouped-query attention written as ``jnp.repeat(k/v, groups, axis=head)``: ``k``/``v``
  # are the un-repeated arrays, ``head_b`` the batch label of the (q) head dim and
  # ``groups`` the repeat count; the kernel gets ``heads = batch_sizes[head_b]`` q heads
  # and ``heads // groups`` k/v heads. ``pre_eqns``: the repeat eqns and eqns computing
  # the scale from constants (in the numeric check, not removed).
  head_b: int | None = None
  groups: int = 1
  pre_eqns: tuple[int, ...] = ()
  # Gemma's spelling merges two adjacent score dims (kv head, group) into one (heads) around the
  # softmax: a bias/mask given in that merged frame is split back with ``(position, size1, size2)``.
  bias_split: tuple[int, int, int] | None = None
  mask_split: tuple[int, int, int] | None = None
  # A second mask applied with the same fill (``where(pad, where(causal, s, f), f)``): the kernel
  # gets ``mask & mask2``.
  mask2: Any = None
  mask2_perm: tuple[int, ...] | None = None
  mask2_split: tuple[int, int, int] | None = None


class _NoMatch(Exception):
  pass


def _uses(jaxpr) -> dict:
  return DefUse(jaxpr).uses


def _scalar_value(a, known) -> float | None:
  if isinstance(a, core.Literal):
    v = np.asarray(a.val)
  else:
    v = known.get(a)
  if v is None or v.size != 1:
    return None
  return float(v.reshape(()))


_SCALAR_OPS = frozenset({"sqrt", "rsqrt", "convert_element_type", "div", "mul", "neg",
                         "integer_pow", "pow", "reshape", "broadcast_in_dim"})


def _const_scalar_chain(jaxpr, prod, a, known, acc: list, depth: int = 0) -> float | None:
  """The value of a one-element ``a`` computed from constants only by a few elementwise
  ops (e.g. ``sqrt(8.0)`` in bfloat16, which constant folding may leave), else None.
  The eqns used are appended to ``acc``."""
  v = _scalar_value(a, known)
  if v is not None or depth > 4 or not isinstance(a, core.Var):
    return v
  i = prod.get(a)
  if i is None:
    return None
  e = jaxpr.eqns[i]
  if e.primitive.name not in _SCALAR_OPS or e.effects or len(e.outvars) != 1 or \
      int(np.prod(a.aval.shape)) != 1:
    return None
  ins = []
  for x in e.invars:
    xv = _const_scalar_chain(jaxpr, prod, x, known, acc, depth + 1)
    if xv is None or int(np.prod(x.aval.shape)) != 1:
      return None
    ins.append(np.asarray(xv, x.aval.dtype).reshape(x.aval.shape))
  try:
    with jax.ensure_compile_time_eval():
      out = e.primitive.bind(*ins, **e.params)
    val = float(np.asarray(out, np.float32).reshape(()))
  except Exception:
    return None
  acc.append(i)
  return val


def _single_use(v, uses, idx) -> bool:
  return uses.get(v, []) == [idx]


def _match_softmax(jaxpr, uses, s_var, known):
  """Matches jax.nn.softmax(S, axis=a), possibly computed in a transposed frame.

  Returns (axis in the frame of P, P var, eqn indices, frame permutation of S's dims).
  """
  eqns = jaxpr.eqns
  cons = uses.get(s_var, [])
  if len(cons) != 2 or -1 in cons:
    raise _NoMatch("scores used outside softmax")
  rm = [i for i in cons if eqns[i].primitive.name == "reduce_max"]
  other = [i for i in cons if i not in rm]
  if len(rm) != 1 or len(other) != 1:
    raise _NoMatch("not a softmax")
  i_max = rm[0]
  axes = tuple(eqns[i_max].params["axes"])
  if len(axes) != 1:
    raise _NoMatch("softmax over several axes")
  axis = int(axes[0])
  ndim = len(s_var.aval.shape)
  idx = [i_max]

  def only_consumer(v):
    c = uses.get(v, [])
    if len(c) != 1 or c[0] == -1:
      raise _NoMatch("softmax intermediate used elsewhere")
    return c[0]

  # The frame in which the softmax is computed: S itself, or one transpose of it.
  frame = tuple(range(ndim))
  s_frame = s_var
  j = other[0]
  if eqns[j].primitive.name == "transpose":
    frame = tuple(eqns[j].params["permutation"])
    idx.append(j)
    s_frame = eqns[j].outvars[0]
    j = only_consumer(s_frame)
  if eqns[j].primitive.name != "sub" or eqns[j].invars[0] is not s_frame:
    raise _NoMatch("softmax subtracts something else")
  i_sub = j
  f_axis = frame.index(axis)
  # Max path: labels are dims of S.
  cur = eqns[i_max].outvars[0]
  labels = [d for d in range(ndim) if d != axis]
  j = only_consumer(cur)
  if eqns[j].primitive.name == "max":   # max(-inf, m)
    oth = [a for a in eqns[j].invars if a is not cur]
    if len(oth) != 1 or _scalar_value(oth[0], known) != -np.inf:
      raise _NoMatch("unexpected max in softmax")
    idx.append(j)
    cur = eqns[j].outvars[0]
    j = only_consumer(cur)
  while eqns[j].primitive.name == "transpose":
    labels = [labels[p] for p in eqns[j].params["permutation"]]
    idx.append(j)
    cur = eqns[j].outvars[0]
    j = only_consumer(cur)
  if eqns[j].primitive.name != "broadcast_in_dim":
    raise _NoMatch("softmax max not broadcast back")
  bd = tuple(eqns[j].params["broadcast_dimensions"])
  yshape = eqns[j].outvars[0].aval.shape
  ylabels = [None] * len(yshape)
  for src, dst in enumerate(bd):
    ylabels[dst] = labels[src]
  missing = [d for d in range(len(yshape)) if ylabels[d] is None]
  if missing != [f_axis] or yshape[f_axis] != 1:
    raise _NoMatch("softmax max not broadcast over its axis")
  ylabels[f_axis] = axis
  if tuple(ylabels) != frame:
    raise _NoMatch("softmax max broadcast in another frame")
  idx.append(j)
  cur = eqns[j].outvars[0]
  j = only_consumer(cur)
  if eqns[j].primitive.name == "stop_gradient":
    idx.append(j)
    cur = eqns[j].outvars[0]
    j = only_consumer(cur)
  if j != i_sub or eqns[i_sub].invars[1] is not cur:
    raise _NoMatch("softmax subtracts something else")
  idx.append(i_sub)
  z = eqns[i_sub].outvars[0]
  j = only_consumer(z)
  if eqns[j].primitive.name != "exp":
    raise _NoMatch("softmax without exp")
  idx.append(j)
  e = eqns[j].outvars[0]
  ce = uses.get(e, [])
  if len(ce) != 2 or -1 in ce:
    raise _NoMatch("exp used elsewhere")
  rs = [i for i in ce if eqns[i].primitive.name in ("reduce_sum", "convert_element_type")]
  dv = [i for i in ce if eqns[i].primitive.name == "div"]
  if len(rs) != 1 or len(dv) != 1:
    raise _NoMatch("softmax normaliser")
  i_rs, widened = rs[0], False
  if eqns[i_rs].primitive.name == "convert_element_type":
    # A low-precision softmax sums in float32: exp -> f32 -> reduce_sum -> broadcast -> back.
    wide = eqns[i_rs].outvars[0]
    if not (jnp.issubdtype(e.aval.dtype, jnp.floating)
            and jnp.issubdtype(wide.aval.dtype, jnp.floating)
            and jnp.dtype(wide.aval.dtype).itemsize > jnp.dtype(e.aval.dtype).itemsize):
      raise _NoMatch("softmax normaliser narrowed")
    idx.append(i_rs)
    i_rs, widened = only_consumer(wide), True
    if eqns[i_rs].primitive.name != "reduce_sum":
      raise _NoMatch("softmax normaliser")
  if tuple(eqns[i_rs].params["axes"]) != (f_axis,):
    raise _NoMatch("softmax normaliser over another axis")
  idx.append(i_rs)
  cur = eqns[i_rs].outvars[0]
  j = only_consumer(cur)
  if eqns[j].primitive.name != "broadcast_in_dim" or tuple(
      eqns[j].params["broadcast_dimensions"]) != tuple(d for d in range(ndim) if d != f_axis) or \
      eqns[j].outvars[0].aval.shape[f_axis] != 1:
    raise _NoMatch("softmax sum not broadcast back")
  idx.append(j)
  cur = eqns[j].outvars[0]
  if widened:
    j = only_consumer(cur)
    if eqns[j].primitive.name != "convert_element_type" or \
        eqns[j].outvars[0].aval.dtype != e.aval.dtype:
      raise _NoMatch("softmax normaliser not cast back")
    idx.append(j)
    cur = eqns[j].outvars[0]
  if only_consumer(cur) != dv[0] or eqns[dv[0]].invars[0] is not e or eqns[dv[0]].invars[1] is not cur:
    raise _NoMatch("softmax divides something else")
  idx.append(dv[0])
  return f_axis, eqns[dv[0]].outvars[0], idx, frame


def _producer_map(jaxpr):
  return DefUse(jaxpr).producers


def _depends_on(jaxpr, prod, var, targets: set, memo: dict) -> bool:
  """Whether ``var`` depends on any eqn index in ``targets``."""
  stack = [var]
  seen = set()
  while stack:
    v = stack.pop()
    if not isinstance(v, core.Var) or v in seen:
      continue
    seen.add(v)
    if v in memo:
      if memo[v]:
        return True
      continue
    i = prod.get(v)
    if i is None:
      continue
    if i in targets:
      return True
    stack.extend(jaxpr.eqns[i].invars)
  return False


def _match_attention(jaxpr, uses, prod, d1: int, known) -> _AttnMatch:
  """The attention whose ``Q.K`` is eqn ``d1`` (``Q`` either operand: the softmax and
  ``P.V`` decide which one holds the keys)."""
  first = None
  for q_is_lhs in (True, False):
    try:
      return _match_attention_oriented(jaxpr, uses, prod, d1, known, q_is_lhs)
    except _NoMatch as e:
      first = first or e
  raise first


def _head_repeat(jaxpr, prod, var):
  """``(source, axis, groups, eqn indices)`` if ``var`` is ``jnp.repeat(source, groups,
  axis=axis)`` (each slice of ``source`` along ``axis`` repeated ``groups`` times in a row),
  spelled as ``reshape(broadcast_in_dim(source))`` with the new dim right after ``axis``
  (optionally via an explicit unit dim: ``broadcast_to(x[:, :, :, None], ...)``); else None.
  ``jnp.tile`` (another order) is not a repeat."""
  i = prod.get(var)
  if i is None or not isinstance(var, core.Var):
    return None
  e = jaxpr.eqns[i]
  if e.primitive.name != "reshape" or e.params.get("dimensions") not in (None, ()):
    return None
  x = e.invars[0]
  j = prod.get(x)
  if j is None or jaxpr.eqns[j].primitive.name != "broadcast_in_dim":
    return None
  eb = jaxpr.eqns[j]
  y = eb.invars[0]
  if not isinstance(y, core.Var) or len(eb.invars) != 1:
    return None
  s2, s1, sy = tuple(var.aval.shape), tuple(x.aval.shape), tuple(y.aval.shape)
  bd = tuple(eb.params["broadcast_dimensions"])
  if len(s1) != len(s2) + 1 or x.aval.dtype != var.aval.dtype or y.aval.dtype != var.aval.dtype:
    return None
  for a in range(len(s2)):
    if s1[:a] != s2[:a] or s1[a + 2:] != s2[a + 1:] or s1[a] * s1[a + 1] != s2[a]:
      continue
    skip = tuple(d for d in range(len(s1)) if d != a + 1)
    unit = s1[:a + 1] + (1,) + s1[a + 2:]
    if bd == skip and sy == s2[:a] + (s1[a],) + s2[a + 1:]:
      return y, a, s1[a + 1], (j, i)
    if bd == tuple(range(len(s1))) and sy == unit:
      # y = x_src with a unit dim inserted at a + 1 (expand_dims / reshape / broadcast).
      k = prod.get(y)
      if k is None:
        continue
      ey = jaxpr.eqns[k]
      src = ey.invars[0] if ey.invars else None
      if not isinstance(src, core.Var) or len(ey.invars) != 1 or src.aval.dtype != y.aval.dtype:
        continue
      if tuple(src.aval.shape) != s2[:a] + (s1[a],) + s2[a + 1:]:
        continue
      ok = (ey.primitive.name == "reshape" and ey.params.get("dimensions") in (None, ())) or (
          ey.primitive.name == "broadcast_in_dim"
          and tuple(ey.params["broadcast_dimensions"]) == skip)
      if ok:
        return src, a, s1[a + 1], (k, j, i)
  return None


def _match_attention_oriented(jaxpr, uses, prod, d1: int, known, q_is_lhs: bool) -> _AttnMatch:
  eqns = jaxpr.eqns
  e1 = eqns[d1]
  (lc, rc), (lb, rb) = e1.params["dimension_numbers"]
  q, k = e1.invars
  if not q_is_lhs:
    lc, rc, lb, rb, q, k = rc, lc, rb, lb, k, q
  if len(lc) != 1 or len(rc) != 1:
    raise _NoMatch("Q.K must contract exactly one head dim")
  if not all(isinstance(x, core.Var) for x in (q, k)):
    raise _NoMatch("literal operand")
  qr, kr = len(q.aval.shape), len(k.aval.shape)
  qfree = [i for i in range(qr) if i not in lc and i not in lb]
  kfree = [i for i in range(kr) if i not in rc and i not in rb]
  if len(kfree) != 1 or not qfree:
    raise _NoMatch("K must have exactly one sequence dim")
  nb = len(lb)
  # Labels of S0 dims: ("b", i) batch i; ("q", j) query free dim j; ("k",) key dim
  # (dot_general's output: batch dims, then lhs free dims, then rhs free dims).
  qlabels = [("q", j) for j in range(len(qfree))]
  labels = [("b", i) for i in range(nb)] + (qlabels + [("k",)] if q_is_lhs else [("k",)] + qlabels)
  scale = 1.0
  bias = mask = None
  bias_labels = mask_labels = bias_shape = None
  mask2 = mask2_labels = fill1 = None
  merge = None          # (size1, size2) of the two score dims merged into one, if any
  phase = 0
  idx = [d1]
  cur = e1.outvars[0]
  # Scores may be computed wider than the inputs (bf16 q/k, float32 scores and softmax,
  # probabilities cast back before P.V: jax.nn.dot_product_attention's spelling).
  in_dtype, dtype = q.aval.dtype, cur.aval.dtype
  if k.aval.dtype != in_dtype or not jnp.issubdtype(in_dtype, jnp.floating):
    raise _NoMatch("mixed dtypes")
  if dtype != in_dtype and not (dtype == jnp.float32 and jnp.dtype(in_dtype).itemsize < 4):
    raise _NoMatch("scores dtype")
  chain_set = {d1}
  const_eqns: list = []      # scale computed from constants (checked, not removed)
  while True:
    c = uses.get(cur, [])
    if len(c) == 2 and "reduce_max" in {eqns[i].primitive.name for i in c} and -1 not in c:
      break
    if len(c) != 1 or c[0] == -1:
      raise _NoMatch("score used elsewhere")
    i = c[0]
    e = eqns[i]
    name = e.primitive.name
    others = [a for a in e.invars if a is not cur]
    if name in ("mul", "div") and len(e.invars) == 2 and len(others) == 1 and phase == 0:
      if name == "div" and e.invars[1] is cur:
        raise _NoMatch("division by scores")
      val = _scalar_value(others[0], known)
      if val is None:
        val = _const_scalar_chain(jaxpr, prod, others[0], known, const_eqns)
      if val is None or not np.isfinite(val) or val == 0:
        raise _NoMatch("non-constant scale")
      if others[0].aval.shape not in ((),) and np.prod(others[0].aval.shape) != 1:
        raise _NoMatch("non-scalar scale")
      if e.outvars[0].aval.shape != cur.aval.shape:
        raise _NoMatch("scale changes the shape")
      scale = scale * val if name == "mul" else scale / val
    elif name == "add" and len(others) == 1 and phase == 0:
      b = others[0]
      shape = tuple(cur.aval.shape)
      if (not isinstance(b, core.Var) or len(b.aval.shape) != len(shape)
          or any(s not in (1, t) for s, t in zip(b.aval.shape, shape))
          or e.outvars[0].aval.shape != cur.aval.shape
          or b.aval.dtype != dtype or _depends_on(jaxpr, prod, b, chain_set, {})):
        raise _NoMatch("bias must be an independent array of the scores' shape")
      bias, bias_labels, bias_shape = b, list(labels), shape
      phase = 1
    elif name == "select_n" and len(e.invars) == 3 and e.invars[2] is cur and (
        phase in (0, 1) or (phase == 2 and mask2 is None)):
      pred, fill = e.invars[0], e.invars[1]
      if pred.aval.dtype != np.bool_ or pred.aval.shape != cur.aval.shape:
        raise _NoMatch("mask shape")
      if _depends_on(jaxpr, prod, pred, chain_set, {}):
        raise _NoMatch("mask depends on scores")
      fv = _fill_value(jaxpr, prod, fill, known)
      if fv is None or not np.isfinite(fv) or fv > _FILL_MAX:
        raise _NoMatch("mask fill must be a large finite negative constant")
      if phase == 2:
        if fv != fill1:
          raise _NoMatch("two masks with different fills")
        mask2, mask2_labels = pred, list(labels)
      else:
        mask, mask_labels, fill1 = pred, list(labels), fv
      idx.extend(_fill_eqns(jaxpr, prod, fill, uses, i))
      phase = 2
    elif name == "transpose":
      perm = tuple(e.params["permutation"])
      labels = [labels[p] for p in perm]
    elif name == "reshape" and e.params.get("dimensions") in (None, ()) and merge is None and \
        _merged_pair(tuple(cur.aval.shape), tuple(e.outvars[0].aval.shape)) is not None and \
        phase == 0:
      mp = _merged_pair(tuple(cur.aval.shape), tuple(e.outvars[0].aval.shape))
      if ("k",) in (labels[mp], labels[mp + 1]):
        raise _NoMatch("reshape merges the key axis")
      merge = (cur.aval.shape[mp], cur.aval.shape[mp + 1])
      labels = labels[:mp] + [("m", labels[mp], labels[mp + 1])] + labels[mp + 2:]
    elif name == "reshape" and e.params.get("dimensions") in (None, ()):
      new_shape = tuple(e.outvars[0].aval.shape)
      old_shape = tuple(cur.aval.shape)
      if [s for s in old_shape if s != 1] != [s for s in new_shape if s != 1]:
        raise _NoMatch("reshape changes non-unit dims")
      nonunit = [l for l, s in zip(labels, old_shape) if s != 1]
      unit = [l for l, s in zip(labels, old_shape) if s == 1]
      it = iter(nonunit)
      new_labels = []
      for s in new_shape:
        if s != 1:
          new_labels.append(next(it))
        elif unit:
          new_labels.append(unit.pop(0))
        else:
          raise _NoMatch("reshape adds a new unit dim")
      if unit:
        # Dropping unit dims is fine only if they are q/batch dims of size 1 (tracked away).
        raise _NoMatch("reshape drops a labelled unit dim")
      labels = new_labels
    else:
      raise _NoMatch(f"unexpected {name} between Q.K and softmax")
    if e.outvars[0].aval.dtype != dtype:
      raise _NoMatch("scores change dtype")
    idx.append(i)
    chain_set.add(i)
    cur = e.outvars[0]
  axis, p_var, sm_idx, frame = _match_softmax(jaxpr, uses, cur, known)
  labels = [labels[p] for p in frame]
  if labels[axis] != ("k",):
    raise _NoMatch("softmax is not over the key axis")
  idx.extend(sm_idx)
  c = uses.get(p_var, [])
  if dtype != in_dtype:
    # float32 probabilities cast back to the inputs' dtype before P.V.
    if len(c) != 1 or c[0] == -1 or eqns[c[0]].primitive.name != "convert_element_type" or \
        eqns[c[0]].outvars[0].aval.dtype != in_dtype:
      raise _NoMatch("probabilities not cast back to the inputs' dtype")
    idx.append(c[0])
    p_var = eqns[c[0]].outvars[0]
    c = uses.get(p_var, [])
  if merge is not None:
    # The probabilities are split back to the frame of Q.K before P.V.
    cp = next(n for n, l in enumerate(labels) if l[0] == "m")
    pshape = tuple(p_var.aval.shape)
    want = pshape[:cp] + merge + pshape[cp + 1:]
    if len(c) != 1 or c[0] == -1 or eqns[c[0]].primitive.name != "reshape" or \
        tuple(eqns[c[0]].outvars[0].aval.shape) != want or \
        eqns[c[0]].params.get("dimensions") not in (None, ()):
      raise _NoMatch("merged score dims not split back before P.V")
    labels = labels[:cp] + [labels[cp][1], labels[cp][2]] + labels[cp + 1:]
    axis = labels.index(("k",))
    idx.append(c[0])
    p_var = eqns[c[0]].outvars[0]
    c = uses.get(p_var, [])
  if len(c) != 1 or c[0] == -1 or eqns[c[0]].primitive.name != "dot_general":
    raise _NoMatch("probabilities not consumed by one dot_general")
  d2 = c[0]
  e2 = eqns[d2]
  (lc2, rc2), (lb2, rb2) = e2.params["dimension_numbers"]
  if e2.invars[0] is p_var:
    pc, vc, pb, vb, v = lc2, rc2, lb2, rb2, e2.invars[1]
    p_first = True
  elif e2.invars[1] is p_var:
    pc, vc, pb, vb, v = rc2, lc2, rb2, lb2, e2.invars[0]
    p_first = False
  else:
    raise _NoMatch("P.V")
  if not isinstance(v, core.Var) or v.aval.dtype != in_dtype or \
      e2.outvars[0].aval.dtype != in_dtype:
    raise _NoMatch("V dtype")
  if tuple(pc) != (axis,) or len(vc) != 1:
    raise _NoMatch("P.V must contract the key axis only")
  p_batch_labels = [labels[d] for d in pb]
  if sorted(p_batch_labels) != sorted(("b", i) for i in range(nb)):
    raise _NoMatch("P.V batch dims differ from Q.K batch dims")
  pr = len(p_var.aval.shape)
  p_free = [d for d in range(pr) if d not in pc and d not in pb]
  if sorted(labels[d] for d in p_free) != sorted(("q", j) for j in range(len(qfree))):
    raise _NoMatch("P.V free dims are not the query dims")
  vr = len(v.aval.shape)
  v_free = [d for d in range(vr) if d not in vc and d not in vb]
  if len(v_free) != 1:
    raise _NoMatch("V must have one feature dim")
  # Sizes.
  batch_sizes = tuple(q.aval.shape[d] for d in lb)
  if tuple(k.aval.shape[d] for d in rb) != batch_sizes:
    raise _NoMatch("batch sizes")
  q_sizes = tuple(q.aval.shape[d] for d in qfree)
  kv_len = k.aval.shape[kfree[0]]
  head_dim = q.aval.shape[lc[0]]
  v_dim = v.aval.shape[v_free[0]]
  if v.aval.shape[vc[0]] != kv_len or v_dim != head_dim:
    raise _NoMatch("V shape")
  # V batch dims in label order b0..b{nb-1}.
  v_batch_for_label = {p_batch_labels[j]: vb[j] for j in range(len(pb))}
  v_perm = tuple(v_batch_for_label[("b", i)] for i in range(nb)) + (vc[0], v_free[0])
  q_perm = tuple(lb) + tuple(qfree) + (lc[0],)
  k_perm = tuple(rb) + (kfree[0], rc[0])
  canon = [("b", i) for i in range(nb)] + [("q", j) for j in range(len(qfree))] + [("k",)]

  def perm_for(lbls):
    return tuple(lbls.index(l) for l in canon)

  # D2 output layout: batch (in pb order), then lhs free, then rhs free.
  out_labels = [p_batch_labels[j] for j in range(len(pb))]
  p_free_labels = [labels[d] for d in p_free]
  out_labels += (p_free_labels + [("v",)]) if p_first else ([("v",)] + p_free_labels)
  canon_out = [("b", i) for i in range(nb)] + [("q", j) for j in range(len(qfree))] + [("v",)]
  out_perm = tuple(canon_out.index(l) for l in out_labels)
  idx.append(d2)
  # Grouped-query attention spelled with jnp.repeat: K and V both repeat their slices
  # along the same batch (head) label by the same count -> the kernel's own GQA on the
  # un-repeated K/V (q head h reads k/v head h // groups, exactly jnp.repeat's order).
  head_b, groups, pre = None, 1, tuple(const_eqns)
  rep_k, rep_v = _head_repeat(jaxpr, prod, k), _head_repeat(jaxpr, prod, v)
  if rep_k is not None and rep_v is not None:
    k0, ak, gk, k_eqns = rep_k
    v0, av, gv, v_eqns = rep_v
    if (gk == gv and gk > 1 and ak in rb and av in vb
        and p_batch_labels[list(vb).index(av)] == ("b", list(rb).index(ak))
        and k0.aval.shape[ak] == v0.aval.shape[av]):
      head_b, groups = list(rb).index(ak), gk
      pre = tuple(sorted(set(pre) | set(k_eqns) | set(v_eqns)))
      k, v = k0, v0
  return _AttnMatch(
      d1=d1, d2=d2, eqns=sorted(set(idx)), q=q, k=k, v=v, q_perm=q_perm, k_perm=k_perm,
      v_perm=v_perm, batch_sizes=batch_sizes, q_sizes=q_sizes, kv_len=kv_len,
      head_dim=head_dim, v_dim=v_dim, scale=scale,
      bias=bias, bias_perm=perm_for(_split_labels(bias_labels)) if bias is not None else None,
      mask=mask, mask_perm=perm_for(_split_labels(mask_labels)) if mask is not None else None,
      out_perm=out_perm, bias_shape=bias_shape, head_b=head_b, groups=groups, pre_eqns=pre,
      bias_split=_split_of(bias_labels, merge) if bias is not None else None,
      mask_split=_split_of(mask_labels, merge) if mask is not None else None,
      mask2=mask2, mask2_perm=perm_for(_split_labels(mask2_labels)) if mask2 is not None else None,
      mask2_split=_split_of(mask2_labels, merge) if mask2 is not None else None)


def _merged_pair(old_shape, new_shape):
  """Position ``i`` when ``new_shape`` is ``old_shape`` with dims ``i, i+1`` merged (both > 1)."""
  if len(new_shape) != len(old_shape) - 1:
    return None
  for i in range(len(new_shape)):
    if (old_shape[:i] == new_shape[:i] and old_shape[i + 2:] == new_shape[i + 1:]
        and old_shape[i] > 1 and old_shape[i + 1] > 1
        and new_shape[i] == old_shape[i] * old_shape[i + 1]):
      return i
  return None


def _split_labels(lbls):
  out = []
  for l in lbls:
    out.extend([l[1], l[2]] if l[0] == "m" else [l])
  return out


def _split_of(lbls, merge):
  for n, l in enumerate(lbls):
    if l[0] == "m":
      return (n, merge[0], merge[1])
  return None


def _fill_value(jaxpr, prod, fill, known):
  """The constant behind a mask fill (a literal, or broadcasts of one)."""
  seen = 0
  while isinstance(fill, core.Var) and seen < 4:
    i = prod.get(fill)
    if i is None:
      val = known.get(fill)
      return None if val is None or np.unique(val).size != 1 else float(np.unique(val)[0])
    e = jaxpr.eqns[i]
    if e.primitive.name in ("broadcast_in_dim", "convert_element_type") and len(e.invars) == 1:
      fill = e.invars[0]
      seen += 1
    else:
      return None
  return _scalar_value(fill, known)


def _fill_eqns(jaxpr, prod, fill, uses, select_idx):
  """Fill broadcast eqns used only by the select (they die with the match)."""
  out = []
  while isinstance(fill, core.Var) and fill in prod:
    i = prod[fill]
    if uses.get(fill, []) != ([select_idx] if not out else [out[-1]]):
      break
    out.append(i)
    fill = jaxpr.eqns[i].invars[0]
  return out


def _attention_replacement(m: _AttnMatch, backend: str, lengths=None):
  """``fn(q, k, v, bias, mask, mask2=None)`` computing the matched attention with ``flash_attention``.

  Batch dims are flattened into the kernel's batch and query dims into its sequence; with
  a head repeat (``m.head_b``) that batch dim becomes the kernel's heads and ``k``/``v``
  keep ``heads // groups`` heads (the kernel's grouped-query attention).

  ``lengths=(q_len, kv_len)`` (int32 scalars, traced; ``None`` for a full axis): the sequences
  are padded beyond them (shape buckets) and ``attention_valid_lengths`` excludes the padding.
  """
  flash_attention = _kernel("flash_attention")
  hb = m.head_b
  nb = len(m.batch_sizes)
  heads = 1 if hb is None else m.batch_sizes[hb]
  kv_heads = heads // m.groups
  other = tuple(s for i, s in enumerate(m.batch_sizes) if i != hb)
  nbo = int(np.prod(other)) if other else 1
  tq = int(np.prod(m.q_sizes))

  def heads_last(x, perm):
    x = jnp.transpose(x, perm)                      # [batch..., seq..., feature]
    return x if hb is None else jnp.moveaxis(x, hb, -2)

  def scores(x, perm):
    x = jnp.transpose(x, perm)                      # [batch..., q..., k]
    if hb is not None:
      x = jnp.moveaxis(x, hb, nb - 1)               # [other batch..., head, q..., k]
    return x.reshape(nbo, heads, tq, m.kv_len)

  def fn(q, k, v, bias, mask, mask2=None):
    qc = heads_last(q, m.q_perm).reshape(nbo, tq, heads, m.head_dim)
    kc = heads_last(k, m.k_perm).reshape(nbo, m.kv_len, kv_heads, m.head_dim)
    vc = heads_last(v, m.v_perm).reshape(nbo, m.kv_len, kv_heads, m.v_dim)
    if bias is not None and tuple(bias.shape) != m.bias_shape:
      bias = jnp.broadcast_to(bias, m.bias_shape)
    bias, mask = _unmerge(bias, m.bias_split), _unmerge(mask, m.mask_split)
    bc = None if bias is None else scores(bias, m.bias_perm)
    mc = None if mask is None else scores(mask, m.mask_perm)
    if mask2 is not None:
      mc = mc & scores(_unmerge(mask2, m.mask2_split), m.mask2_perm)
    if lengths is None:
      o = flash_attention(qc, kc, vc, bias=bc, mask=mc, scale=float(m.scale), backend=backend)
    else:
      q_len = tq if lengths[0] is None else lengths[0]
      kv_len = m.kv_len if lengths[1] is None else lengths[1]
      o = attention_valid_lengths(qc, kc, vc, q_len, kv_len, bias=bc, mask=mc, scale=float(m.scale))
    if hb is None:
      o = o.reshape(m.batch_sizes + m.q_sizes + (m.v_dim,))
    else:
      o = jnp.moveaxis(o.reshape(other + m.q_sizes + (heads, m.v_dim)), -2, hb)
    return jnp.transpose(o, m.out_perm)

  return fn


def _unmerge(x, split):
  """Splits the merged score dim of a bias/mask given in Gemma's merged frame."""
  if x is None or split is None:
    return x
  p, a, b = split
  return x.reshape(x.shape[:p] + (a, b) + x.shape[p + 1:])


def _kernel(name: str):
  """The public ``lepton_jax.pallas_kernels`` entry point ``name``."""
  return getattr(lpk, name)


def find_attention(closed: core.ClosedJaxpr) -> list[_AttnMatch]:
  """All exact attention matches at the top level of ``closed`` (see module doc)."""
  jaxpr = closed.jaxpr
  known = known_consts(closed)
  uses = _uses(jaxpr)
  prod = _producer_map(jaxpr)
  out, taken = [], set()
  for i, e in enumerate(jaxpr.eqns):
    if e.primitive.name != "dot_general" or i in taken:
      continue
    try:
      m = _match_attention(jaxpr, uses, prod, i, known)
    except _NoMatch:
      continue
    if taken & set(m.eqns):
      continue
    taken |= set(m.eqns)
    out.append(m)
  return out


def _subgraph_fn(closed, eqn_ids, in_vars, out_var):
  """The matched sub-graph as a function of its inputs (for spot checks)."""
  jaxpr = closed.jaxpr
  ids = set(eqn_ids)
  sub = jaxpr.replace(invars=[], outvars=[out_var],
                      eqns=[e for i, e in enumerate(jaxpr.eqns) if i in ids])

  def fn(*vals):
    env_vars = [a for a in in_vars if isinstance(a, core.Var)]
    env_vals = [v for a, v in zip(in_vars, vals) if isinstance(a, core.Var)]
    inner = sub.replace(invars=env_vars)
    return eval_jaxpr(inner, closed.consts, *env_vals)[0]

  return fn


def _sds(a):
  if a is None:
    return None
  return jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype)


def _check(closed, eqn_ids, in_vars, out_var, repl, spot_check: bool, key_extra,
           max_elements: int = _SPOT_CHECK_MAX_SCORES) -> str | None:
  """None if the replacement is verified, else the reason it is not.

  Checks the replacement's output shape/dtype and, when ``spot_check`` and the inputs
  are small enough, compares it numerically with the original sub-graph on random inputs.
  """
  out_aval = out_var.aval
  # One random value per distinct input (q, k and v may be one variable).
  uniq, pos = [], []
  for a in in_vars:
    j = next((n for n, u in enumerate(uniq) if u is a), None) if a is not None else None
    if a is not None and j is None:
      uniq.append(a)
      j = len(uniq) - 1
    pos.append(j)
  if len(uniq) < sum(a is not None for a in in_vars):
    spread = lambda vals: [None if j is None else vals[j] for j in pos]
    f_repl, f_sub = repl, _subgraph_fn(closed, eqn_ids, in_vars, out_var)
    repl = lambda *vals: f_repl(*spread(vals))
    sub_fn = lambda *vals: f_sub(*spread(vals))
    in_vars = uniq
  else:
    sub_fn = None
  args = tuple(_sds(a) for a in in_vars)
  try:
    got = jax.eval_shape(repl, *args)
  except Exception as e:  # kernel refused the shapes/dtypes
    return f"{type(e).__name__}: {e}"
  if got.shape != out_aval.shape or got.dtype != out_aval.dtype:
    return f"replacement gives {got.shape}/{got.dtype}, expected {out_aval.shape}/{out_aval.dtype}"
  if not spot_check or _largest_value(closed.jaxpr, eqn_ids, args) > max_elements:
    return None
  if any(isinstance(c, core.Tracer) for c in closed.consts):
    return None
  key = _spot_key(closed, eqn_ids, args, (key_extra, tuple(pos)))
  if key is not None and key in _SPOT_CACHE:
    return _SPOT_CACHE[key]
  sub = sub_fn or _subgraph_fn(closed, eqn_ids, in_vars, out_var)
  verdict = _spot_check(sub, repl, args, out_aval)
  if key is not None:
    _SPOT_CACHE[key] = verdict
  return verdict


# Verdicts of numeric spot checks keyed by the matched sub-graph's structure and shapes
# (an explicit, clearable cache: see clear_spot_check_cache).
_SPOT_CACHE: dict = {}


def clear_spot_check_cache() -> None:
  """Forgets cached spot-check verdicts and traced templates."""
  _SPOT_CACHE.clear()
  _templates.clear_template_cache()
  _route_joint._clear_caches()


def _largest_value(jaxpr, eqn_ids, args) -> int:
  """Elements of the largest input or intermediate of the matched sub-graph."""
  sizes = [int(np.prod(a.shape)) for a in args if a is not None]
  for i in eqn_ids:
    sizes += [int(np.prod(v.aval.shape)) for v in jaxpr.eqns[i].outvars
              if hasattr(v.aval, "shape")]
  return max(sizes, default=0)


def _spot_key(closed, eqn_ids, args, key_extra):
  try:
    cvals = {v: c for v, c in zip(closed.jaxpr.constvars, closed.consts)}
    parts = []
    for i in sorted(eqn_ids):
      e = closed.jaxpr.eqns[i]
      parts.append((e.primitive.name, repr(sorted((k, repr(v)) for k, v in e.params.items())),
                    tuple(repr(a.val) if isinstance(a, core.Literal) else
                          (repr(a.aval), np.asarray(cvals[a]).tobytes() if a in cvals else None)
                          for a in e.invars)))
    return (tuple(parts), tuple(None if a is None else (a.shape, str(a.dtype)) for a in args),
            key_extra)
  except Exception:
    return None


def _spot_check(sub, repl, args, out_aval):
  with jax.ensure_compile_time_eval():
    vals = random_inputs(args)
    both = jax.jit(lambda *v: (sub(*v), repl(*v)))
    if jax.default_backend() == "cpu":
      # A one-off executable: skip XLA's backend optimisations (much faster to compile).
      exe = both.lower(*vals).compile({"xla_backend_optimization_level": 0})
      want, have = exe(*vals)
    else:
      want, have = both(*vals)
    tol = 2e-2 if jnp.dtype(out_aval.dtype).itemsize < 4 else 2e-4
    ok = np.allclose(np.asarray(have, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
  return None if ok else "numeric spot check failed"


_FAMILY_KERNEL = {"rms_norm": "rms_norm", "layer_norm": "layer_norm",
                  "softmax_cross_entropy": "softmax_cross_entropy", "matmul": "matmul"}


def route_kernels(closed: core.ClosedJaxpr, *, kernels: str | None = "auto", spot_check: bool = True,
                  **_) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Routes exact hotspot matches to ``lepton_jax.pallas_kernels``.

  Attention (see module doc) goes to ``flash_attention``; RMS norm, layer norm, softmax
  cross-entropy with integer labels and matmul+bias+activation (see
  :mod:`._templates`) go to ``rms_norm``, ``layer_norm``, ``softmax_cross_entropy`` and
  ``matmul``. Each replacement is checked (shape/dtype, and numerically on random inputs
  when small); a failed check keeps the original sub-graph and warns.

  Args:
    closed: the jaxpr to rewrite; its interface is kept.
    kernels: kernel backend (``"auto"``, ``"xla"``, ``"interpret"``, ...); ``None`` routes
      nothing.
    spot_check: also compare each replacement numerically on random inputs (when its
      inputs have at most 4M elements).

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax, jax.numpy as jnp
  >>> def attn(q, k, v):
  ...   p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, axis=-1)
  ...   return jnp.einsum("bhqk,bkhd->bqhd", p, v)
  >>> x = jnp.ones((1, 8, 2, 16))
  >>> [r.pattern for r in route_kernels(jax.make_jaxpr(attn)(x, x, x), kernels="xla")[1]]
  ['attention']
  """
  if kernels is None:
    return closed, []
  records: list[Rewrite] = []
  level = lambda cj, path, recs: _route_level(cj, path, recs, kernels, spot_check)
  return rewrite_nested(closed, level, records), records


def _has_residuals(jaxpr, du: DefUse, root: int, eqns) -> bool:
  """Whether an intermediate (not the root's output) of the matched ``eqns`` is read outside."""
  return any(u not in eqns for i in eqns if i != root for v in jaxpr.eqns[i].outvars
             for u in du.users(v))


def _joint_forwards(closed, du: DefUse, kernels: str) -> list[JointForward]:
  """Hotspot forwards of a gradient program (attention, then norms / cross-entropy /
  matmul+bias+activation templates whose intermediates the backward reads)."""
  out = attention_forwards(closed, du, match_fn=_match_attention, no_match=_NoMatch,
                           replacement_fn=_attention_replacement, kernels=kernels)
  taken = set()
  for f in out:
    taken |= set(f.eqns) | set(f.pre)
  jaxpr = closed.jaxpr
  for m in _templates.find_template_matches(closed):
    if m.eqns & taken or not _has_residuals(jaxpr, du, m.root, m.eqns):
      continue
    out_var = jaxpr.eqns[m.root].outvars[0]
    repl = _templates.replacement(m, kernels, out_var.aval)
    try:
      got = jax.eval_shape(repl, *[_sds(a) for a in m.inputs])
    except Exception:   # the kernel refuses these shapes/dtypes: not a match
      continue
    if got.shape != out_var.aval.shape or got.dtype != out_var.aval.dtype:
      continue
    taken |= m.eqns
    out.append(JointForward(f"{m.pattern}_fwd_bwd", m.root, set(m.eqns), list(m.inputs), repl,
                            judge=True, key=(m.template.family, m.template.name, m.eps, kernels,
                                             id(_templates.replacement))))
  return out


def _route_level(closed, path: str, records: list, kernels: str, spot_check: bool):
  """Routes the hotspots of one jaxpr level (nested jit calls inlined to see patterns whole)."""
  work, inlined = inline_calls(closed)
  # Hotspots inside a gradient program: forward and backward replaced together.
  joint = route_joint_level(work, path, records, kernels=kernels, spot_check=spot_check,
                            forwards=lambda cj, du: _joint_forwards(cj, du, kernels))
  changed = joint is not work
  work = joint
  repls, skip, taken = {}, set(), set()
  for m in find_attention(work):
    repl = _attention_replacement(m, kernels)
    in_vars = (m.q, m.k, m.v, m.bias, m.mask, m.mask2)
    out_var = work.jaxpr.eqns[m.d2].outvars[0]
    key = ("attention", m.q_perm, m.k_perm, m.v_perm, m.out_perm, m.bias_perm, m.mask_perm,
           m.bias_split, m.mask_split, m.mask2_perm, m.mask2_split,
           m.scale, m.head_b, m.groups, id(_attention_replacement))
    reason = _check(work, set(m.eqns) | set(m.pre_eqns), in_vars, out_var, repl, spot_check, key)
    here = location(f"{path}{m.d2}", work.jaxpr.eqns[m.d2])
    if reason is not None:
      warnings.warn(f"adaptive_jit: attention at eqn {here} was not routed to "
                    f"pallas_kernels.flash_attention because its check failed ({reason}); the "
                    "original computation is kept", RuntimeWarning, stacklevel=2)
      continue

    def make(m=m, repl=repl):
      def r(read):
        return [repl(read(m.q), read(m.k), read(m.v),
                     None if m.bias is None else read(m.bias),
                     None if m.mask is None else read(m.mask),
                     None if m.mask2 is None else read(m.mask2))]
      return r

    repls[m.d2] = make()
    skip |= set(m.eqns) - {m.d2}
    taken |= set(m.eqns)
    records.append(Rewrite("route_kernels", "attention", here, len(m.eqns)))
  prod = _producer_map(work.jaxpr)
  du = DefUse(work.jaxpr)
  for m in _templates.find_template_matches(work):
    if m.eqns & taken or any(isinstance(a, core.Var) and prod.get(a) in skip for a in m.inputs):
      continue
    if _has_residuals(work.jaxpr, du, m.root, m.eqns):
      # Its intermediates are read by a backward the joint pass did not replace: routing the
      # forward alone would compute them twice.
      continue
    out_var = work.jaxpr.eqns[m.root].outvars[0]
    repl = _templates.replacement(m, kernels, out_var.aval)
    key = (m.template.family, m.template.name, m.eps, id(_templates.replacement))
    # A kernel that refuses these shapes/dtypes is a non-match, not a failed check.
    try:
      got = jax.eval_shape(repl, *[_sds(a) for a in m.inputs])
    except Exception:
      continue
    if got.shape != out_var.aval.shape or got.dtype != out_var.aval.dtype:
      continue
    reason = _check(work, m.eqns, m.inputs, out_var, repl, spot_check, key)
    here = location(f"{path}{m.root}", work.jaxpr.eqns[m.root])
    kname = _FAMILY_KERNEL[m.template.family]
    if reason is not None:
      warnings.warn(f"adaptive_jit: {m.pattern} at eqn {here} was not routed to "
                    f"pallas_kernels.{kname} because its check failed ({reason}); the original "
                    "computation is kept", RuntimeWarning, stacklevel=2)
      continue

    def make_t(m=m, repl=repl):
      def r(read):
        return [repl(*[read(a) for a in m.inputs])]
      return r

    repls[m.root] = make_t()
    taken |= m.eqns
    records.append(Rewrite("route_kernels", m.pattern, here, len(m.eqns)))
  if not repls:
    return work if changed else closed
  return retrace(work, replace=repls, skip=frozenset(skip))
