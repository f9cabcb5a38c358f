"""The command line: ``python -m cbam_jax.convert IN.pth OUT_DIR --source official``."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from cbam_jax.convert.architecture import SOURCES
from cbam_jax.convert.conversion import from_pytorch
from cbam_jax.convert.io import save_converted
from cbam_jax.convert.keys import listing
from cbam_jax.convert.state_dict import load_state_dict


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m cbam_jax.convert',
      description='Convert a PyTorch ResNet(+CBAM/SE) checkpoint to a cbam_jax model: writes '
                  'OUT_DIR/model.json and an orbax checkpoint OUT_DIR/variables.')
  parser.add_argument('input', help='.pth/.pt file (state dict or {"state_dict": ...})')
  parser.add_argument('out_dir', help='output directory')
  parser.add_argument('--source', choices=SOURCES, default='official',
                      help='key layout of the input (default: official)')
  parser.add_argument('--attention', default='auto',
                      help="torchvision only: attention to add (default cbam; 'none' for a "
                           "plain ResNet)")
  parser.add_argument('--no-strict', dest='strict', action='store_false',
                      help='load matching keys; initialise missing ones, ignore the rest')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed for variables PyTorch does not provide')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit code."""
  args = _parser().parse_args(argv)
  attention = None if args.attention.lower() == 'none' else args.attention
  state_dict = load_state_dict(args.input)
  model, variables, report = from_pytorch(
      state_dict, args.source, strict=args.strict, attention=attention, rng=args.seed,
      return_report=True)
  save_converted(args.out_dir, model, variables, in_channels=report.config['in_channels'],
                 extra={'source': report.source, 'input': os.path.abspath(args.input),
                        'new_keys': list(report.new_keys),
                        'missing_keys': list(report.missing_keys),
                        'unexpected_keys': list(report.unexpected_keys)})
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables['params']))
  print(f'Converted {len(report.loaded_keys)} tensors ({num_params:,} parameters) from '
        f'{args.input} ({args.source}) to {args.out_dir}.')
  print('Model: ' + json.dumps(report.config))
  for name in ('new_keys', 'missing_keys', 'unexpected_keys'):
    keys = getattr(report, name)
    if keys:
      print(f'{name.replace("_", " ").capitalize()} ({len(keys)}): {listing(list(keys))}')
  return 0

