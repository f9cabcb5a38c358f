"""cbam_jax.saving: model descriptions and the model.json + orbax variables directory."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import attention, models, saving
from cbam_jax.attention.cbam import CBAM
from cbam_jax.attention.se import SqueezeExcitation

pytest.importorskip('orbax.checkpoint')


def _random_variables(model, in_channels=3, seed=0):
  """Random variables of ``model``'s structure, without compiling ``model.init``."""
  abstract = saving.abstract_variables(model, in_channels)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def _through_json(description):
  return json.loads(json.dumps(description))


# Every kind of model a description holds: each registry model, each attention spec form.
MODELS = {
    **{name: (name, {}) for name in models.available_models()},
    'no attention': ('resnet_tiny', {'attention': None}),
    **{f'attention {a}': ('resnet_tiny', {'attention': a}) for a in attention.available()},
    'partial attention': ('resnet_tiny', {'attention': functools.partial(
        CBAM, reduction_ratio=4, mlp_bias=False, pool_types=('avg', 'max', 'lse'))}),
    'stage attention': ('resnet_tiny', {'attention': 'se', 'stage_attention': 'bam'}),
    'partial stage attention': ('resnet_tiny', {'stage_attention': functools.partial(
        SqueezeExcitation, reduction_ratio=2)}),
    'attention fields and flags': ('resnet20', {
        'attention': 'cbam', 'attention_fields': {'reduction_ratio': 4, 'kernel_size': 3},
        'zero_init_spatial_gate': False, 'zero_init_residual': True}),
    'bfloat16': ('resnet_tiny', {'dtype': jnp.bfloat16}),
    'custom architecture': (None, {'stage_sizes': (2, 1), 'block_cls': models.Bottleneck,
                                   'num_filters': 4, 'stem': 'imagenet', 'num_classes': 3,
                                   'shortcut': 'projection'}),
}


@pytest.mark.parametrize('kind', list(MODELS))
def test_description_round_trip(kind):
  name, fields = MODELS[kind]
  model = models.create_model(name, **fields) if name else models.ResNet(**fields)
  description = saving.describe(model, name=name)
  rebuilt = saving.build(_through_json(description))
  assert saving.describe(rebuilt, name=name) == description
  hash(rebuilt)  # Hashable, as jit caches keyed on the module need.
  partials = ('attention', 'stage_attention')
  for key in partials:  # A partial equals only itself: compare what it holds.
    spec, again = getattr(model, key), getattr(rebuilt, key)
    if isinstance(spec, functools.partial):
      assert again.func is spec.func and again.keywords == spec.keywords
  # Every other field is equal as is.
  assert rebuilt.clone(**{k: None for k in partials}) == model.clone(
      **{k: None for k in partials})


def test_partial_description_takes_the_named_models_defaults():
  model = saving.build({'name': 'resnet20', 'attention': 'se', 'dtype': 'bfloat16'})
  assert model == models.create_model('resnet20', attention='se', dtype=jnp.bfloat16)
  description = saving.describe(model, name='resnet20')
  assert description['size'] == 'resnet20' and description['backbone'] == 'resnet'
  assert description['fields']['stage_sizes'] == [3, 3, 3]
  assert description['fields']['shortcut'] == 'pad'
  assert saving.same_model({'name': 'resnet20', 'attention': 'se', 'dtype': 'bfloat16'},
                           description)
  assert not saving.same_model({'name': 'resnet20'}, description)


def test_save_and_load_round_trip(tmp_path):
  model = models.create_model('resnet_tiny', attention='cbam', num_classes=5,
                              attention_fields={'reduction_ratio': 2})
  variables = _random_variables(model, in_channels=1)
  saving.save(tmp_path, model, variables, in_channels=1, name='resnet_tiny',
              extra={'source': 'test'})
  meta = saving.read_model_json(tmp_path)
  assert meta['format'] == saving.FORMAT and meta['source'] == 'test'
  assert meta['model']['in_channels'] == 1 and meta['model']['size'] == 'resnet_tiny'
  loaded_model, loaded = saving.load(tmp_path)
  assert loaded_model == model  # The same module and the same arrays: the same logits.
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), variables)

  # A new head for fine-tuning; everything else as saved.
  model3, variables3 = saving.load(tmp_path, num_classes=3, rng=1)
  assert model3.num_classes == 3 and variables3['params']['fc']['kernel'].shape == (16, 3)
  np.testing.assert_array_equal(variables3['params']['conv1']['kernel'],
                                variables['params']['conv1']['kernel'])
  # Overrides that keep the shapes.
  model16, _ = saving.load(tmp_path, dtype=jnp.bfloat16)
  assert model16.dtype == jnp.bfloat16
  # Saving again overwrites.
  saving.save(tmp_path, model.clone(num_classes=5), jax.tree.map(np.zeros_like, variables),
              in_channels=1)
  _, zeros = saving.load(tmp_path)
  assert not np.any(np.asarray(zeros['params']['fc']['kernel']))


def test_load_as_nnx(tmp_path):
  from flax import nnx

  from cbam_jax.nnx import transfer

  model = models.create_model('resnet_tiny', attention='cbam', num_classes=4)
  variables = _random_variables(model)
  saving.save(tmp_path, model, variables)
  nnx_model = saving.load(tmp_path, api='nnx')
  assert isinstance(nnx_model, nnx.Module)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, transfer.to_linen(nnx_model)),
                              variables)
  with pytest.raises(ValueError, match='api'):
    saving.load(tmp_path, api='torch')


