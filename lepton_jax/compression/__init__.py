"""Compression transforms: mixed precision, post-training quantization, pruning.

>>> import jax.numpy as jnp, lepton_jax as lj
>>> lj.mixed_precision(lambda w, x: x @ w)(jnp.ones((3, 2)), jnp.ones((1, 3))).dtype
dtype('float32')
"""

from lepton_jax.compression._mixed_precision import ConvertedOp as ConvertedOp
from lepton_jax.compression._mixed_precision import DynamicLossScale as DynamicLossScale
from lepton_jax.compression._mixed_precision import MixedPrecisionReport as MixedPrecisionReport
from lepton_jax.compression._mixed_precision import mixed_precision as mixed_precision
from lepton_jax.compression._quantize import QuantizedArray as QuantizedArray
from lepton_jax.compression._quantize import QuantizedWeight as QuantizedWeight
from lepton_jax.compression._quantize import QuantizeReport as QuantizeReport
from lepton_jax.compression._quantize import quantize as quantize
from lepton_jax.compression._prune import prune as prune
