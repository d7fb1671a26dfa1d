"""Benchmark: ``lj.adaptive_jit`` vs ``jax.jit`` on the same functions, judged on the compiled program.

Two groups of rows:

* ``work``: programs with dead, duplicate, loop-invariant or loop-linear work. Each says whether
  XLA already removes it (then adaptive_jit's passes cannot gain: ratio 1.00) or not (then a pass
  of ours must: ``accumulate`` for linear accumulator work in ``scan`` loops, ``cse`` for outer
  values recomputed inside ``cond`` branches).
* ``model``: forward and ``value_and_grad`` of small Flax NNX models written here (an
  ``nnx.MultiHeadAttention`` pre-norm block, an lm1b-like decoder with shared input/output
  embeddings and a sinusoidal position table, a weight-shared looped block with LoRA adapters).

For every row: XLA's compiled temp bytes and FLOPs (``memory_analysis`` / ``cost_analysis``) of
both programs, then wall time as medians of interleaved runs (ours, jax.jit, ours, ...). Note that
XLA's ``cost_analysis()`` counts a rolled ``while``/``scan`` body once, whatever the trip count:
loop rows also give the FLOPs of the same program with its scans unrolled (``flops_unrolled``),
where XLA counts every iteration. The deterministic measures are computed before any timing.

Run ``python -m benchmarks.adaptive_jit --small`` (CPU, about 2 minutes); writes
``benchmarks/results/adaptive_jit_<device-kind>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lepton_jax.jaxpr._compiled import figures_of, read_compiled  # noqa: E402
from lepton_jax.transforms import adaptive_jit  # noqa: E402
from lepton_jax.transforms.passes._pipeline import normalize_passes, pass_gains  # noqa: E402

# ---------------------------------------------------------------- work-removal programs


def _work_cases(small: bool):
  d = 128 if small else 512
  t = 32 if small else 128
  r = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(r.normal(size=s) / np.sqrt(s[-1]), jnp.float32)
  w, xs, x = n(d, d), n(t, 8, d), n(256, d)

  def dead_code(w, x):
    _ = jnp.exp(x @ w) @ w.T
    return jnp.tanh(x @ w).sum()

  def duplicates(w, x):
    return (jnp.tanh(x @ w) * jnp.tanh(x @ w)).sum()

  def dead_scan_carry_and_ys(w, xs):
    def body(c, xi):
      a, dead = c
      return (a + jnp.tanh(xi @ w).sum(), jnp.tanh(dead @ w)), jnp.sin(xi @ w.T)
    return lax.scan(body, (0.0, jnp.ones((8, d))), xs)[0][0]

  def invariant_in_scan(w, xs, unroll=1):
    def body(c, xi):
      noise = jax.random.normal(jax.random.key(1), (d, d)) * 0.01   # same key every step
      pos = jnp.sin(jnp.arange(8)[:, None] * jnp.exp(-jnp.arange(d) / d))
      return c + jnp.tanh(xi @ (jnp.tanh(w) @ w + noise) + pos).sum(), None
    return lax.scan(body, 0.0, xs, unroll=unroll)[0]

  def param_transform_in_scan(w, xs, unroll=1):
    """A recurrence whose weight is a transform of the parameter (here tanh(w) @ w)."""
    def body(h, xi):
      return jnp.tanh(xi + h @ (jnp.tanh(w) @ w)), None
    return (lax.scan(body, jnp.zeros((8, d)), xs, unroll=unroll)[0] ** 2).sum()

  def branch_recomputes_outer(w, x, p):
    h = jnp.tanh(x @ w)
    return (h + lax.cond(p, lambda: jnp.tanh(x @ w) @ w, lambda: h)).sum()

  vg = lambda f, **kw: jax.value_and_grad(lambda *a: f(*a, **kw))
  return [
      # name, fun, args, XLA removes it itself?, unrolled twin (for loop FLOPs) or None
      ("dead_code", dead_code, (w, x), True, None),
      ("duplicate_work", duplicates, (w, x), True, None),
      ("dead_scan_carry_and_ys", dead_scan_carry_and_ys, (w, xs), True, None),
      ("invariant_rng_table_dot_in_scan", invariant_in_scan, (w, xs), True, None),
      # Under value_and_grad the forward's invariant work is hoisted (by JAX and XLA), but the
      # backward applies the invariant transform's transpose in every iteration: XLA keeps it.
      ("grad_invariant_in_scan", vg(invariant_in_scan), (w, xs), False,
       vg(invariant_in_scan, unroll=True)),
      ("grad_param_transform_in_scan", vg(param_transform_in_scan), (w, xs), False,
       vg(param_transform_in_scan, unroll=True)),
      ("cond_branch_recomputes_outer", branch_recomputes_outer, (w, x, True), False, None),
  ]


# ---------------------------------------------------------------- Flax NNX model fixtures


def _models(small: bool):
  from flax import nnx
  seq = 128 if small else 1024
  d, heads, vocab, layers, batch = 64, 4, 256, 2, 2

  class PreNormBlock(nnx.Module):
    """LayerNorm -> nnx.MultiHeadAttention (causal) -> residual -> LayerNorm -> MLP -> residual."""

    def __init__(self, d, heads, rngs):
      self.norm_a = nnx.LayerNorm(d, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                         rngs=rngs)
      self.norm_m = nnx.LayerNorm(d, rngs=rngs)
      self.fc_in = nnx.Linear(d, 4 * d, rngs=rngs)
      self.fc_out = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, mask):
      x = x + self.attn(self.norm_a(x), mask=mask)
      return x + self.fc_out(jax.nn.gelu(self.fc_in(self.norm_m(x))))

  def sinusoid(length, dim):
    pos = np.arange(length)[:, None]
    freq = np.exp(-np.log(10000.0) * np.arange(dim // 2) / (dim // 2 - 1))
    return jnp.asarray(np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], -1), jnp.float32)

  class TinyDecoder(nnx.Module):
    """lm1b-style: token embedding + fixed sinusoidal positions, pre-norm blocks, final norm,
    logits through the (shared) embedding, one-hot cross-entropy."""

    def __init__(self, rngs):
      self.embed = nnx.Embed(vocab, d, rngs=rngs)
      self.blocks = nnx.List([PreNormBlock(d, heads, rngs) for _ in range(layers)])
      self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + sinusoid(tokens.shape[1], d)[None]
      mask = nnx.make_causal_mask(tokens)
      for blk in self.blocks:
        x = blk(x, mask)
      return self.embed.attend(self.norm(x))

  class LoopedLoRA(nnx.Module):
    """One weight-shared block applied `steps` times (a looped / recurrent-depth model), with a
    LoRA adapter on its weight: the effective weight w + a @ b is formed inside the loop."""

    def __init__(self, rngs, steps=8, rank=8):
      init = nnx.initializers.normal(0.05)
      self.w = nnx.Param(init(rngs.params(), (d, d)))
      self.a = nnx.Param(init(rngs.params(), (d, rank)))
      self.b = nnx.Param(init(rngs.params(), (rank, d)))
      self.norm = nnx.LayerNorm(d, rngs=rngs)
      self.steps = steps

    def __call__(self, x):
      def step(h, _):
        return h + jnp.tanh(self.norm(h) @ (self.w[...] + self.a[...] @ self.b[...])), None
      return lax.scan(step, x, None, length=self.steps)[0]

  rngs = nnx.Rngs(0)
  r = np.random.default_rng(1)
  tokens = jnp.asarray(r.integers(0, vocab, (batch, seq)), jnp.int32)
  x = jnp.asarray(r.normal(size=(batch, seq, d)), jnp.float32)

  def mha_setup():
    blk = PreNormBlock(d, heads, rngs)
    gdef, state = nnx.split(blk)
    mask = nnx.make_causal_mask(tokens)
    fwd = lambda s, x: nnx.merge(gdef, s)(x, mask)
    loss = lambda s, x: (fwd(s, x) ** 2).mean()
    return fwd, loss, (state, x)

  def decoder_setup():
    gdef, state = nnx.split(TinyDecoder(rngs))
    fwd = lambda s, tok: nnx.merge(gdef, s)(tok)

    def loss(s, tok):
      logits = fwd(s, tok[:, :-1])
      onehot = jax.nn.one_hot(tok[:, 1:], vocab)
      return -(onehot * jax.nn.log_softmax(logits)).sum(-1).mean()
    return fwd, loss, (state, tokens)

  def lora_setup():
    gdef, state = nnx.split(LoopedLoRA(rngs))
    fwd = lambda s, x: nnx.merge(gdef, s)(x)
    loss = lambda s, x: (fwd(s, x) ** 2).mean()
    return fwd, loss, (state, x)

  out = []
  for name, setup in (("nnx_mha_block", mha_setup), ("lm1b_like_decoder", decoder_setup),
                      ("looped_lora_block", lora_setup)):
    fwd, loss, args = setup()
    out.append((f"{name}_seq{seq}_fwd", fwd, args))
    out.append((f"{name}_seq{seq}_value_and_grad", jax.value_and_grad(loss), args))
  return out


# ---------------------------------------------------------------- measuring


def _interleaved(fns, args, reps):
  for f in fns:
    jax.block_until_ready(f(*args))
  times = [[] for _ in fns]
  for _ in range(reps):
    for k, f in enumerate(fns):
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]


def _max_rel_err(a, b) -> float:
  err = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err = max(err, float(np.max(np.abs(x - y)) / max(1e-6, float(np.max(np.abs(y))))))
  return err


def _ratio(a, b) -> float:
  return float(a) / float(b) if b else 1.0


def _measure(name, group, fun, args, *, xla_removes=None, unrolled=None):
  """Deterministic figures of one program (no timing)."""
  ours = adaptive_jit(fun)
  base_fig = figures_of(fun, *args)
  ours_fig = read_compiled(ours.lower(*args).compile())
  rep = ours.explain(*args)
  by_pass: dict = {}
  for r in rep.rewrites:
    by_pass[r.pass_name] = by_pass.get(r.pass_name, 0) + max(1, r.count)
  row = {
      "program": name, "group": group,
      "temp_bytes": ours_fig.temp_bytes, "temp_bytes_jax_jit": base_fig.temp_bytes,
      "temp_ratio": _ratio(ours_fig.temp_bytes, base_fig.temp_bytes),
      "flops": ours_fig.flops, "flops_jax_jit": base_fig.flops,
      "flops_ratio": _ratio(ours_fig.flops, base_fig.flops),
      "rewrites_by_pass": by_pass,
      "max_rel_err": _max_rel_err(ours(*args), jax.jit(fun)(*args)),
  }
  if xla_removes is not None:
    row["xla_removes_it_itself"] = xla_removes
  if group == "work":
    # What each default pass gained in the compiled program (routing off: these rows have no
    # hotspots). Loop rows use the unrolled twin, where XLA counts every iteration.
    prog = unrolled if unrolled is not None else fun
    gains = pass_gains(jax.make_jaxpr(prog)(*args), normalize_passes("default"), kernels=None)
    row["per_pass_compiled"] = [{"pass": n, "rewrites": k, "temp_bytes": f.temp_bytes,
                                 "flops": f.flops} for n, k, f in gains]
  if unrolled is not None:
    u_base = figures_of(unrolled, *args)
    u_ours = read_compiled(adaptive_jit(unrolled).lower(*args).compile())
    row.update(flops_unrolled=u_ours.flops, flops_unrolled_jax_jit=u_base.flops,
               flops_unrolled_ratio=_ratio(u_ours.flops, u_base.flops))
  return row, ours


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="small sizes and few repeats (CPU)")
  ap.add_argument("--reps", type=int, default=None, help="interleaved timing repeats")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  reps = args.reps or (21 if args.small else 20)
  dev = jax.devices()[0]
  jobs = [(n, "work", f, a, dict(xla_removes=x, unrolled=u))
          for n, f, a, x, u in _work_cases(args.small)]
  jobs += [(n, "model", f, a, {}) for n, f, a in _models(args.small)]
  rows, fns = [], []
  for name, group, fun, a, kw in jobs:          # deterministic measures first
    row, ours = _measure(name, group, fun, a, **kw)
    rows.append(row)
    fns.append((ours, jax.jit(fun), a))
  for row, (ours, base, a) in zip(rows, fns):   # then time, interleaved
    t_ours, t_base = _interleaved([ours, base], a, reps)
    row.update(time_s=t_ours, time_s_jax_jit=t_base, time_ratio=_ratio(t_ours, t_base))
  hdr = (f"{'program':<44}{'temp x':>8}{'flops x':>9}{'unrolled':>9}{'time x':>8}"
         f"{'XLA does':>9}  rewrites")
  print(hdr)
  print("-" * (len(hdr) + 20))
  for r in rows:
    un = f"{r['flops_unrolled_ratio']:>9.2f}" if "flops_unrolled_ratio" in r else f"{'':>9}"
    xd = {True: "yes", False: "no", None: ""}[r.get("xla_removes_it_itself")]
    rw = ", ".join(f"{k}:{v}" for k, v in sorted(r["rewrites_by_pass"].items()))
    print(f"{r['program']:<44}{r['temp_ratio']:>8.2f}{r['flops_ratio']:>9.2f}{un}"
          f"{r['time_ratio']:>8.2f}{xd:>9}  {rw}")
  kind = dev.device_kind.lower().replace(" ", "_")
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"adaptive_jit_{kind}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"benchmark": "adaptive_jit", "device": str(dev), "device_kind": dev.device_kind,
               "platform": dev.platform, "jax_version": jax.__version__,
               "date": datetime.datetime.now().isoformat(), "small": args.small,
               "timing": f"median of {reps} interleaved runs (ours, jax.jit, ...)",
               "baseline": "jax.jit of the same function, same run",
               "note": ("ratios are adaptive_jit / jax.jit; temp/FLOPs from XLA's memory_analysis / "
                        "cost_analysis of the compiled programs; cost_analysis counts a rolled loop "
                        "body once, so loop rows add flops_unrolled (same program, scans unrolled); "
                        "per_pass_compiled: compiled figures after each default pass (work rows)"),
               "rows": rows}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
