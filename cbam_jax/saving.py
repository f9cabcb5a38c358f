"""A model and its variables on disk: ``model.json`` (the model description) + orbax
``variables``.

The model description is the JSON form of a registered backbone network (any family of
:mod:`cbam_jax.models`): its family, its size (the registry model it was made as, if any)
and the fields its family declares (:attr:`cbam_jax.models.Backbone.fields`)::

  {"backbone": "resnet",
   "size": "resnet20",                      # optional: the registry model it was made as
   "fields": {"stage_sizes": [3, 3, 3], "block": "basic", "num_filters": 16,
              "stem": "cifar", "num_classes": 10, "shortcut": "pad",
              "attention": "cbam",          # null | a registry name | {"class": "CBAM",
              "stage_attention": null,      #   "fields": {"reduction_ratio": 16, ...}}
              "attention_fields": {"reduction_ratio": 4},   # or null
              "zero_init_spatial_gate": true, "zero_init_residual": false,
              "dtype": "float32", "param_dtype": "float32"},
   "in_channels": 3}                        # image channels (the variables' shapes need it)

:func:`describe` writes one, :func:`build` reads one back; a partial description with a
``size`` (e.g. ``{"backbone": "resnet", "size": "resnet20", "fields": {"attention":
"se"}}``) starts from that model's defaults, and :func:`canonical` fills in every field.
Descriptions of format 1 (``cbam_jax.model/1``, ``cbam_jax.convert/1``: a flat dict of
ResNet fields with an optional ``name``, e.g. ``{"name": "resnet20", "attention": "se"}``)
are read as ResNet descriptions. The trainer saves the description beside its
checkpoints; the converter and :func:`save` write ``DIR/model.json`` = ``{"format":
FORMAT, "model": description, ...}`` and ``DIR/variables``, an orbax checkpoint of
``{'params', 'batch_stats'}``; :func:`load` reads them back. Example::

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

FORMAT = 'cbam_jax.model/2'
# Format 1 (flat ResNet descriptions), and directories written by cbam_jax.convert before
# this module existed: the same layout.
_FORMAT_1 = ('cbam_jax.model/1', 'cbam_jax.convert/1')
_READABLE_FORMATS = (FORMAT, *_FORMAT_1)
# Format 1 held only this family's networks.
_FORMAT_1_BACKBONE = 'resnet'
MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'
APIS = ('linen', 'nnx')
_KEYS = ('backbone', 'size', 'fields', 'in_channels')


def _attention_classes() -> dict[str, type[nn.Module]]:
  """Class name -> class of every registered attention module (what a spec may name)."""
  classes = (attention_registry.resolve(name) for name in attention_registry.available())
  return {cls.__name__: cls for cls in classes if isinstance(cls, type)}


# --------------------------------------------------------------------------- field kinds


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


def _tuples(value: Any) -> Any:
  """JSON lists -> tuples (module fields are hashable), recursively."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _describe_attention(spec: Any, what: str) -> Any:
  if spec is None:
    return None
  if isinstance(spec, str):
    attention_registry.resolve(spec)  # A clear error for an unknown name.
    return spec
  factory = spec
  fields: dict[str, Any] = {}
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


def _encode(field: models.Field, value: Any, what: str) -> Any:
  """A network's field value -> its JSON form, as ``field.kind`` writes it."""
  if field.kind == 'dtype':
    return jnp.dtype(value).name
  if field.kind == 'attention':
    return _describe_attention(value, what)
  if field.kind == 'choice':
    names = {v: k for k, v in field.choices.items()}
    if value not in names:
      raise TypeError(f'{what}={value!r} cannot be saved; use one of '
                      f'{", ".join(repr(v) for v in field.choices.values())}.')
    return names[value]
  if field.kind == 'mapping' and value is not None:
    return _json_value(dict(value), what)
  return _json_value(value, what)


def _decode(field: models.Field, value: Any, what: str) -> Any:
  """The JSON form of a field (or a Python value) -> the network's field value."""
  if field.kind == 'dtype':
    return _dtype(value, what)
  if field.kind == 'attention':
    return _build_attention(value, what)
  if field.kind == 'choice':
    if value in field.choices.values():
      return value
    if value not in field.choices:
      raise ValueError(f'Unknown {what} {value!r}; use one of {", ".join(field.choices)}.')
    return field.choices[value]
  if field.kind == 'tuple' and value is not None:
    return _tuples(value)
  if field.kind == 'mapping' and value is not None:  # Hashable, as module fields should be.
    return flax.core.FrozenDict(_tuples(dict(value)))
  return value


