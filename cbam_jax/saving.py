"""A model and its variables on disk: ``model.json`` (the model description) + orbax
``variables``.

The model description is the JSON form of a :class:`cbam_jax.models.ResNet`'s fields::

  {"name": "resnet20",                      # optional: the registry model it was made as
   "stage_sizes": [3, 3, 3], "block": "basic", "num_filters": 16, "stem": "cifar",
   "num_classes": 10, "shortcut": "pad",
   "attention": "cbam",                     # null | a registry name | {"class": "CBAM",
   "stage_attention": null,                 #   "fields": {"reduction_ratio": 16, ...}}
   "attention_fields": {"reduction_ratio": 4},   # or null
   "zero_init_spatial_gate": true, "zero_init_residual": false,
   "dtype": "float32", "param_dtype": "float32",
   "in_channels": 3}                        # image channels (the variables' shapes need it)

:func:`describe` writes one, :func:`build` reads one back; a partial description with a
``name`` (e.g. ``{"name": "resnet20", "attention": "se"}``) starts from that model's
defaults. The trainer saves the description beside its checkpoints; the converter and
:func:`save` write ``DIR/model.json`` = ``{"format": FORMAT, "model": description, ...}``
and ``DIR/variables``, an orbax checkpoint of ``{'params', 'batch_stats'}``; :func:`load`
reads them back. Example::

  save('/tmp/model', model, variables)
  model, variables = load('/tmp/model')                # linen
  nnx_model = load('/tmp/model', api='nnx')            # the NNX twin, same weights
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax import attention as attention_registry
from cbam_jax import models

FORMAT = 'cbam_jax.model/1'
# Directories written by cbam_jax.convert before this module existed: the same layout.
_READABLE_FORMATS = (FORMAT, 'cbam_jax.convert/1')
MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'
APIS = ('linen', 'nnx')

# ResNet fields that are code, not data: a description holds only models that use the
# defaults.
_CODE_FIELDS = ('conv', 'norm', 'act', 'kernel_init')
_DTYPE_FIELDS = ('dtype', 'param_dtype')
_ATTENTION_FIELDS = ('attention', 'stage_attention')


def _resnet_fields() -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(models.ResNet)
          if f.name not in ('parent', 'name')}


def _description_keys() -> tuple[str, ...]:
  data_fields = [k for k in _resnet_fields() if k not in (*_CODE_FIELDS, 'block_cls')]
  return ('name', 'block', 'in_channels', *data_fields)


def _attention_classes() -> dict[str, type[nn.Module]]:
  """Class name -> class of every registered attention module (what a spec may name)."""
  classes = (attention_registry.resolve(name) for name in attention_registry.available())
  return {cls.__name__: cls for cls in classes if isinstance(cls, type)}


# --------------------------------------------------------------------------- describe


def _json_value(value: Any, what: str) -> Any:
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  if isinstance(value, (tuple, list)):
    return [_json_value(v, what) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _json_value(v, f'{what}.{k}') for k, v in sorted(value.items())}
  raise TypeError(f'{what} = {value!r} cannot be written to JSON; only plain values '
                  '(numbers, strings, booleans, None, tuples, dicts) can.')


def _describe_attention(spec: Any, what: str) -> Any:
  if spec is None:
    return None
  if isinstance(spec, str):
    attention_registry.resolve(spec)  # A clear error for an unknown name.
    return spec
  factory, fields = spec, {}
  while isinstance(factory, functools.partial):
    if factory.args:
      raise TypeError(f'{what}: positional arguments of a partial cannot be saved; pass '
                      'them by keyword.')
    fields = {**factory.keywords, **fields}
    factory = factory.func
  names = {cls: name for name, cls in _attention_classes().items()}
  if factory not in names:
    raise TypeError(
        f'{what} factory {factory!r} cannot be saved; use a registry name or a '
        f'functools.partial of one of {", ".join(sorted(names.values()))}.')
  return {'class': names[factory],
          'fields': {k: _json_value(v, f'{what}.{k}') for k, v in sorted(fields.items())}}


def describe(model: models.ResNet, *, in_channels: int = 3,
             name: str | None = None) -> dict[str, Any]:
  """The JSON-ready description of ``model``; :func:`build` rebuilds it.

  Args:
    model: a :class:`cbam_jax.models.ResNet` with the default ``conv``/``norm``/``act``/
      ``kernel_init``; ``attention``/``stage_attention`` ``None``, a registry name or a
      ``functools.partial`` of a registered attention class with plain-valued fields.
    in_channels: the image channels the variables were made for.
    name: the registry model (:func:`cbam_jax.models.available_models`) it was made as; a
      label (e.g. for plot titles), also the defaults of a partial description.

  Raises:
    TypeError: something in ``model`` that JSON cannot hold (the message says what).
  """
  if not isinstance(model, models.ResNet):
    raise TypeError(f'Expected a cbam_jax.models.ResNet, got {type(model).__name__}.')
  fields = _resnet_fields()
  for key in _CODE_FIELDS:
    if getattr(model, key) is not fields[key].default:
      raise TypeError(f'ResNet.{key}={getattr(model, key)!r} is not the default; a model '
                      'description holds data only, so only the default can be saved.')
  blocks = {cls: block for block, cls in models.BLOCKS.items()}
  if model.block_cls not in blocks:
    raise TypeError(f'block_cls {model.block_cls!r} cannot be saved; use one of '
                    f'{", ".join(f"models.{c.__name__}" for c in blocks)}.')
  if name is not None:
    models.model_factory(name)  # A clear error for an unknown name.
  description: dict[str, Any] = {} if name is None else {'name': name}
  description.update({
      'stage_sizes': [int(n) for n in model.stage_sizes],
      'block': blocks[model.block_cls],
      'num_filters': int(model.num_filters),
      'stem': model.stem,
      'num_classes': int(model.num_classes),
      'shortcut': model.shortcut,
      'attention': _describe_attention(model.attention, 'attention'),
      'stage_attention': _describe_attention(model.stage_attention, 'stage_attention'),
      'attention_fields': (None if model.attention_fields is None else
                           _json_value(dict(model.attention_fields), 'attention_fields')),
      'zero_init_spatial_gate': bool(model.zero_init_spatial_gate),
      'zero_init_residual': bool(model.zero_init_residual),
      'dtype': jnp.dtype(model.dtype).name,
      'param_dtype': jnp.dtype(model.param_dtype).name,
      'in_channels': int(in_channels),
  })
  return description


# --------------------------------------------------------------------------- build


def _tuples(value: Any) -> Any:
  """JSON lists -> tuples (module fields are hashable), recursively."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _build_attention(spec: Any, what: str) -> Any:
  if spec is None:
    return None
  if isinstance(spec, str):
    attention_registry.resolve(spec)  # A clear error for an unknown name, now.
    return spec
  classes = _attention_classes()
  if not isinstance(spec, Mapping) or spec.get('class') not in classes or not set(
      spec) <= {'class', 'fields'} or not isinstance(spec.get('fields', {}), Mapping):
    raise ValueError(f'{what}={spec!r} is not an attention spec; expected null, a name '
                     f'({", ".join(attention_registry.available())}) or {{"class": one of '
                     f'{sorted(classes)}, "fields": {{...}}}}.')
  return functools.partial(classes[spec['class']], **_tuples(dict(spec.get('fields', {}))))


