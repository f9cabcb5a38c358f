"""config.init_from: weights of a saved model, a training workdir or an orbax checkpoint.

Loading is strict: every array of the checkpoint must have its place (same path, same shape)
in the model, and every array of the model must come from the checkpoint, with two
exceptions that are the point of fine-tuning:

- **attention inserted into a trained network:** the model has attention (``attention`` /
  ``stage_attention`` modules) that the checkpoint lacks. Their arrays are initialised per
  ``config.init_attention``: ``'identity'`` builds the members with ``identity_init=True``
  (the network computes exactly what the checkpoint computed, docs/insertion.md) and
  ``'official'`` keeps the member's own initialisation;
- **a new classifier head:** the backbone's head (``fc``) of another number of classes is
  initialised afresh.

Anything else (another architecture) is a one-line error naming the first mismatch, unless
``config.init_from_partial=True`` asks for a partial load, which lists every array it did
not load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cbam_jax import models, saving
from experiments.training import checkpointing

PyTree = Any

INIT_ATTENTION = ('identity', 'official')
# Submodule names under which a backbone keeps its attention (docs/extending.md).
_ATTENTION_NAME = re.compile(r'^(attention|stage_attention\d*)$')


def load_pretrained(path: str) -> tuple[dict[str, PyTree], dict[str, Any] | None]:
  """``({'params', 'batch_stats'}, model description or None)`` from a checkpoint folder.

  Accepts: a folder written by :func:`cbam_jax.saving.save` / ``python -m cbam_jax.convert``
  (``model.json`` + ``variables/``); a workdir / checkpoints folder / step folder of this
  trainer (its latest step); or a plain orbax PyTree checkpoint of
  ``{'params', 'batch_stats'}``.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'config.init_from={path!r} is not a directory; point it at a '
                            'checkpoint written by this trainer or by cbam_jax.convert.')
  if os.path.isfile(os.path.join(path, saving.MODEL_JSON)):
    _, variables = saving.load(path)
    return variables, saving.read_model_json(path)['model']
  directory, step = checkpointing.find_checkpoint(path)
  if step is not None or (os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory))):
    _, variables, meta, _ = checkpointing.load_model(path, 'latest')
    return variables, meta['model']
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(path)
  if 'params' not in tree:
    raise ValueError(f'{path} holds no \'params\' entry (keys: {sorted(tree)}); expected '
                     'a checkpoint of {\'params\', \'batch_stats\'}.')
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {})}, None