# --------------------------------------------------------------------------- describe


def describe(model: nn.Module, *, in_channels: int = 3,
             name: str | None = None) -> dict[str, Any]:
  """The JSON-ready description of ``model``; :func:`build` rebuilds it.

  Args:
    model: a linen network of a registered backbone family (e.g.
      :class:`cbam_jax.models.ResNet`) whose code fields (layer factories, initialisers:
      those its family does not declare) are the defaults; attention specs ``None``, a
      registry name or a ``functools.partial`` of a registered attention class with
      plain-valued fields.
    in_channels: the image channels the variables were made for.
    name: the registry model (:func:`cbam_jax.models.available_models`) it was made as; a
      label (e.g. for plot titles), also the defaults of a partial description.

  Raises:
    TypeError: something in ``model`` that JSON cannot hold (the message says what).
  """
  backbone = models.backbone_of(model)
  if backbone is None or not isinstance(model, backbone.linen):
    families = ', '.join(f'cbam_jax.models.{models.get_backbone(f).linen.__name__}'
                         for f in models.available_backbones())
    raise TypeError(f'Expected a registered backbone network ({families}), got '
                    f'{type(model).__name__}.')
  attrs = {field.attr or key for key, field in backbone.fields.items()}
  for f in dataclasses.fields(backbone.linen):
    if f.name in (*attrs, 'parent', 'name'):
      continue
    if getattr(model, f.name) is not f.default:
      raise TypeError(f'{backbone.linen.__name__}.{f.name}={getattr(model, f.name)!r} is not '
                      'the default; a model description holds data only, so only the '
                      'default can be saved.')
  description: dict[str, Any] = {'backbone': backbone.family}
  if name is not None:
    if models.backbone_for_model(name) is not backbone:  # Also a clear error for a typo.
      raise ValueError(f'Model {name!r} is not of the {backbone.family!r} family.')
    description['size'] = name
  description['fields'] = {
      key: _encode(field, getattr(model, field.attr or key), key)
      for key, field in backbone.fields.items()}
  description['in_channels'] = int(in_channels)
  return description


# --------------------------------------------------------------------------- build


def _is_format_1(description: Mapping[str, Any]) -> bool:
  return 'backbone' not in description


def _unknown_keys(given, known, what: str) -> None:
  unknown = sorted(set(given) - set(known))
  if unknown:
    hints = [f'{k!r} (did you mean {m[0]!r}?)' if (m := difflib.get_close_matches(k, known, 1))
             else repr(k) for k in unknown]
    raise ValueError(f'Unknown {what} in the model description: {", ".join(hints)}. '
                     f'Known: {", ".join(known)}.')


