"""The visualisation and localisation CLIs on tiny checkpoints written by the test."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('matplotlib')
pytest.importorskip('orbax.checkpoint')

from experiments.configs import base_config  # noqa: E402
from experiments.data import pipeline as input_pipeline  # noqa: E402
from experiments.inspection import localization, visualize  # noqa: E402
from experiments.training import checkpointing, train_lib  # noqa: E402

# Each test runs a command-line tool end to end.
pytestmark = pytest.mark.slow

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _random_variables(model, input_shape, seed=0):
  """Random variables of the right structure, without compiling ``model.init`` (slow)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):  # BatchNorm running variance: positive.
      return np.ones(leaf.shape, leaf.dtype)
    values = 0.3 * rng.standard_normal(leaf.shape)
    if name.endswith("['scale']"):  # BatchNorm scales near 1 (the spatial one starts at 0).
      values += 1.0
    return values.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


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
  fields = train_lib.model_fields(config, info.num_classes)
  model = train_lib.model_from_fields(fields)
  variables = _random_variables(model, (1, 16, 16, 3))
  meta = {'config': json.loads(config.to_json_best_effort()), 'model': fields,
          'dataset': {'name': 'shapes', 'num_classes': info.num_classes,
                      'image_shape': list(info.image_shape),
                      'class_names': list(info.class_names)}}
  ckpts = checkpointing.Checkpoints(checkpointing.checkpoint_dir(str(workdir)),
                                    async_save=False)
  ckpts.save(3, {'step': 3, 'params': variables['params'],
                 'batch_stats': variables['batch_stats']}, meta)
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
  written = visualize.main(['--workdir', runs['cbam'], '--out', str(out), '--num-images', '3',
                            '--rows', '2', '--dpi', '60'])
  assert [os.path.basename(p) for p in written] == [
      'attention_0.png', 'attention_1.png', 'top_channels.png']
  first = _check_png(written[0])
  second = _check_png(written[1])
  assert first.shape[0] > second.shape[0]  # 2 rows vs 1 row.
  _check_png(written[2])

  # Without attention: no spatial columns, so the same grid is narrower.
  out_none = tmp_path / 'vis_none'
  written_none = visualize.main(['--workdir', runs['none'], '--out', str(out_none),
                                 '--num-images', '2', '--rows', '2', '--dpi', '60'])
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
                            '--files', *paths, '--dpi', '60'])
  assert len(written) == 2
  from_files = _check_png(written[0])
  # --folder finds the same two images (sorted, recursive): the same picture.
  written = visualize.main(['--workdir', runs['cbam'], '--out', str(tmp_path / 'out_folder'),
                            '--folder', str(tmp_path / 'images'), '--dpi', '60'])
  np.testing.assert_array_equal(_check_png(written[0]), from_files)
  with pytest.raises(FileNotFoundError, match='missing.png'):
    visualize.main(['--workdir', runs['cbam'], '--out', str(tmp_path / 'x'),
                    '--files', str(tmp_path / 'missing.png')])


def test_localization_scores(runs, tmp_path, capsys):
  json_path = tmp_path / 'scores.json'
  results = localization.main(['--workdir', runs['cbam'], '--workdir', runs['none'],
                               '--tolerance', '0', '15', '--json', str(json_path)])
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


def test_missing_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match='checkpoint'):
    visualize.main(['--workdir', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o')])
