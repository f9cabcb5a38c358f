"""The command lines' persistent compilation cache (experiments/compile_cache.py)."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache, monitoring

from experiments import compile_cache

_SETTINGS = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir',
             'jax_persistent_cache_min_compile_time_secs')


@pytest.fixture(autouse=True)
def restore_jax_cache_settings(monkeypatch):
  """Each test changes JAX's global cache settings: put them back (and the cache object)."""
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  saved = {name: getattr(jax.config, name) for name in _SETTINGS}
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _fresh_program(x):
  # A constant no other test uses: nothing in memory or on disk holds this program yet.
  return jnp.sin(x) * 1.234567 + jnp.cumsum(x)


def test_default_folder_is_per_user(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  assert compile_cache.enable() == tmp_path / 'cbam_jax' / 'jax_cache'
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'cbam_jax' / 'jax_cache')
  assert (tmp_path / 'cbam_jax' / 'jax_cache').is_dir()


def test_explicit_jax_variable_wins_over_the_default(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
  assert compile_cache.enable() == tmp_path / 'jax'
  # ... and our variable wins over JAX's.
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'ours'))
  assert compile_cache.enable() == tmp_path / 'ours'


@pytest.mark.parametrize('value', ['off', 'OFF', '0', 'false'])
def test_off_turns_the_cache_off(monkeypatch, tmp_path, value):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv(compile_cache.ENV, value)
  assert compile_cache.enable() is None
  assert not jax.config.jax_enable_compilation_cache


def test_warm_run_loads_the_same_program(tmp_path):
  """Compiled, written, read back after the in-memory caches are dropped: same result."""
  assert compile_cache.enable(str(tmp_path)) == tmp_path
  x = jnp.linspace(-3.0, 3.0, 257)
  cold = np.asarray(jax.jit(_fresh_program)(x))
  entries = sorted(tmp_path.rglob('*'))
  assert any(path.is_file() for path in entries), 'nothing was written to the cache'
  jax.clear_caches()
  compilation_cache.reset_cache()
  events = []
  listener = lambda event, **_: events.append(event)
  monitoring.register_event_listener(listener)
  try:
    warm = np.asarray(jax.jit(_fresh_program)(x))
  finally:
    monitoring.unregister_event_listener(listener)
  assert '/jax/compilation_cache/cache_hits' in events
  np.testing.assert_array_equal(warm, cold)


def test_corrupt_entries_warn_and_compile(tmp_path):
  compile_cache.enable(str(tmp_path))
  x = jnp.linspace(-2.0, 2.0, 129)
  cold = np.asarray(jax.jit(_fresh_program)(x))
  files = [path for path in tmp_path.rglob('*') if path.is_file()]
  assert files
  for path in files:
    path.write_bytes(b'not a compiled program')
  jax.clear_caches()
  compilation_cache.reset_cache()
  with pytest.warns(UserWarning, match='persistent compilation cache'):
    again = np.asarray(jax.jit(_fresh_program)(x))
  np.testing.assert_array_equal(again, cold)


def test_unusable_folder_warns_and_runs_without_cache(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.warns(RuntimeWarning, match='Compilation cache off: cannot write to'):
    assert compile_cache.enable(str(blocker / 'cache')) is None
  assert not jax.config.jax_enable_compilation_cache
  x = jnp.arange(5.0)
  np.testing.assert_allclose(jax.jit(_fresh_program)(x), _fresh_program(np.asarray(x)),
                             rtol=1e-6)


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes to read-only folders')
def test_read_only_folder_warns(tmp_path):
  folder = pathlib.Path(tmp_path / 'read_only')
  folder.mkdir()
  folder.chmod(0o500)
  try:
    with pytest.warns(RuntimeWarning, match='cannot write to'):
      assert compile_cache.enable(str(folder)) is None
  finally:
    folder.chmod(0o700)
