"""experiments.bench.param_counts: the CBAM paper's Table 4 parameter counts against ours."""

from __future__ import annotations

from test_backbones import EXPECTED_PARAMS

from experiments.bench import param_counts


def test_the_papers_table4_params():
  for name, rows in param_counts.PAPER_TABLE4.items():
    assert set(rows) == {None, 'se', 'cbam'}
    plain, with_cbam = EXPECTED_PARAMS[name]  # Traced there.
    assert round(plain / 1e6, 2) == rows[None][0], name
    assert round(with_cbam / 1e6, 2) == rows['cbam'][0], name
  # SE: traced here for the new rows (tests/test_models.py has ResNet-50's).
  for name in ('wide_resnet18_1_5', 'wide_resnet18_2'):
    count = param_counts.param_count(name, 'se')
    assert round(count / 1e6, 2) == param_counts.PAPER_TABLE4[name]['se'][0], name
