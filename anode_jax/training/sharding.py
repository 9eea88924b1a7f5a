"""Data parallelism with jax.sharding: one 1-D mesh over all devices, batch split along
it, parameters and optimizer state replicated. XLA's SPMD partitioner inserts the
gradient all-reduce (and the cross-device batch-norm statistics), so a sharded step
computes the same function as a single-device step.

Multi-process (GPU clusters, TPU pods, several CPU processes): set
`config.distributed = True`; see anode_jax/training/distributed.py for how the processes
connect and which rows of each global batch a process feeds.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
    devices = jax.devices()
    n = num_devices or len(devices)
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def put_batch(arrays, sharding: NamedSharding):
    """Host numpy arrays holding the *global* batch -> sharded global jax arrays.

    With several processes, each passes the global batch and keeps its own rows.
    """
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)

    def one(x):
        x = np.asarray(x)
        per = x.shape[0] // jax.process_count()
        lo = jax.process_index() * per
        return jax.make_array_from_process_local_data(sharding, x[lo : lo + per], x.shape)

    return jax.tree.map(one, arrays)
