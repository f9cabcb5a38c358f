"""Localisation scores of the study's finished runs (``--mode localization``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiments.study import runner
from experiments.study.variants import Variant


def localize_study(variants: Sequence[Variant], seeds: Sequence[int], *, root: str,
                   tolerances: Sequence[float] = (0.0, 2.0)) -> dict[str, Any]:
  """``experiments.inspection.localization`` scores of every finished (variant, seed) checkpoint."""
  from experiments.inspection import localization, visualize

  results, reference = [], None
  for seed in seeds:
    for variant in variants:
      workdir = runner.run_workdir(root, variant, seed)
      if not runner.is_finished(workdir):  # A run in progress has checkpoints of earlier epochs.
        print(f'  skipped {variant.name} seed {seed}: not finished', flush=True)
        continue
      try:
        run = visualize.load_run(workdir, 'latest')
      except FileNotFoundError as error:
        print(f'  skipped {variant.name} seed {seed}: {error}', flush=True)
        continue
      images = localization._eval_split(run, None)
      result = localization.score_run(run, images, tolerances)
      result.update(variant=variant.name, seed=seed, workdir=workdir)
      results.append(result)
      reference = reference or localization.baselines(images, tolerances)
      print(f'  {variant.name} seed {seed}: top-1 {result["top1"]:.4f}', flush=True)
  return {'runs': results, 'baselines': reference or {}}
