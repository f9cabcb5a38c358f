"""Seconds from starting the main job to its compiled training step, cold then warm.

  python -m experiments.bench.time_to_first_step [--config experiments/configs/default.py]

Runs the training command twice with a fresh compilation-cache folder (the second run finds
the first's programs there), each into a new workdir, and stops each once the training step
is compiled; prints the command's own set-up lines with the seconds since its start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import flags

from experiments import cli

PROG = 'python -m experiments.bench.time_to_first_step'


def first_step_seconds(config: str, workdir: str, cache: str) -> float:
  """Runs the training command until its training step is compiled; returns the seconds."""
  env = {**os.environ, 'CBAM_JAX_COMPILATION_CACHE': cache, 'PYTHONUNBUFFERED': '1'}
  start = time.time()
  process = subprocess.Popen(
      [sys.executable, '-m', 'experiments.training.train', '--config', config,
       '--workdir', workdir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=env, start_new_session=True)
  try:
    last = ''
    for line in process.stdout:
      print(f'{time.time() - start:6.1f} s | {line.rstrip()}', flush=True)
      last = line.strip() or last
      if 'Compiled the training step' in line:
        return time.time() - start
    raise cli.UserError(f'the training command ended before compiling its step (exit '
                        f'{process.wait()}): {last}')
  finally:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('config', 'experiments/configs/default.py',
                      'The training configuration to start.', flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> tuple[float, float]:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``); returns
  the seconds to the compiled step, cold and warm."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  if not os.path.isfile(values.config):
    raise cli.UserError(f'--config {values.config}: no such file (the configs are in '
                        'experiments/configs/).')
  with tempfile.TemporaryDirectory() as scratch:
    cache = os.path.join(scratch, 'cache')
    cold = first_step_seconds(values.config, os.path.join(scratch, 'cold'), cache)
    warm = first_step_seconds(values.config, os.path.join(scratch, 'warm'), cache)
  print(f'To the compiled training step: {cold:.1f} s cold, {warm:.1f} s warm.')
  return cold, warm


if __name__ == '__main__':
  main()
