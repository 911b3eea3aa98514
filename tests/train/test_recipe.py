"""`musiclm-jax train_pipeline`: a recipe's steps run in order, skip when done, stop on failure."""
import json
import os

import gin
import pytest

from musiclm_jax import main
from musiclm_jax.train import recipe
from tests.train.toy_setup import REPO

PROBE = 'tests.train.recipe_probe'


@pytest.fixture
def probe_log(tmp_path, monkeypatch):
  path = tmp_path / 'probe.jsonl'
  monkeypatch.setenv('RECIPE_PROBE_LOG', str(path))
  monkeypatch.chdir(REPO)  # `python -m tests.train.recipe_probe` imports from the checkout

  def calls():
    if not path.exists():
      return []
    return [json.loads(l)['name'] for l in path.read_text().splitlines()]
  return calls


def probe_step(name, kind='train', output=None, exit_status=0):
  args = [name]
  if output:
    args += ['--make', '{root}/' + output]
  if exit_status:
    args += ['--exit', str(exit_status)]
  return recipe.Step(name=name, module=PROBE, args=args, kind=kind, output=output)


def steps(fail_b=False):
  return [probe_step('a', kind='atomic', output='a'),
          probe_step('b', exit_status=3 if fail_b else 0),
          probe_step('c', kind='rerun')]


def test_runs_in_order_then_skips_what_is_done(tmp_path, probe_log):
  root = str(tmp_path / 'root')
  record = recipe.train_pipeline(root=root, steps=steps())
  assert probe_log() == ['a', 'b', 'c']
  assert [s['status'] for s in record['steps']] == ['done'] * 3
  assert os.path.isdir(os.path.join(root, 'a'))  # {root} was substituted in the arguments
  assert all(os.path.exists(os.path.join(root, '.done', f'{n}.json')) for n in 'abc')
  on_disk = json.load(open(os.path.join(root, 'recipe.json')))
  assert [s['status'] for s in on_disk['steps']] == ['done'] * 3
  assert all(s['wall_seconds'] > 0 for s in on_disk['steps'])
  assert '| b |' in open(os.path.join(root, 'recipe.md')).read()
  assert 'python -m tests.train.recipe_probe a --make' in on_disk['steps'][0]['command_line']
  recipe.train_pipeline(root=root, steps=steps())
  assert probe_log() == ['a', 'b', 'c', 'c']  # only the 'rerun' step runs again


def test_a_failed_step_stops_the_recipe_and_a_rerun_continues(tmp_path, probe_log):
  root = str(tmp_path / 'root')
  with pytest.raises(recipe.RecipeError, match=r"step 'b' failed with exit status 3.*b\.log"):
    recipe.train_pipeline(root=root, steps=steps(fail_b=True))
  assert probe_log() == ['a', 'b']  # c needs b's output: not run
  record = json.load(open(os.path.join(root, 'recipe.json')))
  assert [s['status'] for s in record['steps']] == ['done', 'failed', 'pending']
  assert not os.path.exists(os.path.join(root, '.done', 'b.json'))
  assert 'recipe_probe b' in open(os.path.join(root, 'logs', 'b.log')).read()
  recipe.train_pipeline(root=root, steps=steps())
  assert probe_log() == ['a', 'b', 'b', 'c']  # a skipped, b again, then c


def test_an_atomic_output_already_there_counts_as_done(tmp_path, probe_log):
  root = tmp_path / 'root'
  (root / 'a').mkdir(parents=True)
  recipe.train_pipeline(root=str(root), steps=steps())
  assert probe_log() == ['b', 'c']


def test_only_dry_run_and_bad_step_lists(tmp_path, probe_log, capsys):
  root = str(tmp_path / 'root')
  recipe.train_pipeline(root=root, steps=steps(), only=['c'])
  assert probe_log() == ['c']
  recipe.train_pipeline(root=root, steps=steps(), dry_run=True)
  assert probe_log() == ['c']
  out = capsys.readouterr().out
  assert 'a would run: python -m tests.train.recipe_probe a' in out
  with pytest.raises(recipe.RecipeError, match=r"names no step: \['zzz'\]"):
    recipe.train_pipeline(root=root, steps=steps(), only=['zzz'])
  with pytest.raises(recipe.RecipeError, match='repeat'):
    recipe.train_pipeline(root=root, steps=steps() + [probe_step('a')])
  with pytest.raises(recipe.RecipeError, match='an atomic step needs an output'):
    recipe.train_pipeline(root=root, steps=[probe_step('x', kind='atomic')])
  with pytest.raises(recipe.RecipeError, match='kind'):
    recipe.train_pipeline(root=root, steps=[probe_step('x', kind='sometimes')])


