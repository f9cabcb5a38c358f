"""The README's attention comparison script: variant names, the train runs it drives, tables."""

from __future__ import annotations

import json
import os

import pytest

from cbam_jax import attention as registry
from experiments import compare_attention as compare


def test_all_variants_are_none_every_registry_name_and_bam_at_stages():
  assert compare.parse_variants('all') == ['none', *registry.available(), 'bam@stages']
  assert compare.parse_variants(' se, cbam ') == ['se', 'cbam']


def test_unknown_variant_lists_the_valid_ones():
  with pytest.raises(SystemExit, match=r"Unknown attention 'sse'.*none, .*se.*bam@stages"):
    compare.parse_variants('se,sse')


@pytest.mark.parametrize('variant,attention,stage_attention', [
    ('none', 'none', 'none'), ('cbam', 'cbam', 'none'), ('bam@stages', 'none', 'bam')])
def test_train_command_sets_the_variant_and_shared_budget(variant, attention, stage_attention):
  command = compare.train_command(variant, '/tmp/w', config='c.py', epochs=3, seed=7,
                                  extra=['--config.warmup_epochs=0.5'])
  assert command[1:3] == ['-m', 'experiments.train']
  assert f'--config.model.attention={attention}' in command
  assert f'--config.model.stage_attention={stage_attention}' in command
  for flag in ('--config.num_epochs=3', '--config.seed=7', '--config.warmup_epochs=0.5'):
    assert flag in command


def _write_metrics(workdir, top1s):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for epoch, top1 in enumerate(top1s, 1):
      f.write(json.dumps({'epoch': epoch, 'train_loss': 1.0}) + '\n')
      f.write(json.dumps({'epoch': epoch, 'eval_top1': top1, 'eval_loss': 2.0 - top1}) + '\n')


def test_run_training_runs_missing_variants_and_reads_finished_ones(tmp_path, monkeypatch):
  _write_metrics(tmp_path / 'none', [0.5, 0.7])  # Finished: read, not rerun.
  _write_metrics(tmp_path / 'se', [0.4])  # One epoch short: rerun (resumes in train).
  commands = []

  def fake_run(command, check):
    assert check
    commands.append(command)
    workdir = command[command.index('--workdir') + 1]
    _write_metrics(workdir, [0.6, 0.65])

  monkeypatch.setattr(compare.subprocess, 'run', fake_run)
  rows = compare.run_training(['none', 'se', 'bam@stages'], root=str(tmp_path), config='c.py',
                              epochs=2, seed=0, extra=[])
  assert [c[c.index('--workdir') + 1] for c in commands] == [
      str(tmp_path / 'se'), str(tmp_path / 'bam_at_stages')]
  assert rows[0] == {'attention': 'none', 'epochs': 2, 'best_top1': 0.7, 'last_top1': 0.7,
                     'last_loss': pytest.approx(1.3)}
  assert rows[2]['best_top1'] == 0.65 and rows[2]['attention'] == 'bam@stages'
  table = compare.format_train_table(rows)
  assert '| none | 2 | 70.00% | 70.00% | 1.3000 |' in table
  assert '| bam@stages | 2 | 65.00% | 65.00% |' in table


def test_table_mode_counts_params_and_flops_against_none():
  rows = compare.measure(['none', 'se', 'simam'], model_name='resnet20', batch_size=2,
                         image_size=8, rounds=1, calls_per_round=1)
  by_name = {row['attention']: row for row in rows}
  assert by_name['simam']['params'] == by_name['none']['params']  # Parameter-free.
  assert by_name['se']['params'] > by_name['none']['params']
  assert by_name['se']['flops_per_image'] > by_name['none']['flops_per_image'] > 0
  assert all(row['seconds'] > 0 for row in rows)
  table = compare.format_table(rows)
  assert table.splitlines()[2].startswith('| none | ')
  assert '| simam | ' in table and '+0 |' in table
