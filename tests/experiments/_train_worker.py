"""Runs ``train_lib.train_and_evaluate`` in a subprocess for tests/experiments/test_train.py.

  python tests/experiments/_train_worker.py --workdir=DIR --config_json=JSON [--devices=N]
      [--step_delay=S] [--coordinator=HOST:PORT --num_processes=N --process_id=I]

``--config_json`` is a JSON object of config overrides applied to the smoke config. ``--step_delay``
sleeps that many seconds before each training batch (in the input iterator, so the numbers do
not change) to give the kill-and-resume test time to kill the process mid-epoch.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags

flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
flags.DEFINE_string('config_json', '{}', 'JSON object of overrides to the smoke config.')
flags.DEFINE_integer('devices', 1, 'Fake CPU devices.')
flags.DEFINE_float('step_delay', 0.0, 'Seconds to sleep before each training batch.')
flags.DEFINE_string('coordinator', None, 'jax.distributed coordinator HOST:PORT.')
flags.DEFINE_integer('num_processes', None, 'jax.distributed process count.')
flags.DEFINE_integer('process_id', None, 'jax.distributed process index.')
args = flags.FLAGS


def main(argv) -> None:
  del argv
  import jax

  jax.config.update('jax_num_cpu_devices', args.devices)
  from experiments.training import distributed

  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from experiments.configs import smoke
  from experiments.data import pipeline as input_pipeline
  from experiments.training import train_lib

  config = smoke.get_config()
  config.update_from_flattened_dict(json.loads(args.config_json))
  if args.step_delay:
    create_input = input_pipeline.create_input

    def slow_create_input(*a, **k):
      data = create_input(*a, **k)
      train_batches = data.train_batches

      def slow_train_batches(epoch, start_step=0):
        for batch in train_batches(epoch, start_step):
          time.sleep(args.step_delay)
          yield batch

      data.train_batches = slow_train_batches
      return data

    input_pipeline.create_input = slow_create_input
  train_lib.train_and_evaluate(config, args.workdir)
  print(f'tensorflow imported: {"tensorflow" in sys.modules}', flush=True)


if __name__ == '__main__':
  app.run(main)