def upgrade(description: Any) -> dict[str, Any]:
  """``description`` in the current form ``{"backbone", "size", "fields", "in_channels"}``
  (a format-1 flat ResNet description is reshaped; nothing is filled in), checked.

  Raises:
    ValueError: naming the problem: not a JSON object, an unknown key, family, size or
      field (the closest known one is suggested), or no size and not every field without a
      default.
  """
  if not isinstance(description, Mapping):
    raise ValueError(f'A model description is a JSON object {{"backbone", "size", '
                     f'"fields", "in_channels"}}; got {type(description).__name__}.')
  if _is_format_1(description):
    backbone = models.get_backbone(_FORMAT_1_BACKBONE)
    _unknown_keys(description, ('name', 'in_channels', *backbone.fields), 'field(s)')
    flat = dict(description)
    size, in_channels = flat.pop('name', None), flat.pop('in_channels', None)
    description = {'backbone': backbone.family, 'fields': flat}
    description.update({k: v for k, v in (('size', size), ('in_channels', in_channels))
                        if v is not None})
    size_word = 'name'
  else:
    _unknown_keys(description, _KEYS, 'key(s)')
    backbone = models.get_backbone(description['backbone'])
    if not isinstance(description.get('fields', {}), Mapping):
      raise ValueError('The model description\'s "fields" is not a JSON object.')
    _unknown_keys(description.get('fields', {}), tuple(backbone.fields), 'field(s)')
    description = {**description, 'fields': dict(description.get('fields', {}))}
    size_word = 'size'
  if 'size' in description:
    if models.backbone_for_model(description['size']) is not backbone:
      raise ValueError(f'Model {description["size"]!r} is not of the {backbone.family!r} '
                       'family.')
  else:
    required = {f.name for f in dataclasses.fields(backbone.linen)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    missing = [key for key, field in backbone.fields.items()
               if (field.attr or key) in required and key not in description['fields']]
    if missing:
      raise ValueError(f'The model description has no {" or ".join(missing)} and no '
                       f'{size_word} to take defaults from.')
  return description


def check_description(description: Any) -> None:
  """Raises ``ValueError`` naming the problem if ``description`` is not a model
  description (current or format 1; see :func:`upgrade`)."""
  upgrade(description)


def _network_fields(description: Mapping[str, Any]) -> tuple[models.Backbone, dict[str, Any]]:
  """The family and the network fields (size defaults, then the description's, decoded)."""
  description = upgrade(description)
  backbone = models.get_backbone(description['backbone'])
  fields = backbone.size_fields(description.get('size'))
  for key, value in description['fields'].items():
    field = backbone.fields[key]
    fields[field.attr or key] = _decode(field, value, key)
  return backbone, fields


def build(description: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """The linen network that ``description`` (from :func:`describe`, or JSON read back)
  describes; ``overrides`` replace fields with Python values (e.g. ``dtype=jnp.bfloat16``,
  ``num_classes=3``).

  Raises:
    ValueError: an unknown family, size, field (the closest known one is suggested),
      choice (e.g. block), attention or dtype.
  """
  backbone, fields = _network_fields(description)
  return backbone.linen(**{**fields, **overrides})


def canonical(description: Mapping[str, Any]) -> dict[str, Any]:
  """``description`` with every declared field (given, else its size's, else the
  network's default) in its JSON form: two descriptions of one network are equal dicts.
  Nothing is built."""
  backbone, fields = _network_fields(description)
  defaults = {f.name: f.default for f in dataclasses.fields(backbone.linen)}
  result: dict[str, Any] = {'backbone': backbone.family}
  size = upgrade(description).get('size')
  if size is not None:
    result['size'] = size
  result['fields'] = {key: _encode(field, fields.get(field.attr or key,
                                                     defaults[field.attr or key]), key)
                      for key, field in backbone.fields.items()}
  result['in_channels'] = int(description.get('in_channels', 3))
  return result


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Whether two descriptions (full or partial, of either format) describe the same
  network: their :func:`canonical` forms, size labels aside, are equal."""
  def network(description):
    return {k: v for k, v in canonical(description).items() if k != 'size'}
  return network(a) == network(b)


def abstract_variables(model: nn.Module, in_channels: int = 3) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of ``model`` as ``jax.ShapeDtypeStruct`` (nothing is
  computed); the target to restore variables into."""
  dummy = jax.ShapeDtypeStruct((1, 8, 8, in_channels), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


# --------------------------------------------------------------------------- files


def save(directory: str | os.PathLike[str], model: nn.Module,
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
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f'{directory} is a file; save writes a folder (model.json and '
                          'variables/) there. Choose another path.')
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
  """``directory/model.json`` (format checked, description validated and, if of format 1,
  reshaped to the current form by :func:`upgrade`).

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
    raise ValueError(f'{path} has format {found!r}; expected {FORMAT!r} (or an older '
                     f'{", ".join(map(repr, _FORMAT_1))}).')
  if 'model' not in meta:
    raise ValueError(f'{path} has no "model" entry (the model description).')
  try:
    meta['model'] = upgrade(meta['model'])
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
      ``rng`` as the network initialises it (its family's ``head_init``). Everything else
      is loaded.
    rng: PRNG key or int seed for that new head.
    api: ``'linen'`` or ``'nnx'``.
    **overrides: other model fields to replace that keep the variables' shapes, e.g.
      ``dtype=jnp.bfloat16``.

  Returns:
    ``'linen'``: ``(model, variables)`` with ``variables = {'params', 'batch_stats'}``;
    ``'nnx'``: the NNX network (e.g. ``cbam_jax.nnx.ResNet``) holding them (training
    mode).
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
    backbone = models.backbone_of(model)
    assert backbone is not None  # build() made model from a registered family.
    if backbone.head is None or backbone.head_init is None:
      raise ValueError(f'The {backbone.family!r} backbone declares no head to replace; load '
                       'it without num_classes.')
    model = model.clone(num_classes=num_classes)
    features = variables['params'][backbone.head]['kernel'].shape[0]
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    variables['params'] = {**variables['params'],
                           backbone.head: backbone.head_init(model, features, key)}
  if api == 'nnx':
    from cbam_jax.nnx.transfer import from_linen  # NNX only when asked for.

    return from_linen(model, variables)
  return model, variables
