"""The command line: ``python -m cbam_jax.convert IN.pth OUT_DIR --source=official``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from cbam_jax import _cli, saving
from cbam_jax.convert.architecture import SOURCES
from cbam_jax.convert.conversion import from_pytorch
from cbam_jax.convert.keys import listing
from cbam_jax.convert.state_dict import load_state_dict

PROG = 'python -m cbam_jax.convert'
USAGE = f"""Convert a PyTorch ResNet(+CBAM/SE) checkpoint to a cbam_jax model.

  {PROG} IN.pth OUT_DIR [--source={"|".join(SOURCES)}] [--attention=cbam|none|se]
      [--nostrict] [--seed=0]

IN.pth is a state dict or {{"state_dict": ...}}; writes OUT_DIR/model.json (the model
description) and an orbax checkpoint OUT_DIR/variables (cbam_jax.saving.load reads them).
"""


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_enum('source', 'official', SOURCES, 'Key layout of the input.',
                    flag_values=values)
  flags.DEFINE_string('attention', 'auto', "torchvision only: attention to add (default "
                      "cbam; 'none' for a plain ResNet).", flag_values=values)
  flags.DEFINE_boolean('strict', True, 'Fail on missing or unexpected keys; --nostrict loads '
                       'the matching keys, initialises missing ones and ignores the rest.',
                       flag_values=values)
  flags.DEFINE_integer('seed', 0, 'Seed for variables PyTorch does not provide.',
                       flag_values=values)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point (``argv`` without the program name); returns the exit code."""
  values, positional = _cli.parse(argv, define_flags, prog=PROG, usage=USAGE, max_positional=2)
  if len(positional) != 2:
    raise SystemExit(f'{PROG}: give IN.pth and OUT_DIR. Pass --help for the usage.')
  input_path, out_dir = positional
  attention = None if values.attention.lower() == 'none' else values.attention
  with _cli.one_line_errors(PROG):
    state_dict = load_state_dict(input_path)
  model, variables, report = from_pytorch(
      state_dict, values.source, strict=values.strict, attention=attention, rng=values.seed,
      return_report=True)
  saving.save(out_dir, model, variables, in_channels=report.config['in_channels'],
              extra={'source': report.source, 'input': os.path.abspath(input_path),
                     'new_keys': list(report.new_keys),
                     'missing_keys': list(report.missing_keys),
                     'unexpected_keys': list(report.unexpected_keys)})
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables['params']))
  print(f'Converted {len(report.loaded_keys)} tensors ({num_params:,} parameters) from '
        f'{input_path} ({values.source}) to {out_dir}.')
  print('Model: ' + json.dumps(report.config))
  for name in ('new_keys', 'missing_keys', 'unexpected_keys'):
    keys = getattr(report, name)
    if keys:
      print(f'{name.replace("_", " ").capitalize()} ({len(keys)}): {listing(list(keys))}')
  return 0
