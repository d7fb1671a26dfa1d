"""Benchmark: ``adaptive_jit(buckets=...)`` on token models over random lengths vs ``jax.jit``.

Two models (``tests/transforms/_lm_fixtures.py``): a plain-JAX decoder LM (embedding, causal
attention, MLP, tied output, mean next-token loss) and a linen lm1b-style decoder whose loss uses
lm1b's weighted cross-entropy, plus an encoder with a ``[B,1,1,S]`` padding mask (the lm1b-style
model's ``tokens > 0`` mask). Each is run forward and as ``jax.value_and_grad`` over the same
random lengths (default 40 in 16..512, batch 2). Reported: compiles (deterministic), pow2
buckets touched, max relative error against ``jax.jit`` at the true length (logits / loss /
gradients), and the total wall time of all calls (compiles included) of each, run one after the
other on the same inputs; the ratio is ours / jax.jit's.

Run ``python -m benchmarks.buckets [--lengths 40] [--kernels auto]``. Writes
``benchmarks/results/buckets_<device-kind>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lepton_jax as lj  # noqa: E402
from lepton_jax.jaxpr._compiled import read_compiled  # noqa: E402
from tests.transforms import _lm_fixtures as F  # noqa: E402


def _models():
  dec = F.decoder_params(jax.random.key(0))
  lm1b = F.Lm1bLike(layers=2, max_len=1024)
  lm1b_params = lm1b.init(jax.random.key(1), jnp.ones((1, 8), jnp.int32))
  lm1b_loss = lambda p, tok: F.weighted_xent(lm1b.apply(p, tok), tok)
  return {
      "decoder_lm": (dec, F.decoder_logits, F.decoder_loss),
      "lm1b_like_padding_mask": (lm1b_params, lm1b.apply, lm1b_loss),
  }


def _gemma_like():
  """Flax-examples/gemma-shaped tiny LM (grouped-query attention in Gemma's einsum spelling)."""
  from flax import nnx
  from benchmarks._gemma_like import GemmaLike, GemmaLikeConfig
  cfg = GemmaLikeConfig(vocab=F.VOCAB, d=32, heads=4, kv_heads=2, head_dim=8, hidden=64, layers=2)
  graphdef, state = nnx.split(GemmaLike(cfg, nnx.Rngs(0)))
  logits = lambda st, tok: nnx.merge(graphdef, st)(tok)

  def loss(st, tok):
    lg = logits(st, tok)[:, :-1]
    return -jnp.take_along_axis(jax.nn.log_softmax(lg), tok[:, 1:, None], -1).mean()

  return state, logits, loss


def _rel(a, b):
  errs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                / max(1e-12, float(np.max(np.abs(np.asarray(y, np.float64))))))
          for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return max(errs)


