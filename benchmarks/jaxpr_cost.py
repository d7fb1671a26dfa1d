"""lepton_jax.jaxpr cost model vs XLA's cost_analysis, and grad peak vs saved residuals.

Run: python -m benchmarks.jaxpr_cost [--small]
Writes benchmarks/results/jaxpr_cost_<device-kind>.json.
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lepton_jax import jaxpr as ljx  # noqa: E402
from tests.jaxpr import _models  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="small shapes for CPU")
  a = ap.parse_args()
  k = 1 if a.small else 4
  mse = lambda f: (lambda *x: jnp.mean(jax.tree.leaves(f(*x))[0] ** 2))
  cases = {
      "mlp": _models.mlp_case(batch=32 * k, din=64, dh=128 * k),
      "cnn": (lambda f, x: (mse(f), x))(*_models.cnn_case(batch=2 * k)),
      "attention": (lambda f, x: (mse(f), x))(*_models.attention_case(seq=16 * k, d=32 * k)),
      "rnn_scan(unrolled)": (lambda f, x: (mse(f), x))(*_models.rnn_case(steps=10 * k)),
  }
  rows = []
  print(f"{'model':<22} {'mode':<5} {'ours flops':>14} {'xla flops':>14} {'ratio':>7} {'ours trans':>11} {'xla trans':>10}")
  for name, (f, args) in cases.items():
    for mode, g in (("fwd", f), ("grad", jax.grad(f))):
      ours = ljx.cost(g, *args)
      xf, xt = _models.xla_flops(g, *args)
      r = ours.flops / xf
      rows.append(dict(model=name, mode=mode, ours_flops=ours.flops, xla_flops=xf, ratio=r,
                       ours_transcendentals=ours.transcendentals, xla_transcendentals=xt))
      print(f"{name:<22} {mode:<5} {ours.flops:>14,} {xf:>14,.0f} {r:>7.3f} {ours.transcendentals:>11,} {xt:>10,.0f}")
  loss, params = _models.mlp_tower(depth=16, width=64 * k)
  x = jnp.ones((32 * k, 64 * k))
  mem = {"grad_peak_bytes": ljx.grad_peak_bytes(loss, params, x),
         "saved_residual_bytes": ljx.saved_residual_bytes(loss, params, x)}
  mem["ratio"] = mem["grad_peak_bytes"] / mem["saved_residual_bytes"]
  print(f"\nMLP tower (16 layers): grad peak {mem['grad_peak_bytes']:,} B, saved residuals "
        f"{mem['saved_residual_bytes']:,} B, ratio {mem['ratio']:.3f}")
  pols = {"nothing_saveable": jax.checkpoint_policies.nothing_saveable,
          "dots_saveable": jax.checkpoint_policies.dots_saveable,
          "everything_saveable": jax.checkpoint_policies.everything_saveable}
  mem["policies"] = {}
  for pn, pol in pols.items():
    f = (lambda pol: lambda p, x: loss(p, x, remat_policy=pol))(pol)
    mem["policies"][pn] = {"grad_peak_bytes": ljx.grad_peak_bytes(f, params, x),
                           "saved_residual_bytes": ljx.saved_residual_bytes(f, params, x)}
    print(f"  per-layer checkpoint {pn:<20} peak {mem['policies'][pn]['grad_peak_bytes']:>10,} B  "
          f"residuals {mem['policies'][pn]['saved_residual_bytes']:>10,} B")
  dev = jax.devices()[0]
  out = {"device": dev.device_kind, "platform": dev.platform, "jax_version": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "small": a.small,
         "flops": rows, "memory": mem}
  os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                      f"jaxpr_cost_{dev.device_kind.replace(' ', '_').lower()}.json")
  with open(path, "w") as fh:
    json.dump(out, fh, indent=2)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
