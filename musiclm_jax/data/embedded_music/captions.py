"""MusicCaps-style captions and aspect lists written from a rendering's attributes; their check."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

# Tempo bands in quarter notes per minute.
TEMPO_BANDS = {'slow': (0.0, 80.0), 'medium': (80.0, 116.0), 'fast': (116.0, math.inf)}
# Words a caption may put before 'tempo' / 'pace' (or after 'the tempo is') for each band.
TEMPO_WORDS = {
    'slow': ('slow', 'leisurely', 'unhurried'),
    'medium': ('medium', 'moderate', 'walking'),
    'fast': ('fast', 'quick', 'brisk', 'lively'),
}
# Phrases naming each dynamics level; no phrase of one level occurs inside another's.
DYNAMICS_PHRASES = {
    'soft': ('soft', 'softly', 'soft dynamics', 'quiet'),
    'medium': ('medium volume', 'moderate volume', 'medium dynamics'),
    'loud': ('loud', 'loudly', 'loud dynamics', 'forceful'),
}
NO_DRUMS_PHRASES = ('no drums', 'no percussion', 'without drums')
HUM_WORD, WHISTLE_WORD = 'humming', 'whistling'

# How captions call each collection's music (the melody's origin, as a listener would put it).
STYLE_WORDS = {
    'oneills1850': ('Irish folk tune', 'traditional Irish melody', 'Irish dance tune'),
    'ryansMammoth': ('traditional dance tune', 'Celtic dance tune', 'folk dance tune'),
    'airdsAirs': ('Scottish folk air', 'traditional Scottish melody', 'Scottish dance tune'),
    'bach': ('Baroque chorale melody', 'hymn-like chorale tune', 'Lutheran chorale melody'),
    'miscFolk': ('folk song melody', 'traditional folk tune', 'old folk song'),
    'essenFolksong': ('European folk song', 'traditional folk song melody', 'old folk song'),
    'palestrina': ('Renaissance vocal melody', 'sacred Renaissance melody'),
    'monteverdi': ('Renaissance madrigal melody', 'early Baroque vocal melody'),
    'custom': ('simple melody', 'short tune'),
}
STYLE_ASPECTS = {'oneills1850': 'irish folk', 'ryansMammoth': 'celtic folk', 'airdsAirs':
                 'scottish folk', 'bach': 'chorale', 'miscFolk': 'folk', 'essenFolksong': 'folk',
                 'palestrina': 'renaissance', 'monteverdi': 'renaissance', 'custom': 'melody'}
_MOODS = {
    ('major', 'slow'): ('peaceful', 'tender', 'calm'),
    ('major', 'medium'): ('pleasant', 'warm', 'easygoing'),
    ('major', 'fast'): ('cheerful', 'joyful', 'energetic'),
    ('minor', 'slow'): ('melancholic', 'sad', 'mournful'),
    ('minor', 'medium'): ('wistful', 'pensive', 'bittersweet'),
    ('minor', 'fast'): ('spirited', 'restless', 'driving'),
}
_ACCOMPANIMENT_ASPECTS = {'octave': 'octave doubling', 'bass': 'bass line',
                          'chords': 'chordal accompaniment'}


@dataclasses.dataclass(frozen=True)
class RenderingAttributes:
  """Ground truth of one rendered clip, as stored with the example.

  Attributes:
    instruments: what sounds, by caption name: GM instrument names (melody first), or
      ('humming',) / ('whistling',) for the voice timbres.
    gm_programs: the GM programs of `instruments` (empty for hum and whistle).
    timbre: 'instrument', 'hum' or 'whistle'.
    accompaniment: the second instrument's role: 'none', 'octave', 'bass' or 'chords'.
    tempo_bpm: the rendered tempo in quarter notes per minute.
    key_tonic: tonic of the rendered key, after transposition (e.g. 'F#', 'Bb').
    mode: 'major' or 'minor'.
    time_signature: e.g. '6/8'.
    drums: whether drums play.
    dynamics: 'soft', 'medium' or 'loud'.
    transposition: semitones between the written and the rendered melody (register included).
    collection: music21 corpus collection of the melody (e.g. 'oneills1850').
    title: the tune's title.
  """
  instruments: tuple[str, ...]
  gm_programs: tuple[int, ...]
  timbre: str
  accompaniment: str
  tempo_bpm: float
  key_tonic: str
  mode: str
  time_signature: str
  drums: bool
  dynamics: str
  transposition: int
  collection: str
  title: str


def tempo_band(tempo_bpm: float) -> str:
  """'slow', 'medium' or 'fast' for a tempo in quarter notes per minute."""
  for band, (low, high) in TEMPO_BANDS.items():
    if low <= tempo_bpm < high:
      return band
  raise ValueError(f'tempo {tempo_bpm}')


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[rng.integers(len(options))]


def _a(phrase: str) -> str:
  """phrase with its indefinite article."""
  return ('an ' if phrase[0].lower() in 'aeiou' else 'a ') + phrase


def _capitalize(sentence: str) -> str:
  return sentence[0].upper() + sentence[1:]


def _instrumentation(attributes: RenderingAttributes, rng: np.random.Generator) -> str:
  """Who plays, as a noun phrase: 'a solo flute', 'a violin with a cello playing ...'."""
  if attributes.timbre == 'hum':
    return _pick(rng, ('someone humming', 'a person humming', 'a voice humming'))
  if attributes.timbre == 'whistle':
    return _pick(rng, ('someone whistling', 'a person whistling'))
  lead = attributes.instruments[0]
  if len(attributes.instruments) == 1:
    return _pick(rng, (f'a solo {lead}', _a(lead), f'a lone {lead}'))
  second = attributes.instruments[1]
  shapes = {
      'octave': (f'{_a(lead)} with {_a(second)} doubling the melody an octave lower',
                 f'{_a(lead)} and {_a(second)} playing the melody in octaves'),
      'bass': (f'{_a(lead)} with {_a(second)} playing a simple bass line',
               f'{_a(lead)} over {_a(second)} bass line'),
      'chords': (f'{_a(lead)} accompanied by {second} chords',
                 f'{_a(lead)} with {_a(second)} playing simple chords'),
  }[attributes.accompaniment]
  return _pick(rng, shapes)


def write_caption(attributes: RenderingAttributes,
                  rng: np.random.Generator) -> tuple[str, list[str]]:
  """A MusicCaps-style caption and aspect list that state `attributes` truthfully.

  Sentence shapes, word choices and sentence order vary with `rng`; whatever the draw, the text
  names every instrument (or the humming / whistling), the tempo band, the mode, drums or their
  absence and the dynamics, and the aspects also hold the key ('D major') and the meter.

  Args:
    attributes: the rendering's ground truth.
    rng: generator for the wording.

  Returns:
    (caption, aspects).
  """
  a = attributes
  band = tempo_band(a.tempo_bpm)
  tempo_word = _pick(rng, TEMPO_WORDS[band])
  mood = _pick(rng, _MOODS[(a.mode, band)])
  style = _pick(rng, STYLE_WORDS.get(a.collection, STYLE_WORDS['custom']))
  key = f'{a.key_tonic} {a.mode}' if rng.random() < 0.7 else f'a {a.mode} key'
  who = _instrumentation(a, rng)
  voice = a.timbre != 'instrument'

  soft_sentences = {
      'soft': ('It is played softly.', 'The playing is quiet and delicate.',
               'The performance has soft dynamics.'),
      'medium': ('It is played at a medium volume.', 'The dynamics sit at a moderate volume.',
                 'The performance has medium dynamics.'),
      'loud': ('It is played loudly.', 'The playing is bold and forceful.',
               'The performance has loud dynamics.'),
  }
  voice_dynamics = {'soft': 'The voice is quiet.', 'medium': 'The voice is at a medium volume.',
                    'loud': 'The voice is loud and strong.'}
  dynamics = voice_dynamics[a.dynamics] if voice and rng.random() < 0.5 else _pick(
      rng, soft_sentences[a.dynamics])
  if a.drums:
    drums = _pick(rng, ('A simple drum beat keeps time.', 'Drums play a steady groove.',
                        'A light drum pattern follows the meter.'))
  elif voice:
    drums = _pick(rng, ('There are no instruments and no drums.', 'There is no percussion.',
                        'It is sung without drums or accompaniment.' if a.timbre == 'hum' else
                        'There are no drums.'))
  else:
    drums = _pick(rng, ('There are no drums.', 'There is no percussion.',
                        'The tune is played without drums.'))
  details = [dynamics, drums]
  rng.shuffle(details)

  shape = int(rng.integers(4))
  if shape == 0:
    text = [f'This is {_a(style)} performed by {who}.',
            f'The tempo is {tempo_word} and the music is in {key}.', *details,
            f'The mood is {mood}.']
  elif shape == 1:
    verb = ' ' if voice else ' performs '
    text = [f'{_capitalize(who)}{verb}{_a(style)} in {key} at {_a(tempo_word)} tempo.',
            *details, f'It sounds {mood}.']
  elif shape == 2:
    source = 'from' if voice else 'played by'
    text = [f'{_capitalize(_a(mood))} {style} in {key} and {a.time_signature} time, {source} '
            f'{who} at {_a(tempo_word)} pace.', *details]
  else:
    text = [f'The recording features {who} {_a(style)}.' if voice else
            f'The recording features {_a(style)} played on {who}.',
            f'The piece is in {key} with a {a.time_signature} meter and {_a(tempo_word)} tempo '
            f'of about {int(round(a.tempo_bpm))} BPM.', *details]
  caption = ' '.join(text)

  if a.timbre == 'hum':
    sound = [HUM_WORD, 'vocal', 'no instruments']
  elif a.timbre == 'whistle':
    sound = [WHISTLE_WORD, 'no instruments']
  else:
    sound = ['instrumental', *a.instruments, f'{a.instruments[0]} melody']
    if a.accompaniment != 'none':
      sound.append(_ACCOMPANIMENT_ASPECTS[a.accompaniment])
  dynamics_aspect = {'soft': _pick(rng, ('soft dynamics', 'quiet')), 'medium': 'medium volume',
                     'loud': _pick(rng, ('loud dynamics', 'forceful'))}[a.dynamics]
  aspects = [STYLE_ASPECTS.get(a.collection, 'melody'), *sound, f'{tempo_word} tempo',
             dynamics_aspect, 'drums' if a.drums else 'no drums', f'{a.key_tonic} {a.mode}',
             f'{a.time_signature} time signature', mood]
  rng.shuffle(aspects)
  return caption, aspects


def _contains(text: str, phrase: str) -> bool:
  return re.search(r'(?<![\w-])' + re.escape(phrase) + r'(?![\w-])', text) is not None


def _check_text(text: str, a: RenderingAttributes, known_instruments: Sequence[str],
                where: str) -> list[str]:
  """Problems of one text (a caption, or the aspects joined) against the attributes."""
  problems = []
  lower = text.lower()
  # Instruments: every one named; none named that does not play. Longer names are masked first
  # so 'pan flute' does not count as a 'flute'.
  masked = lower
  for name in sorted(set(known_instruments) | set(a.instruments), key=len, reverse=True):
    if _contains(masked, name):
      if name not in a.instruments:
        problems.append(f'{where} names {name!r}, which does not play')
      masked = re.sub(r'(?<![\w-])' + re.escape(name) + r'(?![\w-])', ' ', masked)
  for name in a.instruments:
    if not _contains(lower, name):
      problems.append(f'{where} does not name {name!r}')
  # Timbre.
  if a.timbre != 'hum' and re.search(r'\bhum(s|med|ming)?\b', lower):
    problems.append(f'{where} mentions humming, timbre is {a.timbre}')
  if a.timbre != 'whistle' and re.search(r'\bwhistl', lower):
    problems.append(f'{where} mentions whistling, timbre is {a.timbre}')
  # Tempo: at least one word of the right band and none of another.
  band = tempo_band(a.tempo_bpm)
  words = re.findall(r'\b([a-z-]+) (?:tempo|pace)\b', lower)
  words += re.findall(r'\b(?:tempo|pace) is ([a-z-]+)\b', lower)
  for other, vocabulary in TEMPO_WORDS.items():
    if other != band and any(w in vocabulary for w in words):
      problems.append(f'{where} calls the tempo {other}, {a.tempo_bpm} BPM is {band}')
  if not any(w in TEMPO_WORDS[band] for w in words):
    problems.append(f'{where} states no {band} tempo')
  for bpm in re.findall(r'\b(\d+(?:\.\d+)?) ?bpm\b', lower):
    if abs(float(bpm) - a.tempo_bpm) > 1.0:
      problems.append(f'{where} says {bpm} BPM, rendered at {a.tempo_bpm}')
  # Dynamics.
  for level, phrases in DYNAMICS_PHRASES.items():
    said = any(_contains(lower, p) for p in phrases)
    if level != a.dynamics and said:
      problems.append(f'{where} calls the dynamics {level}, they are {a.dynamics}')
    if level == a.dynamics and not said:
      problems.append(f'{where} states no {a.dynamics} dynamics')
  # Drums.
  negated = any(_contains(lower, p) for p in NO_DRUMS_PHRASES)
  without_negations = lower
  for phrase in NO_DRUMS_PHRASES:
    without_negations = without_negations.replace(phrase, ' ')
  drum_words = re.search(r'\b(drums?|percussion)\b', without_negations) is not None
  if a.drums and (negated or not drum_words):
    problems.append(f'{where} does not say drums play')
  if not a.drums and (drum_words or not negated):
    problems.append(f'{where} does not say there are no drums')
  # Mode and key.
  other_mode = 'minor' if a.mode == 'major' else 'major'
  if not _contains(lower, a.mode) or _contains(lower, other_mode):
    problems.append(f'{where} does not state the mode {a.mode} alone')
  for tonic, mode in re.findall(r'\b([A-G][#b]?) (major|minor)\b', text):
    if (tonic, mode) != (a.key_tonic, a.mode):
      problems.append(f'{where} says {tonic} {mode}, key is {a.key_tonic} {a.mode}')
  for meter in re.findall(r'\b(\d+/\d+)\b', text):
    if meter != a.time_signature:
      problems.append(f'{where} says {meter}, meter is {a.time_signature}')
  return problems


def check_consistency(caption: str, aspects: Sequence[str],
                      attributes: RenderingAttributes) -> list[str]:
  """Everything in `caption` and `aspects` that contradicts or omits `attributes`.

  Checked in both texts: every instrument (or humming / whistling) is named and no other known
  instrument is; the tempo words fit the BPM band (slow < 80 <= medium < 116 <= fast) and any
  BPM figure matches; the dynamics phrase fits; drums are mentioned exactly when they play ('no
  drums' otherwise); the mode is stated and any key ('D major') or meter ('6/8') matches. The
  aspects must also hold the key ('D major') and the meter ('6/8 time signature') themselves.

  Args:
    caption: the free-text caption.
    aspects: the aspect list.
    attributes: the rendering's ground truth.

  Returns:
    Human-readable problems; empty when caption and aspects are consistent.
  """
  from musiclm_jax.data.embedded_music import render  # pylint: disable=g-import-not-at-top
  known = [name for name, _ in render.MELODY_INSTRUMENTS.values()]
  known += list(render.BASS_INSTRUMENTS.values())
  problems = _check_text(caption, attributes, known, 'caption')
  problems += _check_text(' ; '.join(aspects), attributes, known, 'aspects')
  if f'{attributes.key_tonic} {attributes.mode}' not in aspects:
    problems.append(f'aspects lack the key {attributes.key_tonic} {attributes.mode}')
  if f'{attributes.time_signature} time signature' not in aspects:
    problems.append(f'aspects lack the meter {attributes.time_signature}')
  return problems
