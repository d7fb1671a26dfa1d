"""Content digests of arrays that do not depend on how the array is sharded.

The digest of an array is two 32-bit lanes, each a wrapping ``uint32`` sum over
every 32-bit word ``w`` of the array's bytes (elements in C order; 8-byte
elements contribute two words) of a bijective mix of ``w`` keyed by the word's
global position ``i``::

    lane0 = sum_i fmix32(w_i ^ fmix32(i * K0 + S0))
    lane1 = sum_i fmix32(w_i * K1 + fmix32(i ^ S1))

``fmix32`` is MurmurHash3's finaliser (a bijection of ``uint32``). Because the
per-word term is a bijection of ``w_i``, *any* change of a single word changes
both lanes with certainty; a change of several words goes unnoticed with
probability about ``2**-64``. Because integer addition mod ``2**32`` is exact,
associative and commutative, the digest is identical however the array is
sharded, so it is computed on the device(s) inside one ``jax.jit`` (no extra
device-to-host copy at save time, no gather at restore time, and it works for
arrays that span several processes). :func:`host_digest` computes the same
value with NumPy (used by tests and for host arrays).
"""

from __future__ import annotations

import functools
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

__all__ = ["device_digests", "host_digest", "digest_hex", "crc32_text"]

_K0 = 0x9E3779B1
_S0 = 0x7F4A7C15
_K1 = 0x85EBCA77  # odd, so multiplication is a bijection mod 2**32
_S1 = 0x165667B1


def _fmix(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x) -> jax.Array:
  """Returns the array's bytes as uint32 words (trailing dim 2 for 8-byte types)."""
  dt = x.dtype
  if jnp.issubdtype(dt, jnp.complexfloating):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    dt = x.dtype
  if dt == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(dt).itemsize
  if size == 1:
    return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  if size == 2:
    return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing dim of 2
  raise TypeError(f"TieredCheckpointManager: cannot digest arrays of dtype {dt}")


def _digest_one(x) -> jax.Array:
  w = _words(x)
  if w.size == 0:
    return jnp.zeros((2,), jnp.uint32)
  # Global C-order position of each word, built from iotas (no reshape, so it
  # partitions like an elementwise op for any sharding).
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in range(w.ndim - 1, -1, -1):
    idx = idx + lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    stride *= w.shape[d]
  a = _fmix(w ^ _fmix(idx * jnp.uint32(_K0) + jnp.uint32(_S0)))
  b = _fmix(w * jnp.uint32(_K1) + _fmix(idx ^ jnp.uint32(_S1)))
  return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


@functools.partial(jax.jit)
def _digest_all(leaves):
  return [_digest_one(x) for x in leaves]


#: Arrays up to this size are copied to the host and digested with NumPy
#: (no compilation); larger ones are digested on their devices in one jit.
HOST_DIGEST_MAX_BYTES = 1 << 20


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def device_digests(arrays: Sequence) -> list:
  """Starts the digests of ``arrays`` (jax or numpy); returns a list of pending digests.

  Each entry is a ``uint32[2]`` jax array still being computed (large device
  arrays) or a ready NumPy host copy of a small array; :func:`digest_hex`
  finishes either. Nothing here waits for a device computation, and the
  returned objects do not alias ``arrays`` (donating them afterwards is safe).

  >>> d = device_digests([jnp.arange(4.0)])
  >>> digest_hex(d[0]) == host_digest(np.arange(4.0, dtype=np.float32))
  True
  """
  out: list = [None] * len(arrays)
  big, big_idx, small, small_idx = [], [], [], []
  for i, x in enumerate(arrays):
    if isinstance(x, np.ndarray):
      out[i] = _HostCopy(np.array(x, copy=True))
    elif _nbytes(x) <= HOST_DIGEST_MAX_BYTES and getattr(x, "is_fully_addressable", True):
      small.append(x)
      small_idx.append(i)
    else:
      big.append(x)
      big_idx.append(i)
  if small:
    for i, h in zip(small_idx, jax.device_get(small)):
      out[i] = _HostCopy(np.array(h, copy=True))
  if big:
    for i, d in zip(big_idx, _digest_all(big)):
      out[i] = d
  return out


class _HostCopy:
  """A host copy whose digest is computed lazily (off the caller's thread)."""

  def __init__(self, x: np.ndarray):
    self.x = x


def digest_hex(d) -> str:
  """Finishes a pending digest from :func:`device_digests`; 16 hex digits."""
  if isinstance(d, _HostCopy):
    return host_digest(d.x)
  a, b = (int(v) for v in np.asarray(d, dtype=np.uint32))
  return f"{a:08x}{b:08x}"


def _np_fmix(x: np.ndarray) -> np.ndarray:
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> np.uint32(13))
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> np.uint32(16))


def host_digest(x: np.ndarray) -> str:
  """The same digest as :func:`device_digests`, computed with NumPy on the host."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.complexfloating):
    x = np.stack([x.real, x.imag], axis=-1)
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    w = x.astype(np.uint32).ravel()
  elif x.dtype.itemsize in (1, 2):
    w = x.view(np.uint8 if x.dtype.itemsize == 1 else np.uint16).astype(np.uint32).ravel()
  elif x.dtype.itemsize in (4, 8):
    w = x.view(np.uint32).ravel()
  else:
    raise TypeError(f"host_digest: cannot digest arrays of dtype {x.dtype}")
  if w.size == 0:
    return "0" * 16
  with np.errstate(over="ignore"):
    idx = np.arange(w.size, dtype=np.uint64).astype(np.uint32)
    a = _np_fmix(w ^ _np_fmix(idx * np.uint32(_K0) + np.uint32(_S0)))
    b = _np_fmix(w * np.uint32(_K1) + _np_fmix(idx ^ np.uint32(_S1)))
    sa = int(a.sum(dtype=np.uint64)) % 2**32
    sb = int(b.sum(dtype=np.uint64)) % 2**32
  return f"{sa:08x}{sb:08x}"


def crc32_text(text: str) -> int:
  """CRC-32 (zlib) of a UTF-8 string."""
  return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF
