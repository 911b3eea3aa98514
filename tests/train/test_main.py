"""The gin entry point: flags, errors that name the culprit, eval of a trained run."""
import json
import socket
import subprocess
import time

import gin
import pytest

from musiclm_jax import main
from musiclm_jax.train.checkpoints import LOCK_FILE
from tests.train.toy_setup import train_toy


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


def test_flags_parse_t5x_style():
  ns, bindings = main.parse_flags([
      'train', '--gin_file=a.gin', '--gin_file', 'b.gin', "--gin.MODEL_DIR='x'",
      '--gin.TRAIN_STEPS', '5', '--gin_search_paths=p,q', '--module_import=tasks.toy'])
  assert ns.command == 'train' and ns.gin_file == ['a.gin', 'b.gin']
  assert bindings == ["MODEL_DIR='x'", 'TRAIN_STEPS=5']
  assert ns.gin_search_paths == ['p,q'] and ns.module_import == ['tasks.toy']


def test_unknown_binding_exits_nonzero_naming_it(capsys):
  rc = main.main(['train', '--gin_file=examples/toy_lm.gin', "--gin.MODEL_DIR='/tmp/x'",
                  '--gin.train.no_such_option=3'])
  assert rc == 2
  assert 'no_such_option' in capsys.readouterr().err


def test_missing_required_macro_exits_nonzero_naming_it(capsys):
  rc = main.main(['train', '--gin_file=examples/toy_lm.gin'])
  assert rc == 2
  assert 'MODEL_DIR' in capsys.readouterr().err


def test_missing_gin_file_exits_nonzero_naming_it(capsys):
  rc = main.main(['train', '--gin_file=examples/no_such_file.gin', "--gin.MODEL_DIR='x'"])
  assert rc == 2
  assert 'no_such_file.gin' in capsys.readouterr().err


def test_a_locked_model_dir_is_a_usage_error_naming_the_holder(tmp_path, capsys):
  other = subprocess.Popen(['sleep', '600'])  # a live process standing in for a trainer
  try:
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': other.pid, 'started': 'now',
         'started_unix': time.time()}))
    rc = main.main(['train', '--gin_file=examples/toy_lm.gin', f"--gin.MODEL_DIR='{tmp_path}'"])
  finally:
    other.kill()
    other.wait()
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith('musiclm-jax: error: train: ')
  assert f'pid {other.pid}' in err and 'Traceback' not in err
  assert not (tmp_path / 'checkpoints').exists()


def test_eval_subcommand_on_a_trained_run(tmp_path):
  train_toy(tmp_path, 'TRAIN_STEPS=4', 'train.eval_every_steps=0')
  gin.clear_config(clear_constants=False)
  rc = main.main(['eval', '--gin_file=examples/toy_lm_eval.gin', f"--gin.MODEL_DIR='{tmp_path}'",
                  '--gin.MESH_SHAPE=(4, 1, 2)', '--gin.evaluate.eval_batches=2'])
  assert rc == 0
  result = json.loads((tmp_path / 'eval_results.json').read_text())
  assert result['step'] == 4 and 0.0 <= result['accuracy'] <= 1.0 and result['loss'] > 0


def test_a_runs_directory_in_the_working_directory_does_not_break_gin(tmp_path, monkeypatch):
  # ./runs is where people put run directories; on sys.path it is a namespace package, which
  # gin 0.5 would try (and fail) to read 'runs/train.gin' from.
  (tmp_path / 'runs').mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  main.parse_gin(['runs/train.gin', 'models/toy_lm.gin', 'examples/toy_task.gin'],
                 ["MODEL_DIR='unused'"])
  assert gin.query_parameter('%TRAIN_STEPS') == 1000
