r"""The README's attention comparison: ResNet-20 (CIFAR) with each attention module vs none.

Modes:

* ``table`` (default, minutes on a CPU): parameters, forward FLOPs per image (XLA's
  ``cost_analysis`` of the eval-mode forward compiled for the CPU; a multiply-add counts 2)
  and forward time per batch on the default backend (jit, eval mode, median over rounds;
  the variants are timed in interleaved rounds so that load drift on a shared machine hits
  them alike; compare the ratio column).
* ``train``: one ``python -m experiments.train`` run per variant with the same config, seed
  and budget, then a table of the best / last held-out top-1 read from each workdir's
  ``metrics.jsonl``. Runs that already finished are read, not rerun (restartable).

  python -m experiments.compare_attention                                  # table
  python -m experiments.compare_attention --attention none,se,cbam --batch_size 64
  python -m experiments.compare_attention --mode train --epochs 3 \
      --workdir_root /tmp/compare --attention none,se,eca,cbam

``bam@stages`` is BAM at the stage transitions (``stage_attention='bam'``, its paper's
placement); every other name is the module in every residual block (``attention=name``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

STAGE_BAM = 'bam@stages'
DEFAULT_MODEL = 'resnet20'
DEFAULT_CONFIG = 'experiments/configs/cifar10.py'


def variant_fields(variant: str) -> dict[str, Any]:
  """``create_model`` fields of a variant name ('none', a registry name or 'bam@stages')."""
  if variant == 'none':
    return {'attention': None}
  if variant == STAGE_BAM:
    return {'attention': None, 'stage_attention': 'bam'}
  return {'attention': variant}


def parse_variants(spec: str) -> list[str]:
  from cbam_jax import attention as registry  # Imported late: --help stays instant.

  if spec == 'all':
    return ['none', *registry.available(), STAGE_BAM]
  variants = [s.strip() for s in spec.split(',') if s.strip()]
  valid = ('none', *registry.available(), STAGE_BAM)
  for variant in variants:
    if variant not in valid:
      raise SystemExit(f'Unknown attention {variant!r}; use "all" or a comma-separated list '
                       f'of {", ".join(valid)}.')
  return variants


# --------------------------------------------------------------------------- table


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
    jax.block_until_ready(compiled(variables, x))  # Warm-up.
    forwards.append((compiled, variables))
    rows.append({'attention': variant, 'params': models.count_params(variables),
                 'flops_per_image': None if flops is None else flops / batch_size,
                 'times': []})
  for _ in range(rounds):  # Interleaved: every variant sees the same machine load.
    for row, (compiled, variables) in zip(rows, forwards, strict=True):
      start = time.perf_counter()
      for _ in range(calls_per_round):
        out = compiled(variables, x)
      jax.block_until_ready(out)
      row['times'].append((time.perf_counter() - start) / calls_per_round)
  for row in rows:
    row['seconds'] = statistics.median(row.pop('times'))
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


# --------------------------------------------------------------------------- train


def train_command(variant: str, workdir: str, *, config: str, epochs: int, seed: int,
                  extra: Sequence[str]) -> list[str]:
  """The ``experiments.train`` command line of one variant."""
  fields = variant_fields(variant)
  return [sys.executable, '-m', 'experiments.train', '--config', config, '--workdir', workdir,
          f'--config.num_epochs={epochs}', f'--config.seed={seed}',
          f'--config.model.attention={fields["attention"] or "none"}',
          f'--config.model.stage_attention={fields.get("stage_attention") or "none"}',
          '--config.progress_bar=False', '--config.tensorboard=False', *extra]


def read_result(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in records if r.get('eval_top1') is not None]
  if not evals:
    return None
  return {'epochs': max(r.get('epoch', 0) for r in records),
          'best_top1': max(r['eval_top1'] for r in evals),
          'last_top1': evals[-1]['eval_top1'],
          'last_loss': evals[-1].get('eval_loss')}


def run_training(variants: Sequence[str], *, root: str, config: str, epochs: int, seed: int,
                 extra: Sequence[str]) -> list[dict[str, Any]]:
  rows = []
  for variant in variants:
    workdir = os.path.join(root, variant.replace('@', '_at_'))
    result = read_result(workdir)
    if result is None or result['epochs'] < epochs:
      command = train_command(variant, workdir, config=config, epochs=epochs, seed=seed,
                              extra=extra)
      print('$', ' '.join(command), flush=True)
      start = time.perf_counter()
      subprocess.run(command, check=True)
      print(f'  {variant}: {time.perf_counter() - start:.0f} s', flush=True)
      result = read_result(workdir)
    rows.append({'attention': variant, **(result or {})})
  return rows


def format_train_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| attention | epochs | best top-1 | last top-1 | last eval loss |',
           '|---|---:|---:|---:|---:|']
  for r in rows:
    if 'best_top1' not in r:  # Skipped or failed.
      lines.append(f'| {r["attention"]} | - | - | - | - |')
      continue
    loss = 'n/a' if r['last_loss'] is None else f'{r["last_loss"]:.4f}'
    lines.append(f'| {r["attention"]} | {r["epochs"]} | {100 * r["best_top1"]:.2f}% | '
                 f'{100 * r["last_top1"]:.2f}% | {loss} |')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mode', choices=('table', 'train'), default='table')
  parser.add_argument('--attention', default='all',
                      help='"all" or a comma-separated list (none, registry names, '
                      f'{STAGE_BAM}).')
  parser.add_argument('--model', default=DEFAULT_MODEL, help='table mode: the model.')
  parser.add_argument('--batch_size', type=int, default=128, help='table mode.')
  parser.add_argument('--image_size', type=int, default=32, help='table mode.')
  parser.add_argument('--rounds', type=int, default=5, help='table mode: timing rounds.')
  parser.add_argument('--calls_per_round', type=int, default=3, help='table mode.')
  parser.add_argument('--json', default=None, help='also write the rows to this file.')
  parser.add_argument('--workdir_root', default='/tmp/compare_attention', help='train mode.')
  parser.add_argument('--config', default=DEFAULT_CONFIG, help='train mode.')
  parser.add_argument('--epochs', type=int, default=3, help='train mode.')
  parser.add_argument('--seed', type=int, default=0, help='train mode.')
  parser.add_argument('--train_flag', action='append', default=[],
                      help='train mode: extra flag for experiments.train, repeatable, e.g. '
                      '--train_flag=--config.global_batch_size=256.')
  args = parser.parse_args(argv)
  variants = parse_variants(args.attention)

  if args.mode == 'table':
    import jax
    rows = measure(variants, model_name=args.model, batch_size=args.batch_size,
                   image_size=args.image_size, rounds=args.rounds,
                   calls_per_round=args.calls_per_round)
    print(f'{args.model}, eval-mode forward, batch {args.batch_size} of '
          f'{args.image_size}x{args.image_size}x3, {jax.devices()[0].device_kind} '
          f'({jax.default_backend()}, {len(jax.devices())} device(s) visible, 1 used)')
    print(format_table(rows))
  else:
    rows = run_training(variants, root=args.workdir_root, config=args.config,
                        epochs=args.epochs, seed=args.seed, extra=args.train_flag)
    print(format_train_table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
