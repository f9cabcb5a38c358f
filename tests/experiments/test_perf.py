"""Tests for experiments.perf: XLA:CPU flags and the glibc settings of the scripts."""

import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from experiments import perf


def test_configure_cpu_refuses_once_jax_has_started():
  jnp.ones(1).block_until_ready()  # The backend is up, so new XLA flags would be ignored.
  with pytest.raises(RuntimeError, match='before JAX starts'):
    perf.configure_cpu(['--xla_cpu_use_onednn=true'])


@pytest.mark.parametrize('environ,libc,thp,expected', [
    ({}, ('glibc', '2.36'), 'madvise', {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, ('glibc', '2.39'), 'always',
     {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, ('glibc', '2.36'), 'madvise', {}),  # opt-out
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, ('glibc', '2.36'), 'madvise', {}),  # done
    ({}, ('glibc', '2.31'), 'madvise', {}),  # hugetlb came in glibc 2.35
    ({}, ('glibc', '2.36'), 'never', {}),
    ({}, ('glibc', '2.36'), None, {}),  # no THP on this kernel
    ({}, ('', ''), 'madvise', {}),  # musl, macOS
])
def test_cpu_env_updates(environ, libc, thp, expected):
  assert perf.cpu_env_updates(environ, libc=libc, thp_mode=thp) == expected


def test_reexec_with_cpu_env_restarts_once(monkeypatch):
  calls = []
  monkeypatch.setattr(perf.os, 'execve', lambda *args: calls.append(args))
  monkeypatch.setattr(perf, 'cpu_env_updates', lambda: {'GLIBC_TUNABLES': 'x=1'})
  monkeypatch.setattr(perf.sys, 'orig_argv',
                      ['python', '-m', 'experiments.training.train', '--a=1'])
  perf.reexec_with_cpu_env()
  (executable, argv, env), = calls
  assert executable == perf.sys.executable
  assert argv == [perf.sys.executable, '-m', 'experiments.training.train', '--a=1']
  assert env['GLIBC_TUNABLES'] == 'x=1' and env['PATH'] == perf.os.environ['PATH']
  monkeypatch.setattr(perf, 'cpu_env_updates', lambda: {})
  perf.reexec_with_cpu_env()  # Nothing to change (e.g. the restarted process): no exec.
  assert len(calls) == 1


@pytest.mark.slow
def test_importing_perf_does_not_import_jax():
  # The scripts re-exec with perf.reexec_with_cpu_env() before their heavy imports, so
  # importing perf (and the training entry point) must not already have loaded JAX.
  code = ('import sys; from experiments import perf; import experiments.training.train; '
          'assert "jax" not in sys.modules, "jax imported"; print("ok")')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, cwd=pathlib.Path(__file__).resolve().parents[2])
  assert out.stdout.strip() == 'ok'
