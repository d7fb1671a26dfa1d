"""lepton_jax: composable JAX acceleration transforms.

>>> import lepton_jax as lj
>>> lj.__version__  # doctest: +SKIP
'0.1.0'
"""

from lepton_jax._version import __version__ as __version__
from lepton_jax._errors import BudgetError as BudgetError
from lepton_jax._errors import KernelError as KernelError
from lepton_jax._errors import LeptonError as LeptonError
from lepton_jax._errors import ShardingError as ShardingError
from lepton_jax import checkpoint as checkpoint
from lepton_jax import jaxpr as jaxpr
from lepton_jax import sharding as sharding
from lepton_jax.sharding._auto_shard import auto_shard as auto_shard
from lepton_jax import pallas_kernels as pallas_kernels
from lepton_jax.transforms._adaptive_jit import adaptive_jit as adaptive_jit
from lepton_jax.transforms._remat_plan import RematPlan as RematPlan
from lepton_jax.transforms._remat_plan import remat_plan as remat_plan
from lepton_jax import offload as offload
from lepton_jax.compression._mixed_precision import mixed_precision as mixed_precision
from lepton_jax.compression._mixed_precision import DynamicLossScale as DynamicLossScale
from lepton_jax.compression._quantize import quantize as quantize
from lepton_jax.compression._prune import prune as prune
from lepton_jax._caches import clear_caches as clear_caches