def _evaluate(reference):
  return reference.scoped_configurable_fn()


@pytest.mark.parametrize('recipe_file', ['pipelines/tiny.gin', 'pipelines/tiny_smoke.gin'])
def test_the_tiny_recipes_bind_every_part_s_gin_correctly(tmp_path, recipe_file):
  """Each step of the recipe: its gin files parse with its bindings (no unknown macro)."""
  root = str(tmp_path / 'tiny')
  gin.clear_config(clear_constants=False)
  try:
    main.parse_gin([recipe_file], [f"ROOT='{root}'"])
    steps_ = recipe.apply_overrides(
        [_evaluate(r) for r in gin.query_parameter('train_pipeline.steps')],
        gin.query_parameter('train_pipeline.overrides'),
        gin.query_parameter('train_pipeline.train_overrides'))
  except ValueError:  # tiny.gin binds no overrides
    steps_ = [_evaluate(r) for r in gin.query_parameter('train_pipeline.steps')]
  finally:
    gin.clear_config(clear_constants=False)
  names = [s.name for s in steps_]
  assert names[:2] == ['data', 'codec'] and names[-1] == 'eval' and len(names) == 15
  assert sum(s.budget_minutes or 0 for s in steps_[:names.index('pipeline') + 1]) <= 150 + 2
  assert all((s.budget_minutes or 0) <= 60 for s in steps_)
  if recipe_file.endswith('smoke.gin'):
    assert all(s.bindings['TRAIN_STEPS'] == 4 for s in steps_ if s.command == 'train')
  for step in (s.resolve(root) for s in steps_):
    if step.module != 'musiclm_jax.main':
      continue
    bindings = [a[len('--gin.'):] for a in step.argv() if a.startswith('--gin.')]
    gin.clear_config(clear_constants=False)
    try:
      main.parse_gin(list(step.gin_files), bindings)
    except main.UsageError as e:
      pytest.fail(f'step {step.name}: {e}')
    finally:
      gin.clear_config(clear_constants=False)


def test_train_pipeline_command_trains_a_part_and_skips_it_after(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  root = str(tmp_path / 'toy')
  gin_file = tmp_path / 'toy_recipe.gin'
  gin_file.write_text(
      "ROOT = %gin.REQUIRED\n"
      "train_pipeline.root = %ROOT\n"
      "train_pipeline.steps = [@toy/Step()]\n"
      "toy/Step.name = 'toy'\n"
      "toy/Step.command = 'train'\n"
      "toy/Step.gin_files = ['examples/toy_lm.gin']\n"
      "toy/Step.bindings = {'MODEL_DIR': \"'{root}/toy_lm'\", 'TRAIN_STEPS': 2,\n"
      "                     'train.eval_every_steps': 0, 'train.progress_bar': False}\n"
      "toy/Step.output = 'toy_lm'\n")
  argv = ['train_pipeline', f'--gin_file={gin_file}', f"--gin.ROOT='{root}'"]
  gin.clear_config(clear_constants=False)
  assert main.main(argv) == 0
  gin.clear_config(clear_constants=False)
  assert os.path.isdir(os.path.join(root, 'toy_lm', 'checkpoints', '2'))
  assert main.main(argv) == 0
  gin.clear_config(clear_constants=False)
  assert '[recipe] toy: done, skipped' in capsys.readouterr().err


def test_overrides_reach_the_steps_they_name(tmp_path, probe_log):
  root = str(tmp_path / 'root')
  steps_ = [recipe.Step(name='t', command='train', bindings={'TRAIN_STEPS': 100, 'A': 1}),
            recipe.Step(name='k', command='fit_kmeans', bindings={'NUM_EXAMPLES': 512})]
  record = recipe.train_pipeline(root=root, steps=steps_, dry_run=True,
                                 train_overrides={'TRAIN_STEPS': 4},
                                 overrides={'k': {'NUM_EXAMPLES': 8}, 't': {'A': 2}})
  lines = [s['command_line'] for s in record['steps']]
  assert '--gin.TRAIN_STEPS=4' in lines[0] and '--gin.A=2' in lines[0]
  assert '--gin.NUM_EXAMPLES=8' in lines[1] and 'TRAIN_STEPS' not in lines[1]
  with pytest.raises(recipe.RecipeError, match=r"overrides names no step: \['x'\]"):
    recipe.train_pipeline(root=root, steps=steps_, overrides={'x': {}})
