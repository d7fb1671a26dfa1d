"""Host-memory offload: move pytrees between memory kinds, keep optimizer state on host.

>>> import jax.numpy as jnp, lepton_jax as lj
>>> lj.offload.to_host(jnp.ones(2)).sharding.memory_kind
'pinned_host'
"""

from lepton_jax.offload._memory import device_bytes as device_bytes
from lepton_jax.offload._memory import memory_kinds as memory_kinds
from lepton_jax.offload._memory import to_device as to_device
from lepton_jax.offload._memory import to_host as to_host
from lepton_jax.offload._optimizer import offload_optimizer as offload_optimizer
