r"""The README's attention comparison: ResNet-20 (CIFAR) with each attention module vs none.

Modes:

* ``table`` (default, minutes on a CPU): parameters, forward FLOPs per image (XLA's
  ``cost_analysis`` of the eval-mode forward compiled for the CPU; a multiply-add counts 2)
  and forward time per batch on the default backend (jit, eval mode, median over rounds;
  the variants are timed in interleaved rounds so that load drift on a shared machine hits
  them alike; compare the ratio column).
* ``train``: the multi-seed study of ``docs/results/protocol.md``. One
  ``python -m experiments.training.train`` run per (variant, seed), with the same config and budget,
  in ``ROOT/<variant>/seed<k>``, seed by seed in the order given. Finished runs are read back
  from their ``metrics.jsonl``; unfinished ones are restarted with the same command, which
  resumes from their latest checkpoint, so rerunning the command continues the study. Every
  launch records the commit and the CPU in ``<workdir>/study_run.json``. With ``--out``, the
  per-run results (``runs.json``/``runs.csv``), the summary (``summary.md``/``summary.json``:
  mean ± sd over seeds of the last-epoch held-out top-1, paired differences to ``--baseline``
  with 95% t-intervals) and ``curves.png`` are rewritten after every run.
* ``localization``: ``experiments.inspection.localization``'s scores (attention and Grad-CAM mass in
  box, pointing game) of every finished run's last checkpoint, mean ± sd over seeds.

A variant is ``ATTENTION`` or ``NAME=ATTENTION:FIELD=VALUE[:FIELD=VALUE...]``; FIELD is a
``config.model`` field or ``attention_fields.F`` (a field of the attention module).

  python -m experiments.bench.compare_attention                                  # table
  python -m experiments.bench.compare_attention --attention none,se,cbam --batch_size 64
  python -m experiments.bench.compare_attention --mode train --epochs 3 \
      --workdir_root /tmp/compare --attention none,se,eca,cbam
  python -m experiments.bench.compare_attention --mode train \
      --config experiments/configs/default.py --epochs 10 --seeds 0-4 \
      --workdir_root /work/runs/shapes_study --out docs/results/shapes \
      --attention none,cbam,cbam_gate1=cbam:zero_init_spatial_gate=False,se,\
cbam_r4=cbam:attention_fields.reduction_ratio=4 --contrast cbam_gate1:cbam --contrast cbam_r4:cbam

``bam@stages`` is BAM at the stage transitions (``stage_attention='bam'``, its paper's
placement); every other name is the module in every residual block (``attention=name``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from experiments import cli
from experiments.bench import timing

PROG = 'python -m experiments.bench.compare_attention'

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
      raise cli.UserError(f'Unknown attention {variant!r}; use "all" or a comma-separated list '
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


# --------------------------------------------------------------------------- train


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named study variant: an attention name plus ``config.model`` field overrides.

  ``overrides`` maps ``config.model`` fields (``zero_init_spatial_gate``) and
  ``attention_fields.FIELD`` (fields of the attention module) to values, as written.
  """

  name: str
  attention: str
  overrides: tuple[tuple[str, str], ...] = ()

  @property
  def fields(self) -> str:
    """The overrides as written, ``FIELD=VALUE:...`` ('' for none)."""
    return ':'.join(f'{k}={v}' for k, v in self.overrides)

  def train_flags(self) -> list[str]:
    """``experiments.training.train`` flags that select this variant's model."""
    fields = variant_fields(self.attention)
    flags = [f'--config.model.attention={fields["attention"] or "none"}',
             f'--config.model.stage_attention={fields.get("stage_attention") or "none"}']
    attention_fields = [f'{k.split(".", 1)[1]}={v}' for k, v in self.overrides
                        if k.startswith('attention_fields.')]
    flags += [f'--config.model.{k}={v}' for k, v in self.overrides
              if not k.startswith('attention_fields.')]
    if attention_fields:
      flags.append(f'--config.model.attention_fields={",".join(attention_fields)}')
    return flags


