"""`musiclm-jax sweep`: grid expansion, refusals, dry runs, and a real two-run toy LM sweep."""
import json
import os

import gin
import pytest

from musiclm_jax import main
from musiclm_jax.train import sweep

TOY = '--gin_file=examples/toy_lm.gin'
# A toy run in a few seconds: 4 steps, one checkpoint and one eval batch at the end.
TINY = ['--gin.TRAIN_STEPS=4', '--gin.BATCH_SIZE=8', '--gin.train.log_every_steps=2',
        '--gin.train.eval_every_steps=4', '--gin.train.eval_batches=1',
        '--gin.train.checkpoint_every_steps=4']


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


def test_grid_expansion_and_folder_names():
  grid = [sweep.parse_grid('OptimizerConfig.learning_rate=[1e-4, 3e-4]'),
          sweep.parse_grid('SEED = [0, 1, 2]')]
  assert grid[0] == ('OptimizerConfig.learning_rate', ['0.0001', '0.0003'])
  points = sweep.expand_grid(grid)
  assert len(points) == 6
  assert points[1] == {'OptimizerConfig.learning_rate': '0.0001', 'SEED': '1'}
  assert sweep.run_name(points[0]) == 'OptimizerConfig.learning_rate=0.0001,SEED=0'
  # Strings lose their quotes, anything outside [A-Za-z0-9._=,+-] becomes '_'; names that
  # sanitise alike are told apart by a hash of their bindings.
  names = sweep.run_names(sweep.expand_grid(
      [sweep.parse_grid("train/DatasetConfig.split=['a b', 'a/b', (1, 2)]")]))
  assert names[0].startswith('train_DatasetConfig.split=a_b-') and len(set(names)) == 3
  assert names[2] == 'train_DatasetConfig.split=_1,_2'


@pytest.mark.parametrize('spec', ['SEED', 'SEED=3', 'SEED=[]', 'SEED=[1, 1]',
                                  "SEED=[__import__('os')]", 'MODEL_DIR=["a", "b"]'])
def test_bad_grid_flags_are_refused(spec):
  with pytest.raises(sweep.SweepError, match='--grid'):
    sweep.parse_grid(spec)


@pytest.mark.parametrize('grid,culprit', [('LEARNING_RATE=[1e-4, 3e-4]', 'LEARNING_RATE'),
                                          ('OptimizerConfig.learnin_rate=[1e-4]', 'learnin_rate')])
def test_a_grid_name_the_gin_files_do_not_have_is_refused_before_anything(tmp_path, capsys,
                                                                          grid, culprit):
  rc = main.main(['sweep', TOY, '--grid', grid, f'--sweep_dir={tmp_path}/sweep'])
  err = capsys.readouterr().err
  assert rc == 2 and culprit in err and 'toy_lm.gin' in err
  assert not os.path.exists(tmp_path / 'sweep')


def test_dry_run_prints_one_command_per_run_and_writes_only_sweep_json(tmp_path, capsys):
  root = tmp_path / 'sweep'
  rc = main.main(['sweep', TOY, *TINY, '--grid', 'SEED=[0, 1]',
                  '--grid', 'OptimizerConfig.learning_rate=[1e-3, 3e-3]',
                  f'--sweep_dir={root}', '--dry_run', '--launch_prefix=sbatch --wrap'])
  assert rc == 0
  commands = capsys.readouterr().out.splitlines()
  assert len(commands) == 4
  assert all(c.startswith('sbatch --wrap musiclm-jax train --gin_file=examples/toy_lm.gin ')
             for c in commands)
  assert f'--gin.MODEL_DIR="{root}/SEED=1,OptimizerConfig.learning_rate=0.003"' in commands[3]
  assert '--gin.TRAIN_STEPS=4' in commands[0]
  assert os.listdir(root) == ['sweep.json']
  record = json.loads((root / 'sweep.json').read_text())
  assert record['grid'] == {'SEED': ['0', '1'], 'OptimizerConfig.learning_rate': ['0.001', '0.003']}
  assert [r['status'] for r in record['runs']] == ['pending'] * 4
  assert [r['final_step'] for r in record['runs']] == [4] * 4


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
  launched = []

  def fake_launch(run, quiet=False):
    del quiet
    launched.append(run.name)
    return 3 if run.bindings['SEED'] == '0' else 0

  monkeypatch.setattr(sweep, 'launch', fake_launch)
  root = tmp_path / 'sweep'
  argv = ['sweep', TOY, *TINY, '--grid', 'SEED=[0, 1]', f'--sweep_dir={root}']
  assert main.main(argv) == 1
  record = json.loads((root / 'sweep.json').read_text())
  assert [(r['status'], r['exit_status']) for r in record['runs']] == [('failed', 3), ('done', 0)]
  assert 'failed (3)' in (root / 'summary.md').read_text()
  # Again: the done run is skipped, the failed one launched again (it would resume).
  assert main.main(argv) == 1 and launched == ['SEED=0', 'SEED=1', 'SEED=0']
  assert 'launched (1 failed), 1 skipped' in capsys.readouterr().err
  # Other fixed bindings for the same folders are refused rather than mixed in.
  assert main.main(argv[:-1] + ['--gin.BATCH_SIZE=16', f'--sweep_dir={root}']) == 2


def test_a_real_two_run_sweep_tabulates_and_then_skips_both(tmp_path, capsys):
  root = tmp_path / 'sweep'
  argv = ['sweep', TOY, *TINY, '--grid', 'SEED=[0, 1]', f'--sweep_dir={root}', '--quiet']
  assert main.main(argv) == 0
  captured = capsys.readouterr()
  assert 'launched (0 failed), 0 skipped' in captured.err
  table = (root / 'summary.md').read_text()
  assert table in captured.out
  lines = table.splitlines()
  assert lines[0].startswith('| SEED | status | step | train loss |') and 'eval/loss' in lines[0]
  rows = lines[2:]
  assert len(rows) == 2 and rows[0].startswith('| 0 | done | 4 |')
  assert rows[1].startswith('| 1 | done | 4 |')
  summary = json.loads((root / 'summary.json').read_text())
  losses = [r['train']['loss'] for r in summary['runs']]
  assert losses[0] != losses[1] and all(loss > 0 for loss in losses)
  assert all(0 <= r['eval']['eval/accuracy'] <= 1 for r in summary['runs'])
  assert all(r['wall_seconds'] > 0 for r in summary['runs'])
  for run in ('SEED=0', 'SEED=1'):
    assert os.path.isdir(root / run / 'checkpoints' / '4')
    assert 'Done: step 4' in (root / run / 'sweep_run.log').read_text()

  # Again: both finished runs are skipped (nothing launched) and the table is the same.
  assert main.main(argv) == 0
  captured = capsys.readouterr()
  assert captured.err.count('skipped, already finished') == 2
  assert '0 launched (0 failed), 2 skipped' in captured.err
  assert [r['attempts'] for r in json.loads((root / 'sweep.json').read_text())['runs']] == [1, 1]
  assert main.main(['sweep', f'--sweep_dir={root}', '--summarize_only']) == 0
  assert capsys.readouterr().out == table
