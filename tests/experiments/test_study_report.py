"""The study's statistics, tables and plots (experiments/study/report.py)."""

from __future__ import annotations

import math

import pytest

from experiments.study import report


def test_paired_difference_matches_a_hand_computation():
  # d = (0.01, 0.00, 0.02): mean 0.01, sd 0.01, t(0.975, 2) = 4.302653 (tables).
  result = report.paired_difference([0.91, 0.92, 0.96], [0.90, 0.92, 0.94])
  half = 4.302653 * 0.01 / math.sqrt(3)
  assert result['n'] == 3
  assert result['mean'] == pytest.approx(0.01)
  assert result['sd'] == pytest.approx(0.01)
  assert result['low'] == pytest.approx(0.01 - half, abs=1e-6)
  assert result['high'] == pytest.approx(0.01 + half, abs=1e-6)
  assert report.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)


def test_paired_difference_with_too_few_or_mismatched_samples():
  assert report.paired_difference([0.5], [0.4])['low'] is None
  assert report.paired_difference([0.5], [0.4])['mean'] == pytest.approx(0.1)
  assert report.paired_difference([], [])['n'] == 0
  with pytest.raises(ValueError, match='differ in length'):
    report.paired_difference([0.5, 0.6], [0.4])


@pytest.mark.parametrize('low,high,reading', [
    (0.001, 0.02, 'above 0'), (-0.02, -0.001, 'below 0'), (-0.004, 0.003, 'within ±0.5 pt'),
    (-0.02, 0.01, 'includes 0'), (None, None, 'too few seeds')])
def test_verdict_follows_the_protocol(low, high, reading):
  assert report.verdict({'low': low, 'high': high}) == reading


def _rows():
  rows = []
  for seed, (base, cbam, r4) in enumerate([(0.90, 0.91, 0.95), (0.92, 0.92, 0.96),
                                           (0.94, 0.96, 0.97)]):
    for variant, top1 in (('none', base), ('cbam', cbam), ('cbam_r4', r4)):
      rows.append({'variant': variant, 'seed': seed, 'status': 'finished',
                   'last_top1': top1, 'fields': '', 'curve': [[1, top1 / 2], [2, top1]]})
  rows.append({'variant': 'cbam', 'seed': 3, 'status': 'failed', 'last_top1': 0.1})
  return rows


def test_summarise_pairs_by_seed_and_skips_unfinished_runs():
  summary = report.summarise(_rows(), baseline='none', contrasts=[('cbam_r4', 'cbam')])
  none, cbam, r4 = summary['variants']
  assert none['per_seed'] == [0.90, 0.92, 0.94] and 'vs_baseline' not in none
  assert cbam['seeds'] == [0, 1, 2] and cbam['planned'] == 4  # The failed run is not used.
  assert cbam['mean'] == pytest.approx(0.93) and cbam['sd'] == pytest.approx(0.0264575, 1e-5)
  assert cbam['vs_baseline']['mean'] == pytest.approx(0.01)
  assert cbam['vs_baseline']['verdict'] == 'includes 0'
  (contrast,) = summary['contrasts']
  # cbam_r4 - cbam = (0.04, 0.04, 0.01): mean 0.03, sd 0.017321.
  assert contrast['mean'] == pytest.approx(0.03) and contrast['sd'] == pytest.approx(0.0173205)
  table = report.markdown_summary(summary)
  assert '| cbam | - | 3/4 | 93.00 ± 2.65 | 91.00, 92.00, 96.00 | +1.00 | [-1.48, +3.48] |' in table
  assert '| cbam_r4 − cbam | 3 | +3.00 | 1.73 |' in table


def test_curves_png(tmp_path):
  path = tmp_path / 'curves.png'
  report.write_curves_png(_rows(), str(path), title='test')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_localization_summary_mean_and_sd_over_seeds():
  results = [{'variant': 'cbam', 'seed': s, 'top1': t,
              'maps': {'spatial layer1_0': {'mass': m, 'mass_minmax': m, 'pointing@0': 0.9,
                                            'pointing@2': 1.0}}}
             for s, t, m in ((0, 0.9, 0.1), (1, 0.95, 0.3))]
  (row,) = report.summarise_localization(results)
  assert row['n'] == 2 and row['mass'][0] == pytest.approx(0.2)
  assert row['mass'][1] == pytest.approx(math.sqrt(0.02))
  table = report.markdown_localization([row], {'uniform': {'mass': 0.167}})
  assert '| cbam | 2 | 0.925 ± 0.035 | spatial layer1_0 | 0.200 ± 0.141 |' in table
  assert '| baseline | - | - | uniform | 0.167 | - |' in table
