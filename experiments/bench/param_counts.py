"""Prints the model table of docs/models.md: parameter counts of every model x attention.

Counts come from ``jax.eval_shape(model.init, ...)``: shapes only, nothing is computed, so
the whole table takes seconds on a CPU. Only the ``params`` collection is counted
(BatchNorm statistics are not parameters). ImageNet models: 1000 classes, 224x224 input;
CIFAR models: 10 classes, 32x32 input.

Usage::

  python -m experiments.bench.param_counts                       # attention: none, se, cbam
  python -m experiments.bench.param_counts --attention all       # every registered attention
  python -m experiments.bench.param_counts --models resnet50 --attention none,cbam
  python -m experiments.bench.param_counts --paper    # the CBAM paper's Tables 4, 5 beside ours

``--paper`` prints the rows of the CBAM paper's Table 4 (Woo et al., ECCV 2018) that the
registry has, plain, SE and CBAM: the paper's parameters and GFLOPs beside ours, our
GFLOPs being :func:`cbam_jax.models.macs` (multiply-accumulates, the paper's convention)
of one 224x224 image, from the traced forward (nothing is compiled). A second table does the
same for the MobileNet rows of the paper's Table 5 (``PAPER_TABLE5``), '-' where the paper's
figure is not known here. The last column says whether the row's paper figures were checked
against a quote of the paper (``PAPER_ROWS_CHECKED``).
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

# The CBAM paper's Table 4 (Woo et al., ECCV 2018, arXiv:1807.06521): model -> attention ->
# (parameters in millions, GFLOPs), ImageNet, 224x224.
PAPER_TABLE4: dict[str, dict[str | None, tuple[float, float]]] = {
    'resnet18': {None: (11.69, 1.814), 'se': (11.78, 1.814), 'cbam': (11.78, 1.815)},
    'resnet34': {None: (21.80, 3.664), 'se': (21.96, 3.664), 'cbam': (21.96, 3.665)},
    'resnet50': {None: (25.56, 3.858), 'se': (28.09, 3.860), 'cbam': (28.09, 3.864)},
    'resnet101': {None: (44.55, 7.570), 'se': (49.33, 7.575), 'cbam': (49.33, 7.581)},
    'wide_resnet18_1_5': {None: (25.88, 3.866), 'se': (26.07, 3.867), 'cbam': (26.08, 3.868)},
    'wide_resnet18_2': {None: (45.62, 6.696), 'se': (45.97, 6.696), 'cbam': (45.97, 6.697)},
    'resnext50_32x4d': {None: (25.03, 3.768), 'se': (27.56, 3.771), 'cbam': (27.56, 3.774)},
    'resnext101_32x4d': {None: (44.18, 7.508), 'se': (48.96, 7.512), 'cbam': (48.96, 7.519)},
}

# The CBAM paper's Table 5 (MobileNet): model -> attention -> (parameters in millions or None,
# GFLOPs or None), ImageNet, 224x224. MobileNetV2 is not in the paper.
PAPER_TABLE5: dict[str, dict[str | None, tuple[float | None, float | None]]] = {
    'mobilenetv1_070': {None: (2.30, None), 'se': (2.71, None), 'cbam': (2.71, None)},
    'mobilenetv1_100': {None: (4.23, 0.569), 'se': (5.07, 0.570), 'cbam': (5.07, 0.576)},
    'mobilenet_v2': {None: (None, None), 'se': (None, None), 'cbam': (None, None)},
}

# The rows of the two tables above whose parameters and GFLOPs were checked against a quote
# of the paper's tables (no copy of the paper itself was at hand): the Paperspace blog's
# "Attention Mechanisms in Computer Vision: CBAM" (D. Misra), which reprints the ResNet-101,
# WideResNet18 (widen=2.0), ResNeXt50 (32x4d) and MobileNet rows of Tables 4 and 5 and the
# plain and CBAM ResNet-50 of Tables 1 and 2 (3.86, i.e. 3.858 to two decimals, and 3.864).
# Every quoted digit agrees with the tables above. The other rows are unverified.
PAPER_ROWS_CHECKED: frozenset[tuple[str, str | None]] = frozenset(
    [(name, attention)
     for name in ('resnet101', 'wide_resnet18_2', 'resnext50_32x4d', 'mobilenetv1_100')
     for attention in (None, 'se', 'cbam')] + [('resnet50', None), ('resnet50', 'cbam')])


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


def paper_table(
    paper: dict[str, dict[str | None, tuple[float | None, float | None]]] = PAPER_TABLE4,
) -> str:
  """A Markdown table of ``paper``'s rows (default :data:`PAPER_TABLE4`) beside ours."""
  lines = ['| model | attention | params | paper | GMACs | paper GFLOPs | paper checked |',
           '|---|---|---:|---:|---:|---:|---|']
  for name, rows in paper.items():
    for attention, (paper_params, paper_gflops) in rows.items():
      model = models.create_model(name, attention=attention)
      count = param_count(name, attention)
      gmacs = models.macs(model, (1, 224, 224, 3)) / 1e9
      paper_params_text = '-' if paper_params is None else f'{paper_params:.2f}M'
      paper_gflops_text = '-' if paper_gflops is None else f'{paper_gflops:.3f}'
      checked = 'yes' if (name, attention) in PAPER_ROWS_CHECKED else 'no'
      lines.append(f'| {name} | {attention or "none"} | {count:,} ({count / 1e6:.2f}M) | '
                   f'{paper_params_text} | {gmacs:.3f} | {paper_gflops_text} | {checked} |')
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
  flags.DEFINE_bool('paper', False,
                    "Print the CBAM paper's Tables 4 and 5 (params, GFLOPs) beside ours instead.",
                    flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  if values.paper:
    print(paper_table(PAPER_TABLE4))
    print()
    print(paper_table(PAPER_TABLE5))
    return
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
