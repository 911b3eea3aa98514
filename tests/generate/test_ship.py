"""`musiclm-jax ship_pipeline`: a pipeline folder copied with a manifest of sha256s."""
import json
import os

import pytest

from musiclm_jax.data import integrity
from musiclm_jax.generate import ship
from musiclm_jax.generate.pipeline import Pipeline


def _fake_eval_and_recipe(tmp_path):
  eval_dir = tmp_path / 'eval'
  eval_dir.mkdir()
  (eval_dir / 'metrics.json').write_text(json.dumps({
      'systems': {'real': {'fad': 17.0}, 'generated': {'fad': 80.0}},
      'melody': {'with_melody': 0.5, 'text_only_floor': 0.3, 'per_clip': {'a/r0': {}}},
      'diagnostics': {'teacher_forced': {'semantic': {'accuracy': 0.6}}},
      'setup': {'clips': 4}}))
  recipe_dir = tmp_path / 'recipe'
  recipe_dir.mkdir()
  (recipe_dir / 'recipe.json').write_text(json.dumps({
      'root': str(recipe_dir), 'git_commit': 'abc',
      'steps': [{'name': 'codec', 'command_line': 'musiclm-jax train ...', 'status': 'done',
                 'wall_seconds': 120.0}]}))
  return str(eval_dir), str(recipe_dir)


def test_shipped_copy_loads_and_its_manifest_verifies(tiny_pipeline, tmp_path):
  eval_dir, recipe_dir = _fake_eval_and_recipe(tmp_path)
  out = str(tmp_path / 'shipped')
  manifest = ship.ship_pipeline(tiny_pipeline[0], out, recipe_dir=recipe_dir, eval_dir=eval_dir)
  assert integrity.manifest_problems(out) == []
  on_disk = json.load(open(os.path.join(out, ship.MANIFEST)))
  assert on_disk['files'] == manifest['files'] and 'pipeline.json' in on_disk['files']
  assert on_disk['total_bytes'] == sum(e['bytes'] for e in on_disk['files'].values())
  assert on_disk['made_by']['steps'][0] == {'name': 'codec', 'command_line':
                                            'musiclm-jax train ...', 'status': 'done',
                                            'minutes': 2.0}
  assert on_disk['evaluation']['systems']['generated']['fad'] == 80.0
  assert 'per_clip' not in on_disk['evaluation']['melody']
  pipe = Pipeline.load(out)  # the copy is a pipeline folder
  assert pipe.has_melody
  # a changed, a missing and an extra file are all reported
  record = os.path.join(out, 'pipeline.json')
  with open(record, 'a') as f:
    f.write(' ')
  os.remove(os.path.join(out, next(r for r in on_disk['files'] if r.startswith('codec'))))
  open(os.path.join(out, 'stray.txt'), 'w').close()
  problems = integrity.manifest_problems(out)
  assert any('pipeline.json: sha256 differs' in p for p in problems)
  assert any(p.startswith('codec') and p.endswith('missing') for p in problems)
  assert 'stray.txt: not in the manifest' in problems


def test_refusals_leave_what_exists(tiny_pipeline, tmp_path):
  out = tmp_path / 'shipped'
  with pytest.raises(ship.ShipError, match=r'over the 0.001 MB budget \(largest parts: '):
    ship.ship_pipeline(tiny_pipeline[0], str(out), max_megabytes=0.001)
  assert not out.exists()
  with pytest.raises(ship.ShipError, match='not a pipeline folder'):
    ship.ship_pipeline(str(tmp_path), str(out))
  ship.ship_pipeline(tiny_pipeline[0], str(out))
  before = json.load(open(out / ship.MANIFEST))['shipped']
  with pytest.raises(FileExistsError, match='OVERWRITE=True'):
    ship.ship_pipeline(tiny_pipeline[0], str(out))
  assert json.load(open(out / ship.MANIFEST))['shipped'] == before
