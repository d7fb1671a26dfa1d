"""Grouped-query attention routing in adaptive_jit.

``jax.nn.dot_product_attention`` with fewer k/v heads than q heads, the 5-D grouped einsum
spelling and ``jnp.repeat``-ed k/v feeding ordinary einsum attention are routed to
``pallas_kernels.flash_attention`` (the repeat form with the un-repeated k/v: the kernel's
own GQA); values and gradients equal jax.jit's; near misses (repeat along another axis,
tile order, heads that do not divide) are never turned into GQA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import pallas_kernels as lpk
from lepton_jax.transforms import adaptive_jit
from lepton_jax.transforms.passes._pipeline import normalize_passes, run_passes

R = np.random.default_rng(3)
B, T, S, H, KV, D = 2, 6, 5, 4, 2, 8
G = H // KV


def _n(*shape, dtype=jnp.float32):
  return jnp.asarray(R.normal(size=shape), jnp.float32).astype(dtype)


def _mask(*shape):
  m = R.random(shape) < 0.7
  m[..., 0] = True                        # every query attends something
  return jnp.asarray(m)


def _qkv(dtype=jnp.float32, t=T, s=S, kv=KV):
  return _n(B, t, H, D, dtype=dtype), _n(B, s, kv, D, dtype=dtype), _n(B, s, kv, D, dtype=dtype)


def _repeat_attn(q, k, v, *, causal=False, mask=None):
  """Hand-written GQA: k/v repeated along heads, then ordinary einsum attention."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  keep = jnp.tril(jnp.ones(s.shape[-2:], bool)) if causal else None
  if mask is not None:
    keep = mask if keep is None else keep & mask
  if keep is not None:
    s = jnp.where(keep, s, -1e9)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _grouped_5d(q, k, v):
  """Hand-written GQA: q split into [B, T, KV, G, D], grouped einsums."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
  o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v)
  return o.reshape(b, t, h, d)


BF = jnp.bfloat16
QB, KB, VB = _qkv(BF, t=S)
# (name, fn, args, kernel k/v heads when the repeat is absorbed (else None))
ROUTED = [
    ("dpa", lambda q, k, v: jax.nn.dot_product_attention(q, k, v), _qkv(), None),
    ("dpa_causal_mask", lambda q, k, v, m: jax.nn.dot_product_attention(
        q, k, v, mask=m, is_causal=True), (*_qkv(t=S), _mask(B, H, S, S)), None),
    ("dpa_bias_broadcast_scale", lambda q, k, v, b: jax.nn.dot_product_attention(
        q, k, v, bias=b, scale=0.3), (*_qkv(), _n(1, H, T, S)), None),
    ("dpa_mqa_shared_kv", lambda q, kv: jax.nn.dot_product_attention(q, kv, kv),
     _qkv(kv=1)[:2], None),
    ("dpa_bf16_causal_mask_bias", lambda q, k, v, b, m: jax.nn.dot_product_attention(
        q, k, v, bias=b, mask=m, is_causal=True, scale=0.25),
     (QB, KB, VB, _n(B, H, S, S, dtype=BF), _mask(1, 1, S, S)), None),
    ("repeat", _repeat_attn, _qkv(), KV),
    ("repeat_mqa_causal_mask", lambda q, k, v, m: _repeat_attn(q, k, v, causal=True, mask=m),
     (*_qkv(t=S, kv=1), _mask(B, H, S, S)), 1),
    ("repeat_bf16_causal", lambda q, k, v: _repeat_attn(q, k, v, causal=True), (QB, KB, VB), KV),
    ("grouped_5d", _grouped_5d, _qkv(), None),
    ("grouped_5d_bf16", _grouped_5d, (QB, KB, VB), None),
]


def _tol(args):
  return 4e-2 if any(a.dtype == BF for a in args) else 1e-4


def _close(a, b, tol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=tol, atol=tol), a, b)


def _float_argnums(args):
  return tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))


def _flash_kv_shapes(log):
  return [d.shapes[1] for d in log.records if d.kernel == "flash_attention"]


@pytest.mark.parametrize("name,fn,args,kv_heads", ROUTED, ids=[r[0] for r in ROUTED])
def test_gqa_routed_values_and_grads_equal_jit(name, fn, args, kv_heads):
  with lpk.record_dispatches() as log:
    rep = adaptive_jit(fn, kernels="xla").explain(*args)
  routes = [(r.pattern, r.count) for r in rep.rewrites if r.pass_name == "route_kernels"]
  if [p for p, _ in routes] == ["rejected_by_compiled_memory"] and any(a.dtype == BF for a in args):
    # XLA:CPU of jaxlib 0.11 compiles these tiny bf16 programs unrouted to fewer temp bytes, so the
    # compiled judge keeps them unrouted; the routing itself is checked without the judge.
    closed = jax.make_jaxpr(fn)(*args)
    routed, recs = run_passes(closed, normalize_passes("default"), kernels="xla")
    routes = [(r.pattern, r.count) for r in recs if r.pass_name == "route_kernels"]
    _close(jax.core.eval_jaxpr(routed.jaxpr, routed.consts, *args)[0], fn(*args), _tol(args))
  assert [p for p, _ in routes] == ["attention"] and routes[0][1] >= 10, str(rep)
  assert "attention" in str(rep)
  kv_shapes = _flash_kv_shapes(log)
  assert kv_shapes, "flash_attention was not called"
  if kv_heads is not None:      # un-repeated k/v reach the kernel: [batch, seq, kv_heads, d]
    k = args[1]
    assert kv_shapes[-1] == (k.shape[0], k.shape[1], kv_heads, k.shape[3]), kv_shapes
  ct = _n(*jax.eval_shape(fn, *args).shape)

  def loss(*a):
    y = fn(*a)
    return jnp.sum(y.astype(jnp.float32) * ct), y   # outputs as aux: checked elementwise

  vg = lambda f: jax.value_and_grad(f, argnums=_float_argnums(args), has_aux=True)
  # jax.grad outside adaptive_jit, compiled together with the plain-JAX reference.
  ours, want = jax.jit(lambda *a: (vg(adaptive_jit(loss, kernels="xla"))(*a), vg(loss)(*a)))(*args)
  _close(ours, want, _tol(args))


def test_gqa_under_vmap_inside_and_outside():
  q, k, v = _qkv(t=S)
  qs, ks, vs = (jnp.stack([x, 0.5 * x]) for x in (q, k, v))
  rep = lambda q, k, v: _repeat_attn(q, k, v, causal=True)
  dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  # adaptive_jit(vmap(f)): the vmapped batch joins the kernel's batch, heads stay grouped.
  with lpk.record_dispatches() as log:
    rpt = adaptive_jit(jax.vmap(rep), kernels="xla").explain(qs, ks, vs)
  assert [r.pattern for r in rpt.rewrites if r.pass_name == "route_kernels"] == ["attention"]
  assert _flash_kv_shapes(log)[-1] == (2 * B, S, KV, D)
  # vmap(value_and_grad(adaptive_jit(f))) outside; both against plain JAX in one compile.
  loss = lambda q, k, v: jnp.sum(jnp.sin(dpa(q, k, v)))
  grads = lambda f: jax.vmap(jax.value_and_grad(f, argnums=(0, 1, 2)))
  ours_in, ours_out, want_y, want_g = jax.jit(lambda *a: (
      adaptive_jit(jax.vmap(rep), kernels="xla")(*a), grads(adaptive_jit(loss, kernels="xla"))(*a),
      jax.vmap(rep)(*a), grads(loss)(*a)))(qs, ks, vs)
  _close(ours_in, want_y, 1e-4)
  _close(ours_out, want_g, 1e-4)


def _tile_by_broadcast(x, g):
  """jnp.tile along heads spelled like a repeat (new dim *before* heads): head h reads
  x[..., h % kv, :], not h // g."""
  b, s, kv, d = x.shape
  return jnp.broadcast_to(x[:, :, None], (b, s, g, kv, d)).reshape(b, s, g * kv, d)


