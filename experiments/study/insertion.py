"""Attention inserted into a trained network (issue 36; protocol: docs/results/protocol.md,
addendum of 2026-12-04): pretrain without attention, then fine-tune in several arms.

Every run is one ``python -m experiments.training.train`` process (the project's one training
path). Per seed: the pretraining run (``<root>/pretrain_s<seed>``), then each arm, fine-tuned
``--config.init_from`` it (``<root>/<arm>_s<seed>``). A finished run is not run again; an
unfinished one resumes from its checkpoints. Each finished run writes its own result file
(``<out>/runs/<run>.json``: arm, seed, curve, commit, CPU, command), so two runners can share
an ``--out`` (e.g. one per seed subset); ``--report_only`` then writes ``summary.md``,
``summary.json`` and ``curves.png`` from the result files.

  python -m experiments.study.insertion --config experiments/configs/default.py \\
      --pretrain_epochs 10 --seeds 0-4 --workdir_root /work/runs/insertion_shapes \\
      --out docs/results/insertion_shapes --title "shapes, resnet_tiny"
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from experiments import cli
from experiments.study import provenance
from experiments.study import report as study_report
from experiments.study.variants import parse_seeds

# arm -> the trainer flags that make it (besides init_from and the fine-tuning schedule).
ARMS = {
    'continue': {'model.attention': 'none'},
    'cbam_official': {'model.attention': 'cbam', 'init_attention': 'official'},
    'cbam_identity': {'model.attention': 'cbam', 'init_attention': 'identity'},
    'se_identity': {'model.attention': 'se', 'init_attention': 'identity'},
}
BASELINE = 'continue'
CONTRASTS = (('cbam_official', 'continue'), ('cbam_identity', 'continue'),
             ('cbam_identity', 'cbam_official'), ('se_identity', 'continue'))

PROG = 'python -m experiments.study.insertion'


def define_flags(values: flags.FlagValues) -> None:
  def define(kind, name, default, help_text):
    getattr(flags, f'DEFINE_{kind}')(name, default, help_text, flag_values=values)

  define('string', 'config', 'experiments/configs/default.py', "The setting's config file.")
  define('integer', 'pretrain_epochs', 10, 'Epochs of the pretraining run (no attention).')
  define('integer', 'finetune_epochs', 5, 'Epochs of each fine-tuning arm.')
  define('float', 'finetune_lr', 0.01, "Peak learning rate of the fine-tuning (cosine, no "
         "warmup); the protocol: a tenth of the config's.")
  define('string', 'seeds', '0-4', 'Seeds: "0-4" or "0,2,4".')
  define('list', 'arms', list(ARMS), f'Arms, in run order per seed: {", ".join(ARMS)}.')
  define('string', 'workdir_root', None, "Where the runs' workdirs go (outside the repo).")
  define('string', 'out', None, 'Results folder (runs/*.json, summary.md, curves.png).')
  define('string', 'title', 'insertion study', 'Title of the results page.')
  define('bool', 'report_only', False, 'Only write the report from the result files.')


def _records(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _finished(workdir: str, epochs: int) -> bool:
  records = _records(workdir)
  return bool(records) and records[-1]['epoch'] == epochs and 'eval_top1' in records[-1]


def train_command(config: str, workdir: str, seed: int, epochs: int,
                  overrides: Mapping[str, Any]) -> list[str]:
  flags_ = {'seed': seed, 'num_epochs': epochs, 'progress_bar': False, 'tensorboard': False,
            **overrides}
  return [sys.executable, '-m', 'experiments.training.train', '--config', config,
          '--workdir', workdir] + [f'--config.{k}={v}' for k, v in flags_.items()]


def run(name: str, arm: str, seed: int, command: list[str], workdir: str, epochs: int,
        out: str) -> None:
  """Runs (or resumes) one training run unless finished; writes its result file."""
  result_path = os.path.join(out, 'runs', f'{name}.json')
  if os.path.exists(result_path) and _finished(workdir, epochs):
    with open(result_path) as f:
      result = json.load(f)
    if ARMS.get(arm, {}).get('init_attention') == 'identity' and 'identity_scales' not in result:
      _write(result_path, {**result, 'identity_scales': identity_scales(workdir)})
    return
  if not _finished(workdir, epochs):
    print(f'[{time.strftime("%H:%M:%S")}] {name}: {" ".join(command[1:])}', flush=True)
    start = time.time()
    log_path = workdir.rstrip('/') + '.log'
    with open(log_path, 'a') as log:
      returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode:
      raise cli.UserError(f'The run {name} failed (exit status {returncode}); its output is '
                          f'in {log_path}. Fix the cause and run this command again: finished '
                          'runs are kept, this one resumes from its checkpoints.')
    seconds = time.time() - start
  else:
    seconds = None  # Finished before this runner saw it (e.g. by the same command by hand).
  records = _records(workdir)
  result = {'run': name, 'arm': arm, 'seed': seed, 'epochs': epochs,
            'curve': [[r['epoch'], r['eval_top1']] for r in records if 'eval_top1' in r],
            'last_top1': records[-1]['eval_top1'], 'last_loss': records[-1]['eval_loss'],
            'seconds': seconds,
            'commit': provenance.git_commit() if seconds is not None else 'not recorded',
            'cpu': provenance.cpu_model() if seconds is not None else 'not recorded',
            'command': ' '.join(command[1:]), 'workdir': workdir}
  if ARMS.get(arm, {}).get('init_attention') == 'identity':
    result['identity_scales'] = identity_scales(workdir)
  _write(result_path, result)


def _write(path: str, result: Mapping[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=1)
  os.replace(path + '.tmp', path)


def identity_scales(workdir: str) -> dict[str, list[float]]:
  """Per inserted module of the run's last checkpoint: ``[mean, max]`` of
  ``|identity_scale|`` (0 at insertion; how far training moved it from the identity)."""
  import jax
  import numpy as np

  from experiments.training import checkpointing

  _, variables, _, _ = checkpointing.load_model(workdir, 'latest')
  scales = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]:
    names = [str(getattr(key, 'key', key)) for key in path]
    if names[-1] == 'identity_scale':
      values = np.abs(np.asarray(leaf, np.float64))
      scales['/'.join(names[:-1])] = [float(values.mean()), float(values.max())]
  return scales


def run_study(values: flags.FlagValues) -> None:
  root, out = values.workdir_root, values.out
  os.makedirs(root, exist_ok=True)  # Each run's log file sits beside its workdir.
  for seed in parse_seeds(values.seeds):
    base = os.path.join(root, f'pretrain_s{seed}')
    run(f'pretrain_s{seed}', 'pretrain', seed,
        train_command(values.config, base, seed, values.pretrain_epochs,
                      {'model.attention': 'none'}),
        base, values.pretrain_epochs, out)
    for arm in values.arms:
      workdir = os.path.join(root, f'{arm}_s{seed}')
      overrides = {**ARMS[arm], 'init_from': base, 'learning_rate': values.finetune_lr,
                   'warmup_epochs': 0.0, 'schedule': 'cosine'}
      run(f'{arm}_s{seed}', arm, seed,
          train_command(values.config, workdir, seed, values.finetune_epochs, overrides),
          workdir, values.finetune_epochs, out)


# --------------------------------------------------------------------------- report


def summarise(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per arm: top-1 at insertion (epoch 0), after epoch 1 and at the last epoch, and the
  drops against the pretrained network; paired contrasts at the last epoch."""
  by_run = {(r['arm'], r['seed']): r for r in results}
  pretrained = {seed: r['last_top1'] for (arm, seed), r in by_run.items() if arm == 'pretrain'}

  def at(result, epoch):
    return dict((int(e), t) for e, t in result['curve']).get(epoch)

  arms = []
  for arm in [a for a in ARMS if any(k[0] == a for k in by_run)]:
    runs = sorted((r for (a, _), r in by_run.items() if a == arm), key=lambda r: r['seed'])
    row: dict[str, Any] = {'arm': arm, 'seeds': [r['seed'] for r in runs]}
    for key, epoch in (('insertion', 0), ('epoch1', 1), ('last', None)):
      values = [r['last_top1'] if epoch is None else at(r, epoch) for r in runs]
      row[key] = values
      row[f'{key}_mean'] = statistics.fmean(values) if values else None
      row[f'{key}_sd'] = statistics.stdev(values) if len(values) > 1 else None
      drops = [v - pretrained[r['seed']] for v, r in zip(values, runs, strict=True)
               if r['seed'] in pretrained]
      row[f'{key}_vs_pretrained'] = study_report.paired_difference(drops, [0.0] * len(drops))
    scales = [values for r in runs for values in (r.get('identity_scales') or {}).values()]
    row['identity_scale_mean'] = (statistics.fmean(v[0] for v in scales) if scales else None)
    row['identity_scale_max'] = max((v[1] for v in scales), default=None)
    arms.append(row)
  contrasts = []
  for arm, baseline in CONTRASTS:
    seeds = sorted(s for (a, s) in by_run if a == arm and (baseline, s) in by_run)
    if not seeds:
      continue
    result = study_report.paired_difference([by_run[arm, s]['last_top1'] for s in seeds],
                                            [by_run[baseline, s]['last_top1'] for s in seeds])
    contrasts.append({'contrast': f'{arm} - {baseline}', 'seeds': seeds, **result,
                      'reading': study_report.verdict(result)})
  return {'pretrained': pretrained, 'arms': arms, 'contrasts': contrasts,
          'commits': sorted({(r['commit'] or 'unknown')[:12] for r in results}),
          'cpus': sorted({r['cpu'] or 'unknown' for r in results})}


