"""A pipeline folder someone hands you is data: it cannot run code, and damaged weights are caught.

Each test is the attack or the fault: a record naming a shell command, an unknown class, field
or dtype; flipped bytes in a stage's weights; a shipped folder whose files differ from its
manifest.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from musiclm_jax.data import integrity
from musiclm_jax.data.integrity import IntegrityError
from musiclm_jax.data.module_records import (RECORD_CLASSES, RecordError, module_config,
                                             module_from_config, record_fields)
from musiclm_jax.generate import export
from musiclm_jax.generate import ship
from musiclm_jax.generate.pipeline import Pipeline
from musiclm_jax.nn.transformer import TransformerConfig
from musiclm_jax.stages import tokens


def _shell_payload(marker: str) -> dict:
  """A record value that, built by name as before, runs `/bin/sh -c 'touch MARKER'`.

  musiclm_jax.train.recipe.run_step(Step(module='-c', args=(CMD,)), python='/bin/sh') runs
  ['/bin/sh', '-m', '-c', CMD]: any callable of the package with JSON arguments is enough.
  """
  return {'__class__': 'musiclm_jax.train.recipe.run_step',
          'step': {'__class__': 'musiclm_jax.train.recipe.Step', 'name': 'x', 'module': '-c',
                   'args': {'__tuple__': [f'touch {marker}']}},
          'log_path': marker + '.log', 'python': '/bin/sh', 'echo': False}


def _copy(folder: str, tmp_path, name: str = 'copy') -> str:
  out = str(tmp_path / name)
  shutil.copytree(folder, out)
  return out


def _edit_json(path: str, edit) -> None:
  with open(path) as f:
    record = json.load(f)
  edit(record)
  with open(path, 'w') as f:
    json.dump(record, f)


def test_a_codec_record_naming_a_shell_command_runs_nothing(tiny_pipeline, tmp_path):
  folder = _copy(tiny_pipeline[0], tmp_path)
  marker = str(tmp_path / 'pwned')
  _edit_json(os.path.join(folder, 'codec', export.CODEC_RECORD),
             lambda r: r.update(soundstream=_shell_payload(marker)))
  with pytest.raises(RecordError, match=r'codec\.json: soundstream: refusing to build '
                     r"'musiclm_jax\.train\.recipe\.run_step'"):
    Pipeline.load(folder)
  assert not os.path.exists(marker), 'the folder ran a command'
  with pytest.raises(RecordError):
    export.load_codec_dir(os.path.join(folder, 'codec'))
  assert not os.path.exists(marker)


def test_a_payload_nested_in_a_registered_class_runs_nothing(tiny_pipeline, tmp_path):
  folder = _copy(tiny_pipeline[0], tmp_path)
  marker = str(tmp_path / 'pwned')
  conditioner = os.path.join(folder, 'mulan_conditioner')
  _edit_json(os.path.join(conditioner, 'conditioner.json'),
             lambda r: r['mulan'].update(audio_tower=_shell_payload(marker)))
  with pytest.raises(RecordError, match=r'conditioner\.json: mulan\.audio_tower: refusing'):
    Pipeline.load(folder)
  with pytest.raises(RecordError, match=r'mulan\.audio_tower'):  # the stage-token path too
    tokens.mulan_tokenizer(conditioner, input_samples=4800)
  assert not os.path.exists(marker)


@pytest.mark.parametrize('edit, message', [
    (lambda t: t.update(__class__='os.system'), r"refusing to build 'os\.system'"),
    (lambda t: t.update(__class__='musiclm_jax.main.main'), r'refusing to build'),
    (lambda t: t.update(not_a_field=1), r"has no field\(s\) \['not_a_field'\]"),
    (lambda t: t.update(dtype={'__dtype__': 'object'}), r"dtype 'object' is not one of"),
    (lambda t: t.update(dtype={'__dtype__': 'float32', '__class__': 'x'}), r'exactly one of'),
    (lambda t: t.update(num_layers=[1, 2]), r'list values are not allowed'),
])
def test_a_stage_record_with_anything_unregistered_is_refused(tiny_pipeline, tmp_path, edit,
                                                               message):
  stage = _copy(os.path.join(tiny_pipeline[0], 'fine_stage'), tmp_path, 'fine_stage')
  _edit_json(os.path.join(stage, export.STAGE_RECORD), lambda r: edit(r['transformer']))
  with pytest.raises(RecordError, match=message) as error:
    export.load_stage_dir(stage)
  assert f'{stage}/stage.json: transformer' in str(error.value)


def test_every_registered_class_round_trips_and_nothing_else_builds():
  config = TransformerConfig(vocab_size=40, embed_dim=16, num_heads=2, num_layers=1, head_dim=8,
                             mlp_dim=32)
  assert module_from_config(json.loads(json.dumps(module_config(config)))) == config
  for path in RECORD_CLASSES:  # each registered name resolves to a dataclass with fields
    module_name, _, name = path.rpartition('.')
    cls = getattr(importlib.import_module(module_name), name)
    assert record_fields(cls), path
  with pytest.raises(RecordError, match='musiclm_jax.train.recipe.Step'):
    module_from_config({'__class__': 'musiclm_jax.train.recipe.Step', 'name': 'x'})


def _flip_bytes(part_dir: str, count: int = 4096) -> None:
  """Flips `count` bytes in the middle of the part's largest weights file (bit rot, a bad copy).
  """
  files = [f for f in glob.glob(os.path.join(part_dir, 'variables', '**', '*'), recursive=True)
           if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  start = max(0, len(data) // 2 - count // 2)
  for i in range(start, min(len(data), start + count)):
    data[i] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _flip_bytes_silently(stage_dir: str, count: int = 256) -> None:
  """Flips bytes of a stage's weights where the damage still loads (no decode error).

  The store compresses some chunks and not others; damage inside a compressed frame fails to
  decode (already an error), damage in a stored-raw block loads as other numbers: the silent
  case this guards against. Tries offsets through the largest file until one loads.
  """
  files = [f for f in glob.glob(os.path.join(stage_dir, 'variables', '**', '*'), recursive=True)
           if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  original = open(path, 'rb').read()
  for start in range(len(original) // 3, len(original) - count, len(original) // 40):
    data = bytearray(original)
    for i in range(start, start + count):
      data[i] ^= 0xFF
    with open(path, 'wb') as f:
      f.write(bytes(data))
    try:
      export.load_stage_dir(stage_dir, verify=False)
      return
    except IntegrityError:  # a damaged compressed frame: try elsewhere
      continue
  raise AssertionError(f'no silent corruption found in {path}')


def test_flipped_bytes_in_the_fine_stage_are_an_error_naming_it(tiny_pipeline, tmp_path):
  folder = _copy(tiny_pipeline[0], tmp_path)
  _flip_bytes_silently(os.path.join(folder, 'fine_stage'))
  with pytest.raises(IntegrityError, match=r'the fine stage \(.*fine_stage\): the weights are '
                     r'not the ones its record was saved with'):
    Pipeline.load(folder)
  # Whoever edits weights on purpose says so: the damaged weights load, and differ.
  _, damaged, _ = export.load_stage_dir(os.path.join(folder, 'fine_stage'), verify=False)
  _, intact, _ = export.load_stage_dir(os.path.join(tiny_pipeline[0], 'fine_stage'))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(damaged),
                                                      jax.tree_util.tree_leaves(intact)))


@pytest.mark.parametrize('part', ['codec', 'semantic_tokenizer', 'mulan_conditioner',
                                  'melody_conditioner'])
def test_flipped_bytes_in_any_part_are_caught_by_pipeline_load(tiny_pipeline, tmp_path, part):
  folder = _copy(tiny_pipeline[0], tmp_path)
  _flip_bytes(os.path.join(folder, part))
  # Uncompressed chunks load and differ from the fingerprint; compressed ones fail to decode:
  # both are an IntegrityError naming the part's folder.
  with pytest.raises(IntegrityError, match=f'{part}(\\): the weights are not|/variables: the '
                     'weights cannot be read)'):
    Pipeline.load(folder)


def test_frozen_tokenizers_of_the_token_cache_check_their_weights(tiny_pipeline, tmp_path):
  conditioner = _copy(os.path.join(tiny_pipeline[0], 'mulan_conditioner'), tmp_path, 'mulan')
  _flip_bytes(conditioner)
  with pytest.raises(IntegrityError, match='the weights are not the ones'):
    tokens.mulan_tokenizer(conditioner, input_samples=4800).variables()
  tokens.mulan_tokenizer(conditioner, input_samples=4800, verify=False).variables()


def test_a_shipped_folder_is_checked_against_its_manifest(tiny_pipeline, tmp_path):
  out = str(tmp_path / 'shipped')
  ship.ship_pipeline(tiny_pipeline[0], out)
  # A file nobody lists (a README beside the parts) changes nothing that loads.
  with open(os.path.join(out, 'NOTES.txt'), 'w') as f:
    f.write('mine')
  Pipeline.load(out)
  # A changed record (still valid JSON, the same weights) is caught by the manifest, by part.
  with open(os.path.join(out, 'coarse_stage', export.STAGE_RECORD), 'a') as f:
    f.write('\n')
  with pytest.raises(IntegrityError, match=r'coarse_stage \(coarse_stage/stage\.json: sha256 '
                     r'differs from the manifest\)'):
    Pipeline.load(out)
  Pipeline.load(out, verify=False)


def test_a_manifest_cannot_point_outside_its_folder(tmp_path):
  folder = tmp_path / 'shipped'
  folder.mkdir()
  (tmp_path / 'secret').write_text('x')
  (folder / integrity.MANIFEST).write_text(json.dumps(
      {'files': {'../secret': {'sha256': integrity.sha256_of(str(tmp_path / 'secret'))}}}))
  assert integrity.manifest_problems(str(folder)) == ['../secret: names a path outside the folder']
  (folder / integrity.MANIFEST).write_text('{"files": 3}')
  assert 'unreadable' in integrity.manifest_problems(str(folder))[0]
