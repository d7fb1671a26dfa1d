"""Tests for lj.offload (lepton_jax.offload)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lepton_jax import offload


def test_to_host_to_device_roundtrip_keeps_sharding():
  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  a = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("x")))
  tree = {"a": a, "b": jnp.ones(3, jnp.bfloat16)}
  h = offload.to_host(tree)
  assert offload.memory_kinds(h) == {"a": "pinned_host", "b": "pinned_host"}
  assert h["a"].sharding.spec == a.sharding.spec and h["a"].sharding.mesh == a.sharding.mesh
  assert offload.device_bytes(h) == 0
  d = offload.to_device(h)
  assert offload.memory_kinds(d) == {"a": "device", "b": "device"}
  assert d["a"].sharding.spec == a.sharding.spec
  np.testing.assert_array_equal(d["a"], a)
  np.testing.assert_array_equal(d["b"], tree["b"])


def test_to_host_rejects_non_arrays():
  with pytest.raises(TypeError, match=r"\['k'\]"):
    offload.to_host({"k": "text"})


def _adam_step(tx):
  def step(params, state, batch):
    grads = jax.grad(lambda p: jnp.mean((batch @ p["w"] + p["b"]) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_offload_optimizer_adam_equals_plain(dtype):
  params = {"w": jnp.ones((16, 8), dtype) * 0.1, "b": jnp.zeros(8, dtype)}
  batch = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)), dtype)
  plain, off = optax.adam(1e-2), offload.offload_optimizer(optax.adam(1e-2))
  s0, s1 = plain.init(params), off.init(params)
  assert set(jax.tree.leaves(offload.memory_kinds(s1))) == {"pinned_host"}
  p0 = p1 = params
  step0, step1 = _adam_step(plain), _adam_step(off)
  for _ in range(3):
    p0, s0 = step0(p0, s0, batch)
    p1, s1 = step1(p1, s1, batch)
  for a, b in zip(jax.tree.leaves((p0, s0)), jax.tree.leaves((p1, s1))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert set(jax.tree.leaves(offload.memory_kinds(s1))) == {"pinned_host"}
  assert set(jax.tree.leaves(offload.memory_kinds(p1))) == {"device"}


def test_offload_optimizer_device_argument_bytes_drop():
  params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
  batch = jnp.ones((4, 64))
  plain, off = optax.adam(1e-3), offload.offload_optimizer(optax.adam(1e-3))
  s0, s1 = plain.init(params), off.init(params)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(s0))

  def device_arg_bytes(tx, state):
    compiled = _adam_step(tx).lower(params, state, batch).compile()
    shardings = jax.tree.leaves(compiled.input_shardings[0])
    leaves = jax.tree.leaves((params, state, batch))
    return sum(x.nbytes for x, s in zip(leaves, shardings) if s.memory_kind != "pinned_host")

  drop = device_arg_bytes(plain, s0) - device_arg_bytes(off, s1)
  assert drop == state_bytes
  assert offload.device_bytes(s1) == 0 and offload.device_bytes(s0) == state_bytes
  # the program for an accelerator keeps the state arguments in pinned_host
  text = jax.export.export(_adam_step(off), platforms=["cuda"])(params, s1, batch).mlir_module()
  assert text.count('mhlo.memory_kind = "pinned_host"') >= len(jax.tree.leaves(s1))


def test_offload_optimizer_with_nnx_optimizer():
  from flax import nnx
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  ref = nnx.clone(model)
  opt = nnx.Optimizer(model, offload.offload_optimizer(optax.adam(1e-2)), wrt=nnx.Param)
  opt_ref = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)
  x = jnp.ones((2, 4))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)

  for _ in range(2):
    step(model, opt)
    step(ref, opt_ref)
  np.testing.assert_allclose(model.kernel[...], ref.kernel[...], rtol=1e-6)