def _pct(value: float | None, sign: bool = False) -> str:
  return '-' if value is None else f'{100 * value:{"+" if sign else ""}.2f}'


def _mean_sd(row: Mapping[str, Any], key: str) -> str:
  if row[f'{key}_mean'] is None:
    return '-'
  sd = row[f'{key}_sd']
  return _pct(row[f'{key}_mean']) + ('' if sd is None else f' ± {_pct(sd)}')


def _interval(result: Mapping[str, Any]) -> str:
  if result.get('low') is None:
    return _pct(result.get('mean'), sign=True)
  return (f'{_pct(result["mean"], sign=True)} [{_pct(result["low"], sign=True)}, '
          f'{_pct(result["high"], sign=True)}]')


def markdown(summary: Mapping[str, Any], title: str) -> str:
  pretrained = summary['pretrained']
  lines = [f'# {title}', '',
           'Held-out top-1 (%); protocol: docs/results/protocol.md (addendum of 2026-12-04). '
           f'CPU: {", ".join(summary["cpus"])}. Commits: {", ".join(summary["commits"])}.', '',
           f'Pretrained without attention (last epoch), {len(pretrained)} seed(s): '
           + (_pct(statistics.fmean(pretrained.values())) if pretrained else '-')
           + (f' ± {_pct(statistics.stdev(pretrained.values()))}' if len(pretrained) > 1
              else '') + '.', '',
           '| arm | seeds | at insertion | change at insertion [95% CI] | after epoch 1 | '
           'change after epoch 1 [95% CI] | last epoch | change vs pretrained [95% CI] |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for row in summary['arms']:
    lines.append(f'| {row["arm"]} | {len(row["seeds"])} | {_mean_sd(row, "insertion")} | '
                 f'{_interval(row["insertion_vs_pretrained"])} | {_mean_sd(row, "epoch1")} | '
                 f'{_interval(row["epoch1_vs_pretrained"])} | {_mean_sd(row, "last")} | '
                 f'{_interval(row["last_vs_pretrained"])} |')
  lines += ['', 'Paired differences at the last fine-tuning epoch (points):', '',
            '| contrast | seeds | mean [95% CI] | reading |', '|---|---:|---:|---|']
  for c in summary['contrasts']:
    lines.append(f'| {c["contrast"]} | {len(c["seeds"])} | {_interval(c)} | {c["reading"]} |')
  scaled = [row for row in summary['arms'] if row.get('identity_scale_mean') is not None]
  if scaled:
    lines += ['', 'How far the identity-initialised modules moved: mean (max) of '
              '`|identity_scale|` over all channels and places at the last epoch, over seeds '
              '(0 = the identity; the gate blend is `x + s * (attend(x) - x)`):', '']
    lines += [f'- {row["arm"]}: {row["identity_scale_mean"]:.3f} '
              f'({row["identity_scale_max"]:.3f})' for row in scaled]
  lines += ['', 'Per run (top-1 at insertion / after epoch 1 / last epoch):', '']
  for row in summary['arms']:
    per_seed = ', '.join(
        f's{s}: {_pct(a)} / {_pct(b)} / {_pct(c)}' for s, a, b, c in
        zip(row['seeds'], row['insertion'], row['epoch1'], row['last'], strict=True))
    lines.append(f'- {row["arm"]}: {per_seed}')
  return '\n'.join(lines) + '\n'


def write_report(out: str, title: str) -> dict[str, Any]:
  results = []
  for path in sorted(glob.glob(os.path.join(out, 'runs', '*.json'))):
    with open(path) as f:
      results.append(json.load(f))
  summary = summarise(results)
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(markdown(summary, title))
  rows = [{'variant': r['arm'], 'curve': r['curve']} for r in results if r['arm'] != 'pretrain']
  if rows:
    study_report.write_curves_png(rows, os.path.join(out, 'curves.png'),
                                  title=f'{title}: fine-tuning (epoch 0 = at insertion)')
  return summary


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  if values.out is None or (values.workdir_root is None and not values.report_only):
    raise cli.UserError('--out and --workdir_root are required (only --out with '
                        '--report_only).')
  unknown = sorted(set(values.arms) - set(ARMS))
  if unknown:
    raise cli.UserError(f'Unknown arm(s) {", ".join(unknown)}; use {", ".join(ARMS)}.')
  parse_seeds(values.seeds)
  if not values.report_only:
    run_study(values)
  print(markdown(write_report(values.out, values.title), values.title))


if __name__ == '__main__':
  main()
