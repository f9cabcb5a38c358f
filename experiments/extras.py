"""Optional dependencies: TensorFlow is an extra (`pip install -e '.[tf]'`), needed only for
TensorBoard summaries, TFRecord-only tfds datasets and building tfds datasets not yet
prepared. Everything else (image folders, shapes, prepared ArrayRecord tfds datasets) runs
without it."""

from __future__ import annotations

import importlib.util

TF_EXTRA = "pip install -e '.[tf]'"


def has_tensorflow() -> bool:
  """True if TensorFlow can be imported (imports it)."""
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    return False
  return True


def tensorflow_installed() -> bool:
  """True if a TensorFlow package is on the path, without importing it (fast)."""
  return importlib.util.find_spec('tensorflow') is not None


def import_tensorflow(needed_for: str):
  """`import tensorflow`, or an ImportError that names the extra to install."""
  try:
    import tensorflow as tf
  except ImportError:
    raise ImportError(
      f'{needed_for} needs TensorFlow, which is not installed: {TF_EXTRA}.'
    ) from None
  return tf