def parse_variant(spec: str) -> Variant:
  """``ATTENTION`` or ``NAME=ATTENTION:FIELD=VALUE[:FIELD=VALUE...]`` -> a :class:`Variant`.

  E.g. ``cbam``, ``cbam_gate1=cbam:zero_init_spatial_gate=False``,
  ``cbam_r4=cbam:attention_fields.reduction_ratio=4``.
  """
  head, *overrides = spec.strip().split(':')
  name, sep, attention = head.partition('=')
  if not sep:
    name, attention = head, head
  name, attention = name.strip(), attention.strip()
  if not name.replace('_', '').replace('@', '').replace('-', '').isalnum():
    raise cli.UserError(f'Variant {spec!r}: the name {name!r} must be letters, digits, _ or -.')
  pairs = []
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise cli.UserError(f'Variant {spec!r}: {item!r} is not FIELD=VALUE; write e.g. '
                          'cbam_r4=cbam:attention_fields.reduction_ratio=4.')
    pairs.append((key.strip(), value.strip()))
  return Variant(name, attention, tuple(pairs))


def parse_study_variants(spec: str) -> list[Variant]:
  """A comma-separated list of :func:`parse_variant` specs, or 'all' (plain attention names)."""
  if spec == 'all':
    return [Variant(v, v) for v in parse_variants('all')]
  variants = [parse_variant(s) for s in spec.split(',') if s.strip()]
  parse_variants(','.join(v.attention for v in variants))  # Unknown attention names fail here.
  names = [v.name for v in variants]
  if len(set(names)) != len(names):
    raise cli.UserError(f'Variant names must be unique; got {", ".join(names)}.')
  return variants


def parse_seeds(spec: str) -> list[int]:
  """``'0,1,2'`` or ``'0-4'`` (inclusive) or a mix -> a list of seeds, in order."""
  seeds = []
  for part in filter(None, (p.strip() for p in spec.split(','))):
    first, sep, last = part.partition('-')
    try:
      seeds += list(range(int(first), int(last) + 1)) if sep else [int(first)]
    except ValueError:
      raise cli.UserError(f'--seeds {spec!r}: use e.g. 0-4 or 0,1,2.') from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise cli.UserError(f'--seeds {spec!r}: give at least one seed, each once.')
  return seeds


def train_command(variant: Variant, workdir: str, *, config: str, epochs: int, seed: int,
                  extra: Sequence[str]) -> list[str]:
  """The ``experiments.training.train`` command line of one (variant, seed) run."""
  return [sys.executable, '-m', 'experiments.training.train', '--config', config,
          '--workdir', workdir,
          f'--config.num_epochs={epochs}', f'--config.seed={seed}', *variant.train_flags(),
          '--config.progress_bar=False', '--config.tensorboard=False', *extra]


def read_result(workdir: str) -> dict[str, Any] | None:
  """Last / best held-out top-1 and the per-epoch curve from ``<workdir>/metrics.jsonl``."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  curve = {}  # epoch -> held-out top-1 (the last record of an epoch wins)
  for record in records:
    if record.get('eval_top1') is not None:
      curve[int(record.get('epoch', 0))] = record
  if not curve:
    return None
  last = curve[max(curve)]
  return {'epochs': max(int(r.get('epoch', 0)) for r in records),
          'best_top1': max(r['eval_top1'] for r in curve.values()),
          'last_top1': last['eval_top1'], 'last_loss': last.get('eval_loss'),
          'curve': [[e, curve[e]['eval_top1']] for e in sorted(curve)]}


def git_commit() -> str | None:
  """``git rev-parse HEAD`` of this checkout, '-dirty' if tracked code files changed.

  Only ``cbam_jax/``, ``experiments/`` and ``pyproject.toml`` count: the study itself rewrites
  its results under ``docs/``.
  """
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--',
                            'cbam_jax', 'experiments', 'pyproject.toml'], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ('-dirty' if dirty else '')


def cpu_model() -> str | None:
  """``lscpu``'s 'Model name' (or /proc/cpuinfo's 'model name')."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


PROVENANCE = 'study_run.json'  # In each workdir: one entry per launch of the run.