def _names(path: Sequence[Any]) -> tuple[str, ...]:
  return tuple(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
  return {_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_attention(names: Sequence[str]) -> bool:
  return any(_ATTENTION_NAME.match(name) for name in names)


def _show(collection: str, names: Sequence[str]) -> str:
  return collection + ''.join(f'[{name!r}]' for name in names)


def has_attention(params: PyTree) -> bool:
  """Whether a parameter tree holds attention modules (by their submodule names)."""
  return any(_is_attention(names) for names in _flat(params))


def with_identity_init(description: Mapping[str, Any]) -> dict[str, Any]:
  """``description`` with ``identity_init=True`` added to its attention's fields."""
  fields = dict(description['fields'])
  fields['attention_fields'] = {**(fields.get('attention_fields') or {}), 'identity_init': True}
  return saving.canonical({**description, 'fields': fields})


def insertion_description(description: dict[str, Any], pretrained: Mapping[str, PyTree],
                          init_attention: str) -> dict[str, Any]:
  """The model to build for fine-tuning from ``pretrained``: ``description`` itself, or, when
  it inserts attention the checkpoint lacks and ``init_attention='identity'``, its attention
  with ``identity_init=True``."""
  if init_attention not in INIT_ATTENTION:
    raise ValueError(f'config.init_attention={init_attention!r} is unknown; use '
                     f"'identity' (inserted attention starts as the identity) or 'official'.")
  fields = description['fields']
  if init_attention == 'official' or has_attention(pretrained['params']):
    return description
  if fields.get('stage_attention') is not None:
    raise ValueError(
        "config.init_attention='identity' cannot insert stage_attention (its fields are not "
        "configurable here); use --config.init_attention=official, or insert it with "
        'cbam_jax.models.add_attention.')
  if fields.get('attention') is None:
    return description
  return with_identity_init(description)


def _merge(collection: str, fresh: PyTree, pretrained: PyTree, head: str | None,
           ) -> tuple[PyTree, list[str], list[str], list[str], list[str]]:
  """``fresh`` with the arrays of ``pretrained`` at the same path and shape.

  Returns ``(merged, inserted, head, mismatches, loaded)``: the paths (name tuples)
  initialised as inserted attention, and the shown paths of a new head, of the mismatches
  (another architecture) and of the loaded arrays.
  """
  flat_fresh, flat_pretrained = _flat(fresh), _flat(pretrained)
  inserted, new_head, mismatches, loaded = [], [], [], []
  values = {}
  for names, leaf in flat_fresh.items():
    shown = _show(collection, names)
    source = flat_pretrained.get(names)
    if source is not None and tuple(np.shape(source)) == tuple(leaf.shape):
      values[names] = jnp.asarray(source, leaf.dtype)
      loaded.append(shown)
      continue
    values[names] = leaf
    if head is not None and names[0] == head:
      new_head.append(shown)
    elif source is None and _is_attention(names):
      inserted.append(names)
    elif source is None:
      mismatches.append(f'this model has {shown} {tuple(leaf.shape)}, which the checkpoint '
                        'lacks')
    else:
      mismatches.append(f'{shown} is {tuple(np.shape(source))} in the checkpoint but '
                        f'{tuple(leaf.shape)} in this model')
  for names, leaf in flat_pretrained.items():
    if names not in flat_fresh:
      mismatches.append(f'the checkpoint has {_show(collection, names)} '
                        f'{tuple(np.shape(leaf))}, which this model lacks')
  merged = jax.tree_util.tree_map_with_path(lambda path, _: values[_names(path)], fresh)
  return merged, inserted, new_head, mismatches, loaded


def init_from(state: Any, path: str, pretrained: Mapping[str, PyTree], model_description:
              Mapping[str, Any], replicated: Any, is_chief: bool, *,
              partial: bool = False) -> Any:
  """The train ``state`` with ``pretrained``'s arrays (strictly; see the module docstring).

  Raises:
    ValueError: ``pretrained`` is of another architecture (the first mismatch is named),
      unless ``partial``.
  """
  head = models.get_backbone(model_description['backbone']).head
  params, inserted, new_head, mismatches, loaded = _merge(
      'params', state.params, pretrained['params'], head)
  stats = _merge('batch_stats', state.batch_stats, pretrained.get('batch_stats') or {}, head)
  batch_stats = stats[0]
  inserted, new_head, mismatches = inserted + stats[1], new_head + stats[2], mismatches + stats[3]
  loaded += stats[4]
  if mismatches and not partial:
    raise ValueError(
        f'config.init_from={path!r} is of another architecture than this model '
        f'({model_description.get("size") or model_description["backbone"]}): '
        f'{mismatches[0]} ({len(mismatches)} mismatch(es) in all). Point init_from at a '
        'checkpoint of this model, or set --config.init_from_partial=True to load only the '
        'arrays that match.')
  if not loaded:
    raise ValueError(f'config.init_from={path!r}: no array matches this model by name and '
                     'shape; is it a checkpoint of the same architecture?')
  if is_chief:
    fields = model_description['fields']
    lines = [f'Initialised from {path}: loaded {len(loaded)} array(s).']
    if inserted:
      identity = bool((fields.get('attention_fields') or {}).get('identity_init'))
      places = {names[:i + 1] for names in inserted for i, name in enumerate(names)
                if _ATTENTION_NAME.match(name)}
      what = fields.get('attention') or fields.get('stage_attention')
      lines.append(f'Inserted attention ({what}, {"identity" if identity else "official"} '
                   f'init) at {len(places)} place(s): {len(inserted)} new array(s).')
    if new_head:
      lines.append(f'Initialised a new classifier head ({len(new_head)} array(s): '
                   f'{", ".join(new_head)}).')
    if mismatches:
      lines.append(f'Partial load (config.init_from_partial): {len(mismatches)} array(s) not '
                   'loaded: ' + '; '.join(mismatches) + '.')
    print('\n'.join(lines), flush=True)
  return state.replace(params=jax.device_put(params, replicated),
                       batch_stats=jax.device_put(batch_stats, replicated))