def run(n_lengths: int, kernels, seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = [int(x) for x in rng.integers(16, 513, n_lengths)]
  rows = []
  for name, (params, fwd, loss) in _models().items():
    for form, fn in (("forward", fwd), ("value_and_grad", jax.value_and_grad(loss))):
      batches = []
      for n in lengths:
        tok = rng.integers(1, F.VOCAB, (2, n))
        tok[1, n - n // 4:] = 0            # padding inside the batch (masked by the model)
        batches.append(jnp.asarray(tok, jnp.int32))
      ours = lj.adaptive_jit(fn, kernels=kernels,
                             buckets={"argnum": 1, "axis": 1, "sizes": "pow2"})
      plain = jax.jit(fn)
      t0 = time.perf_counter()
      outs_plain = [jax.block_until_ready(plain(params, b)) for b in batches]
      t_plain = time.perf_counter() - t0
      t0 = time.perf_counter()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs_ours = [jax.block_until_ready(ours(params, b)) for b in batches]
      t_ours = time.perf_counter() - t0
      err = max(_rel(a, b) for a, b in zip(outs_ours, outs_plain))
      info = ours.cache_info()
      buckets = len({1 << (n - 1).bit_length() for n in lengths})
      row = dict(model=name, form=form, calls=len(lengths), distinct_lengths=len(set(lengths)),
                 pow2_buckets=buckets, compiles=info.compiles,
                 jit_compiles=len(set(lengths)), fallbacks=info.bucket_fallbacks,
                 max_rel_err=err, seconds=t_ours, jit_seconds=t_plain,
                 time_ratio=t_ours / t_plain)
      rows.append(row)
      print(f"{name:<24}{form:<16}compiles {info.compiles:>3} (buckets {buckets}, jax.jit "
            f"{row['jit_compiles']})  err {err:.1e}  time {t_ours:7.1f}s vs {t_plain:7.1f}s "
            f"= {row['time_ratio']:.2f}x", flush=True)
  return lengths, rows


def memory(length: int, seed: int = 2):
  """Compiled temp bytes of the bucket's program at one long length (deterministic): the program
  adaptive_jit runs (attention on the kernel with the true lengths when that compiles smaller),
  the masked program without kernels, and jax.jit at the exact length."""
  rng = np.random.default_rng(seed)
  tok = rng.integers(1, F.VOCAB, (2, length))
  tok[1, length - length // 4:] = 0
  tok = jnp.asarray(tok, jnp.int32)
  rows = []
  spec = {"argnum": 1, "axis": 1, "sizes": "pow2"}
  models = dict(_models(), gemma_like_gqa=_gemma_like())
  for name, (params, fwd, loss) in models.items():
    for form, fn in (("forward", fwd), ("value_and_grad", jax.value_and_grad(loss))):
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lj.adaptive_jit(fn, buckets=spec).explain(params, tok)
        masked = lj.adaptive_jit(fn, kernels=None, buckets=spec).explain(params, tok)
      jit_temp = read_compiled(jax.jit(fn).lower(params, tok).compile()).temp_bytes
      row = dict(model=name, form=form, length=length, bucket=ours.bucket["bucket"],
                 temp_bytes=ours.compiled_temp_bytes_after,
                 masked_temp_bytes=masked.compiled_temp_bytes_after, jit_temp_bytes=jit_temp,
                 temp_ratio_vs_jit=ours.compiled_temp_bytes_after / jit_temp,
                 masked_ratio_vs_jit=masked.compiled_temp_bytes_after / jit_temp,
                 attention=ours.bucket.get("attention"))
      rows.append(row)
      print(f"{name:<24}{form:<16}seq {length} -> {row['bucket']}: temp {row['temp_bytes'] / 2**20:7.1f} MiB"
            f" (masked {row['masked_temp_bytes'] / 2**20:7.1f}, jax.jit at {length} "
            f"{jit_temp / 2**20:7.1f}) = {row['temp_ratio_vs_jit']:.2f}x of jax.jit", flush=True)
  return rows


def train(steps: int, seed: int = 1):
  """lm1b-style training (value_and_grad + optax.adam in one step) on batches of varying length:
  per-step losses of the bucketed step vs jax.jit's, and compiles."""
  import optax
  model = F.Lm1bLike(layers=2, max_len=1024)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  tx = optax.adam(3e-3)

  def step(state, tokens):
    p, opt = state
    loss, grads = jax.value_and_grad(lambda p: F.weighted_xent(model.apply(p, tokens), tokens))(p)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  rng = np.random.default_rng(seed)
  lengths = [int(x) for x in rng.integers(33, 513, steps)]
  ours = lj.adaptive_jit(step, buckets={"argnum": 1, "axis": 1, "sizes": "pow2"})
  plain = jax.jit(step)
  sa = sb = (params, tx.init(params))
  la, lb = [], []
  t_ours = t_plain = 0.0
  for n in lengths:
    tok = rng.integers(1, F.VOCAB, (2, n))
    tok[1, n - n // 4:] = 0
    tok = jnp.asarray(tok, jnp.int32)
    t0 = time.perf_counter()
    sa, loss_a = jax.block_until_ready(ours(sa, tok))
    t1 = time.perf_counter()
    sb, loss_b = jax.block_until_ready(plain(sb, tok))
    t2 = time.perf_counter()
    t_ours += t1 - t0
    t_plain += t2 - t1
    la.append(float(loss_a))
    lb.append(float(loss_b))
  diff = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
  row = dict(model="lm1b_like", steps=steps, lengths=lengths, compiles=ours.cache_info().compiles,
             pow2_buckets=len({1 << (n - 1).bit_length() for n in lengths}),
             jit_compiles=len(set(lengths)), losses=la, jit_losses=lb, max_rel_loss_diff=diff,
             seconds=t_ours, jit_seconds=t_plain, time_ratio=t_ours / t_plain)
  print(f"lm1b_like training {steps} steps: compiles {row['compiles']} (jax.jit "
        f"{row['jit_compiles']}), max rel loss diff {diff:.1e}, loss {la[0]:.3f} -> {la[-1]:.3f}, "
        f"time {t_ours:.1f}s vs {t_plain:.1f}s = {row['time_ratio']:.2f}x", flush=True)
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", type=int, default=40)
  ap.add_argument("--kernels", default="auto", choices=["auto", "xla", "none"])
  ap.add_argument("--train-steps", type=int, default=20)
  ap.add_argument("--memory-length", type=int, default=1000)
  ap.add_argument("--only-memory", action="store_true",
                  help="measure only the compiled-memory rows and update them in the existing JSON")
  args = ap.parse_args()
  kernels = None if args.kernels == "none" else args.kernels
  dev = jax.devices()[0]
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  path = os.path.join(os.path.dirname(__file__), "results",
                      f"buckets_{dev.platform}.json")
  memory_rows = memory(args.memory_length) if args.memory_length else None
  stamp = dict(device=str(dev.device_kind), platform=dev.platform, jax_version=jax.__version__,
               date=datetime.datetime.now().isoformat(timespec="seconds"))
  if args.only_memory:
    with open(path) as f:
      out = json.load(f)
    out["memory"] = memory_rows
    out["memory_measured"] = stamp
  else:
    lengths, rows = run(args.lengths, kernels)
    training = train(args.train_steps) if args.train_steps else None
    out = dict(benchmark="buckets", **stamp, kernels=args.kernels, lengths=lengths, rows=rows,
               training=training, memory=memory_rows, memory_measured=stamp,
               note="seconds = total wall time of all calls in order (compiles included); "
                    "jax.jit compiles once per distinct length, adaptive_jit once per pow2 "
                    "bucket; memory = XLA temp bytes of the program run at memory_length")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
  os.replace(tmp, path)
  print("wrote", path)


if __name__ == "__main__":
  main()
