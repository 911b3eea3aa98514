"""The semantic-token probe's measures and labels."""
from __future__ import annotations

import numpy as np

from musiclm_jax.semantic import probe


def test_purity_and_nmi_on_known_cases():
  labels = np.array([0, 0, 1, 1, 2, 2])
  assert probe.purity(labels + 10, labels) == 1.0
  assert abs(probe.nmi(labels + 10, labels) - 1.0) < 1e-9
  # One token for everything: purity is the majority rate, no information.
  assert probe.purity(np.zeros(6), labels) == probe.majority_rate(labels) == 1 / 3
  assert abs(probe.nmi(np.zeros(6), labels)) < 1e-9
  # Splitting a label over two tokens keeps purity at 1.
  assert probe.purity(np.array([0, 1, 2, 2, 3, 3]), labels) == 1.0
  rng = np.random.default_rng(0)
  random_tokens, random_labels = rng.integers(0, 8, 20000), rng.integers(0, 12, 20000)
  assert probe.nmi(random_tokens, random_labels) < 0.01


def test_frame_labels_of_a_hand_made_clip():
  example = {'melody_notes': np.array([[0.0, 0.2, 60], [0.2, 0.3, 62], [0.5, 0.6, 71]],
                                      np.float32),
             'timbre': b'instrument', 'instruments': [b'flute', b'cello']}
  labels = probe.frame_labels(example, 20)  # 25 Hz: frame t is [0.04 t, 0.04 (t + 1))
  np.testing.assert_array_equal(labels['pitch'][:17],
                                [60] * 5 + [62] * 3 + [-1] * 4 + [71] * 3 + [-1] * 2)
  np.testing.assert_array_equal(labels['pitch_class'][:8], [0] * 5 + [2] * 3)
  assert labels['pitch_class'][9] == -1
  np.testing.assert_array_equal(np.flatnonzero(labels['onset']), [0, 5, 12])
  assert set(labels['timbre']) == {'flute'}
  hum = probe.frame_labels({**example, 'timbre': b'hum', 'instruments': []}, 20)
  assert set(hum['timbre']) == {'hum'}


def test_linear_probe_finds_a_linear_label():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((600, 5))
  y = (x[:, 2] > 0).astype(int)
  assert probe.linear_probe(x[:400], y[:400], x[400:], y[400:]) > 0.95
  assert probe.linear_probe(x[:400], y[:400], x[400:], y[400:], balanced=True) > 0.95


def test_markdown_table_has_a_row_per_representation():
  row = {c: 0.5 for c in ('nmi/pitch_class', 'nmi/pitch', 'nmi/onset', 'nmi/timbre',
                          'purity/pitch_class', 'purity/timbre', 'linear/pitch_class',
                          'linear/timbre', 'linear/onset_balanced')}
  results = {'k': 8, 'rows': {'semantic layer 2': {**row, 'tokens_used': 8},
                              'semantic layer 1': {'linear/pitch_class': 0.25}},
             'chance': {'purity/pitch_class': 0.1, 'purity/timbre': 0.2,
                        'linear/pitch_class': 0.1, 'linear/timbre': 0.2,
                        'linear/onset_balanced': 0.5}}
  table = probe.markdown(results).splitlines()
  assert len(table) == 5
  assert table[2].startswith('| semantic layer 2 (k=8) | 0.500')
  assert table[3].startswith('| semantic layer 1 (frames only) | -')
  assert '0.250' in table[3]
