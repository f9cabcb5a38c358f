r"""Export a saved model or a training checkpoint as StableHLO or ONNX.

  python -m cbam_jax.export --model DIR --format stablehlo --out model.stablehlo
  python -m cbam_jax.export --model WORKDIR --which best --format onnx --out model.onnx

--model is a saved model directory (model.json + variables: cbam_jax.saving.save, python -m
cbam_jax.convert) or a training workdir (python -m experiments.training.train; run this
from the repository root so that `experiments` imports). The exported program is the
model in evaluation mode on (batch, size, size, channels) float32 images, any batch size
unless --fixed_batch. An existing --out is kept unless --overwrite. See docs/deploy.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from cbam_jax import _flags
from cbam_jax._flags import HELP_HINT, UsageError

PROG = 'python -m cbam_jax.export'
FORMATS = ('stablehlo', 'onnx')
# The input size when neither --image_size nor a training config says it, by the stem.
_DEFAULT_SIZES = {'imagenet': 224, 'cifar': 32}


def _define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('model', None, 'A saved model directory or a training workdir.',
                      flag_values=values)
  flags.DEFINE_enum('format', None, FORMATS, 'What to write.', flag_values=values)
  flags.DEFINE_string('out', None, 'The file to write.', flag_values=values)
  flags.DEFINE_string('which', 'latest', "A workdir's checkpoint: 'latest', 'best' (best "
                      'eval top-1) or a step number.', flag_values=values)
  flags.DEFINE_integer('image_size', None, 'Input height and width; default: the training '
                       "config's image_size, else 224 (ImageNet stem) or 32 (CIFAR stem).",
                       flag_values=values)
  flags.DEFINE_integer('batch_size', 1, 'The example batch (the ONNX check runs on it).',
                       flag_values=values)
  flags.DEFINE_bool('fixed_batch', False, 'Fix the batch size to --batch_size instead of '
                    'exporting for any batch size.', flag_values=values)
  flags.DEFINE_integer('opset', None, 'ONNX opset (default: cbam_jax.export.onnx\'s).',
                       flag_values=values)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.', flag_values=values)


def _parse(argv: Sequence[str]) -> flags.FlagValues:
  values, extra = _flags.parse(argv, _define_flags, prog=PROG, usage=__doc__)
  if extra:
    raise UsageError(f'unexpected argument(s) {" ".join(extra)}. {HELP_HINT}')
  for name in ('model', 'format', 'out'):
    if values[name].value is None:
      raise UsageError(f'--{name} is required. {HELP_HINT}')
  return values


def _load(path: str, which: str) -> tuple[Any, Any, int | None]:
  """``(model, variables, the training config's image_size or None)`` of a saved model
  directory or, failing that, a training workdir."""
  from cbam_jax import saving

  if not os.path.isdir(path):
    raise UsageError(f'--model {path}: no such directory.')
  try:
    model, variables = saving.load(path)
    return model, variables, None
  except FileNotFoundError:
    pass  # Not a saved model directory: a training workdir?
  except (OSError, ValueError) as error:
    raise UsageError(str(error)) from None
  try:
    from experiments.training import checkpointing
  except ImportError:
    raise UsageError(f'--model {path} is not a saved model directory; reading a training '
                     "workdir needs the repository's experiments package: run from the "
                     'repository root.') from None
  checkpoints, _ = checkpointing.find_checkpoint(path)
  if not os.path.isdir(checkpoints):
    raise UsageError(f'--model {path} is neither a saved model directory (no '
                     f'{saving.MODEL_JSON}) nor a training workdir (no checkpoints folder).')
  try:
    model, variables, meta, _ = checkpointing.load_model(path, which)
  except (OSError, ValueError) as error:
    raise UsageError(str(error)) from None
  return model, variables, meta.get('config', {}).get('image_size')


def run(argv: Sequence[str]) -> str:
  """Exports as ``argv`` says; returns the path written.

  Raises:
    UsageError: a bad flag, a missing or unreadable --model, an existing --out.
  """
  values = _parse(argv)
  out = os.path.abspath(values.out)
  if os.path.exists(out) and not values.overwrite:
    raise UsageError(f'--out {values.out} exists; pass --overwrite to replace it.')
  if not os.path.isdir(os.path.dirname(out)):
    raise UsageError(f'--out {values.out}: its folder does not exist.')
  if values.batch_size < 1 or (values.image_size is not None and values.image_size < 1):
    raise UsageError('--batch_size and --image_size must be positive.')

  import jax.numpy as jnp
  import numpy as np

  from cbam_jax import export
  from cbam_jax.export import _files

  model, variables, config_size = _load(values.model, values.which)
  size = values.image_size or config_size or _DEFAULT_SIZES.get(model.stem, 224)
  in_channels = variables['params']['conv1']['kernel'].shape[-2]  # The stem conv's input.
  shape = (values.batch_size, size, size, in_channels)
  example = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  polymorphic = not values.fixed_batch
  try:
    if values.format == 'stablehlo':
      blob = export.to_stablehlo(model, variables, example, batch_polymorphic=polymorphic)
      with _files.replacing(out) as written, open(written, 'wb') as f:
        f.write(blob)
    else:
      opset = {} if values.opset is None else {'opset': values.opset}
      export.to_onnx(model, variables, example, out, batch_polymorphic=polymorphic, **opset)
  except (ImportError, export.ExportError) as error:
    raise UsageError(str(error)) from None
  return out


def main(argv: Sequence[str] | None = None) -> str:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``): one
  line on stderr and exit status 2 for a mistake the user can fix."""
  try:
    out = run(sys.argv[1:] if argv is None else list(argv))
  except UsageError as error:
    print(f'{PROG}: {error}', file=sys.stderr)
    raise SystemExit(2) from None
  print(f'wrote {out}')
  return out


if __name__ == '__main__':
  main()
