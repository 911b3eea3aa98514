"""The quality table: an eval's metrics.json against the tiny pipeline's targets."""
import copy
import json

from musiclm_jax.evaluation import quality

METRICS = {
    'attributes': {'balanced_accuracy': {
        'real_ceiling': {'instrument': 0.8, 'tempo': 1.0},
        'generated': {'instrument': 0.6, 'tempo': 0.8},       # mean 0.7 = 78% of 0.9
        'shuffled_floor': {'instrument': 0.1, 'tempo': 0.4}}},  # mean 0.25
    'fad': {'generated': 40.0, 'real_halves_floor': 15.0, 'codec_resynthesis': 30.0},
    'systems': {'codec_resynthesis': {'mel_distance': 0.5}, 'opus_6kbps': {'mel_distance': 0.6}},
    'melody': {'with_melody': 0.4, 'text_only_floor': 0.2, 'real_rendering_ceiling': 0.6,
               'clips': 2},
    'setup': {'pipeline_dir': 'p', 'dataset': 'd', 'split': 'test', 'clips': 4, 'seconds': 3},
}


def test_every_target_met_and_each_one_missed():
  assert [r['met'] for r in quality.quality_rows(METRICS)] == [True] * 4
  misses = {
      0: lambda m: m['attributes']['balanced_accuracy']['generated'].update(instrument=0.3),
      1: lambda m: m['fad'].update(generated=46.0),
      2: lambda m: m['systems']['opus_6kbps'].update(mel_distance=0.45),
      3: lambda m: m['melody'].update(with_melody=0.1),
  }
  for index, spoil in misses.items():
    metrics = copy.deepcopy(METRICS)
    spoil(metrics)
    met = [r['met'] for r in quality.quality_rows(metrics)]
    assert met == [i != index for i in range(4)], index


def test_attributes_need_a_margin_over_the_floor_too():
  metrics = copy.deepcopy(METRICS)
  balanced = metrics['attributes']['balanced_accuracy']
  balanced['real_ceiling'] = {'a': 0.3}
  balanced['shuffled_floor'] = {'a': 0.25}
  balanced['generated'] = {'a': 0.3}  # 100% of the ceiling, but only 0.05 over the floor
  assert not quality.quality_rows(metrics)[0]['met']


def test_missing_sections_are_not_met_and_say_why(tmp_path, capsys):
  metrics = {'melody': {'skipped': 'no melody conditioner'},
             'systems': {'codec_resynthesis': {'mel_distance': 0.5}}}
  rows = quality.quality_rows(metrics)
  assert [r['met'] for r in rows] == [False] * 4
  assert 'Opus not measured' in rows[2]['measured']
  assert 'skipped: no melody conditioner' in rows[3]['measured']
  (tmp_path / 'metrics.json').write_text(json.dumps(METRICS))
  assert quality.main([str(tmp_path), '--out', str(tmp_path / 'q.md')]) == 0
  out = capsys.readouterr().out
  assert '4 of 4 targets met.' in out and out == (tmp_path / 'q.md').read_text() + '\n'
  assert quality.main([str(tmp_path / 'nowhere')]) == 2


def test_instrument_prompts_row_when_the_eval_has_the_section():
  metrics = copy.deepcopy(METRICS)
  metrics['instrument_prompts'] = {'named_accuracy': 0.6, 'real_accuracy': 0.8,
                                   'chance_floor': 0.05, 'clips': 16,
                                   'instruments': ['flute'] * 8}
  rows = quality.quality_rows(metrics)
  assert len(rows) == 5 and rows[4]['met'] and rows[4]['threshold'] == '>= 0.560'
  assert 'named 0.600 (16 clips, 8 instruments); real 0.800' in rows[4]['measured']
  metrics['instrument_prompts']['chance_floor'] = 0.55  # needs 0.65 now
  assert not quality.quality_rows(metrics)[4]['met']
  metrics['instrument_prompts'] = {'skipped': 'no attribute classifier'}
  row = quality.quality_rows(metrics)[4]
  assert not row['met'] and 'skipped: no attribute classifier' in row['measured']
