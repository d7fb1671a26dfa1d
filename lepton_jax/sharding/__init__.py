"""Automatic sharding over a device mesh: ``auto_shard`` and multi-host helpers.

>>> import lepton_jax as lj
>>> from lepton_jax.sharding import auto_shard
"""

from lepton_jax.sharding._auto_shard import AutoShardFunction as AutoShardFunction
from lepton_jax.sharding._auto_shard import auto_shard as auto_shard
from lepton_jax.sharding._plan import LeafPlan as LeafPlan
from lepton_jax.sharding._plan import ShardingPlan as ShardingPlan
from lepton_jax.sharding._multihost import make_global_batch as make_global_batch
