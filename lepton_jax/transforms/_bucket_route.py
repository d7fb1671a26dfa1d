"""Attention routing inside a bucket's masked program (``adaptive_jit(buckets=..., kernels=...)``).

The masked program of :mod:`._bucket_mask` keeps a padded program exact by masking every operation
that mixes positions; an attention so masked no longer has the shape of an attention, so the
kernel router cannot see it. This module finds the attentions on the trace at the bucket size
(where they are whole and unpadded: the attention matcher and the joint forward + backward
identification of the router apply as they are) and tells the masking walk to compute them with
``attention_valid_lengths``, the blockwise attention that excludes the padded keys outright (and
skips their blocks) given the true lengths at run time:

- an attention whose intermediates are read only by itself (a forward program): its output;
- an attention whose forward and backward are both in the program (a gradient): the forward and
  the backward region the router identified, the backward being the kernel's own VJP.

Tags (which dims are padded) come from the two traces' shapes; an attention is routed only if
the padded dims are its query sequence, its key sequence, or batch-like dims (never the head
dim, never one of several flattened query dims). Whether the routed program is kept is decided
by the caller on the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._defuse import DefUse
from lepton_jax.jaxpr._driver import inline_calls, known_consts
from lepton_jax.pallas_kernels._attention import BlockSizes
from lepton_jax.transforms.passes._dce import dce
from lepton_jax.transforms.passes import _route_joint as rj
from lepton_jax.transforms.passes import _route_kernels as rk

__all__ = ["AttentionPlan", "plan_attention", "prepare"]


@dataclasses.dataclass
class AttentionPlan:
  """Equations of one jaxpr level the walk computes with the kernel instead.

  Attributes:
    replace: eqn index -> ``fn(read) -> list of outputs`` (an equation's outputs) or ``{var:
      value}`` (a joint backward writing the region's outputs).
    skip: eqn indices not evaluated (their values are only read by the replaced equations).
    routed: how many attentions (forward-only or forward + backward).
    vtags: each top-level variable's padded dims (set by the caller).
    n: the true length (a traced int32 scalar), set by the walk before it evaluates.
  """
  replace: dict
  skip: set
  routed: int
  vtags: dict = dataclasses.field(default_factory=dict)
  n: Any = None


def prepare(closed):
  """Nested jit calls inlined and dead code removed (dead uses of a residual would block the
  joint identification). Not CSE: whether two equations are duplicates can depend on the length
  (a padded dim equal to another dim at one length only), and both traces must keep one structure."""
  return dce(inline_calls(closed)[0])[0]


def _seq_offsets(m, vtags) -> tuple | None:
  """``(q_offset, kv_offset)`` of the padded query / key sequence (None: not padded), or None when
  the padding is somewhere the kernel cannot take it."""
  nb = len(m.batch_sizes)

  def axis_role(var, perm, n_seq):
    t = vtags.get(var, {}) if isinstance(var, core.Var) else {}
    seq = None
    for d, c in t.items():
      pos = perm.index(d)
      if pos < nb:
        if m.head_b is not None and pos == m.head_b:
          return False
        continue                          # batch-like: position-wise
      if pos >= nb + n_seq:               # the feature (head) dim
        return False
      if pos != nb:
        # Query dims are flattened into the kernel's sequence outermost first (Gemma's
        # ``BTKGH`` queries: t * G + g); only the outermost may be padded.
        return False
      seq = c
    return seq

  q = axis_role(m.q, m.q_perm, len(m.q_sizes))
  k = axis_role(m.k, m.k_perm, 1)
  v = axis_role(m.v, m.v_perm, 1)
  if q is False or k is False or v is False or k != v:
    return None
  if q is None and k is None:
    return None                           # nothing padded along the sequences: routed normally
  inner = 1
  for size in m.q_sizes[1:]:
    inner *= int(size)
  return q, k, inner


def _one_block(m) -> bool:
  """Whether the blockwise kernel would hold the whole score matrix as one block anyway (its
  default XLA blocks cover the sequences): then it cannot need less memory than the masked
  program, only more time, and is not tried."""
  tq = 1
  for size in m.q_sizes:
    tq *= int(size)
  bs = BlockSizes.get_default(q_len=tq, kv_len=int(m.kv_len), impl="xla", head_dim=m.head_dim)
  return tq <= bs.block_q and int(m.kv_len) <= bs.block_k


def _lengths(offsets, n):
  """``(q_len, kv_len)`` in the kernel's flattened sequences."""
  q, k, inner = offsets
  nn = jnp.asarray(n, jnp.int32)
  return (None if q is None else (nn + q) * inner, None if k is None else nn + k)


def plan_attention(closed, vtags: dict, *, single_block: bool = False) -> AttentionPlan | None:
  """The attentions of ``closed``'s top level (the trace at the bucket size, nested jit calls
  inlined) that the walk can compute with ``attention_valid_lengths``; ``vtags`` gives each
  variable's padded dims (``{dim: offset}``). Attentions that fit one kernel block are skipped
  unless ``single_block`` (exactness tests at small sizes). The walk sets ``plan.n`` (the traced
  true length) before evaluating the replacements."""
  jaxpr = closed.jaxpr
  du = DefUse(jaxpr)
  plan = AttentionPlan({}, set(), 0)
  used: set = set()

  def kernel(m, offsets):
    return lambda read: rk._attention_replacement(m, "xla", lengths=_lengths(offsets, plan.n))

  # Gradients: forward + backward together (the router's joint identification, at size P).
  found = rj.attention_forwards(closed, du, match_fn=rk._match_attention, no_match=rk._NoMatch,
                                replacement_fn=rk._attention_replacement, kernels="xla")
  known = known_consts(closed)
  consts = rj._consts_of(jaxpr)
  for jf in found:
    offsets = _seq_offsets(jf.match, vtags)
    if offsets is None or (_one_block(jf.match) and not single_block) or \
        (set(jf.eqns) | set(jf.pre)) & used:
      continue
    # A literal cotangent may depend on the length (the walk reads values, not literals).
    j = rj.identified_region(closed, du, jf, known, used,
                             accept=lambda cand: not isinstance(cand.do, core.Literal))
    if j is None:
      continue
    used |= j.fwd | set(j.bwd)
    fwd_fn, bwd_fn, first_out, skip = rj.joint_replacements(jaxpr, du, j, consts,
                                                            kernel(jf.match, offsets))
    plan.replace[jf.root] = fwd_fn
    plan.replace[first_out] = bwd_fn
    plan.skip |= skip
    plan.routed += 1
  # Forward programs: attentions whose intermediates nothing else reads.
  for m in rk.find_attention(closed):
    if set(m.eqns) & used or rk._has_residuals(jaxpr, du, m.d2, set(m.eqns)):
      continue
    offsets = _seq_offsets(m, vtags)
    if offsets is None or (_one_block(m) and not single_block):
      continue

    def fwd_only(read, m=m, make=kernel(m, offsets)):
      return [make(read)(read(m.q), read(m.k), read(m.v),
                         None if m.bias is None else read(m.bias),
                         None if m.mask is None else read(m.mask),
                         None if m.mask2 is None else read(m.mask2))]

    plan.replace[m.d2] = fwd_only
    plan.skip |= set(m.eqns) - {m.d2}
    used |= set(m.eqns)
    plan.routed += 1
  return plan if plan.routed else None
