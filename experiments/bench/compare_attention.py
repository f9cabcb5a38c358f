r"""The README's attention table: ResNet-20 (CIFAR) with each attention module vs none.

Parameters, forward FLOPs per image (XLA's ``cost_analysis`` of the eval-mode forward
compiled for the CPU; a multiply-add counts 2) and forward time per batch on the default
backend (jit, eval mode, median over rounds; the variants are timed in interleaved rounds so
that load drift on a shared machine hits them alike; compare the ratio column). Minutes on a
CPU.

  python -m experiments.bench.compare_attention                                  # all
  python -m experiments.bench.compare_attention --attention none,se,cbam --batch_size 64

``bam@stages`` is BAM at the stage transitions (``stage_attention='bam'``, its paper's
placement); every other name is the module in every residual block (``attention=name``).
The multi-seed training study of these variants is ``python -m experiments.study.run``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from absl import flags

from experiments import cli
from experiments.bench import timing
from experiments.study.variants import STAGE_BAM, parse_variants, variant_fields

PROG = 'python -m experiments.bench.compare_attention'

DEFAULT_MODEL = 'resnet20'


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # Older JAX: one dict per computation.
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def measure(variants: Sequence[str], *, model_name: str, batch_size: int, image_size: int,
            rounds: int, calls_per_round: int) -> list[dict[str, Any]]:
  """Params, FLOPs per image and forward seconds per batch of every variant."""
  import jax

  from cbam_jax import models

  x = jax.random.normal(jax.random.key(0), (batch_size, image_size, image_size, 3))
  rows, forwards = [], []
  for variant in variants:
    model = models.create_model(model_name, **variant_fields(variant))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    compiled = forward.lower(variables, x).compile()
    # FLOPs from a CPU compile whatever the backend: on GPU the convolutions become cuDNN
    # custom calls that XLA's cost analysis does not count.
    cpu = jax.devices('cpu')[0]
    flops = _flops(forward.lower(jax.device_put(variables, cpu),
                                 jax.device_put(x, cpu)).compile())
    forwards.append(lambda compiled=compiled, variables=variables: jax.block_until_ready(
        compiled(variables, x)))
    rows.append({'attention': variant, 'params': models.count_params(variables),
                 'flops_per_image': None if flops is None else flops / batch_size})
  # Interleaved rounds: every variant sees the same machine load.
  seconds = timing.median_ms(timing.interleaved_times(
      dict(enumerate(forwards)), rounds, calls_per_round=calls_per_round))
  for index, row in enumerate(rows):
    row['seconds'] = seconds[index] / 1e3
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  base = next((r for r in rows if r['attention'] == 'none'), rows[0])
  lines = ['| attention | params | Δ params | MFLOPs / image | Δ FLOPs | forward ms / batch | '
           'time vs none |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    if r['flops_per_image'] is None or base['flops_per_image'] is None:
      flops, dflops = 'n/a', 'n/a'
    else:
      flops = f'{r["flops_per_image"] / 1e6:.2f}'
      dflops = f'{100 * (r["flops_per_image"] / base["flops_per_image"] - 1):+.2f}%'
    lines.append(
        f'| {r["attention"]} | {r["params"]:,} | {r["params"] - base["params"]:+,} | {flops} | '
        f'{dflops} | {1e3 * r["seconds"]:.2f} | {r["seconds"] / base["seconds"]:.2f}x |')
  return '\n'.join(lines)


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('attention', 'all', '"all" or a comma-separated list of none, registry '
                      f'names and {STAGE_BAM}.', flag_values=values)
  flags.DEFINE_string('model', DEFAULT_MODEL, 'The model.', flag_values=values)
  flags.DEFINE_integer('batch_size', 128, 'Images per forward.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_integer('image_size', 32, 'Image height and width.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_integer('rounds', 5, 'Timing rounds.', lower_bound=1, flag_values=values)
  flags.DEFINE_integer('calls_per_round', 3, 'Timed calls per variant and round.',
                       lower_bound=1, flag_values=values)
  flags.DEFINE_string('json', None, 'Also write the rows to this file.', flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  import jax

  rows = measure(parse_variants(values.attention), model_name=values.model,
                 batch_size=values.batch_size, image_size=values.image_size,
                 rounds=values.rounds, calls_per_round=values.calls_per_round)
  print(f'{values.model}, eval-mode forward, batch {values.batch_size} of '
        f'{values.image_size}x{values.image_size}x3, {jax.devices()[0].device_kind} '
        f'({jax.default_backend()}, {len(jax.devices())} device(s) visible, 1 used)')
  print(format_table(rows))
  if values.json:
    with open(values.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