def _dtype(value: Any, what: str) -> Any:
  if not isinstance(value, str):
    return value  # Already a dtype (an override).
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{what}={value!r} is not a floating-point dtype name; use e.g. '
                     "'float32', 'bfloat16' or 'float16'.")
  return dtype.type


def check_description(description: Any) -> None:
  """Raises ``ValueError`` naming the problem if ``description`` is not a model
  description (a dict of known keys, with a ``name`` or the architecture's fields)."""
  if not isinstance(description, Mapping):
    raise ValueError(f'A model description is a JSON object of ResNet fields; got '
                     f'{type(description).__name__}.')
  known = _description_keys()
  unknown = sorted(set(description) - set(known))
  if unknown:
    hints = [f'{k!r} (did you mean {m[0]!r}?)' if (m := difflib.get_close_matches(k, known, 1))
             else repr(k) for k in unknown]
    raise ValueError(f'Unknown field(s) in the model description: {", ".join(hints)}. '
                     f'Known fields: {", ".join(known)}.')
  if 'name' not in description:
    missing = [k for k in ('stage_sizes', 'block') if k not in description]
    if missing:
      raise ValueError(f'The model description has no {" or ".join(missing)} and no '
                       'name to take defaults from.')


def build(description: Mapping[str, Any], **overrides: Any) -> models.ResNet:
  """The :class:`~cbam_jax.models.ResNet` that ``description`` (from :func:`describe`, or
  JSON read back) describes; ``overrides`` replace fields with Python values (e.g.
  ``dtype=jnp.bfloat16``, ``num_classes=3``).

  Raises:
    ValueError: an unknown field (the closest known one is suggested), an unknown name,
      block, attention or dtype.
  """
  check_description(description)
  fields = dict(description)
  fields.pop('in_channels', None)
  factory = models.model_factory(fields.pop('name')) if 'name' in fields else models.ResNet
  if 'block' in fields:
    block = fields.pop('block')
    if block not in models.BLOCKS:
      raise ValueError(f'Unknown block {block!r}; use one of {", ".join(models.BLOCKS)}.')
    fields['block_cls'] = models.BLOCKS[block]
  for key in _ATTENTION_FIELDS:
    if key in fields:
      fields[key] = _build_attention(fields[key], key)
  for key in _DTYPE_FIELDS:
    if key in fields:
      fields[key] = _dtype(fields[key], key)
  if 'stage_sizes' in fields:
    fields['stage_sizes'] = tuple(fields['stage_sizes'])
  if fields.get('attention_fields') is not None:  # Hashable, as module fields should be.
    fields['attention_fields'] = flax.core.FrozenDict(_tuples(dict(fields['attention_fields'])))
  return factory(**{**fields, **overrides})


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Whether two descriptions (full or partial) describe the same model."""
  def canonical(description):
    model = build(description)
    return describe(model, in_channels=description.get('in_channels', 3))
  return canonical(a) == canonical(b)


def abstract_variables(model: models.ResNet, in_channels: int = 3) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of ``model`` as ``jax.ShapeDtypeStruct`` (nothing is
  computed); the target to restore variables into."""
  dummy = jax.ShapeDtypeStruct((1, 8, 8, in_channels), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


# --------------------------------------------------------------------------- files


def save(directory: str | os.PathLike[str], model: models.ResNet,
         variables: Mapping[str, Any], *, in_channels: int = 3, name: str | None = None,
         extra: Mapping[str, Any] | None = None) -> None:
  """Writes ``directory/model.json`` and the orbax checkpoint ``directory/variables``.

  ``model.json`` is ``{"format": FORMAT, "model": describe(model, ...), **extra}``; the
  checkpoint holds ``{'params': ..., 'batch_stats': ...}`` (orbax ``StandardCheckpointer``).
  Existing files are overwritten.
  """
  import orbax.checkpoint as ocp

  meta = {'format': FORMAT, 'model': describe(model, in_channels=in_channels, name=name),
          **(extra or {})}
  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  tree = jax.tree_util.tree_map(np.asarray, tree)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), tree, force=True)
    checkpointer.wait_until_finished()
  with open(os.path.join(directory, MODEL_JSON), 'w') as f:
    json.dump(meta, f, indent=2)
    f.write('\n')


