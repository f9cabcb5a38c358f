"""Where and on what each run of the study ran: the commit, the CPU, one record per launch."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

PROVENANCE = 'study_run.json'  # In each workdir: one entry per launch of the run.


def git_commit() -> str | None:
  """``git rev-parse HEAD`` of this checkout, '-dirty' if tracked code files changed.

  Only ``cbam_jax/``, ``experiments/`` and ``pyproject.toml`` count: the study itself rewrites
  its results under ``docs/``.
  """
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--',
                            'cbam_jax', 'experiments', 'pyproject.toml'], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ('-dirty' if dirty else '')


def cpu_model() -> str | None:
  """``lscpu``'s 'Model name' (or /proc/cpuinfo's 'model name')."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


def launches(workdir: str) -> list[dict[str, Any]]:
  """Every launch recorded in ``<workdir>/study_run.json``, oldest first ([] if none)."""
  path = os.path.join(workdir, PROVENANCE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def record_launch(workdir: str, launch: Mapping[str, Any]) -> None:
  """Appends ``launch`` to ``<workdir>/study_run.json``."""
  records = [*launches(workdir), dict(launch)]
  with open(os.path.join(workdir, PROVENANCE), 'w') as f:
    json.dump(records, f, indent=1)