def _launches(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, PROVENANCE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def _check_budget(workdir: str, epochs: int) -> None:
  """A workdir trained for another num_epochs has another schedule: never resume it."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f).get('config', {}).get('num_epochs')
  if saved is not None and int(saved) != epochs:
    raise cli.UserError(f'{workdir} holds a run of num_epochs={saved}, not {epochs}: its learning-'
                        'rate schedule differs. Use another --workdir_root for this budget.')


def _is_finished(workdir: str) -> bool:
  """Whether the run in ``workdir`` reached the num_epochs of its own config.json."""
  result, path = read_result(workdir), os.path.join(workdir, 'config.json')
  if result is None or not os.path.exists(path):
    return False
  with open(path) as f:
    return result['epochs'] >= int(json.load(f)['config']['num_epochs'])


def run_workdir(root: str, variant: Variant, seed: int) -> str:
  return os.path.join(root, variant.name.replace('@', '_at_'), f'seed{seed}')


def _run_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
  """What makes two records the same run: variant, seed, budget and the training flags.

  The interpreter, the module path of the trainer (``-m ...``) and the workdir may differ
  between sessions; every other argument must be equal.
  """
  command = list(row['command'][1:])
  if command[:1] == ['-m']:
    del command[:2]
  if '--workdir' in command:
    i = command.index('--workdir')
    del command[i:i + 2]
  return (row['variant'], row['seed'], row['target_epochs'], tuple(command))


def read_archive(out: str | None) -> list[dict[str, Any]]:
  """The finished rows of an earlier ``<out>/runs.json`` (committed results), or []."""
  path = os.path.join(out, 'runs.json') if out else None
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in json.load(f) if r.get('status') == 'finished']


def run_study(variants: Sequence[Variant], seeds: Sequence[int], *, root: str, config: str,
              epochs: int, extra: Sequence[str], on_update=None, launch_runs: bool = True,
              archive: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
  """Every (variant, seed) run, seed by seed in the order given; finished runs are read back.

  A finished run is read back from its workdir or, when the workdir is gone (a study that
  spans sessions keeps only its committed ``runs.json``), from the ``archive`` row of the same
  variant, seed, budget and training flags. An unfinished run is (re)started with the same
  command, which resumes from its latest checkpoint (unless ``launch_runs`` is False: then it
  stays 'pending'). A run that fails is recorded as 'failed' and the study goes on. Calls
  ``on_update(rows)`` after each run with every row so far (planned ones as 'pending').
  """
  plan = [(variant, seed) for seed in seeds for variant in variants]
  rows = [_row(v, s, run_workdir(root, v, s), config, epochs, extra) for v, s in plan]
  archived = {_run_key(r): r for r in archive}
  for i, row in enumerate(rows):
    if row['status'] != 'finished' and _run_key(row) in archived:
      rows[i] = {**archived[_run_key(row)], 'command': row['command'],
                 'workdir': row['workdir'], 'source': 'archive'}
  commit, cpu = git_commit(), cpu_model()
  for row, (variant, seed) in zip(rows, plan, strict=True):
    if row['status'] == 'finished' or not launch_runs:
      continue
    workdir = row['workdir']
    _check_budget(workdir, epochs)
    os.makedirs(workdir, exist_ok=True)
    print('$', ' '.join(row['command']), flush=True)
    launch = {'commit': commit, 'cpu': cpu, 'started': time.time(), 'command': row['command']}
    start = time.perf_counter()
    returncode = subprocess.run(row['command'], check=False).returncode
    launch.update(seconds=time.perf_counter() - start, returncode=returncode)
    launches = [*_launches(workdir), launch]
    with open(os.path.join(workdir, PROVENANCE), 'w') as f:
      json.dump(launches, f, indent=1)
    print(f'  {variant.name} seed {seed}: {launch["seconds"]:.0f} s, exit {returncode}',
          flush=True)
    row.update(_row(variant, seed, workdir, config, epochs, extra))
    if returncode and row['status'] != 'finished':
      row['status'] = 'failed'
    if on_update is not None:
      on_update(rows)
  if on_update is not None:
    on_update(rows)
  return rows


def _row(variant: Variant, seed: int, workdir: str, config: str, epochs: int,
         extra: Sequence[str]) -> dict[str, Any]:
  result = read_result(workdir) or {}
  launches = _launches(workdir)
  finished = bool(result) and result['epochs'] >= epochs
  return {'variant': variant.name, 'attention': variant.attention, 'fields': variant.fields,
          'seed': seed, 'status': 'finished' if finished else 'pending',
          'target_epochs': epochs, **result,
          'seconds': sum(launch.get('seconds', 0.0) for launch in launches) or None,
          # The commit and CPU of the launch that finished the run (all launches in the
          # workdir's study_run.json).
          'commit': launches[-1]['commit'] if launches else None,
          'cpu': launches[-1]['cpu'] if launches else None,
          'workdir': workdir,
          'command': train_command(variant, workdir, config=config, epochs=epochs, seed=seed,
                                   extra=extra)}


def write_outputs(rows: Sequence[dict[str, Any]], out: str, *, title: str, baseline: str,
                  contrasts: Sequence[tuple[str, str]]) -> str:
  """runs.json / runs.csv, summary.json / summary.md and curves.png under ``out``."""
  from experiments.bench import study_report

  study_report.write_runs(rows, out)
  summary = study_report.summarise(rows, baseline=baseline, contrasts=contrasts)
  table = study_report.markdown_summary(summary)
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  cpus = sorted({r['cpu'] for r in rows if r.get('cpu')})
  commits = sorted({r['commit'][:12] + ('-dirty' if r['commit'].endswith('-dirty') else '')
                    for r in rows if r.get('commit')})
  finished = sum(r['status'] == 'finished' for r in rows)
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(f'# {title}\n\n{finished}/{len(rows)} runs finished. Metric: held-out top-1 at '
            f'the last epoch. CPU: {", ".join(cpus) or "unknown"}. Commits: '
            f'{", ".join(commits) or "unknown"}.\n\n{table}\n')
  if any(r.get('curve') for r in rows):
    study_report.write_curves_png(rows, os.path.join(out, 'curves.png'), title=title)
  return table


def format_train_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| variant | seed | epochs | best top-1 | last top-1 | last eval loss |',
           '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    if 'best_top1' not in r:  # Pending or failed.
      lines.append(f'| {r["variant"]} | {r["seed"]} | - | - | - | - |')
      continue
    loss = 'n/a' if r['last_loss'] is None else f'{r["last_loss"]:.4f}'
    lines.append(f'| {r["variant"]} | {r["seed"]} | {r["epochs"]} | {100 * r["best_top1"]:.2f}% '
                 f'| {100 * r["last_top1"]:.2f}% | {loss} |')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- localization


def localize_study(variants: Sequence[Variant], seeds: Sequence[int], *, root: str,
                   tolerances: Sequence[float] = (0.0, 2.0)) -> dict[str, Any]:
  """``experiments.inspection.localization`` scores of every finished (variant, seed) checkpoint."""
  from experiments.inspection import localization, visualize

  results, reference = [], None
  for seed in seeds:
    for variant in variants:
      workdir = run_workdir(root, variant, seed)
      if not _is_finished(workdir):  # A run in progress has checkpoints of earlier epochs.
        print(f'  skipped {variant.name} seed {seed}: not finished', flush=True)
        continue
      try:
        run = visualize.load_run(workdir, 'latest')
      except FileNotFoundError as error:
        print(f'  skipped {variant.name} seed {seed}: {error}', flush=True)
        continue
      images = localization._eval_split(run, None)
      result = localization.score_run(run, images, tolerances)
      result.update(variant=variant.name, seed=seed, workdir=workdir)
      results.append(result)
      reference = reference or localization.baselines(images, tolerances)
      print(f'  {variant.name} seed {seed}: top-1 {result["top1"]:.4f}', flush=True)
  return {'runs': results, 'baselines': reference or {}}


# --------------------------------------------------------------------------- main


def _contrast(spec: str) -> tuple[str, str]:
  """``'VARIANT:REFERENCE'`` as ``(variant, reference)``.

  Raises:
    flags.ValidationError: no colon or an empty side.
  """
  variant, sep, reference = spec.partition(':')
  if not sep or not variant or not reference:
    raise flags.ValidationError(f'--contrast {spec!r}: write VARIANT:REFERENCE.')
  return variant, reference


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_enum('mode', 'table', ('table', 'train', 'localization'), 'What to run (see '
                    'Modes above).', flag_values=values)
  flags.DEFINE_string('attention', 'all', '"all" or a comma-separated list of variants: '
                      f'ATTENTION (none, registry names, {STAGE_BAM}) or, in train/'
                      'localization mode, NAME=ATTENTION:FIELD=VALUE[:...].',
                      flag_values=values)
  flags.DEFINE_string('model', DEFAULT_MODEL, 'table mode: the model.', flag_values=values)
  flags.DEFINE_integer('batch_size', 128, 'table mode.', lower_bound=1, flag_values=values)
  flags.DEFINE_integer('image_size', 32, 'table mode.', lower_bound=1, flag_values=values)
  flags.DEFINE_integer('rounds', 5, 'table mode: timing rounds.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_integer('calls_per_round', 3, 'table mode.', lower_bound=1, flag_values=values)
  flags.DEFINE_string('json', None, 'Also write the rows to this file.', flag_values=values)
  flags.DEFINE_string('workdir_root', '/tmp/compare_attention', 'train/localization mode: '
                      'runs go to ROOT/<variant>/seed<k>.', flag_values=values)
  flags.DEFINE_string('config', DEFAULT_CONFIG, 'train mode.', flag_values=values)
  flags.DEFINE_integer('epochs', 3, 'train mode.', lower_bound=1, flag_values=values)
  flags.DEFINE_string('seeds', '0', 'train/localization mode: e.g. 0-4 or 0,1,2.',
                      flag_values=values)
  flags.DEFINE_multi_string('train_flag', [], 'train mode: an extra flag for '
                            'experiments.training.train, e.g. '
                            '--train_flag=--config.global_batch_size=256.', flag_values=values)
  flags.DEFINE_string('out', None, 'train/localization mode: write runs.json/.csv, '
                      'summary.json/.md, curves.png (or localization.json/.md) here, updated '
                      'after every run.', flag_values=values)
  flags.DEFINE_string('title', None, 'train mode: summary and plot title.', flag_values=values)
  flags.DEFINE_boolean('report_only', False, 'train mode: read the runs back and write --out, '
                       'launch nothing.', flag_values=values)
  flags.DEFINE_string('baseline', 'none', 'train mode: the variant the others are paired with.',
                      flag_values=values)
  flags.DEFINE_multi_string('contrast', [], 'train mode: an extra paired contrast '
                            'VARIANT:REFERENCE, e.g. --contrast cbam_r4:cbam.',
                            flag_values=values)
  flags.register_validator('contrast', lambda specs: all(_contrast(s) for s in specs),
                           flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  contrasts = [_contrast(spec) for spec in values.contrast]

  if values.mode == 'table':
    import jax
    variants = parse_variants(values.attention)
    rows = measure(variants, model_name=values.model, batch_size=values.batch_size,
                   image_size=values.image_size, rounds=values.rounds,
                   calls_per_round=values.calls_per_round)
    print(f'{values.model}, eval-mode forward, batch {values.batch_size} of '
          f'{values.image_size}x{values.image_size}x3, {jax.devices()[0].device_kind} '
          f'({jax.default_backend()}, {len(jax.devices())} device(s) visible, 1 used)')
    print(format_table(rows))
    output: Any = rows
  elif values.mode == 'train':
    variants, seeds = parse_study_variants(values.attention), parse_seeds(values.seeds)
    title = values.title or f'{os.path.basename(values.config)}, {values.epochs} epochs'

    def update(rows):
      if values.out:
        write_outputs(rows, values.out, title=title, baseline=values.baseline,
                      contrasts=contrasts)

    rows = run_study(variants, seeds, root=values.workdir_root, config=values.config,
                     epochs=values.epochs, extra=values.train_flag, on_update=update,
                     launch_runs=not values.report_only, archive=read_archive(values.out))
    print(format_train_table(rows))
    from experiments.bench import study_report
    print(study_report.markdown_summary(study_report.summarise(
        rows, baseline=values.baseline, contrasts=contrasts)))
    output = rows
    failed = [f'{r["variant"]}/seed{r["seed"]}' for r in rows if r['status'] == 'failed']
  else:
    from experiments.bench import study_report
    variants, seeds = parse_study_variants(values.attention), parse_seeds(values.seeds)
    output = localize_study(variants, seeds, root=values.workdir_root)
    output['summary'] = study_report.summarise_localization(output['runs'])
    table = study_report.markdown_localization(output['summary'], output['baselines'])
    print(table)
    if values.out:
      os.makedirs(values.out, exist_ok=True)
      with open(os.path.join(values.out, 'localization.json'), 'w') as f:
        json.dump(output, f, indent=1)
      with open(os.path.join(values.out, 'localization.md'), 'w') as f:
        f.write(f'# Localisation, mean ± sd over seeds {values.seeds}\n\n{table}\n')
  if values.json:
    with open(values.json, 'w') as f:
      json.dump(output, f, indent=1)
  if values.mode == 'train' and failed:
    sys.exit(f'Failed runs (rerun the same command to retry): {", ".join(failed)}')


if __name__ == '__main__':
  main()
