"""The visualisation and localisation CLIs on tiny checkpoints written by the test."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('matplotlib')
pytest.importorskip('orbax.checkpoint')

from random_variables import random_variables

from cbam_jax import saving
from experiments.configs import base_config
from experiments.data import pipeline as input_pipeline
from experiments.inspection import localization, visualize
from experiments.training import checkpointing, train_lib

# Each test runs a command-line tool end to end.
pytestmark = pytest.mark.slow

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def _write_run(workdir, attention):
  """A checkpoint laid out like experiments.training.train writes it, of an untrained tiny model."""
  config = base_config()
  config.dataset = 'shapes'
  config.image_size = 16
  config.augment = 'none'
  config.shapes.num_train = 32
  config.shapes.num_eval = 8
  config.global_batch_size = 8
  config.eval_batch_size = 8
  config.model.name = 'resnet_tiny'
  config.model.attention = attention
  info = input_pipeline.create_input(config).info
  fields = train_lib.model_description(config, info.num_classes)
  model = saving.build(fields)
  variables = random_variables(model, jnp.zeros((1, 16, 16, 3)))
  meta = {'config': json.loads(config.to_json_best_effort()), 'model': fields,
          'dataset': {'name': 'shapes', 'num_classes': info.num_classes,
                      'image_shape': list(info.image_shape),
                      'class_names': list(info.class_names)}}
  ckpts = checkpointing.Checkpoints(checkpointing.checkpoint_dir(str(workdir)),
                                    async_save=False)
  # Like the trainer's state: optimiser state beside the variables (inspection skips it).
  ckpts.save(3, {'step': 3, 'params': variables['params'],
                 'batch_stats': variables['batch_stats'],
                 'opt_state': {'momentum': variables['params']}}, meta)
  ckpts.close()
  return str(workdir)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  return {'cbam': _write_run(root / 'cbam', 'cbam'), 'none': _write_run(root / 'none', 'none')}


def _check_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == _PNG_SIGNATURE, path
  import matplotlib.image

  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and min(image.shape[:2]) > 100, image.shape
  assert image[..., :3].std() > 0.05, f'{path} looks blank'
  return image


def test_eval_images_grid_and_channels(runs, tmp_path):
  out = tmp_path / 'vis'
  written = visualize.main(['--workdir', runs['cbam'], '--out', str(out), '--num_images=3',
                            '--rows=2', '--dpi=60'])
  assert [os.path.basename(p) for p in written] == [
      'attention_0.png', 'attention_1.png', 'top_channels.png']
  first = _check_png(written[0])
  second = _check_png(written[1])
  assert first.shape[0] > second.shape[0]  # 2 rows vs 1 row.
  _check_png(written[2])

  # Without attention: no spatial columns, so the same grid is narrower.
  out_none = tmp_path / 'vis_none'
  written_none = visualize.main(['--workdir', runs['none'], '--out', str(out_none),
                                 '--num_images=2', '--rows=2', '--dpi=60'])
  assert _check_png(written_none[0]).shape[1] < first.shape[1]


def test_files_of_any_size(runs, tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  (tmp_path / 'images' / 'sub').mkdir(parents=True)
  paths = []
  for name, size in (('a.png', (20, 28)), ('sub/b.jpg', (40, 17))):
    path = str(tmp_path / 'images' / name)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  written = visualize.main(['--workdir', runs['cbam'], '--out', str(tmp_path / 'out'),
                            *[f'--files={p}' for p in paths], '--dpi=60'])
  assert len(written) == 2
  from_files = _check_png(written[0])
  # --folder finds the same two images (sorted, recursive): the same picture.
  written = visualize.main(['--workdir', runs['cbam'], '--out', str(tmp_path / 'out_folder'),
                            '--folder', str(tmp_path / 'images'), '--dpi=60'])
  np.testing.assert_array_equal(_check_png(written[0]), from_files)
  with pytest.raises(SystemExit, match='missing.png'):
    visualize.main(['--workdir', runs['cbam'], '--out', str(tmp_path / 'x'),
                    '--files', str(tmp_path / 'missing.png')])


def test_localization_scores(runs, tmp_path, capsys):
  json_path = tmp_path / 'scores.json'
  results = localization.main(['--workdir', runs['cbam'], '--workdir', runs['none'],
                               '--tolerance=0,15', '--json', str(json_path)])
  cbam, none = results
  assert sorted(cbam['maps']) == ['grad-cam layer1_0', 'grad-cam layer2_0',
                                  'spatial layer1_0', 'spatial layer2_0']
  assert sorted(none['maps']) == ['grad-cam layer1_0', 'grad-cam layer2_0']
  for result in results:
    assert result['num_examples'] == 8
    for scores in result['maps'].values():
      assert 0.0 <= scores['mass'] <= 1.0
      assert 0.0 <= scores['pointing@0'] <= scores['pointing@15'] == 1.0  # 16 px images.
  saved = json.loads(json_path.read_text())
  assert saved['runs'][0]['maps'] == cbam['maps']
  table = capsys.readouterr().out
  assert '| cbam | cbam |' in table and '| none | none |' in table


def test_missing_workdir_or_checkpoint_is_one_line(runs, tmp_path, caplog):
  for main in (visualize.main, localization.main):
    out = ['--out', str(tmp_path / 'o')] if main is visualize.main else []
    with pytest.raises(SystemExit, match='No checkpoint directory at .*nowhere') as error:
      main(['--workdir', str(tmp_path / 'nowhere'), *out])
    assert '\n' not in str(error.value.code)
    with pytest.raises(SystemExit, match=r'No checkpoint at step 7 .*\(steps: \[3\]\)'):
      main(['--workdir', runs['cbam'], '--which=7', *out])
    # Saved without eval metrics: no "best".
    with pytest.raises(SystemExit, match='eval top-1.*--which=latest'):
      main(['--workdir', runs['cbam'], '--which=best', *out])
  with pytest.raises(SystemExit, match="flag 'num-images'. Did you mean: num_images"):
    visualize.main(['--workdir', runs['cbam'], '--out', 'o', '--num-images=3'])
  assert not [r for r in caplog.records if 'read only' in r.getMessage()]


def test_evaluate_cli_reads_the_same_checkpoints(runs, tmp_path, capsys):
  from experiments.training import evaluate

  result = evaluate.main(['--workdir', runs['cbam'], '--which=3'])
  assert result['step'] == 3 and result['num_examples'] == 8
  assert 0 <= result['eval_top1'] <= result['eval_top5'] <= 1
  assert 'step 3: top-1' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='evaluate: No checkpoint directory at .*nowhere'):
    evaluate.main(['--workdir', str(tmp_path / 'nowhere')])
  with pytest.raises(SystemExit, match='--data_override wants KEY=VALUE'):
    evaluate.main(['--workdir', runs['cbam'], '--data_override=eval_batch_size'])


def test_cli_twice_in_one_process_forgets_the_first_flags(runs, tmp_path):
  from PIL import Image

  path = str(tmp_path / 'a.png')
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
  written = visualize.main(['--workdir', runs['none'], '--out', str(tmp_path / 'one'),
                            f'--files={path}', '--dpi=60'])
  assert len(written) == 2  # One attention grid of one file, plus the channels figure.
  # Without --files the eval split is used again, not the previous call's file.
  written = visualize.main(['--workdir', runs['none'], '--out', str(tmp_path / 'two'),
                            '--num_images=5', '--rows=1', '--dpi=60'])
  assert len(written) == 6


def test_inspection_reads_only_variables_without_training_code_or_warnings(runs):
  code = ('import sys\n'
          'from experiments.inspection import localization, visualize\n'
          'from experiments.training import checkpointing\n'
          'def full_restore(*args):\n'
          "  raise AssertionError('read the whole train state')\n"
          'checkpointing.Checkpoints.restore = full_restore\n'
          f'run = visualize.load_run({runs["cbam"]!r})\n'
          "assert sorted(run.variables) == ['batch_stats', 'params'], sorted(run.variables)\n"
          "assert run.step == 3 and run.model.attention == 'cbam'\n"
          # Not the trainer nor its optimiser (flax.nnx, which the attention members use
          # beside linen, imports optax itself, so optax's presence says nothing).
          "assert not {'experiments.training.train_lib', 'experiments.training.optimizer'} & "
          "set(sys.modules), 'inspection imported the training code'\n")
  process = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert process.returncode == 0, process.stderr[-3000:]
  assert 'read only' not in process.stderr, process.stderr[-3000:]
