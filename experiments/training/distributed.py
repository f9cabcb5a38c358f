"""Multi-host start-up and the data-parallel mesh.

One process per host, all devices of all hosts in one mesh axis ``'data'``: the batch is
sharded ``P('data')``, the train state replicated ``P()``, and ``jax.jit`` inserts the
cross-device reductions (so BatchNorm statistics are those of the global batch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Cluster launchers under which `jax.distributed.initialize()` finds the coordinator, the
# process count and the process id by itself (JAX's cluster auto-detection).
_AUTO_DETECTED_CLUSTERS = {
    'SLURM_JOB_ID': 'SLURM_NTASKS',
    'OMPI_MCA_orte_hnp_uri': 'OMPI_COMM_WORLD_SIZE',
}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when this is one process of several.

  Sources, first match wins: the arguments (from ``--coordinator_address``,
  ``--num_processes``, ``--process_id``); the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; a cluster JAX
  detects itself (SLURM, Open MPI) with more than one task. Otherwise nothing happens (one
  process, all its local devices).

  Returns:
    Whether ``jax.distributed.initialize`` was called.
  """
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None and environ.get('JAX_NUM_PROCESSES'):
    num_processes = int(environ['JAX_NUM_PROCESSES'])
  if process_id is None and environ.get('JAX_PROCESS_ID'):
    process_id = int(environ['JAX_PROCESS_ID'])

  given = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in given):
    if any(value is None for value in given):
      raise ValueError(
          'Multi-host training needs all three of coordinator address, number of processes '
          f'and process id; got coordinator_address={coordinator_address!r}, '
          f'num_processes={num_processes!r}, process_id={process_id!r}. Pass '
          '--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or set '
          'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id must be in [0, {num_processes}); got {process_id}.')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif any(int(environ.get(size, '1') or '1') > 1 and job in environ
           for job, size in _AUTO_DETECTED_CLUSTERS.items()):
    jax.distributed.initialize()
  else:
    return False
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device.')
  return Mesh(np.asarray(devices), ('data',))


def check_batch_divides(batch_size: int, mesh: Mesh, what: str) -> None:
  """A clear error when ``batch_size`` cannot be split evenly over the mesh's devices."""
  num_devices = mesh.devices.size
  if batch_size <= 0:
    raise ValueError(f'{what} must be positive; got {batch_size}.')
  if batch_size % num_devices:
    lower = max(num_devices, batch_size // num_devices * num_devices)
    raise ValueError(
        f'{what}={batch_size} does not divide over {num_devices} devices '
        f'({jax.process_count()} process(es)); data parallelism gives every device the same '
        f'share. Use a multiple of {num_devices}, e.g. --config.{what}={lower}.')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 keys: Sequence[str]) -> dict[str, jax.Array]:
  """This host's slice of a batch -> global arrays sharded ``P('data')``.

  Args:
    local_batch: ``{key: (local_batch, ...)}`` numpy arrays; host ``p`` holds rows
      ``[p * local_batch, (p + 1) * local_batch)`` of the global batch.
    mesh: the data-parallel mesh.
    keys: which entries to transfer (others, e.g. ``'box'``, stay on the host).

  Returns:
    ``{key: (local_batch * process_count, ...)}`` global arrays.
  """
  sharding = batch_sharded(mesh)
  process_count = len({device.process_index for device in mesh.devices.flat})
  arrays = {}
  for key in keys:
    local = np.asarray(local_batch[key])
    global_shape = (local.shape[0] * process_count, *local.shape[1:])
    arrays[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return arrays


def configure_xla() -> None:
  """Applies the project's XLA:CPU settings (:func:`experiments.perf.configure_cpu`).

  Must run before JAX starts its backends (before ``initialize`` and any device use).
  """
  from experiments import perf

  perf.configure_cpu()
