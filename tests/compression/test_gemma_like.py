"""Both transforms on a tiny Gemma-shaped attention block: einsum kernels with several axes
(``q: (N, D, H)``, ``kv: (2, K, D, H)``, ``out: (N, H, D)``), grouped-query attention
(``einsum('BTKGH,BSKH->BTKGS')``), RMSNorm, rotary positions and a tied embedding table (gathered on
the way in, contracted over its last axis on the way out)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import lepton_jax as lj

V, D, N, K, H, B, T = 32, 16, 4, 2, 8, 2, 6


def _params():
  r = np.random.default_rng(20)  # numpy: no per-shape compiles of the random kernels
  f = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)  # noqa: E731
  return {"embed": f(V, D) / 4, "q": f(N, D, H) / 4, "kv": f(2, K, D, H) / 4, "out": f(N, H, D) / 3,
          "norm": jnp.full((D,), 0.1)}


def _rope(x, pos):
  freq = 1.0 / 10_000 ** (jnp.arange(H // 2) * 2 / H)
  ang = pos[:, None, None] * freq
  a, b = x[..., : H // 2], x[..., H // 2:]
  return jnp.concatenate([a * jnp.cos(ang) - b * jnp.sin(ang), b * jnp.cos(ang) + a * jnp.sin(ang)], -1)


def _model(p, tokens, table_out=None):
  """Logits; ``table_out`` (default: ``p["embed"]``) is the table of the tied output projection."""
  x = p["embed"][tokens] * D ** 0.5
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + p["norm"])
  pos = jnp.arange(T, dtype=jnp.float32)
  q = _rope(jnp.einsum("BTD,NDH->BTNH", h, p["q"]), pos) / H ** 0.5
  k, v = jnp.einsum("BTD,CKDH->CBTKH", h, p["kv"])
  logits = jnp.einsum("BTKGH,BSKH->BTKGS", q.reshape(B, T, K, N // K, H), _rope(k, pos))
  logits = jnp.where(jnp.tril(jnp.ones((T, T), bool))[:, None, None, :], logits, -1e30)
  att = jnp.einsum("BTKGS,BSKH->BTKGH", jax.nn.softmax(logits, -1), v).reshape(B, T, N, H)
  x = x + jnp.einsum("BTNH,NHD->BTD", att, p["out"])
  return jnp.einsum("BTD,VD->BTV", x, p["embed"] if table_out is None else table_out)


TOKENS = jnp.asarray(np.random.default_rng(21).integers(0, V, (B, T)), jnp.int32)


def _rel(ref, got):
  return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def test_quantize_einsum_kernels_and_tied_embedding():
  p = _params()
  q = lj.quantize(_model, weights="int8")
  rep = q.explain(p, TOKENS)
  compute = {w.path: w.compute for w in rep.weights}
  # kernels whose last axis is a free output axis: int8 values times per-channel scales on the result;
  # the tied table is contracted over its last (scale) axis: dequantized, float matmul
  assert compute == {"['q']": ("scaled-dot",), "['kv']": ("scaled-dot",), "['out']": ("scaled-dot",),
                     "['embed']": ("dequantize",)}
  shapes = {k: v.shape for k, v in p.items() if v.ndim >= 2}
  # int8 values plus one float32 scale per last-axis channel (q: per head_dim channel, shared by heads)
  assert rep.bytes_after == sum(np.prod(s) + 4 * s[-1] for s in shapes.values())
  assert rep.bytes_before == 4 * sum(np.prod(s) for s in shapes.values())
  fq = lambda w: lj.quantize.freeze(w).dequantize()  # noqa: E731  (each weight quantized on its own)
  # plain JAX reference: the gather sees the float table, every matmul a quantized weight
  model = jax.jit(_model)
  reference = model({**p, "q": fq(p["q"]), "kv": fq(p["kv"]), "out": fq(p["out"])}, TOKENS, fq(p["embed"]))
  got = jax.jit(q)(p, TOKENS)
  np.testing.assert_allclose(np.asarray(got), np.asarray(reference), rtol=1e-4, atol=1e-4)
  assert 0 < _rel(model(p, TOKENS), got) < 2e-2
  frozen = lj.quantize.freeze(p, weights="int4", group_size=8)  # groups of 8 along axis -2
  assert sorted(k for k, v in frozen.items() if isinstance(v, lj.quantize.QuantizedArray)) == sorted(shapes)
  assert frozen["out"].scale.shape == (N, 1, 1, D) and frozen["kv"].scale.shape == (2, K, 2, 1, H)
  assert 0 < _rel(model(p, TOKENS), jax.jit(q)(frozen, TOKENS)) < 0.15


def test_mixed_precision_converts_every_einsum_and_keeps_float32_elsewhere():
  p = _params()
  loss = lambda p, t: jnp.mean(jax.nn.log_softmax(_model(p, t)) ** 2)  # noqa: E731
  mp = lj.mixed_precision(loss)
  rep = mp.explain(p, TOKENS)
  assert rep.converted == len(rep.ops) == 6  # q, kv, GQA logits, GQA mix, out, tied logits
  v, g = jax.jit(jax.value_and_grad(mp))(p, TOKENS)
  v32, g32 = jax.jit(jax.value_and_grad(loss))(p, TOKENS)
  assert v.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
  assert abs(float(v) - float(v32)) < 2e-2 * abs(float(v32))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g32)):
    assert _rel(b, a) < 5e-2
  text = jax.jit(mp).lower(p, TOKENS).as_text()
  dots = [ln for ln in text.splitlines() if "dot_general" in ln]
  assert len(dots) == 6 and all(re.search(r"xbf16>, tensor<[0-9x]+xbf16>\) -> tensor<[0-9x]+xf32>", ln) for ln in dots)
  assert re.search(r"rsqrt .*: tensor<[0-9x]+xf32>", text)  # the RMSNorm stays float32