def read_model_json(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """``directory/model.json`` (format checked, description validated).

  Raises:
    FileNotFoundError: no ``model.json`` there.
    ValueError: it is not JSON, of another format, or its description is not valid.
  """
  path = os.path.join(os.path.abspath(os.fspath(directory)), MODEL_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} not found: {os.fspath(directory)!r} is not a saved model directory. Write '
        'one with cbam_jax.saving.save(...) or python -m cbam_jax.convert IN.pth OUT_DIR.')
  try:
    with open(path) as f:
      meta = json.load(f)
  except (ValueError, UnicodeDecodeError) as error:
    raise ValueError(f'{path} is not valid JSON ({error}); rewrite it with '
                     'cbam_jax.saving.save(...) or convert the weights again.') from None
  if not isinstance(meta, dict) or meta.get('format') not in _READABLE_FORMATS:
    found = meta.get('format') if isinstance(meta, dict) else type(meta).__name__
    raise ValueError(f'{path} has format {found!r}; expected {FORMAT!r}.')
  if 'model' not in meta:
    raise ValueError(f'{path} has no "model" entry (the model description).')
  try:
    check_description(meta['model'])
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from None
  return meta


def load(directory: str | os.PathLike[str], *, num_classes: int | None = None,
         rng: int | jax.Array = 0, api: str = 'linen', **overrides: Any) -> Any:
  """The model and variables saved in ``directory`` by :func:`save` or the converter.

  Args:
    directory: holds ``model.json`` and ``variables``.
    num_classes: a new head size for fine-tuning (e.g. 10 for CIFAR-10 from ImageNet
      weights); when it differs from the saved one, ``fc`` is freshly initialised from
      ``rng`` as :class:`cbam_jax.models.ResNet` initialises it. Everything else is loaded.
    rng: PRNG key or int seed for that new head.
    api: ``'linen'`` or ``'nnx'``.
    **overrides: other model fields to replace that keep the variables' shapes, e.g.
      ``dtype=jnp.bfloat16``.

  Returns:
    ``'linen'``: ``(model, variables)`` with ``variables = {'params', 'batch_stats'}``;
    ``'nnx'``: the :class:`cbam_jax.nnx.models.ResNet` holding them (training mode).
  """
  import orbax.checkpoint as ocp

  from cbam_jax import _validation

  _validation.check_choice('api', api, APIS)
  meta = read_model_json(directory)
  description = meta['model']
  model = build(description, **overrides)
  target = abstract_variables(model, description.get('in_channels', 3))
  path = os.path.join(os.path.abspath(os.fspath(directory)), VARIABLES_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} not found: the variables of {MODEL_JSON} are missing.')
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, target)
  variables = jax.tree_util.tree_map(jnp.asarray, dict(restored))
  if num_classes is not None and num_classes != model.num_classes:
    if num_classes < 1:
      raise ValueError(f'num_classes must be positive, got {num_classes}.')
    model = model.clone(num_classes=num_classes)
    features = variables['params']['fc']['kernel'].shape[0]
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    head = nn.Dense(num_classes, param_dtype=model.param_dtype,
                    kernel_init=models.head_kernel_init).init(key, jnp.zeros((1, features)))
    variables['params'] = {**variables['params'], 'fc': head['params']}
  if api == 'nnx':
    from cbam_jax.nnx.transfer import from_linen  # NNX only when asked for.

    return from_linen(model, variables)
  return model, variables
