"""experiments.bench.side_by_side: its cases and its refusal of a folder that is no checkout
(the timing itself runs only by hand: two worker processes compiling every case)."""

import pytest

from experiments.bench import side_by_side


def test_cases_cover_every_module_shape_in_both_modes_and_the_steps():
  names = side_by_side.case_names()
  assert len(names) == (2 * len(side_by_side.MODULE_SHAPES) + 2 * len(side_by_side.STEPS)
                        + len(side_by_side.NNX_MODULE_SHAPES) + 1)
  assert 'cbam fwd_bwd 128x32x32x16' in names and 'step resnet50 cbam b8' in names
  assert 'nnx cbam fwd_bwd 128x32x32x16' in names
  assert side_by_side.case_names(models_only=True) == [
      'step resnet20 b128', 'step resnet20 cbam b128', 'step resnet50 b8',
      'step resnet50 cbam b8', 'nnx step resnet20 cbam b128']


def test_a_folder_without_cbam_jax_is_a_one_line_error(tmp_path):
  with pytest.raises(SystemExit, match=r'is not a checkout of cbam_jax.*git worktree add'):
    side_by_side.main(['--other', str(tmp_path)])
