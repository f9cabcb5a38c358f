"""Statistics, tables and plots of the multi-seed attention study (``experiments.study.run``).

The protocol is ``docs/results/protocol.md``: per variant, the mean and sample standard
deviation over seeds of the held-out top-1 at the last epoch; per variant and seed, the paired
difference to the baseline with a 95% t-interval.

  rows = [{'variant': 'cbam', 'seed': 0, 'last_top1': 0.95, 'curve': [[1, 0.6], ...]}, ...]
  summary = summarise(rows, baseline='none', contrasts=[('cbam_r4', 'cbam')])
  markdown_summary(summary); write_curves_png(rows, 'curves.png', title='shapes')
  write_outputs(rows, 'docs/results/shapes', title='shapes', baseline='none', contrasts=[])
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Columns of the per-run CSV (the JSON has everything, including the curves).
CSV_COLUMNS = ('variant', 'attention', 'fields', 'seed', 'status', 'epochs', 'last_top1',
               'best_top1', 'last_loss', 'seconds', 'commit', 'cpu', 'workdir')


def t_quantile(probability: float, dof: int) -> float:
  """Student-t quantile (``scipy.stats.t.ppf``; SciPy comes with JAX)."""
  from scipy import stats

  return float(stats.t.ppf(probability, dof))


def paired_difference(values: Sequence[float], baseline: Sequence[float],
                      confidence: float = 0.95) -> dict[str, Any]:
  """Mean, sd and two-sided t-interval of ``values[i] - baseline[i]`` (same seeds, paired).

  Returns ``{'n', 'mean', 'sd', 'low', 'high'}``; ``sd``/``low``/``high`` are None for n < 2.
  """
  if len(values) != len(baseline):
    raise ValueError(f'Paired samples differ in length: {len(values)} vs {len(baseline)}.')
  diffs = [v - b for v, b in zip(values, baseline, strict=True)]
  n = len(diffs)
  if n == 0:
    return {'n': 0, 'mean': None, 'sd': None, 'low': None, 'high': None}
  mean = statistics.fmean(diffs)
  if n < 2:
    return {'n': 1, 'mean': mean, 'sd': None, 'low': None, 'high': None}
  sd = statistics.stdev(diffs)
  half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
  return {'n': n, 'mean': mean, 'sd': sd, 'low': mean - half, 'high': mean + half}


def verdict(interval: Mapping[str, Any], margin: float = 0.005) -> str:
  """The protocol's reading of a paired interval (top-1 as a fraction; margin 0.5 points)."""
  low, high = interval.get('low'), interval.get('high')
  if low is None or high is None:
    return 'too few seeds'
  if low > 0:
    return 'above 0'
  if high < 0:
    return 'below 0'
  if -margin <= low and high <= margin:
    return f'within ±{100 * margin:g} pt'
  return 'includes 0'


