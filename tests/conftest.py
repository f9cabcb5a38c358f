"""Test settings: 8 fake CPU devices (set before anything else touches JAX), and one
persistent compilation cache for the whole run.

Many tests compile the same programs (every run of the tiny training config, every CLI
subprocess that rebuilds a trained model), so the run shares one JAX compilation cache:
the pytest process that starts first makes a fresh directory, the xdist workers and the
subprocesses inherit it through the environment, and it is removed when that process ends.
It starts empty on every run, so no result depends on an earlier one. Set
``JAX_COMPILATION_CACHE_DIR`` yourself to keep a cache between runs.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Keep TensorFlow (used only by the tfds input pipeline) off any accelerator.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='cbam_jax_tests_jit_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# Programs that compile in under 0.3 s are not stored: caching every eager op too measured
# no faster (docs/testing.md).
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable otherwise): xdist hands tests out in this order, so the long
  end-to-end runs start early and the short tests fill the last minutes on both workers."""
  del config
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.fixture(params=[jax.jit, lambda fn, **_: fn], ids=['jit', 'nojit'])
def variant(request):
  """Runs a test once under ``jax.jit`` and once eagerly; ``variant(fn, static_argnums=...)``
  takes ``jax.jit``'s keywords, which the eager variant ignores."""
  return request.param