def _einsum_attn(q, k, v):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


NEAR_MISSES = {
    # Repeat along the sequence axis: ordinary attention over the repeated keys.
    "repeat_seq_axis": (lambda q, k, v: _einsum_attn(
        q, jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1)), _qkv(kv=H)),
    "tile_heads": (lambda q, k, v: _einsum_attn(
        q, jnp.tile(k, (1, 1, G, 1)), jnp.tile(v, (1, 1, G, 1))), _qkv()),
    "tile_heads_by_broadcast": (lambda q, k, v: _einsum_attn(
        q, _tile_by_broadcast(k, G), _tile_by_broadcast(v, G)), _qkv()),
    "repeat_k_tile_v": (lambda q, k, v: _einsum_attn(
        q, jnp.repeat(k, G, axis=2), _tile_by_broadcast(v, G)), _qkv()),
    "repeat_k_only": (lambda q, k, v: _einsum_attn(q, jnp.repeat(k, G, axis=2), v),
                      (_qkv()[0], _qkv()[1], _qkv(kv=H)[2])),
    # 6 q heads, 4 k/v heads: 4 does not divide 6; repeat to 8 and keep 6.
    "heads_not_dividing": (lambda q, k, v: _einsum_attn(
        q, jnp.repeat(k, 2, axis=2)[:, :, :6], jnp.repeat(v, 2, axis=2)[:, :, :6]),
        (_n(B, T, 6, D), _n(B, S, 4, D), _n(B, S, 4, D))),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_misses_are_not_routed_as_gqa(name):
  fn, args = NEAR_MISSES[name]
  g = adaptive_jit(fn, kernels="xla")
  with lpk.record_dispatches() as log:
    g.explain(*args)
  # Whatever is routed reads the materialised (repeated / tiled / sliced) k and v: the
  # kernel never gets grouped k/v heads.
  for shape in _flash_kv_shapes(log):
    assert shape[2] == 1, (name, shape)
  _close(*jax.jit(lambda *a: (g(*a), fn(*a)))(*args), 1e-5)


def test_failed_check_of_repeat_route_falls_back_with_warning(wrong_attention_kernel):
  q, k, v = _qkv()
  g = adaptive_jit(_repeat_attn, kernels="xla")
  with pytest.warns(RuntimeWarning, match="numeric spot check failed"):
    out = g(q, k, v)
  _close(out, jax.jit(_repeat_attn)(q, k, v), 1e-5)