def _finished(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  return [r for r in rows if r.get('status') == 'finished' and r.get('last_top1') is not None]


def summarise(rows: Sequence[Mapping[str, Any]], *, baseline: str = 'none',
              contrasts: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
  """Per-variant statistics and paired contrasts over the finished runs.

  Args:
    rows: per-run results with 'variant', 'seed', 'status' and 'last_top1'.
    baseline: the variant every other one is paired with.
    contrasts: extra ``(variant, reference)`` pairs, e.g. ``('cbam_r4', 'cbam')``.
  """
  done = _finished(rows)
  order = list(dict.fromkeys(r['variant'] for r in rows))
  by_variant = {v: {r['seed']: r['last_top1'] for r in done if r['variant'] == v} for v in order}
  planned = {v: sum(1 for r in rows if r['variant'] == v) for v in order}

  def paired(variant: str, reference: str) -> dict[str, Any]:
    seeds = sorted(set(by_variant.get(variant, {})) & set(by_variant.get(reference, {})))
    result = paired_difference([by_variant[variant][s] for s in seeds],
                               [by_variant[reference][s] for s in seeds])
    result.update(variant=variant, reference=reference, seeds=seeds)
    result['verdict'] = verdict(result)
    return result

  variants = []
  for variant in order:
    values = [by_variant[variant][s] for s in sorted(by_variant[variant])]
    entry: dict[str, Any] = {
        'variant': variant, 'seeds': sorted(by_variant[variant]), 'planned': planned[variant],
        'per_seed': values, 'mean': statistics.fmean(values) if values else None,
        'sd': statistics.stdev(values) if len(values) > 1 else None}
    entry['fields'] = next((r.get('fields') for r in rows if r['variant'] == variant), None)
    if variant != baseline and baseline in by_variant:
      entry['vs_baseline'] = paired(variant, baseline)
    variants.append(entry)
  return {'baseline': baseline, 'variants': variants,
          'contrasts': [paired(a, b) for a, b in contrasts]}


def _pct(value: float | None, digits: int = 2, sign: bool = False) -> str:
  if value is None:
    return '-'
  return f'{100 * value:{"+" if sign else ""}.{digits}f}'


def _interval(result: Mapping[str, Any]) -> str:
  if result.get('low') is None:
    return '-'
  return f'[{_pct(result["low"], sign=True)}, {_pct(result["high"], sign=True)}]'


def markdown_summary(summary: Mapping[str, Any]) -> str:
  """The summary table, then the contrast table (top-1 in percentage points)."""
  baseline = summary['baseline']
  lines = [f'| variant | fields | seeds | last-epoch top-1, mean ± sd (%) | per seed (%) | '
           f'Δ vs {baseline} (pt) | 95% CI (pt) | reading |',
           '|---|---|---:|---:|---|---:|---:|---|']
  for v in summary['variants']:
    per_seed = ', '.join(_pct(x) for x in v['per_seed']) or '-'
    sd = '' if v['sd'] is None else f' ± {_pct(v["sd"])}'
    paired = v.get('vs_baseline')
    delta, ci, reading = ('-', '-', 'baseline') if paired is None else (
        _pct(paired['mean'], sign=True), _interval(paired), paired['verdict'])
    lines.append(f'| {v["variant"]} | {v["fields"] or "-"} | {len(v["seeds"])}/{v["planned"]} | '
                 f'{_pct(v["mean"])}{sd} | {per_seed} | {delta} | {ci} | {reading} |')
  if summary['contrasts']:
    lines += ['', '| contrast | seeds | Δ mean (pt) | sd (pt) | 95% CI (pt) | reading |',
              '|---|---:|---:|---:|---:|---|']
    for c in summary['contrasts']:
      lines.append(f'| {c["variant"]} − {c["reference"]} | {c["n"]} | '
                   f'{_pct(c["mean"], sign=True)} | {_pct(c["sd"])} | {_interval(c)} | '
                   f'{c["verdict"]} |')
  return '\n'.join(lines)


def write_runs(rows: Sequence[Mapping[str, Any]], out: str) -> None:
  """``<out>/runs.json`` (everything, with curves) and ``<out>/runs.csv`` (one line a run)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'runs.json'), 'w') as f:
    json.dump(list(rows), f, indent=1)
  with open(os.path.join(out, 'runs.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row.get(k) for k in CSV_COLUMNS})


def write_curves_png(rows: Sequence[Mapping[str, Any]], path: str, *, title: str) -> None:
  """Held-out top-1 per epoch: the mean over seeds per variant and its min-max band."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  # Left: the whole run; right: the last third, zoomed, where the last-epoch metric is.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  order = list(dict.fromkeys(r['variant'] for r in rows))
  last_epoch = 1
  for variant in order:
    curves = [dict((int(e), float(t)) for e, t in r['curve'])
              for r in rows if r['variant'] == variant and r.get('curve')]
    if not curves:
      continue
    epochs = sorted(set().union(*curves))
    last_epoch = max(last_epoch, epochs[-1])
    values = [[c[e] for c in curves if e in c] for e in epochs]
    mean = [100 * statistics.fmean(v) for v in values]
    low, high = [100 * min(v) for v in values], [100 * max(v) for v in values]
    for ax in axes:
      line, = ax.plot(epochs, mean, marker='o', markersize=3,
                      label=f'{variant} (n={len(curves)})')
      ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
  half = max(1, last_epoch - max(2, last_epoch // 3))
  # Zoomed to the mean lines (a collapsed seed's band may run off the bottom).
  zoom = [y for ax_line in axes[1].get_lines() for x, y in zip(*ax_line.get_data(), strict=True)
          if x >= half]
  if zoom:
    axes[1].set_xlim(half - 0.2, last_epoch + 0.2)
    axes[1].set_ylim(min(zoom) - 1.0, max(zoom) + 1.0)
  for ax, what in zip(axes, ('all epochs', f'epochs {half}-{last_epoch}'), strict=True):
    ax.set_xlabel('epoch')
    ax.set_ylabel('held-out top-1 (%)')
    ax.set_title(what, fontsize=10)
    ax.grid(alpha=0.3)
  axes[1].legend(loc='lower right', fontsize=8)
  fig.suptitle(f'{title}: mean over seeds, band = min-max', fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_outputs(rows: Sequence[dict[str, Any]], out: str, *, title: str, baseline: str,
                  contrasts: Sequence[tuple[str, str]]) -> str:
  """runs.json / runs.csv, summary.json / summary.md and curves.png under ``out``."""
  write_runs(rows, out)
  summary = summarise(rows, baseline=baseline, contrasts=contrasts)
  table = markdown_summary(summary)
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
    write_curves_png(rows, os.path.join(out, 'curves.png'), title=title)
  return table


def format_train_table(rows: Sequence[dict[str, Any]]) -> str:
  """One line per run: epochs, best and last held-out top-1, last eval loss."""
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


# --------------------------------------------------------------------------- localisation

LOCALIZATION_SCORES = ('top1', 'mass', 'mass_minmax', 'pointing@0', 'pointing@2')


def summarise_localization(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean and sd over seeds per (variant, map) of ``localization.score_run`` results.

  Each result carries 'variant' and 'seed' besides score_run's fields.
  """
  groups: dict[tuple[str, str], list[dict[str, float]]] = {}
  for result in results:
    for name, scores in result['maps'].items():
      groups.setdefault((result['variant'], name), []).append(
          {'top1': result['top1'], **scores})
  rows = []
  for (variant, name), entries in groups.items():
    row: dict[str, Any] = {'variant': variant, 'map': name, 'n': len(entries)}
    for key in LOCALIZATION_SCORES:
      values = [e[key] for e in entries if key in e]
      if values:
        row[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1
                    else None)
    rows.append(row)
  return rows


def markdown_localization(rows: Sequence[Mapping[str, Any]],
                          baselines: Mapping[str, Mapping[str, float]]) -> str:
  header = ['variant', 'seeds', 'top-1', 'map', 'mass in box', 'mass in box (min-max)',
            'pointing (tol 0 px)', 'pointing (tol 2 px)']
  lines = ['| ' + ' | '.join(header) + ' |', '|---|---:|---:|---|---:|---:|---:|---:|']

  def cell(value) -> str:
    if value is None:
      return '-'
    mean, sd = value
    return f'{mean:.3f}' + ('' if sd is None else f' ± {sd:.3f}')

  previous = None
  for row in rows:
    head = ([row['variant'], str(row['n']), cell(row.get('top1'))] if row['variant'] != previous
            else ['', '', ''])
    previous = row['variant']
    lines.append('| ' + ' | '.join(head + [row['map']] + [
        cell(row.get(k)) for k in LOCALIZATION_SCORES[1:]]) + ' |')
  for name, scores in baselines.items():
    lines.append('| ' + ' | '.join(['baseline', '-', '-', name] + [
        f'{scores[k]:.3f}' if k in scores else '-' for k in LOCALIZATION_SCORES[1:]]) + ' |')
  return '\n'.join(lines)
