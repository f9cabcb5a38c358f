"""The multi-seed attention study (experiments/study/): variants, the runs it drives, outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from cbam_jax import attention as registry
from experiments import cli
from experiments.study import localize, provenance, report, run, runner
from experiments.study import variants as study_variants


def test_all_variants_are_none_every_registry_name_and_bam_at_stages():
  assert study_variants.parse_variants('all') == ['none', *registry.available(), 'bam@stages']
  assert study_variants.parse_variants(' se, cbam ') == ['se', 'cbam']


def test_unknown_variant_lists_the_valid_ones():
  with pytest.raises(cli.UserError, match=r"Unknown attention 'sse'.*none, .*se.*bam@stages"):
    study_variants.parse_variants('se,sse')


@pytest.mark.parametrize('variant,attention,stage_attention', [
    ('none', 'none', 'none'), ('cbam', 'cbam', 'none'), ('bam@stages', 'none', 'bam')])
def test_train_command_sets_the_variant_and_shared_budget(variant, attention, stage_attention):
  command = runner.train_command(study_variants.parse_variant(variant), '/tmp/w', config='c.py',
                                  epochs=3, seed=7, extra=['--config.warmup_epochs=0.5'])
  assert command[1:3] == ['-m', 'experiments.training.train']
  assert f'--config.model.attention={attention}' in command
  assert f'--config.model.stage_attention={stage_attention}' in command
  for flag in ('--config.num_epochs=3', '--config.seed=7', '--config.warmup_epochs=0.5'):
    assert flag in command


def test_named_variants_with_field_overrides():
  variants = study_variants.parse_study_variants(
      'none, cbam_gate1=cbam:zero_init_spatial_gate=False,'
      'cbam_r4=cbam:attention_fields.reduction_ratio=4:attention_fields.mlp_bias=False')
  assert [v.name for v in variants] == ['none', 'cbam_gate1', 'cbam_r4']
  assert variants[0] == study_variants.Variant('none', 'none')
  gate1, r4 = variants[1].train_flags(), variants[2].train_flags()
  assert '--config.model.attention=cbam' in gate1
  assert '--config.model.zero_init_spatial_gate=False' in gate1
  assert '--config.model.attention_fields=reduction_ratio=4,mlp_bias=False' in r4
  assert variants[2].fields == 'attention_fields.reduction_ratio=4:attention_fields.mlp_bias=False'


@pytest.mark.parametrize('spec,message', [
    ('x=sse', "Unknown attention 'sse'"), ('cbam,cbam', 'unique'),
    ('r4=cbam:reduction_ratio', 'not FIELD=VALUE'), ('a b=cbam', 'must be letters')])
def test_bad_variants_name_the_problem(spec, message):
  with pytest.raises(cli.UserError, match=message):
    study_variants.parse_study_variants(spec)


def test_parse_seeds():
  assert study_variants.parse_seeds('0-4') == [0, 1, 2, 3, 4]
  assert study_variants.parse_seeds('3, 0-1') == [3, 0, 1]
  for bad in ('', '0,0', 'a'):
    with pytest.raises(cli.UserError, match='--seeds'):
      study_variants.parse_seeds(bad)


def test_command_line_flags_repeat_and_reject_bad_values_in_one_line():
  values, _ = cli.parse(['--mode', 'train', '--train_flag', '--config.seed=1',
                          '--train_flag=--config.warmup_epochs=0', '--contrast', 'a:b',
                          '--contrast=c:d'], run.define_flags, prog='c', usage='')
  assert values.train_flag == ['--config.seed=1', '--config.warmup_epochs=0']
  assert [run._contrast(spec) for spec in values.contrast] == [('a', 'b'), ('c', 'd')]
  for argv, message in ((['--contrast', 'cbam'], r"--contrast 'cbam': write VARIANT:REFERENCE"),
                        (['--mode', 'tain'], r'--mode=tain: value should be one of'),
                        (['--epochs', '0'], r'--epochs=0: 0 is not a positive integer')):
    with pytest.raises(SystemExit, match=message) as error:
      run.main(argv)
    assert str(error.value).startswith('python -m experiments.study.run: ')


def test_provenance_is_this_checkouts_commit_and_the_cpu_model():
  assert re.fullmatch(r'[0-9a-f]{40}(-dirty)?', provenance.git_commit())
  assert provenance.cpu_model()


@pytest.fixture
def fake_provenance(monkeypatch):
  monkeypatch.setattr(provenance, 'git_commit', lambda: 'abc123')
  monkeypatch.setattr(provenance, 'cpu_model', lambda: 'Test CPU')


def _write_metrics(workdir, top1s, num_epochs=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for epoch, top1 in enumerate(top1s, 1):
      f.write(json.dumps({'epoch': epoch, 'train_loss': 1.0}) + '\n')
      f.write(json.dumps({'epoch': epoch, 'eval_top1': top1, 'eval_loss': 2.0 - top1}) + '\n')
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'config': {'num_epochs': num_epochs or 2}}, f)


def test_run_study_runs_missing_runs_seed_by_seed_and_reads_finished_ones(
    tmp_path, monkeypatch, fake_provenance):
  variants = study_variants.parse_study_variants('none,se,bam@stages')
  _write_metrics(tmp_path / 'none' / 'seed0', [0.5, 0.7])  # Finished: read, not rerun.
  _write_metrics(tmp_path / 'se' / 'seed0', [0.4])  # One epoch short: rerun (resumes).
  commands, updates = [], []

  def fake_run(command, check):
    assert not check
    commands.append(command)
    workdir = command[command.index('--workdir') + 1]
    _write_metrics(workdir, [0.6, 0.65])
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(runner.subprocess, 'run', fake_run)
  rows = runner.run_study(variants, [0, 1], root=str(tmp_path), config='c.py', epochs=2,
                           extra=[], on_update=lambda rows: updates.append(
                               sum(r['status'] == 'finished' for r in rows)))
  ran = [c[c.index('--workdir') + 1] for c in commands]
  assert ran == [str(tmp_path / 'se' / 'seed0'), str(tmp_path / 'bam_at_stages' / 'seed0'),
                 *[str(tmp_path / v / 'seed1') for v in ('none', 'se', 'bam_at_stages')]]
  assert updates[:5] == [2, 3, 4, 5, 6]
  assert [(r['variant'], r['seed']) for r in rows] == [
      ('none', 0), ('se', 0), ('bam@stages', 0), ('none', 1), ('se', 1), ('bam@stages', 1)]
  assert rows[0]['last_top1'] == 0.7 and rows[0]['commit'] is None  # Not launched here.
  assert rows[0]['curve'] == [[1, 0.5], [2, 0.7]]
  assert rows[1]['commit'] == 'abc123' and rows[1]['cpu'] == 'Test CPU'
  assert rows[1]['last_top1'] == 0.65 and rows[1]['status'] == 'finished'
  with open(tmp_path / 'se' / 'seed0' / 'study_run.json') as f:
    (launch,) = json.load(f)
  assert launch['returncode'] == 0 and '--config.seed=0' in launch['command']
  table = report.format_train_table(rows)
  assert '| none | 0 | 2 | 70.00% | 70.00% | 1.3000 |' in table

  # Everything finished: a rerun reads all back and launches nothing.
  commands.clear()
  again = runner.run_study(variants, [0, 1], root=str(tmp_path), config='c.py', epochs=2,
                            extra=[])
  assert commands == [] and [r['last_top1'] for r in again] == [r['last_top1'] for r in rows]
  assert again[1]['commit'] == 'abc123'


def test_report_only_launches_nothing(tmp_path, monkeypatch, fake_provenance):
  _write_metrics(tmp_path / 'none' / 'seed0', [0.5, 0.7])
  monkeypatch.setattr(runner.subprocess, 'run', lambda *a, **k: pytest.fail('ran'))
  rows = runner.run_study(study_variants.parse_study_variants('none,se'), [0], root=str(tmp_path),
                           config='c.py', epochs=2, extra=[], launch_runs=False)
  assert [r['status'] for r in rows] == ['finished', 'pending']


def test_run_study_records_a_failed_run_and_goes_on(tmp_path, monkeypatch, fake_provenance):
  def fake_run(command, check):
    workdir = command[command.index('--workdir') + 1]
    if '--config.model.attention=se' in command:
      return subprocess.CompletedProcess(command, 1)
    _write_metrics(workdir, [0.6, 0.65])
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(runner.subprocess, 'run', fake_run)
  rows = runner.run_study(study_variants.parse_study_variants('se,none'), [0], root=str(tmp_path),
                           config='c.py', epochs=2, extra=[])
  assert [r['status'] for r in rows] == ['failed', 'finished']


def test_run_study_reads_finished_runs_back_from_the_committed_archive(
    tmp_path, monkeypatch, fake_provenance):
  # Session 1 finishes none/seed0 and writes runs.json; its workdirs are then lost.
  variants = study_variants.parse_study_variants('none,se')
  first_root, out = tmp_path / 'session1', tmp_path / 'out'
  _write_metrics(first_root / 'none' / 'seed0', [0.5, 0.7])
  rows = runner.run_study(variants, [0], root=str(first_root), config='c.py', epochs=2,
                           extra=[], launch_runs=False)
  report.write_outputs(rows, str(out), title='t', baseline='none', contrasts=[])
  commands = []

  def fake_run(command, check):
    commands.append(command)
    _write_metrics(command[command.index('--workdir') + 1], [0.6, 0.65])
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(runner.subprocess, 'run', fake_run)
  archive = runner.read_archive(str(out))
  assert [(r['variant'], r['seed']) for r in archive] == [('none', 0)]
  rows = runner.run_study(variants, [0], root=str(tmp_path / 'session2'), config='c.py',
                           epochs=2, extra=[], archive=archive)
  assert len(commands) == 1 and '--config.model.attention=se' in commands[0]
  assert rows[0]['source'] == 'archive' and rows[0]['last_top1'] == 0.7
  assert rows[1]['status'] == 'finished' and rows[1]['last_top1'] == 0.65
  # Another budget or other training flags are another run: the archive does not match.
  assert runner.run_study(variants, [0], root=str(tmp_path / 's3'), config='c.py',
                           epochs=2, extra=['--config.global_batch_size=64'], archive=archive,
                           launch_runs=False)[0]['status'] == 'pending'
  assert runner.read_archive(str(tmp_path / 'nowhere')) == []


def test_run_study_refuses_a_workdir_of_another_budget(tmp_path, monkeypatch,
                                                         fake_provenance):
  _write_metrics(tmp_path / 'none' / 'seed0', [0.5], num_epochs=10)
  monkeypatch.setattr(runner.subprocess, 'run', lambda *a, **k: pytest.fail('ran'))
  with pytest.raises(cli.UserError, match='num_epochs=10, not 30'):
    runner.run_study([study_variants.Variant('none', 'none')], [0], root=str(tmp_path),
                      config='c.py', epochs=30, extra=[])


def test_localization_mode_skips_unfinished_runs(tmp_path, monkeypatch):
  from experiments.inspection import visualize

  _write_metrics(tmp_path / 'none' / 'seed0', [0.5], num_epochs=2)  # In progress.
  monkeypatch.setattr(visualize, 'load_run', lambda *a: pytest.fail('loaded a partial run'))
  assert localize.localize_study([study_variants.Variant('none', 'none')], [0, 1],
                                root=str(tmp_path)) == {'runs': [], 'baselines': {}}


def test_write_outputs_writes_results_summary_and_plot(tmp_path):
  rows = []
  for seed, (base, cbam) in enumerate([(0.90, 0.91), (0.92, 0.92), (0.94, 0.96)]):
    for variant, top1 in (('none', base), ('cbam', cbam)):
      rows.append({'variant': variant, 'attention': variant, 'fields': '', 'seed': seed,
                   'status': 'finished', 'last_top1': top1, 'best_top1': top1,
                   'curve': [[1, top1 - 0.1], [2, top1]], 'cpu': 'Test CPU',
                   'commit': 'abcdef1234567890'})
  rows.append({'variant': 'cbam', 'attention': 'cbam', 'fields': '', 'seed': 3,
               'status': 'pending'})
  out = tmp_path / 'out'
  table = report.write_outputs(rows, str(out), title='test', baseline='none', contrasts=[])
  assert sorted(os.listdir(out)) == ['curves.png', 'runs.csv', 'runs.json', 'summary.json',
                                     'summary.md']
  assert '| cbam | - | 3/4 | 93.00 ± 2.65 |' in table
  summary_md = (out / 'summary.md').read_text()
  assert '6/7 runs finished' in summary_md and 'Test CPU' in summary_md
  assert 'abcdef123456' in summary_md
  assert (out / 'runs.csv').read_text().count('\n') == 8
  assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_study_end_to_end_through_experiments_train(tmp_path, monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  out = tmp_path / 'out'
  run.main(['--mode', 'train', '--config', 'experiments/configs/smoke.py', '--epochs', '1',
                '--seeds', '0', '--workdir_root', str(tmp_path / 'runs'), '--out', str(out),
                '--attention', 'r4=cbam:attention_fields.reduction_ratio=4'])
  (row,) = json.loads((out / 'runs.json').read_text())
  assert row['status'] == 'finished' and row['epochs'] == 1 and row['commit']
  with open(tmp_path / 'runs' / 'r4' / 'seed0' / 'config.json') as f:
    assert json.load(f)['model']['fields']['attention_fields'] == {'reduction_ratio': 4}
