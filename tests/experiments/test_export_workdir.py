"""``python -m cbam_jax.export`` on a training workdir (the trainer's checkpoints)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_export import _assert_close, _images, _reference, _run_cli, _variables

from cbam_jax import saving
from cbam_jax.export import __main__ as cli
from cbam_jax.models import create_model
from experiments.training import checkpointing


@pytest.mark.slow
def test_cli_exports_a_training_workdir(tmp_path, capsys):
  model = create_model('resnet20', attention='cbam', num_classes=3, stage_sizes=(1, 1, 1),
                       num_filters=4)
  variables = _variables(model, _images(1, 16))
  ckpts = checkpointing.Checkpoints(checkpointing.checkpoint_dir(str(tmp_path / 'run')),
                                    async_save=False)
  meta = {'model': saving.describe(model, name='resnet20'), 'config': {'image_size': 16}}
  ckpts.save(7, dict(variables), meta)
  ckpts.close()
  out = tmp_path / 'model.stablehlo'
  cli.main(['--model', str(tmp_path / 'run'), '--which', '7', '--format', 'stablehlo',
            '--out', str(out)])
  exported = jax.export.deserialize(out.read_bytes())
  assert exported.in_avals[0].shape[1:] == (16, 16, 3)  # The config's image_size.
  x = _images(2, 16, seed=1)
  _assert_close(np.asarray(exported.call(x)), _reference(model, variables, x))

  # A workdir's own errors name the step, not "neither a saved model nor a workdir".
  for which, message in (('9', 'No checkpoint at step 9 in '), ('last', "--which must be")):
    code, lines = _run_cli(capsys, '--model', tmp_path / 'run', '--which', which, '--format',
                           'stablehlo', '--out', tmp_path / 'other.stablehlo')
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert 'neither' not in lines[0], lines
