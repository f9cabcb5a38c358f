"""The README's attention table (experiments/bench/compare_attention.py)."""

from __future__ import annotations

import pytest

from experiments.bench import compare_attention as compare


def test_bad_flags_are_one_line():
  for argv, message in ((['--rounds', '0'], r'--rounds=0: 0 is not a positive integer'),
                        (['--attention', 'sse'], r"Unknown attention 'sse'")):
    with pytest.raises(SystemExit, match=message) as error:
      compare.main(argv)
    assert str(error.value).startswith('python -m experiments.bench.compare_attention: ')


@pytest.mark.slow  # Compiles three ResNets, twice each.
def test_table_mode_counts_params_and_flops_against_none():
  rows = compare.measure(['none', 'se', 'simam'], model_name='resnet_tiny', batch_size=2,
                         image_size=8, rounds=1, calls_per_round=1)
  by_name = {row['attention']: row for row in rows}
  assert by_name['simam']['params'] == by_name['none']['params']  # Parameter-free.
  assert by_name['se']['params'] > by_name['none']['params']
  assert by_name['se']['flops_per_image'] > by_name['none']['flops_per_image'] > 0
  assert all(row['seconds'] > 0 for row in rows)
  table = compare.format_table(rows)
  assert table.splitlines()[2].startswith('| none | ')
  assert '| simam | ' in table and '+0 |' in table
