"""The study's runs: one ``experiments.training.train`` run per (variant, seed).

Runs go to ``ROOT/<variant>/seed<k>``, seed by seed in the order given. Finished runs are read
back from their ``metrics.jsonl`` (or from the committed ``runs.json`` when their workdir is
gone); unfinished ones are restarted with the same command, which resumes from their latest
checkpoint, so rerunning the study continues it. Every launch records the commit and the CPU
in ``<workdir>/study_run.json`` (:mod:`experiments.study.provenance`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments import cli
from experiments.study import provenance
from experiments.study.variants import Variant


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


def is_finished(workdir: str) -> bool:
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
              epochs: int, extra: Sequence[str],
              on_update: Callable[[list[dict[str, Any]]], None] | None = None,
              launch_runs: bool = True,
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
  commit, cpu = provenance.git_commit(), provenance.cpu_model()
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
    provenance.record_launch(workdir, launch)
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
  launches = provenance.launches(workdir)
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
