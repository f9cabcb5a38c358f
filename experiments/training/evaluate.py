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
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments.data import pipeline as input_pipeline  # noqa: E402
from experiments.training import checkpointing, distributed, train_lib  # noqa: E402


def evaluate_checkpoint(workdir: str, which: str = 'latest',
                        overrides: dict | None = None) -> dict[str, float]:
  """Restores a checkpoint of ``workdir`` and evaluates it on every device.

  Returns:
    ``{'step', 'eval_loss', 'eval_top1', 'eval_top5', 'num_examples'}``.
  """
  directory, step = checkpointing.find_checkpoint(workdir)
  ckpts = checkpointing.Checkpoints(directory, read_only=True)
  if step is None:
    if which == 'latest':
      step = ckpts.latest_step()
    elif which == 'best':
      step = ckpts.best_step()
    elif which.isdigit():
      step = int(which)
    else:
      raise ValueError(f"--which must be 'latest', 'best' or a step number; got {which!r}.")
  if step is None or step not in ckpts.all_steps():
    raise FileNotFoundError(f'No checkpoint {"" if step is None else step} in {directory} '
                            f'(steps: {ckpts.all_steps()}).')
  meta = ckpts.restore_meta(step)
  config = ml_collections.ConfigDict(meta['config'])
  for key, value in (overrides or {}).items():
    config[key] = value
  model = train_lib.model_from_fields(meta['model'])
  mesh = distributed.make_mesh()
  eval_batch_size = config.get('eval_batch_size') or config.global_batch_size
  distributed.check_batch_divides(eval_batch_size, mesh, 'eval_batch_size')
  data = input_pipeline.create_input(config, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  replicated = distributed.replicated(mesh)
  steps_per_epoch = max(data.steps_per_epoch, 1)
  tx, _ = train_lib.create_optimizer(config, steps_per_epoch)
  abstract = jax.eval_shape(functools.partial(train_lib.create_train_state, model, tx,
                                              data.info.image_shape, config.seed))
  abstract = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), abstract)
  state, _ = ckpts.restore(step, abstract.to_dict())
  ckpts.close()
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, model=model),
                    out_shardings=replicated)
  metrics = train_lib.evaluate(eval_fn, state['params'], state['batch_stats'],
                               data.eval_batches(), mesh)
  return {'step': step, **metrics, 'num_examples': data.info.num_eval}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  overrides = {}
  for item in flags.FLAGS.data_override:
    key, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--data_override wants KEY=VALUE; got {item!r}.')
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  result = evaluate_checkpoint(flags.FLAGS.workdir, flags.FLAGS.which, overrides)
  if jax.process_index() == 0:
    print(f'step {result["step"]}: top-1 {100 * result["eval_top1"]:.2f}%  '
          f'top-5 {100 * result["eval_top5"]:.2f}%  loss {result["eval_loss"]:.4f}  '
          f'({result["num_examples"]} examples)')


def define_flags() -> None:
  """The command line's flags (defined here, not on import: tests import this module)."""
  flags.DEFINE_string('workdir', None, 'A training workdir (or its checkpoints folder, or '
                      'one step folder).', required=True)
  flags.DEFINE_string('which', 'latest', "'latest', 'best' or a step number.")
  flags.DEFINE_multi_string('data_override', [],
                            'KEY=VALUE (JSON value) changes to the saved config.')


if __name__ == '__main__':
  define_flags()
  distributed.configure_xla()
  distributed.initialize()
  app.run(main)
