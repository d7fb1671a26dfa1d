"""A tiny decoder-only transformer in the shape of Flax's ``examples/gemma`` (NNX), for the compression
benchmark.

What it shares with Gemma: a token table scaled by ``sqrt(d)`` on the way in and reused (tied) as
the output projection, pre-norm blocks with RMSNorm (``x * rsqrt(mean(x^2) + eps) * (1 + scale)``,
scale initialised to zero) before attention and before the MLP, rotary position embeddings on
queries and keys, grouped-query attention (``num_heads`` query heads share ``num_kv_heads`` key/value
heads; logits as ``einsum('BTKGH,BSKH->BTKGS')``), einsum projection kernels laid out as Gemma's
(``q: (N, D, H)``, ``kv: (2, K, D, H)``, ``out: (N, H, D)``) and a gated GELU MLP
(``down(gelu(gate(x)) * up(x))``). Left out: KV cache, sliding windows, logit soft-capping, QK norm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["GemmaLikeConfig", "GemmaLike", "rms_norm", "rotary", "stack_blocks"]

_NEG = -2.3819763e38  # additive mask value (as large and negative as float32 allows, with room)


@dataclasses.dataclass(frozen=True)
class GemmaLikeConfig:
  vocab: int = 256
  d: int = 128          # model width (embedding size)
  heads: int = 4        # query heads
  kv_heads: int = 2     # key/value heads (grouped-query attention: heads % kv_heads == 0)
  head_dim: int = 32
  hidden: int = 512     # gated-MLP width
  layers: int = 2
  rope_wavelength: float = 10_000.0
  scan_layers: bool = False  # blocks stacked on a leading axis and run by nnx.scan (one loop body)


def rms_norm(x, scale, eps=1e-6):
  """Gemma's RMSNorm in float32: normalise by the root mean square, multiply by ``1 + scale``."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + scale)


def rotary(x, positions, wavelength):
  """Rotates the two halves of the last axis of ``x`` (B, T, heads, H) by position-dependent angles."""
  h = x.shape[-1]
  inv_freq = 1.0 / wavelength ** (jnp.arange(h // 2, dtype=jnp.float32) * 2.0 / h)
  angle = positions.astype(jnp.float32)[..., None] * inv_freq        # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  a, b = x[..., : h // 2], x[..., h // 2:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def _normal(rngs, shape, fan_in):
  return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in))


class _RMSNorm(nnx.Module):
  def __init__(self, d):
    self.scale = nnx.Param(jnp.zeros((d,), jnp.float32))

  def __call__(self, x):
    return rms_norm(x, self.scale[...])


class _GQAttention(nnx.Module):
  def __init__(self, cfg: GemmaLikeConfig, rngs):
    if cfg.heads % cfg.kv_heads:
      raise ValueError(f"GemmaLikeConfig: heads={cfg.heads} must be a multiple of kv_heads={cfg.kv_heads}")
    self.cfg = cfg
    self.q = _normal(rngs, (cfg.heads, cfg.d, cfg.head_dim), cfg.d)
    self.kv = _normal(rngs, (2, cfg.kv_heads, cfg.d, cfg.head_dim), cfg.d)
    self.out = _normal(rngs, (cfg.heads, cfg.head_dim, cfg.d), cfg.heads * cfg.head_dim)

  def __call__(self, x, positions, mask):
    cfg = self.cfg
    b, t, _ = x.shape
    q = jnp.einsum("BTD,NDH->BTNH", x, self.q[...])
    k, v = jnp.einsum("BTD,CKDH->CBTKH", x, self.kv[...])
    q = rotary(q, positions, cfg.rope_wavelength) * cfg.head_dim ** -0.5
    k = rotary(k, positions, cfg.rope_wavelength)
    groups = cfg.heads // cfg.kv_heads
    q = q.reshape(b, t, cfg.kv_heads, groups, cfg.head_dim)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
    logits = jnp.where(mask[:, :, None, None, :], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    mixed = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, cfg.heads, cfg.head_dim)
    return jnp.einsum("BTNH,NHD->BTD", mixed, self.out[...])


class _GatedMLP(nnx.Module):
  def __init__(self, cfg: GemmaLikeConfig, rngs):
    self.gate = nnx.Linear(cfg.d, cfg.hidden, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(cfg.d, cfg.hidden, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(cfg.hidden, cfg.d, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class _Block(nnx.Module):
  def __init__(self, cfg: GemmaLikeConfig, rngs):
    self.attn_norm, self.mlp_norm = _RMSNorm(cfg.d), _RMSNorm(cfg.d)
    self.attn, self.mlp = _GQAttention(cfg, rngs), _GatedMLP(cfg, rngs)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


class GemmaLike(nnx.Module):
  """``model(tokens) -> logits`` for int tokens ``(B, T)``; causal attention, positions ``0..T-1``."""

  def __init__(self, cfg: GemmaLikeConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab, cfg.d), jnp.float32) * cfg.d ** -0.5)
    if cfg.scan_layers:
      keys = jax.random.split(rngs.params(), cfg.layers)
      self.blocks = nnx.vmap(lambda key: _Block(cfg, nnx.Rngs(key)))(keys)
    else:
      self.blocks = nnx.List([_Block(cfg, rngs) for _ in range(cfg.layers)])
    self.final_norm = _RMSNorm(cfg.d)

  def __call__(self, tokens):
    b, t = tokens.shape
    table = self.embed[...]
    x = table[tokens] * jnp.sqrt(jnp.float32(self.cfg.d))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    if self.cfg.scan_layers:
      x, _ = nnx.scan(lambda h, blk: (blk(h, positions, mask), None), in_axes=(nnx.Carry, 0))(x, self.blocks)
    else:
      for blk in self.blocks:
        x = blk(x, positions, mask)
    return jnp.einsum("BTD,VD->BTV", self.final_norm(x), table)  # tied output projection


def stack_blocks(params: dict) -> dict:
  """Pure-dict parameters of the per-layer model in the ``scan_layers=True`` layout (blocks stacked)."""
  blocks = params["blocks"]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[blocks[i] for i in sorted(blocks)])
  return {**params, "blocks": stacked}
