r"""Top-1 / top-5 accuracy of a training checkpoint on its config's evaluation split.

  python -m experiments.training.evaluate --workdir /tmp/run                # latest checkpoint
  python -m experiments.training.evaluate --workdir /tmp/run --which=best   # best eval top-1
  python -m experiments.training.evaluate --workdir /tmp/run --which=1250   # a given step

The model and data are rebuilt from the config saved with the checkpoint; override data
fields with --data_override, e.g. --data_override=eval_batch_size=500.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import jax
import ml_collections
from absl import flags

from experiments import cli, compile_cache
from experiments.data import pipeline as input_pipeline
from experiments.training import checkpointing, distributed, train_lib

PROG = 'python -m experiments.training.evaluate'


def evaluate_checkpoint(workdir: str, which: str = 'latest',
                        overrides: dict | None = None) -> dict[str, float]:
  """Restores a checkpoint's variables (not its optimiser state) of ``workdir`` and
  evaluates them on every device.

  Returns:
    ``{'step', 'eval_loss', 'eval_top1', 'eval_top5', 'num_examples'}``.
  """
  mesh = distributed.make_mesh()
  replicated = distributed.replicated(mesh)
  model, variables, meta, step = checkpointing.load_model(workdir, which, sharding=replicated)
  config = ml_collections.ConfigDict(meta['config'])
  for key, value in (overrides or {}).items():
    cli.set_field(config, key, value, f'--data_override {key}')
  eval_batch_size = config.get('eval_batch_size') or config.global_batch_size
  distributed.check_batch_divides(eval_batch_size, mesh, 'eval_batch_size')
  data = input_pipeline.create_input(config, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, model=model),
                    out_shardings=replicated)
  metrics = train_lib.evaluate(eval_fn, variables['params'], variables['batch_stats'],
                               data.eval_batches(), mesh)
  return {'step': step, **metrics, 'num_examples': data.info.num_eval}


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'A training workdir (or its checkpoints folder, or '
                      'one step folder).', required=True, flag_values=values)
  flags.DEFINE_string('which', 'latest', "'latest', 'best' (best eval top-1) or a step "
                      'number.', flag_values=values)
  flags.DEFINE_multi_string('data_override', [],
                            'KEY=VALUE (JSON value) changes to the saved config.',
                            flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  compile_cache.enable()
  overrides = {}
  for item in values.data_override:
    key, sep, value = item.partition('=')
    if not sep:
      raise cli.UserError(f'--data_override wants KEY=VALUE; got {item!r}.')
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  result = evaluate_checkpoint(values.workdir, values.which, overrides)
  if jax.process_index() == 0:
    print(f'step {result["step"]}: top-1 {100 * result["eval_top1"]:.2f}%  '
          f'top-5 {100 * result["eval_top5"]:.2f}%  loss {result["eval_loss"]:.4f}  '
          f'({result["num_examples"]} examples)')
  return result


if __name__ == '__main__':
  distributed.configure_xla()
  distributed.initialize()
  main()
