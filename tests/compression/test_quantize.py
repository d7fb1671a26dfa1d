"""lj.quantize: accuracy vs float on an MLP and a conv net, packed bytes, frozen params, activation
calibration (real int8 x int8 -> int32 dots in the lowered program), report, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lepton_jax as lj


def _mlp(p, x):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def _mlp_params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w1": jax.random.normal(k[0], (64, 128)) / 8, "b1": jnp.full(128, 0.1),
          "w2": jax.random.normal(k[1], (128, 16)) / 11, "b2": jnp.zeros(16)}


def _conv(p, x):
  y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y).mean((1, 2)) @ p["w"]


def _conv_params():
  k = jax.random.split(jax.random.key(1), 2)
  return {"k": jax.random.normal(k[0], (3, 3, 8, 16)) / 8, "w": jax.random.normal(k[1], (16, 4)) / 4}


def _rel(ref, got):
  return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


X = jax.random.normal(jax.random.key(2), (32, 64))
XC = jax.random.normal(jax.random.key(3), (4, 8, 8, 8))


@pytest.mark.parametrize("kind,bound", [("int8", 2e-2), ("fp8", 6e-2), ("int4", 0.2)])
def test_mlp_weight_only_close_to_float_and_frozen_equals_on_the_fly(kind, bound):
  p = _mlp_params()
  ref = _mlp(p, X)
  q = lj.quantize(_mlp, weights=kind)
  on_the_fly = jax.jit(q)(p, X)
  frozen = lj.quantize.freeze(p, weights=kind)
  packed = jax.jit(q)(frozen, X)
  err = _rel(ref, packed)
  assert 0 < err < bound
  np.testing.assert_allclose(np.asarray(on_the_fly), np.asarray(packed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,bound", [("int8", 2e-2), ("fp8", 6e-2), ("int4", 0.15)])
def test_conv_net_close_to_float(kind, bound):
  p = _conv_params()
  err = _rel(_conv(p, XC), jax.jit(lj.quantize(_conv, weights=kind))(lj.quantize.freeze(p, weights=kind), XC))
  assert 0 < err < bound


def test_packed_bytes():
  p = _mlp_params()
  f8 = lj.quantize.freeze(p)
  w = f8["w1"]
  assert w.values.dtype == jnp.int8 and w.values.nbytes == p["w1"].nbytes // 4
  assert w.scale.shape == (1, 128) and w.nbytes == p["w1"].nbytes // 4 + 128 * 4
  assert f8["b1"] is p["b1"]  # 1-D leaves stay float
  f4 = lj.quantize.freeze(p, weights="int4", group_size=32)
  w4 = f4["w1"]
  assert w4.values.nbytes == p["w1"].nbytes // 8  # two int4 per byte
  assert w4.scale.shape == (2, 1, 128) and w4.nbytes == p["w1"].nbytes // 8 + 2 * 128 * 4
  big = jax.random.normal(jax.random.key(6), (256, 128))
  assert big.nbytes / lj.quantize.freeze(big, weights="int4").nbytes > 7.0  # default group_size=128
  np.testing.assert_array_equal(np.asarray(w4.int_values()), np.asarray(
      jnp.clip(jnp.round(p["w1"].reshape(2, 32, 128) / w4.scale), -7, 7).reshape(64, 128)))
  assert jnp.abs(w.dequantize() - p["w1"]).max() <= w.scale.max() / 2 + 1e-6


def test_int8_activations_use_integer_dots_and_stay_accurate():
  p = _mlp_params()
  calib = [(p, jax.random.normal(jax.random.key(i), (32, 64))) for i in range(3)]
  q = lj.quantize(_mlp, weights="int8", activations="int8", calibration=calib)
  err = _rel(_mlp(p, X), jax.jit(q)(lj.quantize.freeze(p), X))
  assert err < 3e-2
  text = jax.jit(q).lower(lj.quantize.freeze(p), X).as_text()
  assert "tensor<32x64xi8>, tensor<64x128xi8>) -> tensor<32x128xi32>" in text
  rep = q.explain()
  assert [w.compute for w in rep.weights] == [("int8-dot",), ("int8-dot",)]
  qc = lj.quantize(_conv, weights="int8", activations="int8", calibration=[(_conv_params(), XC)])
  assert _rel(_conv(_conv_params(), XC), jax.jit(qc)(_conv_params(), XC)) < 3e-2


def test_explain_lists_weights_bytes_and_errors():
  p = _mlp_params()
  rep = lj.quantize(_mlp, weights="int8").explain(p, X)
  assert [w.path for w in rep.weights] == ["['w1']", "['w2']"]
  assert rep.weights[0].bytes_before == 64 * 128 * 4 and rep.weights[0].bytes_after == 64 * 128 + 128 * 4
  assert all(0 < w.output_error < 2e-2 for w in rep.weights)
  assert rep.compression > 3.7 and 0 < rep.output_error < 2e-2
  d = rep.to_dict()
  assert d["weights"][1]["shape"] == [128, 16] and "['w1']" in str(rep)


def test_only_matmul_operands_are_quantized_on_the_fly():
  emb = jax.random.normal(jax.random.key(4), (10, 8))
  w = jax.random.normal(jax.random.key(5), (8, 8))

  def f(p, ids):
    return p["emb"][ids] @ p["w"]

  q = lj.quantize(f, weights="int8")
  rep = q.explain({"emb": emb, "w": w}, jnp.arange(4))
  assert [r.path for r in rep.weights] == ["['w']"]  # the gathered table stays float
  got = q({"emb": emb, "w": w}, jnp.arange(4))
  assert _rel(f({"emb": emb, "w": w}, jnp.arange(4)), got) < 2e-2


def test_bad_options():
  with pytest.raises(ValueError, match=r"weights='int2' is not supported; valid: 'int8', 'int4', 'fp8'"):
    lj.quantize(weights="int2")
  with pytest.raises(ValueError, match="activations='int8' needs calibration"):
    lj.quantize(_mlp, activations="int8")
  with pytest.raises(ValueError, match=r"activations='bf16' is not supported"):
    lj.quantize(activations="bf16")
  with pytest.raises(ValueError, match="group_size=0 must be an int >= 1"):
    lj.quantize.freeze({}, weights="int4", group_size=0)
  with pytest.raises(TypeError, match="argnums=1 but _mlp was called with 1 positional"):
    lj.quantize(_mlp, argnums=1)(_mlp_params())


def _fake_quant(w, kind="int8"):
  """What quantizing ``w`` alone gives, dequantized (the independent per-weight reference)."""
  return lj.quantize.freeze(w, weights=kind).dequantize()


def test_weights_reaching_dots_through_scan_xs_consts_and_cond():
  k = jax.random.split(jax.random.key(7), 3)
  p = {"ws": jax.random.normal(k[0], (3, 32, 32)) / 6,  # stacked layers: the scan's xs
       "w": jax.random.normal(k[1], (32, 32)) / 6}     # one weight closed over: a scan const

  def f(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["ws"])
    h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), h, None, length=2)
    return jax.lax.cond(h.sum() > 0, lambda a: a @ p["w"], lambda a: -(a @ p["w"]), h)

  x = jax.random.normal(k[2], (8, 32))
  q = lj.quantize(f, weights="int8")
  got = jax.jit(q)(p, x)
  # reference: every layer slice / the shared weight quantized on its own, then plain float JAX
  f_jit = jax.jit(f)
  ref_q = f_jit({"ws": jnp.stack([_fake_quant(w) for w in p["ws"]]), "w": _fake_quant(p["w"])}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref_q), rtol=2e-4, atol=2e-5)
  assert 0 < _rel(f_jit(p, x), got) < 3e-2
  rep = q.explain(p, x)
  assert {w.path: w.uses for w in rep.weights} == {"['ws']": 1, "['w']": 3}  # scan body, scan body + 2 branches
  frozen = lj.quantize.freeze(p)  # packed leaves enter the loop dequantized and are used as they are
  np.testing.assert_allclose(np.asarray(jax.jit(q)(frozen, x)),
                             np.asarray(f_jit(jax.tree.map(lambda a: a.dequantize(), frozen,
                                                           is_leaf=lambda a: hasattr(a, "dequantize")), x)),
                             rtol=2e-4, atol=2e-5)


def test_nnx_scan_over_stacked_layers():
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.lin(x))

  blocks = nnx.vmap(lambda key: Block(nnx.Rngs(key)))(jax.random.split(jax.random.key(8), 4))
  graphdef, state = nnx.split(blocks)
  params = nnx.to_pure_dict(state)

  def f(params, x):
    model = nnx.merge(graphdef, params)
    return nnx.scan(lambda h, blk: (blk(h), None), in_axes=(nnx.Carry, 0))(x, model)[0]

  x = jax.random.normal(jax.random.key(9), (4, 16))
  got = jax.jit(lj.quantize(f, weights="int8"))(params, x)
  kern = params["lin"]["kernel"]
  ref_params = jax.tree.map(lambda a: a, params)
  ref_params["lin"]["kernel"] = jnp.stack([_fake_quant(w) for w in kern])
  np.testing.assert_allclose(np.asarray(got), np.asarray(f(ref_params, x)), rtol=2e-4, atol=2e-5)
  assert 0 < _rel(f(params, x), got) < 2e-2


def test_int8_activations_inside_scan_and_while_bodies_match_a_jnp_reference():
  k = jax.random.split(jax.random.key(10), 4)
  p = {"ws": jax.random.normal(k[0], (3, 32, 32)) / 4, "w": jax.random.normal(k[1], (32, 32)) / 4}

  def f(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["ws"])                      # site 0
    _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, h))  # 1
    return h @ p["w"]                                                                          # site 2

  xs = [jax.random.normal(k[2 + i], (8, 32)) * (1 + i) for i in range(2)]
  q = lj.quantize(f, weights="int8", activations="int8", calibration=[(p, x) for x in xs])

  # reference in plain jnp: each site's scale is its input's absmax over examples and iterations / 127
  def walk(x, ws, w, act=None):
    amax, h = [0.0, 0.0, 0.0], x
    fq = (lambda v, i: v) if act is None else (lambda v, i: jnp.clip(jnp.round(v / act[i]), -127, 127) * act[i])
    for wl in ws:
      amax[0] = max(amax[0], float(jnp.abs(h).max()))
      h = jnp.tanh(fq(h, 0) @ wl)
    for _ in range(2):
      amax[1] = max(amax[1], float(jnp.abs(h).max()))
      h = jnp.tanh(fq(h, 1) @ w)
    amax[2] = float(jnp.abs(h).max())
    return fq(h, 2) @ w, amax

  scales = np.max([walk(x, p["ws"], p["w"])[1] for x in xs], axis=0) / 127
  ws_q, w_q = [_fake_quant(w) for w in p["ws"]], _fake_quant(p["w"])
  for x in xs:
    got = jax.jit(q)(p, x)
    want, _ = walk(x, ws_q, w_q, act=[jnp.float32(s) for s in scales])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert 0 < _rel(f(p, x), got) < 0.1  # int8 x int8 through 6 layers, scales set by the larger example
  text = jax.jit(q).lower(p, xs[0]).as_text()
  assert text.count("xi8>) -> tensor<8x32xi32>") == 3  # integer dots in the scan body, the while body, top level
  # frozen weights enter the bodies dequantized; activations are still quantized there
  frozen = lj.quantize.freeze(p)
  deq = jax.tree.map(lambda a: a.dequantize(), frozen, is_leaf=lambda a: hasattr(a, "dequantize"))
  want, _ = walk(xs[0], deq["ws"], deq["w"], act=[jnp.float32(s) for s in scales])
  np.testing.assert_allclose(np.asarray(jax.jit(q)(frozen, xs[0])), np.asarray(want), rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(want).max()))


def test_activation_site_in_a_branch_calibration_never_took_stays_float():
  w = jax.random.normal(jax.random.key(11), (16, 16)) / 4
  f = lambda p, x: jax.lax.cond(x.sum() > 0, lambda a: a @ p["w"], lambda a: -(a @ p["w"]), x)  # noqa: E731
  pos = jnp.abs(jax.random.normal(jax.random.key(12), (4, 16)))
  q = lj.quantize(f, weights="int8", activations="int8", calibration=[({"w": w}, pos)])
  wq = _fake_quant(w)
  s = float(jnp.abs(pos).max()) / 127
  np.testing.assert_allclose(np.asarray(jax.jit(q)({"w": w}, pos)),
                             np.asarray(jnp.clip(jnp.round(pos / s), -127, 127) * s @ wq), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(q)({"w": w}, -pos)), np.asarray(pos @ wq), rtol=1e-5, atol=1e-5)
