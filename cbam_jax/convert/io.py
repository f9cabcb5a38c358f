"""Converted models on disk: ``model.json`` (the model's fields) + orbax ``variables``."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax.attention.bam import BottleneckAttention
from cbam_jax.attention.se import SqueezeExcitation
from cbam_jax.convert.architecture import BLOCK_CLASSES
from cbam_jax.layers import CBAM, ChannelAttention, SpatialAttention
from cbam_jax.models import ResNet, head_kernel_init

FORMAT = 'cbam_jax.convert/1'
MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'

# Attention module classes that a model config (JSON) may name.
_ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    'CBAM': CBAM, 'ChannelAttention': ChannelAttention, 'SpatialAttention': SpatialAttention,
    'SqueezeExcitation': SqueezeExcitation,
    'BottleneckAttention': BottleneckAttention,
}


def _json_value(value: Any, what: str) -> Any:
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, (tuple, list)):
    return [_json_value(v, what) for v in value]
  raise TypeError(f'{what} = {value!r} cannot be written to JSON; only plain values can.')


def _attention_config(spec: Any, what: str) -> Any:
  if spec is None or isinstance(spec, str):
    return spec
  factory, fields = spec, {}
  if isinstance(spec, functools.partial):
    if spec.args:
      raise TypeError(f'{what}: positional arguments of a partial cannot be saved.')
    factory, fields = spec.func, dict(spec.keywords)
  names = {cls: name for name, cls in _ATTENTION_CLASSES.items()}
  if factory not in names:
    raise TypeError(
        f'{what} factory {factory!r} cannot be saved; use a registry name or a partial of '
        f'{", ".join(_ATTENTION_CLASSES)}.')
  return {'class': names[factory],
          'fields': {k: _json_value(v, f'{what}.{k}') for k, v in sorted(fields.items())}}


def _attention_from_config(config: Any) -> Any:
  if config is None or isinstance(config, str):
    return config
  try:
    cls = _ATTENTION_CLASSES[config['class']]
  except (KeyError, TypeError):
    raise ValueError(f'Unknown attention config {config!r}; expected a name or '
                     f'{{"class": one of {list(_ATTENTION_CLASSES)}, "fields": {{...}}}}.'
                     ) from None
  fields = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.get('fields', {}).items()}
  return functools.partial(cls, **fields)


def model_config(model: ResNet, *, in_channels: int = 3) -> dict[str, Any]:
  """JSON-ready fields of ``model``; :func:`model_from_config` rebuilds it.

  Covers the architecture fields (not ``conv``/``norm``/``act``/``kernel_init``, which
  must be the defaults). Attention must be ``None``, a registry name or a
  ``functools.partial`` of a cbam_jax attention class with plain-valued fields.
  """
  if not isinstance(model, ResNet):
    raise TypeError(f'Expected a cbam_jax.models.ResNet, got {type(model).__name__}.')
  blocks = {cls: name for name, cls in BLOCK_CLASSES.items()}
  if model.block_cls not in blocks:
    raise TypeError(f'block_cls {model.block_cls!r} cannot be saved.')
  return {
      'stage_sizes': [int(n) for n in model.stage_sizes],
      'block': blocks[model.block_cls],
      'num_filters': int(model.num_filters),
      'stem': model.stem,
      'num_classes': int(model.num_classes),
      'attention': _attention_config(model.attention, 'attention'),
      'stage_attention': _attention_config(model.stage_attention, 'stage_attention'),
      'zero_init_spatial_gate': bool(model.zero_init_spatial_gate),
      'zero_init_residual': bool(model.zero_init_residual),
      'shortcut': model.shortcut,
      'in_channels': int(in_channels),
  }


def model_from_config(config: Mapping[str, Any], **overrides: Any) -> ResNet:
  """The :class:`ResNet` described by a :func:`model_config` dict; ``overrides`` (e.g.
  ``dtype=jnp.bfloat16``) replace fields."""
  config = dict(config)
  config.pop('in_channels', None)
  block = config.pop('block')
  if block not in BLOCK_CLASSES:
    raise ValueError(f'Unknown block {block!r}; use one of {tuple(BLOCK_CLASSES)}.')
  for name in ('attention', 'stage_attention'):
    config[name] = _attention_from_config(config.get(name))
  config['stage_sizes'] = tuple(config['stage_sizes'])
  return ResNet(block_cls=BLOCK_CLASSES[block], **{**config, **overrides})


def save_converted(out_dir: str | os.PathLike[str], model: ResNet,
                   variables: Mapping[str, Any], *, in_channels: int = 3,
                   extra: Mapping[str, Any] | None = None) -> None:
  """Writes ``out_dir/model.json`` and the orbax checkpoint ``out_dir/variables``.

  ``model.json``: ``{"format": "cbam_jax.convert/1", "model": model_config(model), ...extra}``.
  The checkpoint holds ``{'params': ..., 'batch_stats': ...}`` (orbax
  ``StandardCheckpointer``). Existing files are overwritten.
  """
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  tree = jax.tree_util.tree_map(np.asarray, tree)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out_dir, VARIABLES_DIR), tree, force=True)
    checkpointer.wait_until_finished()
  meta = {'format': FORMAT, 'model': model_config(model, in_channels=in_channels),
          **(extra or {})}
  with open(os.path.join(out_dir, MODEL_JSON), 'w') as f:
    json.dump(meta, f, indent=2)
    f.write('\n')


def load_converted(out_dir: str | os.PathLike[str], *, num_classes: int | None = None,
                   rng: int | jax.Array = 0, **overrides: Any
                   ) -> tuple[ResNet, dict[str, Any]]:
  """``(model, variables)`` from a directory written by :func:`save_converted` / the CLI.

  Args:
    out_dir: the directory holding ``model.json`` and ``variables``.
    num_classes: a new head size for fine-tuning (e.g. 10 for CIFAR-10 from ImageNet
      weights); when it differs from the saved one, ``fc`` is freshly initialised from
      ``rng`` as :class:`cbam_jax.models.ResNet` initialises it. Everything else is loaded.
    rng: PRNG key or int seed for that new head.
    **overrides: other model fields to replace that keep the variables' shapes, e.g.
      ``dtype=jnp.bfloat16``.
  """
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(os.fspath(out_dir))
  meta_path = os.path.join(out_dir, MODEL_JSON)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f'{meta_path} not found: {out_dir!r} is not a converted checkpoint directory. Create '
        'one with python -m cbam_jax.convert IN.pth OUT_DIR --source official.')
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{meta_path} has format {meta.get("format")!r}; expected {FORMAT!r}.')
  config = meta['model']
  model = model_from_config(config, **overrides)
  dummy = jnp.zeros((1, 8, 8, config.get('in_channels', 3)), jnp.float32)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            dummy)
  target = {'params': abstract['params'], 'batch_stats': abstract.get('batch_stats', {})}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(out_dir, VARIABLES_DIR), target)
  variables = jax.tree_util.tree_map(jnp.asarray, dict(restored))
  if num_classes is not None and num_classes != model.num_classes:
    if num_classes < 1:
      raise ValueError(f'num_classes must be positive, got {num_classes}.')
    model = model.clone(num_classes=num_classes)
    features = variables['params']['fc']['kernel'].shape[0]
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    head = nn.Dense(num_classes, param_dtype=model.param_dtype,
                    kernel_init=head_kernel_init).init(key, jnp.zeros((1, features)))
    variables['params'] = {**variables['params'], 'fc': head['params']}
  return model, variables
