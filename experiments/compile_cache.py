"""JAX's persistent compilation cache for the command lines: a second run does not compile.

Every entry point (training, evaluation, inspection, the benchmark's runs are left out on
purpose: they measure compile time) calls :func:`enable` once, before its first compilation.
XLA then writes each compiled program to a folder and later runs with the same program, jax
version and flags load it instead of compiling (the CBAM ResNet training step: seconds on a
small CPU). A cached program is the same executable, so results do not change.

``CBAM_JAX_COMPILATION_CACHE``:

* unset: ``$JAX_COMPILATION_CACHE_DIR`` if set (JAX's own variable wins), else
  ``$XDG_CACHE_HOME/cbam_jax/jax_cache`` (``~/.cache/cbam_jax/jax_cache``);
* ``off`` (or ``0``, ``false``, ``no``): no persistent cache, even if JAX's variable is set;
* anything else: the folder to use.

A folder that cannot be created or written is reported in one warning and the run compiles as
usual; a corrupt entry is JAX's business: it warns and compiles.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import warnings

import jax

__all__ = ['ENV', 'default_folder', 'enable']

ENV = 'CBAM_JAX_COMPILATION_CACHE'
_OFF = ('off', '0', 'false', 'no')


def default_folder() -> pathlib.Path:
  """``$XDG_CACHE_HOME/cbam_jax/jax_cache``, ``~/.cache/cbam_jax/jax_cache`` without it."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'cbam_jax' / 'jax_cache'


def enable(setting: str | None = None) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache as ``CBAM_JAX_COMPILATION_CACHE`` says.

  Args:
    setting: the variable's value; ``None`` reads it from the environment.

  Returns:
    The cache folder, or ``None`` when the cache is off (asked for, or the folder unusable).
  """
  if setting is None:
    setting = os.environ.get(ENV, '')
  setting = setting.strip()
  if setting.lower() in _OFF:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  folder = pathlib.Path(setting or os.environ.get('JAX_COMPILATION_CACHE_DIR') or
                        default_folder()).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as error:
    warnings.warn(f'Compilation cache off: cannot write to {folder} ({error.strerror or error}); '
                  f'every program compiles. Set {ENV}=DIR to use another folder or '
                  f'{ENV}=off to silence this.', RuntimeWarning, stacklevel=2)
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', str(folder))
  # Every program, not only those over JAX's 1 s default: the set-up's small ones add up.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return folder
