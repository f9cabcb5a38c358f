r"""Trains a (CBAM) ResNet: data parallel over every device of every host, resumable.

  python -m experiments.training.train --config experiments/configs/default.py --workdir /tmp/run
  python -m experiments.training.train --config experiments/configs/cifar10.py --workdir /tmp/c10 \
      --config.num_epochs=3 --config.model.attention=none

Restarting with the same --workdir resumes from its latest checkpoint. Multi-host: start one
process per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables; SLURM and Open
MPI are detected). Writes <workdir>/metrics.jsonl, TensorBoard events, config.json and
orbax checkpoints.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

if __name__ == '__main__':
  from cbam_jax import perf

  # Before the heavy imports: glibc reads its tunables (huge pages for malloc, ~1.2x faster
  # XLA:CPU steps) only at process start, so this restarts the process once if needed.
  perf.reexec_with_cpu_env()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import compile_cache  # noqa: E402
from experiments.training import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py',
                                          'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.',
                               required=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-host: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error for config overrides that name no field."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    overrides = [arg for arg in argv[1:] if arg.startswith('--config.')]
    # ml_collections quotes its message twice ('\\'name\\'\\nDid you mean ...'): unwrap it.
    message = str(error).replace('\\n', ' ').replace('\n', ' ').replace('\\', '')
    message = message.replace("'", '').strip('" ')
    sys.exit(f'Bad config override ({" ".join(overrides)}): no such field: {message}. '
             'The fields and their defaults are in experiments/configs/__init__.py.')
  except flags.Error as error:
    sys.exit(f'{error}\nPass --helpfull to list the flags.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  distributed.configure_xla()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  compile_cache.enable()  # A second run with the same config does not compile again.
  from experiments.training import train_lib  # After initialize: nothing may touch devices before.

  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
