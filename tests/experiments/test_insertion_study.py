"""The insertion study's runner: seeds, commands and the report (no training here)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from experiments.study import insertion as insertion_study


def _result(arm, seed, curve):
  return {'arm': arm, 'seed': seed, 'curve': curve, 'last_top1': curve[-1][1],
          'commit': 'abc', 'cpu': 'cpu'}


def test_seeds_and_commands():
  assert insertion_study.parse_seeds('0-2') == [0, 1, 2]
  assert insertion_study.parse_seeds('1,3') == [1, 3]
  command = insertion_study.train_command('c.py', '/w', 2, 5, {'init_from': '/p'})
  assert command[1:5] == ['-m', 'experiments.training.train', '--config', 'c.py']
  assert '--config.seed=2' in command and '--config.num_epochs=5' in command
  assert '--config.init_from=/p' in command


def test_summary_pairs_arms_by_seed_and_measures_the_drop():
  results = []
  for seed, base in ((0, 0.80), (1, 0.82), (2, 0.81)):
    results.append(_result('pretrain', seed, [[1, 0.5], [2, base]]))
    results.append(_result('continue', seed, [[0, base], [1, base], [2, base + 0.01]]))
    results.append(_result('cbam_official', seed,
                           [[0, base - 0.30], [1, base - 0.05], [2, base - 0.01 * seed]]))
  summary = insertion_study.summarise(results)
  arms = {row['arm']: row for row in summary['arms']}
  assert arms['continue']['insertion_vs_pretrained']['mean'] == pytest.approx(0.0)
  assert arms['cbam_official']['insertion_vs_pretrained']['mean'] == pytest.approx(-0.30)
  assert arms['cbam_official']['epoch1_mean'] == pytest.approx(0.81 - 0.05)
  (contrast,) = summary['contrasts']
  assert contrast['contrast'] == 'cbam_official - continue' and contrast['seeds'] == [0, 1, 2]
  assert contrast['mean'] == pytest.approx(-0.02)  # -(0.01 + 0.01 * seed) on average.
  # sd 1 point over 3 seeds: half-width 4.303 * 0.01 / sqrt(3) = 2.48 points.
  assert contrast['low'] == pytest.approx(-0.0448, abs=1e-4)
  assert contrast['reading'] == 'includes 0'
  text = insertion_study.markdown(summary, 'toy')
  assert '| cbam_official | 3 | 51.00 ± 1.00 | -30.00 [-30.00, -30.00] |' in text
  assert '| cbam_official - continue | 3 | -2.00 [' in text


def test_runner_makes_its_root_runs_pretraining_then_arms_and_skips_finished_runs(
    tmp_path, monkeypatch):
  calls = []
  real_run = subprocess.run

  def fake_trainer(command, **kwargs):  # Stands in for one training process.
    if 'experiments.training.train' not in command:
      return real_run(command, **kwargs)  # e.g. git, for the result's commit.
    workdir = command[command.index('--workdir') + 1]
    epochs = int(next(a for a in command if a.startswith('--config.num_epochs=')).split('=')[1])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for epoch in range(epochs + 1):
        f.write(json.dumps({'epoch': epoch, 'eval_top1': 0.5 + 0.1 * epoch,
                            'eval_loss': 1.0}) + '\n')
    calls.append(os.path.basename(workdir))
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(insertion_study.subprocess, 'run', fake_trainer)
  root, out = tmp_path / 'not' / 'yet' / 'there', tmp_path / 'out'
  argv = [f'--workdir_root={root}', f'--out={out}', '--seeds=0', '--pretrain_epochs=2',
          '--finetune_epochs=1', '--arms=continue,cbam_official']
  insertion_study.main(argv)
  assert calls == ['pretrain_s0', 'continue_s0', 'cbam_official_s0']
  with open(out / 'runs' / 'cbam_official_s0.json') as f:
    result = json.load(f)
  assert result['curve'] == [[0, 0.5], [1, 0.6]] and result['seed'] == 0
  assert '--config.init_from=' + str(root / 'pretrain_s0') in result['command']
  insertion_study.main(argv)  # Everything finished: nothing runs again.
  assert len(calls) == 3


@pytest.mark.parametrize('argv,message', [
    (['--out=/tmp/x', '--workdir_root=/tmp/y', '--arms=cbam_identity,cbam_idenity'],
     'Unknown arm(s) cbam_idenity'),
    (['--workdir_root=/tmp/y'], '--out and --workdir_root are required'),
    (['--out=/tmp/x', '--workdir_root=/tmp/y', '--seeds=0-x'], '--seeds'),
])
def test_bad_flags_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    insertion_study.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err
