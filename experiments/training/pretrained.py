"""config.init_from: weights of a saved model, a training workdir or an orbax checkpoint."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cbam_jax import saving
from experiments.training import checkpointing

PyTree = Any


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


def merge_pretrained(fresh: PyTree, pretrained: PyTree, what: str) -> tuple[PyTree, list[str]]:
  """``fresh`` with every array of matching path and shape taken from ``pretrained``.

  Returns:
    ``(merged, skipped)``: ``skipped`` lists the paths kept from ``fresh`` (absent from
    ``pretrained`` or of another shape, e.g. a classifier head for other classes).
  """
  flat_pretrained = {jax.tree_util.keystr(path): leaf for path, leaf in
                     jax.tree_util.tree_flatten_with_path(pretrained)[0]}
  skipped = []

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    source = flat_pretrained.get(key)
    if source is None or tuple(np.shape(source)) != tuple(leaf.shape):
      skipped.append(f'{what}{key}')
      return leaf
    return jnp.asarray(source, leaf.dtype)

  return jax.tree_util.tree_map_with_path(pick, fresh), skipped


def init_from(state: Any, path: str, replicated: Any, is_chief: bool) -> Any:
  """The train ``state`` with the arrays of ``config.init_from`` that match by path and shape."""
  pretrained, _ = load_pretrained(path)
  params, skipped_params = merge_pretrained(state.params, pretrained['params'], 'params')
  batch_stats, skipped_stats = merge_pretrained(state.batch_stats,
                                                pretrained.get('batch_stats', {}), 'batch_stats')
  skipped = skipped_params + skipped_stats
  if len(skipped_params) == len(jax.tree.leaves(state.params)):
    raise ValueError(f'config.init_from={path!r}: no parameter matches this model by name '
                     'and shape; is it a checkpoint of the same architecture?')
  if is_chief:
    print(f'Initialised from {path}; kept the fresh init for {len(skipped)} array(s)'
          + (f': {", ".join(skipped[:8])}' if skipped else '') + '.', flush=True)
  return state.replace(params=jax.device_put(params, replicated),
                       batch_stats=jax.device_put(batch_stats, replicated))
