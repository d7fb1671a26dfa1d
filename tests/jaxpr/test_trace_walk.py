"""trace() validation, aval_bytes, sub_jaxprs and walk ids."""

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import jaxpr as ljx


def test_trace_pytrees_and_kwargs():
  def f(p, x, *, scale):
    return {"y": p["w"] @ x * scale, "n": x.sum()}
  p = {"w": jnp.ones((3, 4))}
  t = ljx.trace(f, p, jnp.ones(4), scale=2.0)
  assert [a.shape for a in t.in_avals] == [(3, 4), (4,), ()]
  assert jax.tree.structure({"y": 0, "n": 0}) == t.out_tree
  out = jax.extend.core.jaxpr_as_fun(t.closed_jaxpr)(*t.flatten_args(p, jnp.ones(4), scale=2.0))
  np.testing.assert_allclose(jax.tree.unflatten(t.out_tree, out)["y"], f(p, jnp.ones(4), scale=2.0)["y"])
  # ShapeDtypeStruct and numpy inputs trace abstractly.
  t2 = ljx.trace(f, {"w": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)}, np.ones(4, np.float32), scale=1)
  assert t2.in_avals[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("bad, where", [
    (("a", jnp.ones(2)), "args[0]"),
    ((jnp.ones(2), {"w": object()}), "args[1]['w']"),
    ((jnp.ones(2), [jnp.ones(1), print]), "args[1][1]"),
])
def test_trace_rejects_non_arrays_naming_the_path(bad, where):
  with pytest.raises(TypeError, match=r"argument " + __import__("re").escape(where)) as e:
    ljx.trace(lambda *a: a[0], *bad)
  assert "not an array" in str(e.value) and "functools.partial" in str(e.value)


def test_trace_rejects_kwargs_and_outputs_and_callables():
  with pytest.raises(TypeError, match=r"kwargs\['mode'\]"):
    ljx.trace(lambda x, mode: x, jnp.ones(2), mode="train")
  with pytest.raises(TypeError, match=r"output\[1\]"):
    ljx.trace(lambda x: (x, "s"), jnp.ones(2))
  with pytest.raises(TypeError, match="callable"):
    ljx.trace(3, jnp.ones(2))


def test_trace_rejects_leaked_tracer_but_accepts_live_ones():
  leaked = []

  @jax.jit
  def g(x):
    leaked.append(x)
    return x
  g(jnp.ones(3))
  with pytest.raises(ValueError, match=r"argument args\[0\]\['x'\] is a leaked tracer"):
    ljx.trace(lambda d: d["x"] * 2, {"x": leaked[0]})

  @jax.jit
  def inside(x):  # tracers of the current trace are fine
    return ljx.cost(jnp.sin, x).transcendentals
  assert int(inside(jnp.ones(5))) == 5


def test_aval_bytes():
  assert ljx.aval_bytes(jnp.ones((4, 8))) == 128
  assert ljx.aval_bytes(jax.ShapeDtypeStruct((3,), jnp.bfloat16)) == 6
  assert ljx.aval_bytes(jnp.ones((2,), jnp.int8)) == 2
  assert ljx.aval_bytes(jax.random.key(0)) == 8
  j = jax.make_jaxpr(lambda x: x * 2)(jnp.ones((5,), jnp.float32))
  assert ljx.aval_bytes(j.jaxpr.invars[0]) == 20
  assert ljx.aval_bytes(j.jaxpr.eqns[0].invars[1]) == 4  # literal
  with pytest.raises(TypeError, match="aval_bytes"):
    ljx.aval_bytes("x")


def _nested(x, n):
  y = jax.jit(jnp.sin)(x)
  y = jax.checkpoint(lambda z: jnp.tanh(z) * 2)(y)
  y = jax.nn.relu(y)
  c, ys = jax.lax.scan(lambda c, v: (c + v, c * v), 0., y)
  z = jax.lax.cond(c > 0, jnp.exp, jnp.log, y)
  w = jax.lax.fori_loop(0, n, lambda i, a: a * 2, z)
  return w.sum() + ys.sum()


def test_sub_jaxprs_and_walk_ids():
  j = jax.make_jaxpr(_nested)(jnp.ones(4), 3)
  prims = [e.primitive.name for e in j.eqns]
  subs = {p: [(s.name, s.trip_count, s.exclusive) for s in ljx.sub_jaxprs(e)] for p, e in zip(prims, j.eqns)}
  assert subs["jit"] == [("jaxpr", 1, False)]
  assert subs["remat2"] == [("jaxpr", 1, False)]
  assert subs["custom_jvp_call"] == [("call_jaxpr", 1, False)]
  assert subs["scan"] == [("jaxpr", 4, False)]
  assert subs["cond"] == [("branch0", 1, True), ("branch1", 1, True)]
  assert subs["while"] == [("cond_jaxpr", None, False), ("body_jaxpr", None, False)]
  refs = list(ljx.walk(j))
  ids = [r.id for r in refs]
  assert len(ids) == len(set(ids))
  assert ids[:2] == ["0", "0/jaxpr/0"]
  by_id = {r.id: r for r in refs}
  scan_i = prims.index("scan")
  inner = [r for r in refs if r.id.startswith(f"{scan_i}/jaxpr/")]
  assert inner and all(r.multiplier == 4 and r.depth == 1 for r in inner)
  cond_i = prims.index("cond")
  assert by_id[f"{cond_i}/branch1/0"].eqn.primitive.name == "exp"
  # ids are stable: walking again (or re-tracing) gives the same ids for the same program.
  assert [r.id for r in ljx.walk(jax.make_jaxpr(_nested)(jnp.ones(4), 3))] == ids
  assert [r.id for r in ljx.walk(j, into_subjaxprs=False)] == [str(i) for i in range(len(j.eqns))]


def test_shard_map_and_custom_vjp_sub_jaxprs():
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((len(jax.devices()),), ("i",))
  n = len(jax.devices())
  x = jax.device_put(jnp.ones((n * 2, 4)), jax.NamedSharding(mesh, P("i")))
  sm = jax.shard_map(lambda v: jnp.exp(v), mesh=mesh, in_specs=P("i"), out_specs=P("i"))
  j = jax.make_jaxpr(sm)(x)
  (s,) = ljx.sub_jaxprs(j.eqns[0])
  assert s.trip_count == n
  assert ljx.jaxpr_cost(j).transcendentals == n * 2 * 4

  @jax.custom_vjp
  def g(v):
    return jnp.sin(v)
  g.defvjp(lambda v: (jnp.sin(v), v), lambda v, ct: (ct * jnp.cos(v),))
  j = jax.make_jaxpr(g)(jnp.ones(3))
  assert [r.eqn.primitive.name for r in ljx.walk(j)] == ["custom_vjp_call", "sin"]
