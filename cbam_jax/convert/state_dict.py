"""Reading PyTorch state dicts: ``.pth``/``.pt`` files, mappings of tensors or arrays."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

# Keys that carry no weights.
_IGNORED_SUFFIXES = ('num_batches_tracked',)


def _to_numpy(value: Any, key: str) -> np.ndarray:
  if type(value).__module__.split('.')[0] == 'torch':
    import torch  # Only here: converting numpy state dicts must not need torch.

    if not isinstance(value, torch.Tensor):
      raise TypeError(f'State dict entry {key!r} is a {type(value).__name__}, not a tensor.')
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()  # numpy has no bfloat16; float32 is what we store anyway.
    return value.numpy()
  try:
    return np.asarray(value)
  except Exception as error:  # noqa: BLE001 - re-raised with the key named.
    raise TypeError(
        f'State dict entry {key!r} ({type(value).__name__}) is not an array or tensor.'
    ) from error


def _unwrap(state_dict: Any) -> Mapping[str, Any]:
  """The weights of a state dict or of a training checkpoint ``{'state_dict': ...}``."""
  if not isinstance(state_dict, Mapping):
    raise TypeError(
        f'Expected a state dict (a mapping from names to tensors or arrays), got '
        f'{type(state_dict).__name__}. Pass model.state_dict() or torch.load(path).')
  for wrapper in ('state_dict', 'model', 'model_state_dict'):
    inner = state_dict.get(wrapper)
    if isinstance(inner, Mapping):
      return inner
  return state_dict


def prepare(state_dict: Any) -> dict[str, np.ndarray]:
  """numpy arrays keyed without a ``module.`` prefix (DataParallel) or counters."""
  arrays = {}
  for key, value in _unwrap(state_dict).items():
    if not isinstance(key, str):
      raise TypeError(f'State dict keys must be strings, got {key!r}.')
    name = key[len('module.'):] if key.startswith('module.') else key
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    if name in arrays:
      raise ValueError(f'State dict has {name!r} both with and without a \'module.\' prefix.')
    arrays[name] = _to_numpy(value, key)
  if not arrays:
    raise ValueError('The state dict holds no weights.')
  return arrays


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """A ``.pth``/``.pt`` file's weights as numpy arrays (needs torch).

  Accepts a bare state dict or a training checkpoint ``{'state_dict': ..., ...}`` as the
  official CBAM releases are; strips ``module.`` prefixes.
  """
  try:
    import torch
  except ImportError as error:
    raise ImportError(
        'Reading PyTorch checkpoints needs torch: pip install \'cbam_jax[torch]\' (on CPU-only '
        'machines: pip install torch --index-url https://download.pytorch.org/whl/cpu).'
    ) from error
  try:
    checkpoint = torch.load(os.fspath(path), map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise FileNotFoundError(f'No PyTorch checkpoint at {os.fspath(path)!r}.') from None
  except IsADirectoryError:
    raise ValueError(f'{os.fspath(path)!r} is a folder, not a PyTorch checkpoint file.') from None
  except Exception as error:  # torch.load raises many types for a non-checkpoint.
    raise ValueError(
        f'{os.fspath(path)!r} is not a PyTorch checkpoint that torch.load(weights_only=True) can '
        f'read ({type(error).__name__}). Pass a .pth/.pt file saved with '
        'torch.save(model.state_dict(), ...).') from error
  return prepare(checkpoint)
