"""The command line: ``python -m cbam_jax.convert IN.pth OUT_DIR --source=official``.

Errors the user can fix (flags, paths, an input that is not a PyTorch checkpoint or does not
fit ``--source``) print one line and exit with status 2; ``CBAM_JAX_TRACEBACK=1`` shows the
traceback. The output appears complete or not at all: it is written beside ``OUT_DIR`` and
renamed into place, and an existing ``OUT_DIR`` is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import flags

from cbam_jax import _flags, saving
from cbam_jax.convert.architecture import SOURCES
from cbam_jax.convert.conversion import from_pytorch
from cbam_jax.convert.keys import listing
from cbam_jax.convert.state_dict import load_state_dict

PROG = 'python -m cbam_jax.convert'
USAGE = f"""Convert a PyTorch ResNet/ResNeXt(+CBAM/SE) or MobileNet checkpoint to cbam_jax.

  {PROG} IN.pth OUT_DIR [--source={"|".join(SOURCES)}] [--attention=cbam|none|se]
      [--identity_init] [--nostrict] [--seed=0] [--overwrite]

IN.pth is a state dict or {{"state_dict": ...}}; writes OUT_DIR/model.json (the model
description) and an orbax checkpoint OUT_DIR/variables (cbam_jax.saving.load reads them).
"""


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_enum('source', 'official', SOURCES, 'Key layout of the input.',
                    flag_values=values)
  flags.DEFINE_string('attention', 'auto', "torchvision and timm MobileNets only: attention "
                      "to add (default cbam; 'none' for the plain network).",
                      flag_values=values)
  flags.DEFINE_boolean('identity_init', False, 'added attention only (torchvision, timm '
                       'MobileNets): start it as the identity (the plain network\'s logits).',
                       flag_values=values)
  flags.DEFINE_boolean('strict', True, 'Fail on missing or unexpected keys; --nostrict loads '
                       'the matching keys, initialises missing ones and ignores the rest.',
                       flag_values=values)
  flags.DEFINE_integer('seed', 0, 'Seed for variables PyTorch does not provide.',
                       flag_values=values)
  flags.DEFINE_boolean('overwrite', False, 'Replace an existing OUT_DIR.', flag_values=values)


def _parse(argv: Sequence[str] | None) -> tuple[flags.FlagValues, list[str]]:
  """The flags and positional arguments of ``argv``; ``--help`` prints the usage."""
  argv = list(sys.argv[1:] if argv is None else argv)
  values, positional = _flags.parse(argv, define_flags, prog=PROG, usage=USAGE)
  if len(positional) != 2:
    raise ValueError(f'give IN.pth and OUT_DIR, got {len(positional)} argument(s). Pass --help '
                     'for the usage.')
  return values, positional


def _better_source(state_dict: dict[str, np.ndarray], source: str, attention: str | None
                   ) -> str | None:
  """Another ``--source`` whose layout the whole state dict fits, or None."""
  for other in SOURCES:
    if other == source:
      continue
    try:
      from_pytorch(state_dict, other, strict=True, attention=attention)
    except (ValueError, KeyError, TypeError):
      continue
    return other
  return None


def _check_free(out_dir: str, overwrite: bool) -> None:
  """Raises FileExistsError if ``out_dir`` holds anything and ``overwrite`` is off."""
  if overwrite or not os.path.lexists(out_dir):
    return
  if os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir):
    return  # An empty folder made for the output.
  raise FileExistsError(f'{os.path.abspath(out_dir)} exists and is not empty; pass --overwrite '
                        'to replace it, or choose another OUT_DIR.')


def _write(out_dir: str, overwrite: bool, write: Callable[[str], None]) -> None:
  """Calls ``write(folder)`` on a fresh folder beside ``out_dir``, then renames it into place,
  so that an interrupted conversion leaves no half-written ``out_dir``."""
  out_dir = os.path.abspath(out_dir)
  _check_free(out_dir, overwrite)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.partial-', dir=parent)
  try:
    write(staging)
    if os.path.lexists(out_dir):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-', dir=parent)
      os.replace(out_dir, os.path.join(old, 'replaced'))
      os.replace(staging, out_dir)
      shutil.rmtree(old)
    else:
      os.replace(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point (``argv`` without the program name); returns the exit code.

  Raises:
    SystemExit: an error the user can fix, as one line (status 2).
  """
  try:
    return _convert(argv)
  except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError) as error:
    if os.environ.get('CBAM_JAX_TRACEBACK', '') not in ('', '0'):
      raise
    line = f'{PROG}: {" ".join(str(error).split())}'
    print(f'{line} (Set CBAM_JAX_TRACEBACK=1 for the traceback.)', file=sys.stderr, flush=True)
    exit_error = SystemExit(line)
    exit_error.code = 2
    raise exit_error from None


def _convert(argv: Sequence[str] | None) -> int:
  values, (input_path, out_dir) = _parse(argv)
  attention = None if values.attention.lower() == 'none' else values.attention
  _check_free(out_dir, values.overwrite)  # Before the slow part; _write checks again.
  state_dict = load_state_dict(input_path)
  try:
    model, variables, report = from_pytorch(
        state_dict, values.source, strict=values.strict, attention=attention,
        identity_init=values.identity_init, rng=values.seed, return_report=True)
  except ValueError as error:
    better = _better_source(state_dict, values.source, attention)
    if better is None:
      raise
    raise ValueError(f'{error} The state dict fits --source={better}: pass that.') from error
  extra = {'source': report.source, 'input': os.path.abspath(input_path),
           'new_keys': list(report.new_keys), 'missing_keys': list(report.missing_keys),
           'unexpected_keys': list(report.unexpected_keys)}
  _write(out_dir, values.overwrite, lambda folder: saving.save(
      folder, model, variables, in_channels=report.config['in_channels'], extra=extra))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables['params']))
  print(f'Converted {len(report.loaded_keys)} tensors ({num_params:,} parameters) from '
        f'{input_path} ({values.source}) to {out_dir}.')
  print('Model: ' + json.dumps(report.config))
  for name in ('new_keys', 'missing_keys', 'unexpected_keys'):
    keys = getattr(report, name)
    if keys:
      print(f'{name.replace("_", " ").capitalize()} ({len(keys)}): {listing(list(keys))}')
  return 0