# The model.json of format 1 (cbam_jax.model/1) that cbam_jax.saving.save wrote for
# models.create_model('resnet_tiny', attention='se') (flat ResNet fields), byte for byte.
FORMAT_1_MODEL_JSON = {
    'format': 'cbam_jax.model/1',
    'model': {'name': 'resnet_tiny', 'stage_sizes': [1, 1], 'block': 'basic', 'num_filters': 8,
              'stem': 'cifar', 'num_classes': 10, 'shortcut': 'projection', 'attention': 'se',
              'stage_attention': None, 'attention_fields': None,
              'zero_init_spatial_gate': True, 'zero_init_residual': False,
              'dtype': 'float32', 'param_dtype': 'float32', 'in_channels': 3}}


@pytest.mark.parametrize('old_format', ['cbam_jax.model/1', 'cbam_jax.convert/1'])
def test_format_1_directory_is_read(tmp_path, old_format):
  """Directories saved before descriptions named their backbone (cbam_jax.model/1), and
  written by cbam_jax.convert before cbam_jax.saving existed (cbam_jax.convert/1)."""
  model = models.create_model('resnet_tiny', attention='se')
  variables = _random_variables(model)
  saving.save(tmp_path, model, variables)
  meta = json.loads(json.dumps(FORMAT_1_MODEL_JSON))
  meta['format'] = old_format
  if old_format == 'cbam_jax.convert/1':
    for key in ('name', 'dtype', 'param_dtype', 'attention_fields'):  # Not written then.
      del meta['model'][key]
  (tmp_path / 'model.json').write_text(json.dumps(meta))
  loaded_model, loaded = saving.load(tmp_path)
  assert loaded_model == model
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), variables)
  description = saving.read_model_json(tmp_path)['model']
  assert description['backbone'] == 'resnet' and description['fields']['attention'] == 'se'
  assert saving.same_model(description, saving.describe(model, name='resnet_tiny'))
  assert saving.same_model(FORMAT_1_MODEL_JSON['model'], saving.describe(model))


# --------------------------------------------------------------------------- errors


def test_missing_and_garbled_model_json(tmp_path):
  with pytest.raises(FileNotFoundError, match='model.json not found.*saving.save'):
    saving.load(tmp_path)
  (tmp_path / 'model.json').write_text('{"format": "cbam_jax.model/1", "model": {')
  with pytest.raises(ValueError, match='not valid JSON'):
    saving.load(tmp_path)
  (tmp_path / 'model.json').write_text('[1, 2]')
  with pytest.raises(ValueError, match="format 'list'"):
    saving.load(tmp_path)
  (tmp_path / 'model.json').write_text('{"format": "other/2", "model": {}}')
  with pytest.raises(ValueError, match="format 'other/2'; expected 'cbam_jax.model/2'"):
    saving.load(tmp_path)
  (tmp_path / 'model.json').write_text('{"format": "cbam_jax.model/1"}')
  with pytest.raises(ValueError, match='no "model" entry'):
    saving.load(tmp_path)
  (tmp_path / 'model.json').write_text(json.dumps(
      {'format': saving.FORMAT, 'model': {'name': 'resnet_tiny', 'stages': [1]}}))
  with pytest.raises(ValueError, match="model.json: Unknown field.*'stages' \\(did you mean "
                                       "'stage_sizes'"):
    saving.load(tmp_path)
  (tmp_path / 'model.json').write_text(json.dumps(
      {'format': saving.FORMAT, 'model': {'name': 'resnet_tiny'}}))
  with pytest.raises(FileNotFoundError, match='variables of model.json are missing'):
    saving.load(tmp_path)


def test_save_to_a_file_path_is_refused(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  model = models.create_model('resnet_tiny')
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  with pytest.raises(FileExistsError, match=r'notes.txt is a file; save writes a folder'):
    saving.save(tmp_path / 'notes.txt', model, variables)
  assert (tmp_path / 'notes.txt').read_text() == 'mine'


def test_bad_descriptions():
  with pytest.raises(ValueError, match='description is a JSON object'):
    saving.build(['resnet_tiny'])
  with pytest.raises(ValueError, match="no stage_sizes or block and no name"):
    saving.build({'num_classes': 3})
  with pytest.raises(ValueError, match="Unknown model 'resnet7'"):
    saving.build({'name': 'resnet7'})
  with pytest.raises(ValueError, match="Unknown block 'wide'"):
    saving.build({'stage_sizes': [1], 'block': 'wide'})
  with pytest.raises(ValueError, match="Unknown attention 'cbma'"):
    saving.build({'name': 'resnet_tiny', 'attention': 'cbma'})
  with pytest.raises(ValueError, match='not an attention spec'):
    saving.build({'name': 'resnet_tiny', 'attention': {'class': 'Dense', 'fields': {}}})
  with pytest.raises(ValueError, match="dtype='int8' is not a floating-point dtype"):
    saving.build({'name': 'resnet_tiny', 'dtype': 'int8'})
  with pytest.raises(ValueError, match="dtype='float9' is not a floating-point dtype"):
    saving.build({'name': 'resnet_tiny', 'dtype': 'float9'})


def test_what_cannot_be_described():
  tiny = models.create_model('resnet_tiny')
  with pytest.raises(TypeError, match='cannot be saved'):
    saving.describe(tiny.clone(attention=lambda **kw: None))
  with pytest.raises(TypeError, match='positional arguments'):
    saving.describe(tiny.clone(attention=functools.partial(CBAM, 4)))
  with pytest.raises(TypeError, match='cannot be written to JSON'):
    saving.describe(tiny.clone(attention=functools.partial(CBAM, reduction_ratio=object())))
  with pytest.raises(TypeError, match='ResNet.act=.*not the default'):
    saving.describe(tiny.clone(act=jax.nn.gelu))
  with pytest.raises(TypeError, match='Expected a registered backbone network'):
    saving.describe(CBAM())
  with pytest.raises(ValueError, match="Unknown model 'tiny'"):
    saving.describe(tiny, name='tiny')
