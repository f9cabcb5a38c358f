"""Prints the model table of docs/models.md: parameter counts of every model x attention.

Counts come from ``jax.eval_shape(model.init, ...)``: shapes only, nothing is computed, so
the whole table takes seconds on a CPU. Only the ``params`` collection is counted
(BatchNorm statistics are not parameters). ImageNet models: 1000 classes, 224x224 input;
CIFAR models: 10 classes, 32x32 input.

Usage::

  python -m experiments.bench.param_counts                       # attention: none, se, cbam
  python -m experiments.bench.param_counts --attention all       # every registered attention
  python -m experiments.bench.param_counts --models resnet50 --attention none,cbam
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import flags

from cbam_jax import attention as attention_registry
from cbam_jax import models
from experiments import cli

PROG = 'python -m experiments.bench.param_counts'

def input_size_and_classes(name: str) -> tuple[int, int]:
  # The registry's ImageNet models default to 1000 classes, its CIFAR ones to 10.
  return (224, 1000) if models.create_model(name).num_classes == 1000 else (32, 10)


def param_count(name: str, attention: str | None) -> int:
  """Parameters of ``create_model(name, attention=attention)`` at its default resolution."""
  size, num_classes = input_size_and_classes(name)
  model = models.create_model(name, attention=attention, num_classes=num_classes)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return models.count_params(variables)


def table(model_names: Sequence[str], attentions: Sequence[str | None]) -> str:
  """A Markdown table with one row per (model, attention)."""
  lines = ['| model | input | classes | attention | params | vs. none |',
           '|---|---|---:|---|---:|---:|']
  for name in model_names:
    size, num_classes = input_size_and_classes(name)
    baseline = param_count(name, None)
    for attention in attentions:
      count = baseline if attention is None else param_count(name, attention)
      lines.append(f'| {name} | {size}x{size} | {num_classes} | {attention or "none"} | '
                   f'{count:,} ({count / 1e6:.2f}M) | {count - baseline:+,} |')
  return '\n'.join(lines)


def parse_attentions(spec: str) -> list[str | None]:
  if spec == 'all':
    return [None, *attention_registry.available()]
  names = [None if s.strip().lower() == 'none' else s.strip() for s in spec.split(',')]
  for attention in names:
    if attention is not None:
      attention_registry.resolve(attention)  # A clear error listing valid names.
  return names


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_list('models', list(models.available_models()),
                    'Comma-separated names from cbam_jax.models.available_models().',
                    flag_values=values)
  flags.DEFINE_string('attention', 'none,se,cbam',
                      "Comma-separated attention names ('none' for plain), or 'all'.",
                      flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  for name in values.models:
    if name not in models.available_models():
      raise cli.UserError(
          f'unknown model {name!r} in --models.'
          f'{cli.did_you_mean(name, models.available_models(), "{!r}")} Valid: '
          f'{", ".join(models.available_models())}.')
  attentions = parse_attentions(values.attention)
  print(table(values.models, attentions))


if __name__ == '__main__':
  main()
