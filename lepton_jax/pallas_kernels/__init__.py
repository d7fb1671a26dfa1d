"""Differentiable Pallas kernels with memory-efficient XLA fallbacks.

>>> import jax.numpy as jnp
>>> from lepton_jax import pallas_kernels as lpk
>>> q = jnp.ones((1, 40, 2, 16))
>>> lpk.flash_attention(q, q, q, is_causal=True, backend="xla").shape
(1, 40, 2, 16)
"""

from lepton_jax.pallas_kernels._attention import BlockSizes as BlockSizes
from lepton_jax.pallas_kernels._attention import flash_attention as flash_attention
from lepton_jax.pallas_kernels._attention import flash_attention_reference as flash_attention_reference
from lepton_jax.pallas_kernels._autotune import AutotuneCache as AutotuneCache
from lepton_jax.pallas_kernels._autotune import AutotuneResult as AutotuneResult
from lepton_jax.pallas_kernels._autotune import autotune as autotune
from lepton_jax.pallas_kernels._autotune import clear_autotune_cache as clear_autotune_cache
from lepton_jax.pallas_kernels._autotune import default_autotune_cache as default_autotune_cache
from lepton_jax.pallas_kernels._autotune import default_cache_path as default_cache_path
from lepton_jax.pallas_kernels._cross_entropy import CEBlockSizes as CEBlockSizes
from lepton_jax.pallas_kernels._cross_entropy import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from lepton_jax.pallas_kernels._cross_entropy import linear_softmax_cross_entropy_reference as linear_softmax_cross_entropy_reference
from lepton_jax.pallas_kernels._cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from lepton_jax.pallas_kernels._cross_entropy import softmax_cross_entropy_reference as softmax_cross_entropy_reference
from lepton_jax.pallas_kernels._matmul import MatmulBlockSizes as MatmulBlockSizes
from lepton_jax.pallas_kernels._matmul import matmul as matmul
from lepton_jax.pallas_kernels._matmul import matmul_reference as matmul_reference
from lepton_jax.pallas_kernels._norms import NormBlockSizes as NormBlockSizes
from lepton_jax.pallas_kernels._norms import layer_norm as layer_norm
from lepton_jax.pallas_kernels._norms import layer_norm_reference as layer_norm_reference
from lepton_jax.pallas_kernels._norms import rms_norm as rms_norm
from lepton_jax.pallas_kernels._norms import rms_norm_reference as rms_norm_reference
from lepton_jax.pallas_kernels._registry import BACKENDS as BACKENDS
from lepton_jax.pallas_kernels._registry import Dispatch as Dispatch
from lepton_jax.pallas_kernels._registry import DispatchLog as DispatchLog
from lepton_jax.pallas_kernels._registry import record_dispatches as record_dispatches
from lepton_jax.pallas_kernels._registry import resolve_backend as resolve_backend
