r"""How well do attention maps and Grad-CAM localise the object? Scores on 'shapes' boxes.

  python -m experiments.inspection.localization --workdir /tmp/default --workdir /tmp/default_none
  python -m experiments.inspection.localization --workdir /tmp/default --which=best \
      --tolerance=0,2,15

For every run (a workdir of ``experiments.training.train`` on the 'shapes' dataset), over its eval
split: top-1 accuracy, and for the spatial attention of the last block of each stage and
Grad-CAM (predicted class) of the same blocks, both upsampled bilinearly to the input:

* mass: fraction of the map's mass inside the object's ground-truth box
  (:func:`cbam_jax.inspection.attention_mass_in_box`) of the raw map (sigmoid gates; Grad-CAM
  is always min-max normalised) and of the map min-max normalised per image, which
  discounts a gate's constant floor,
* pointing: how often the map's maximum falls in the box, within ``--tolerance`` pixels
  (:func:`cbam_jax.inspection.pointing_game`).

Two baselines need no model: a uniform map (its mass is the box's area fraction; pointing
at a random pixel) and a map peaked at the image centre. Prints a Markdown table; ``--json``
also saves the numbers. ``--which`` picks each run's checkpoint (latest, best or a step).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import flags

from cbam_jax import inspection as ci
from experiments import cli, compile_cache
from experiments.inspection import visualize

PROG = 'python -m experiments.inspection.localization'


def _eval_split(run: visualize.Run, num_examples: int | None) -> visualize.Images:
  if run.config.get('dataset') != 'shapes':
    raise ValueError(f'Run at step {run.step} was trained on {run.config.get("dataset")!r}; '
                     "localisation scores need the ground-truth boxes of dataset='shapes'.")
  num_eval = int(run.config.shapes.num_eval) if num_examples is None else num_examples
  images = visualize.eval_images(run, num_eval)
  if images.boxes is None:
    raise ValueError('The eval batches carry no boxes; localisation needs the shapes dataset.')
  return images


def score_run(run: visualize.Run, images: visualize.Images,
              tolerances: Sequence[float] = (0.0,), batch_size: int = 256) -> dict[str, Any]:
  """Accuracy and localisation scores of one run on ``images`` (with labels and boxes).

  Returns:
    ``{'top1': float, 'maps': {name: {'mass': float, 'pointing@<tol>': float}}}`` with names
    ``'spatial <block>'`` and ``'grad-cam <block>'``.
  """
  blocks = visualize.last_block_per_stage(visualize.block_names(run.variables['params']))
  analysis = visualize.analyse(run, images.inputs, blocks, map_blocks=None,
                               batch_size=batch_size)
  spatial_blocks = visualize.last_block_per_stage(sorted(analysis.spatial))
  candidates = [(f'spatial {b}', analysis.spatial[b]) for b in spatial_blocks]
  candidates += [(f'grad-cam {b}', analysis.cams[b]) for b in blocks]
  boxes = jnp.asarray(images.boxes)
  result: dict[str, Any] = {
      'step': run.step, 'attention': run.attention, 'model': run.model_name,
      'num_examples': len(images.inputs),
      'top1': float(np.mean(np.argmax(analysis.probs, -1) == images.labels)), 'maps': {}}
  for name, maps in candidates:
    scores = {'mass': float(ci.attention_mass_in_box(maps, boxes).mean()),
              'mass_minmax': float(ci.attention_mass_in_box(ci.normalize_maps(maps),
                                                            boxes).mean())}
    for tolerance in tolerances:
      scores[f'pointing@{tolerance:g}'] = float(ci.pointing_game(maps, boxes, tolerance).mean())
    result['maps'][name] = scores
  return result


def baselines(images: visualize.Images, tolerances: Sequence[float]) -> dict[str, Any]:
  """Scores without a model: a uniform map / random point, and the image centre.

  A uniform map's mass in the box is the box's area fraction; its "pointing" entry is the
  expected hit rate of a uniformly random pixel (the fraction of pixels within the
  tolerance of the box). The centre map peaks at the image centre.
  """
  n, height, width = images.inputs.shape[:3]
  boxes = np.asarray(images.boxes, np.float32)
  uniform = jnp.ones((n, height, width))
  ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing='ij')
  dy = np.maximum(np.maximum(boxes[:, 0, None, None] - ys, ys - boxes[:, 2, None, None]), 0)
  dx = np.maximum(np.maximum(boxes[:, 1, None, None] - xs, xs - boxes[:, 3, None, None]), 0)
  distance = np.hypot(dy, dx)  # (N, H, W) from each pixel centre to the box
  centre = -((ys - height / 2) ** 2 + (xs - width / 2) ** 2)
  centre = jnp.broadcast_to(jnp.asarray(centre, jnp.float32), (n, height, width))
  mass = float(ci.attention_mass_in_box(uniform, boxes).mean())
  random_point = {'mass': mass, 'mass_minmax': mass}
  image_centre = {'mass': mass, 'mass_minmax': float(ci.attention_mass_in_box(
      ci.normalize_maps(centre), boxes).mean())}
  for tolerance in tolerances:
    key = f'pointing@{tolerance:g}'
    random_point[key] = float((distance <= tolerance).mean())
    image_centre[key] = float(ci.pointing_game(centre, boxes, tolerance).mean())
  return {'uniform map / random point': random_point, 'image centre': image_centre}


def markdown_table(results: Sequence[dict[str, Any]], reference: dict[str, Any],
                   tolerances: Sequence[float]) -> str:
  pointing = [f'pointing@{t:g}' for t in tolerances]
  header = ['run', 'attention', 'top-1', 'map', 'mass in box', 'mass in box (min-max)', *[
      f'pointing hit rate (tol {t:g} px)' for t in tolerances]]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for result in results:
    for index, (name, scores) in enumerate(result['maps'].items()):
      head = ([result['name'], result['attention'], f'{result["top1"]:.3f}'] if index == 0
              else ['', '', ''])
      lines.append('| ' + ' | '.join(head + [name] + [
          f'{scores[p]:.3f}' for p in ('mass', 'mass_minmax', *pointing)]) + ' |')
  for name, scores in reference.items():
    lines.append('| ' + ' | '.join(['baseline', '-', '-', name] + [
        f'{scores[p]:.3f}' for p in ('mass', 'mass_minmax', *pointing)]) + ' |')
  return '\n'.join(lines)


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_multi_string('workdir', None, 'Training workdir on shapes; repeat to compare '
                            'runs.', required=True, flag_values=values)
  flags.DEFINE_string('which', 'latest', "Each run's checkpoint: 'latest', 'best' (best eval "
                      'top-1) or a step number.', flag_values=values)
  flags.DEFINE_integer('num_examples', None, 'Eval examples to score (default: the whole '
                       'eval split).', lower_bound=1, flag_values=values)
  flags.DEFINE_list('tolerance', ['0'], 'Pointing-game tolerances in pixels, comma-separated '
                    '(the original protocol: 15).', flag_values=values)
  flags.DEFINE_integer('batch_size', 256, 'Images per forward pass.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_string('json', None, 'Also write the results to this JSON file.',
                      flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``);
  returns the results of every run."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  compile_cache.enable()
  try:
    tolerances = [float(t) for t in values.tolerance]
  except ValueError:
    raise cli.UserError(f'--tolerance wants numbers, e.g. --tolerance=0,2,15; got '
                        f'{",".join(values.tolerance)}.') from None
  if any(t < 0 for t in tolerances):
    raise cli.UserError('--tolerance must be >= 0.')
  results, reference = [], None
  for workdir in values.workdir:
    run = visualize.load_run(workdir, values.which)
    images = _eval_split(run, values.num_examples)
    result = score_run(run, images, tolerances, values.batch_size)
    result['name'] = os.path.basename(os.path.abspath(workdir).rstrip('/'))
    result['workdir'] = os.path.abspath(workdir)
    results.append(result)
    reference = reference or baselines(images, tolerances)
  print(f'{results[0]["num_examples"]} eval examples of shapes; maps upsampled to the input.')
  print(markdown_table(results, reference, tolerances))
  if values.json:
    with open(values.json, 'w') as f:
      json.dump({'runs': results, 'baselines': reference}, f, indent=2)
  return results


if __name__ == '__main__':
  main()
