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

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, perf

PROG = 'python -m experiments.training.train'

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/default.py',
                                          'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.',
                               required=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-host: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')


def _config_fields() -> list[str]:
  """Every field of the training config, dotted (``model.attention``)."""
  from experiments.configs import base_config

  def walk(config, prefix):
    for key, value in config.items():
      if hasattr(value, 'items'):
        yield from walk(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}'

  return list(walk(base_config(), ''))


def _field_named(name: str) -> str | None:
  """The dotted config field called ``name`` (``learning_rate``, ``model.attention``), else
  the closest to a misspelling of it, else None."""
  fields = _config_fields()
  found = next((f for f in fields if f == name or f.endswith(f'.{name}')), None)
  return found or cli.closest(name, fields)


def _config_field_hint(argv: list[str]) -> str:
  """``' Did you mean --config.X?'`` for the first top-level flag that names a config field."""
  for arg in argv[1:]:
    name = arg[2:].split('=', 1)[0] if arg.startswith('--') else ''
    if not name or name.startswith('config') or name in flags.FLAGS:
      continue
    field = _field_named(name)
    if field is not None:
      return f' Did you mean --config.{field}{arg[2 + len(name):]}?'
  return ''


# Config fields that hold several settings in one string, FIELD=VALUE,FIELD=VALUE.
_FIELD_VALUE_STRINGS = ('model.attention_fields',)


def _override_shape_error(argv: list[str]) -> str | None:
  """The error of the first ``--config.`` override whose path does not fit the config's
  shape: one that goes on through a field holding a value (``--config.optimizer.
  learning_rate``: the optimizer is the string ``'sgd'``) or that gives a group of fields a
  plain value (``--config.model=resnet20``); None if every path fits. ml_collections
  raises a TypeError or ValueError from inside its parser for both."""
  from experiments.configs import base_config

  config = base_config()
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path, _, value = arg[len('--config.'):].partition('=')
    parts = path.split('.')
    node: object = config
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        break  # A field that does not exist: the "no such field" error says so.
      node = node[part]
      field, rest = '.'.join(parts[:depth + 1]), '.'.join(parts[depth + 1:])
      if rest and not isinstance(node, ml_collections.ConfigDict):
        what = 'unset' if node is None else repr(node)
        message = f'{arg}: config.{field} is a value ({what}), not a group of fields.'
        if field in _FIELD_VALUE_STRINGS:
          return (f'{message} It takes comma-separated FIELD=VALUE: '
                  f'--config.{field}={rest}={value}.')
        guess = _field_named(parts[-1])
        return message + (f' Did you mean --config.{guess}={value}?' if guess else '')
      if not rest and isinstance(node, ml_collections.ConfigDict) and not value.startswith('{'):
        first = 'name' if 'name' in node else next(iter(node.keys()))
        return (f'{arg}: config.{field} is a group of fields ({", ".join(node.keys())}); '
                f'set one of them, e.g. --config.{field}.{first}={value}.')
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit status 2), e.g. for config overrides that
  name no field or go on through a field that holds a value, or top-level flags that are
  config fields."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as error:
    message = _override_shape_error(argv)
    if message is None and isinstance(error, (AttributeError, KeyError)):
      overrides = [arg for arg in argv[1:] if arg.startswith('--config.')]
      # ml_collections quotes its message twice ('\\'name\\'\\nDid you mean ...'): unwrap it.
      unquoted = str(error).replace('\\n', ' ').replace('\n', ' ').replace('\\', '')
      unquoted = unquoted.replace("'", '').strip('" ')
      message = (f'Bad config override ({" ".join(overrides)}): no such field: {unquoted}. '
                 'The fields and their defaults are in experiments/configs/__init__.py.')
    elif message is None and isinstance(error, flags.Error):
      hint = _config_field_hint(argv) if 'Unknown command line flag' in str(error) else ''
      message = (str(error).split('Did you mean')[0].strip() if hint else str(error))
      message += f'{hint} Pass --helpfull to list the flags.'
    if message is None:
      raise
    cli.exit_with(PROG, message)


def _config() -> ml_collections.ConfigDict:
  """The ``--config`` file's config with the overrides, or a UserError naming the file."""
  try:
    config = _CONFIG.value
    config.keys()  # A file that failed to load raises here, on first use.
    return config
  except OSError as error:
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    if not os.path.isfile(path):
      folder = os.path.dirname(path) or '.'
      names = [os.path.join(os.path.dirname(path), name) for name in
               (os.listdir(folder) if os.path.isdir(folder) else []) if name.endswith('.py')]
      raise cli.UserError(f'--config={path}: no such config file.'
                          f'{cli.did_you_mean(path, names, "--config={}")} The configs are in '
                          'experiments/configs/.') from None
    raise cli.UserError(f'--config={path} could not be loaded: '
                        f'{str(error).strip().splitlines()[-1].strip()}') from error


@cli.command(PROG)
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}. Pass --helpfull to list '
                        'the flags.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  config = _config()
  from experiments import compile_cache  # JAX: only after the restart below.
  from experiments.training import distributed

  distributed.configure_xla()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  compile_cache.enable()  # A second run with the same config does not compile again.
  from experiments.training import train_lib  # After initialize: nothing may touch devices before.

  train_lib.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  # Before JAX is imported: glibc reads its tunables (huge pages for malloc, ~1.2x faster
  # XLA:CPU steps) only at process start, so this restarts the process once if needed.
  perf.reexec_with_cpu_env()
  app.run(main, flags_parser=parse_flags)
