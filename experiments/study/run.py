r"""The multi-seed attention study of ``docs/results/protocol.md``.

Modes:

* ``train`` (default): one ``python -m experiments.training.train`` run per (variant, seed),
  with the same config and budget, in ``ROOT/<variant>/seed<k>``, seed by seed in the order
  given. Finished runs are read back from their ``metrics.jsonl``; unfinished ones are
  restarted with the same command, which resumes from their latest checkpoint, so rerunning
  the command continues the study. Every launch records the commit and the CPU in
  ``<workdir>/study_run.json``. With ``--out``, the per-run results (``runs.json``/
  ``runs.csv``), the summary (``summary.md``/``summary.json``: mean ± sd over seeds of the
  last-epoch held-out top-1, paired differences to ``--baseline`` with 95% t-intervals) and
  ``curves.png`` are rewritten after every run.
* ``localization``: ``experiments.inspection.localization``'s scores (attention and Grad-CAM
  mass in box, pointing game) of every finished run's last checkpoint, mean ± sd over seeds.

A variant is ``ATTENTION`` or ``NAME=ATTENTION:FIELD=VALUE[:FIELD=VALUE...]``; FIELD is a
``config.model`` field or ``attention_fields.F`` (a field of the attention module).
``bam@stages`` is BAM at the stage transitions; every other name is the module in every
residual block.

  python -m experiments.study.run --epochs 3 --workdir_root /tmp/compare \
      --attention none,se,eca,cbam
  python -m experiments.study.run --config experiments/configs/default.py --epochs 10 \
      --seeds 0-4 --workdir_root /work/runs/shapes_study --out docs/results/shapes \
      --attention none,cbam,cbam_gate1=cbam:zero_init_spatial_gate=False,se,\
cbam_r4=cbam:attention_fields.reduction_ratio=4 --contrast cbam_gate1:cbam --contrast cbam_r4:cbam
  python -m experiments.study.run --mode localization --seeds 0-4 \
      --workdir_root /work/runs/shapes_study --out docs/results/shapes --attention none,cbam

The attention table (parameters, FLOPs, forward time) is ``experiments.bench.compare_attention``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from experiments import cli
from experiments.study import localize, report, runner, variants

PROG = 'python -m experiments.study.run'

DEFAULT_CONFIG = 'experiments/configs/cifar10.py'


def _contrast(spec: str) -> tuple[str, str]:
  """``'VARIANT:REFERENCE'`` as ``(variant, reference)``.

  Raises:
    flags.ValidationError: no colon or an empty side.
  """
  variant, sep, reference = spec.partition(':')
  if not sep or not variant or not reference:
    raise flags.ValidationError(f'--contrast {spec!r}: write VARIANT:REFERENCE.')
  return variant, reference


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_enum('mode', 'train', ('train', 'localization'), 'What to run (see Modes '
                    'above).', flag_values=values)
  flags.DEFINE_string('attention', 'all', '"all" or a comma-separated list of variants: '
                      f'ATTENTION (none, registry names, {variants.STAGE_BAM}) or '
                      'NAME=ATTENTION:FIELD=VALUE[:...].', flag_values=values)
  flags.DEFINE_string('json', None, 'Also write the rows to this file.', flag_values=values)
  flags.DEFINE_string('workdir_root', '/tmp/compare_attention', 'Runs go to '
                      'ROOT/<variant>/seed<k>.', flag_values=values)
  flags.DEFINE_string('config', DEFAULT_CONFIG, 'train mode.', flag_values=values)
  flags.DEFINE_integer('epochs', 3, 'train mode.', lower_bound=1, flag_values=values)
  flags.DEFINE_string('seeds', '0', 'e.g. 0-4 or 0,1,2.', flag_values=values)
  flags.DEFINE_multi_string('train_flag', [], 'train mode: an extra flag for '
                            'experiments.training.train, e.g. '
                            '--train_flag=--config.global_batch_size=256.', flag_values=values)
  flags.DEFINE_string('out', None, 'Write runs.json/.csv, summary.json/.md, curves.png (or '
                      'localization.json/.md) here, updated after every run.',
                      flag_values=values)
  flags.DEFINE_string('title', None, 'train mode: summary and plot title.', flag_values=values)
  flags.DEFINE_boolean('report_only', False, 'train mode: read the runs back and write --out, '
                       'launch nothing.', flag_values=values)
  flags.DEFINE_string('baseline', 'none', 'train mode: the variant the others are paired with.',
                      flag_values=values)
  flags.DEFINE_multi_string('contrast', [], 'train mode: an extra paired contrast '
                            'VARIANT:REFERENCE, e.g. --contrast cbam_r4:cbam.',
                            flag_values=values)
  flags.register_validator('contrast', lambda specs: all(_contrast(s) for s in specs),
                           flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  contrasts = [_contrast(spec) for spec in values.contrast]
  study_variants = variants.parse_study_variants(values.attention)
  seeds = variants.parse_seeds(values.seeds)
  failed = []

  output: Any
  if values.mode == 'train':
    title = values.title or f'{os.path.basename(values.config)}, {values.epochs} epochs'

    def update(rows):
      if values.out:
        report.write_outputs(rows, values.out, title=title, baseline=values.baseline,
                             contrasts=contrasts)

    rows = runner.run_study(study_variants, seeds, root=values.workdir_root,
                            config=values.config, epochs=values.epochs,
                            extra=values.train_flag, on_update=update,
                            launch_runs=not values.report_only,
                            archive=runner.read_archive(values.out))
    print(report.format_train_table(rows))
    print(report.markdown_summary(report.summarise(rows, baseline=values.baseline,
                                                   contrasts=contrasts)))
    output = rows
    failed = [f'{r["variant"]}/seed{r["seed"]}' for r in rows if r['status'] == 'failed']
  else:
    output = localize.localize_study(study_variants, seeds, root=values.workdir_root)
    output['summary'] = report.summarise_localization(output['runs'])
    table = report.markdown_localization(output['summary'], output['baselines'])
    print(table)
    if values.out:
      os.makedirs(values.out, exist_ok=True)
      with open(os.path.join(values.out, 'localization.json'), 'w') as f:
        json.dump(output, f, indent=1)
      with open(os.path.join(values.out, 'localization.md'), 'w') as f:
        f.write(f'# Localisation, mean ± sd over seeds {values.seeds}\n\n{table}\n')
  if values.json:
    with open(values.json, 'w') as f:
      json.dump(output, f, indent=1)
  if failed:
    sys.exit(f'Failed runs (rerun the same command to retry): {", ".join(failed)}')


if __name__ == '__main__':
  main()
