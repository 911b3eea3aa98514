"""Renders a Melody to mono audio: General MIDI instruments or a hummed/whistled voice."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import numpy as np
from scipy import signal

from musiclm_jax.data.embedded_music.captions import RenderingAttributes
from musiclm_jax.data.embedded_music.melodies import Melody

SAMPLE_RATE = 24000
TIMBRES = ('instrument', 'hum', 'whistle')
ACCOMPANIMENTS = ('none', 'octave', 'bass', 'chords')
DYNAMICS = ('soft', 'medium', 'loud')

# The tempo ranges renderings draw from inside captions.TEMPO_BANDS (quarter notes per minute).
# The gaps between them keep every rendering clearly inside its band's words.
_TEMPO_DRAW = {'slow': (60, 76), 'medium': (84, 112), 'fast': (120, 160)}

# GM melody instruments: program -> (name used in captions and attributes, register centre as a
# MIDI pitch: the melody's median note is moved to the octave nearest it). No name contains
# 'drum', 'hum' or 'whistle', which the caption checker reads as drums / other timbres.
MELODY_INSTRUMENTS = {
    0: ('piano', 67), 6: ('harpsichord', 67), 8: ('celesta', 79), 10: ('music box', 79),
    11: ('vibraphone', 72), 12: ('marimba', 72), 13: ('xylophone', 79), 19: ('church organ', 67),
    21: ('accordion', 67), 22: ('harmonica', 72), 24: ('acoustic guitar', 64),
    25: ('steel-string guitar', 64), 40: ('violin', 74), 41: ('viola', 62), 42: ('cello', 55),
    46: ('harp', 67), 48: ('string ensemble', 67), 56: ('trumpet', 70), 57: ('trombone', 55),
    60: ('french horn', 60), 64: ('soprano saxophone', 70), 65: ('alto saxophone', 65),
    68: ('oboe', 74), 70: ('bassoon', 50), 71: ('clarinet', 67), 72: ('piccolo', 86),
    73: ('flute', 76), 74: ('recorder', 76), 75: ('pan flute', 74), 79: ('ocarina', 76),
    104: ('sitar', 64), 105: ('banjo', 67), 108: ('kalimba', 72), 109: ('bagpipe', 70),
    110: ('fiddle', 74),
}
# Second instruments by role: doubling the melody an octave lower, a bass line, block chords.
OCTAVE_INSTRUMENTS = (0, 19, 21, 24, 41, 42, 46, 48, 57, 60, 70, 71)
BASS_INSTRUMENTS = {32: 'acoustic bass', 33: 'electric bass', 43: 'contrabass', 58: 'tuba',
                    42: 'cello', 70: 'bassoon'}
CHORD_INSTRUMENTS = (0, 6, 19, 21, 24, 25, 46, 48)
# GM percussion kits (bank 128 of the soundfont) and what captions call them.
DRUM_KITS = {0: 'standard', 8: 'room', 32: 'jazz', 40: 'brush'}

HUM_NAME = 'humming'
WHISTLE_NAME = 'whistling'

# Loudness of the finished clip per dynamics level (RMS in dBFS) and the MIDI velocity it is
# played with, so both the level and the instruments' velocity timbre follow the attribute.
_DYNAMICS_RMS_DBFS = {'soft': -28.0, 'medium': -21.0, 'loud': -15.0}
_DYNAMICS_VELOCITY = {'soft': 48, 'medium': 78, 'loud': 108}
_PEAK_LIMIT = 0.9

# Register centres of the voices: a low or a high humming voice; whistling sits two octaves or
# so above a typical tune (1-2.5 kHz).
_HUM_CENTRES = (55, 65)
_WHISTLE_CENTRE = 86

_MELODY_CHANNEL, _SECOND_CHANNEL, _DRUM_CHANNEL = 0, 1, 9


@dataclasses.dataclass(frozen=True)
class RenderSpec:
  """How to render one melody: everything a rendering's audio and attributes depend on.

  Attributes:
    timbre: 'instrument' (GM soundfont), 'hum' or 'whistle' (numpy voice synth).
    programs: GM programs: the melody's, then the second instrument's if any (empty for voices).
    accompaniment: the second instrument's role: 'none', 'octave' (melody an octave lower),
      'bass' (chord roots per bar) or 'chords' (triads per bar), chords chosen from the key.
    tempo_bpm: quarter notes per minute (integer-valued, exact in float32).
    transposition: semitones added to every written pitch of the melody, register moves
      included (so the rendered melody note is written pitch + transposition).
    dynamics: 'soft', 'medium' or 'loud': velocity and clip loudness.
    drums: whether a GM drum kit plays a pattern fitting the time signature.
    drum_kit: GM percussion program (a key of DRUM_KITS).
    start_quarters: where the clip starts in the (looped) tune, in quarter notes.
    clip_seconds: clip length.
    sample_rate: output sample rate.
    seed: seeds the small random parts of the performance (velocity jitter, vibrato, drift,
      breath noise).
  """
  timbre: str = 'instrument'
  programs: tuple[int, ...] = (0,)
  accompaniment: str = 'none'
  tempo_bpm: float = 100.0
  transposition: int = 0
  dynamics: str = 'medium'
  drums: bool = False
  drum_kit: int = 0
  start_quarters: float = 0.0
  clip_seconds: float = 10.0
  sample_rate: int = SAMPLE_RATE
  seed: int = 0

  @property
  def num_samples(self) -> int:
    return int(round(self.clip_seconds * self.sample_rate))


def instrument_name(program: int) -> str:
  """The caption name of a GM program used by the renderer."""
  if program in MELODY_INSTRUMENTS:
    return MELODY_INSTRUMENTS[program][0]
  return BASS_INSTRUMENTS[program]


def _register_shift(melody: Melody, key_shift: int, centre: int) -> int:
  """key_shift plus the octaves that bring the melody's median pitch nearest `centre`."""
  median = float(np.median(melody.pitches)) + key_shift
  return key_shift + 12 * int(round((centre - median) / 12.0))


def sample_render_spec(melody: Melody, rng: np.random.Generator, *, clip_seconds: float,
                       sample_rate: int = SAMPLE_RATE, hum_fraction: float = 0.2,
                       whistle_fraction: float = 0.1, drums_fraction: float = 0.35,
                       two_instruments_fraction: float = 0.5) -> RenderSpec:
  """Draws a rendering of `melody`: timbre, instruments, tempo, key, dynamics, drums, excerpt.

  Args:
    melody: what will be rendered (its register and length shape the choices).
    rng: the rendering's own generator (seeded from config seed, melody and rendering index).
    clip_seconds: clip length.
    sample_rate: output sample rate.
    hum_fraction: probability of a hummed rendering (voice synth, solo).
    whistle_fraction: probability of a whistled rendering (voice synth, solo).
    drums_fraction: probability of drums on an instrument rendering.
    two_instruments_fraction: probability that an instrument rendering has a second instrument.

  Returns:
    The spec; every field is drawn from `rng`, so the same generator state gives the same spec.
  """
  draw = rng.random()
  timbre = ('hum' if draw < hum_fraction else
            'whistle' if draw < hum_fraction + whistle_fraction else 'instrument')
  band = ('slow', 'medium', 'fast')[rng.integers(3)]
  tempo_bpm = float(rng.integers(_TEMPO_DRAW[band][0], _TEMPO_DRAW[band][1] + 1))
  key_shift = int(rng.integers(-5, 7))
  dynamics = DYNAMICS[rng.integers(len(DYNAMICS))]
  programs: tuple[int, ...] = ()
  accompaniment, drums, drum_kit = 'none', False, 0
  if timbre == 'instrument':
    melody_programs = sorted(MELODY_INSTRUMENTS)
    program = melody_programs[rng.integers(len(melody_programs))]
    transposition = _register_shift(melody, key_shift, MELODY_INSTRUMENTS[program][1])
    programs = (program,)
    if rng.random() < two_instruments_fraction:
      accompaniment = ('octave', 'bass', 'chords')[rng.integers(3)]
      if accompaniment == 'octave' and MELODY_INSTRUMENTS[program][1] < 62:
        accompaniment = 'chords'  # an octave below a low instrument would only rumble
      choices = {'octave': OCTAVE_INSTRUMENTS, 'bass': tuple(sorted(BASS_INSTRUMENTS)),
                 'chords': CHORD_INSTRUMENTS}[accompaniment]
      # The second instrument must sound (and be named) differently from the first.
      choices = [p for p in choices if instrument_name(p) != instrument_name(program)]
      programs = (program, choices[rng.integers(len(choices))])
    drums = bool(rng.random() < drums_fraction)
    kits = sorted(DRUM_KITS)
    drum_kit = kits[rng.integers(len(kits))]
  elif timbre == 'hum':
    transposition = _register_shift(melody, key_shift, _HUM_CENTRES[rng.integers(2)])
  else:
    transposition = _register_shift(melody, key_shift, _WHISTLE_CENTRE)

  clip_quarters = clip_seconds * tempo_bpm / 60.0
  start_quarters = 0.0
  if melody.length_quarters >= clip_quarters:
    # An excerpt that starts on a downbeat (or at the very start, pickup included).
    starts = [0.0] + [s for s in np.arange(melody.downbeat_phase, melody.length_quarters,
                                           melody.bar_quarters)
                      if s + clip_quarters <= melody.length_quarters and s > 0]
    start_quarters = float(starts[rng.integers(len(starts))])
  return RenderSpec(timbre=timbre, programs=programs, accompaniment=accompaniment,
                    tempo_bpm=tempo_bpm, transposition=transposition, dynamics=dynamics,
                    drums=drums, drum_kit=drum_kit, start_quarters=start_quarters,
                    clip_seconds=clip_seconds, sample_rate=sample_rate,
                    seed=int(rng.integers(2**31)))


_MAJOR_NAMES = ('C', 'Db', 'D', 'Eb', 'E', 'F', 'F#', 'G', 'Ab', 'A', 'Bb', 'B')
_MINOR_NAMES = ('C', 'C#', 'D', 'Eb', 'E', 'F', 'F#', 'G', 'G#', 'A', 'Bb', 'B')


def key_name(pitch_class: int, mode: str) -> str:
  """Conventional spelling of a key's tonic ('F#' major, 'Bb' minor, ...)."""
  return (_MAJOR_NAMES if mode == 'major' else _MINOR_NAMES)[pitch_class % 12]


def attributes_of(melody: Melody, spec: RenderSpec) -> RenderingAttributes:
  """The ground-truth attributes of `render_rendering(melody, spec)`'s audio."""
  if spec.timbre == 'hum':
    instruments = (HUM_NAME,)
  elif spec.timbre == 'whistle':
    instruments = (WHISTLE_NAME,)
  else:
    instruments = tuple(instrument_name(p) for p in spec.programs)
  return RenderingAttributes(
      instruments=instruments, gm_programs=tuple(spec.programs), timbre=spec.timbre,
      accompaniment=spec.accompaniment, tempo_bpm=float(spec.tempo_bpm),
      key_tonic=key_name(melody.tonic_pitch_class + spec.transposition, melody.mode),
      mode=melody.mode, time_signature=melody.time_signature, drums=spec.drums,
      dynamics=spec.dynamics, transposition=spec.transposition, collection=melody.collection,
      title=melody.title)


@dataclasses.dataclass(frozen=True)
class _Note:
  start: float     # seconds from the clip start
  end: float       # seconds
  pitch: int       # MIDI pitch as sounded
  velocity: int


def _clip_melody(melody: Melody, spec: RenderSpec) -> list[tuple[float, float, int]]:
  """The melody's notes inside the clip, looped as needed: (start, length, pitch) in quarters."""
  clip_quarters = spec.clip_seconds * spec.tempo_bpm / 60.0
  period = melody.length_quarters
  begin, end = spec.start_quarters, spec.start_quarters + clip_quarters
  notes = []
  for repeat in range(int(begin // period), int(math.ceil(end / period)) + 1):
    for onset, length, pitch in zip(melody.onsets, melody.durations, melody.pitches):
      start = float(onset) + repeat * period
      if begin <= start < end:
        notes.append((start - begin, float(length), int(pitch) + spec.transposition))
  return notes


# The share of its written length an instrument's melody note is held (a slight detachment, so
# repeated notes are heard); the voices hold their notes fully and articulate with a breath gap
# inside the note (_render_voice) instead.
_INSTRUMENT_LEGATO = 0.92


def _melody_voice(melody: Melody, spec: RenderSpec) -> list[tuple[float, float, float, int]]:
  """The notes the melody voice plays: (start in quarters, start s, end s, sounding pitch).

  The one source of the melody channel's (instrument) or the voice's (hum, whistle) notes, and of
  melody_voice_notes. Seconds are from the clip start; ends are cut at the clip's end.
  """
  seconds = 60.0 / spec.tempo_bpm
  legato = _INSTRUMENT_LEGATO if spec.timbre == 'instrument' else 1.0
  return [(s, s * seconds, min((s + legato * length) * seconds, spec.clip_seconds), pitch)
          for s, length, pitch in _clip_melody(melody, spec)]


def melody_voice_notes(melody: Melody, spec: RenderSpec) -> np.ndarray:
  """The melody as it sounds in `render_rendering(melody, spec)`: float32 [n, 3].

  Rows are (start_seconds, end_seconds, midi_pitch) of the melody voice only (the instrument on
  the melody channel, or the hummed / whistled voice; never the second instrument, an 'octave'
  doubling included, nor drums), sorted by start. Pitches include spec.transposition (key and
  register moves); times are at spec.tempo_bpm, from the clip start, within [0, clip_seconds]
  (a note still sounding at the clip's end ends there); an instrument's notes end where the
  renderer releases them (_INSTRUMENT_LEGATO of their written length), a voice's at their full
  length. Notes the renderer plays for no sample (one starting within half a sample of the
  clip's end) are left out, so every row has end > start, in float32 too.
  """
  def first_sample(seconds: float) -> int:  # as the renderer places note-ons and note-offs
    return int(round(seconds * spec.sample_rate))

  rows = [(start, end, pitch) for _, start, end, pitch in _melody_voice(melody, spec)
          if first_sample(start) < min(spec.num_samples, first_sample(end))]
  notes = np.asarray(rows, np.float64).reshape(-1, 3)
  notes = notes[np.argsort(notes[:, 0], kind='stable')]
  return notes.astype(np.float32)


def _bars(melody: Melody, spec: RenderSpec) -> list[float]:
  """Downbeats inside the clip in quarters from its start, the bar before the first included."""
  clip_quarters = spec.clip_seconds * spec.tempo_bpm / 60.0
  first = melody.downbeat_phase + melody.bar_quarters * math.floor(
      (spec.start_quarters - melody.downbeat_phase) / melody.bar_quarters)
  return [float(b) - spec.start_quarters
          for b in np.arange(first, spec.start_quarters + clip_quarters, melody.bar_quarters)]


def _bar_chords(melody: Melody, spec: RenderSpec, notes, bars) -> list[tuple[int, bool]]:
  """Per bar, the I, IV or V chord (root pitch class, is_major) that best fits its melody notes."""
  tonic = (melody.tonic_pitch_class + spec.transposition) % 12
  minor = melody.mode == 'minor'
  # i/iv minor in a minor key; V major in both (the raised leading tone of minor tunes).
  candidates = [(tonic, not minor), ((tonic + 5) % 12, not minor), ((tonic + 7) % 12, True)]
  chords = []
  for bar_start in bars:
    bar_end = bar_start + melody.bar_quarters
    weights = np.zeros(12)
    for start, length, pitch in notes:
      overlap = min(start + length, bar_end) - max(start, bar_start)
      if overlap > 0:
        weights[pitch % 12] += overlap
    fits = []
    for root, major in candidates:
      tones = (root, (root + (4 if major else 3)) % 12, (root + 7) % 12)
      fits.append(sum(weights[t] for t in tones))
    chords.append(candidates[int(np.argmax(fits))])  # ties go to the tonic, listed first
  return chords


def _beats(time_signature: str) -> tuple[float, int, float]:
  """(beat length in quarters, beats per bar, hi-hat step in quarters) of a meter."""
  numerator, denominator = (int(x) for x in time_signature.split('/'))
  compound = denominator == 8 and numerator % 3 == 0 and numerator > 3
  beat = 4.0 / denominator * (3 if compound else 1)
  beats = numerator // 3 if compound else numerator
  return beat, beats, beat / (3 if compound else 2)


def _drum_pattern(time_signature: str,
                  kit_rng: np.random.Generator) -> list[tuple[float, int, float]]:
  """One bar of drums fitting the meter: (position in quarters, GM drum key, relative velocity).

  Kick on the first beat (and the third of four), snare on the back beats (beats 2 and 4; the
  last beat of odd meters; beats 2 and 3 of a waltz), hi-hat or ride on the subdivisions (eighths;
  the three eighths of each dotted beat in compound meters).
  """
  beat, beats, step = _beats(time_signature)
  kick, snare = 36, (38, 40, 37)[kit_rng.integers(3)]
  cymbal = (42, 42, 51, 44)[kit_rng.integers(4)]
  hits = []
  for b in range(beats):
    position = b * beat
    if b == 0 or (beats == 4 and b == 2):
      hits.append((position, kick, 1.0))
    elif beats == 3 or (beats % 2 == 0 and b % 2 == 1) or (beats % 2 == 1 and b == beats - 1):
      hits.append((position, snare, 0.85))
  for s in np.arange(0.0, beats * beat - 1e-6, step):
    on_beat = abs(s / beat - round(s / beat)) < 1e-6
    hits.append((float(s), cymbal, 0.7 if on_beat else 0.5))
  return hits


def _instrument_notes(melody: Melody, spec: RenderSpec,
                      rng: np.random.Generator) -> tuple[list[_Note], list[_Note], list[_Note]]:
  """(melody, second instrument, drum) notes of an instrument rendering, in seconds."""
  seconds = 60.0 / spec.tempo_bpm
  base_velocity = _DYNAMICS_VELOCITY[spec.dynamics]
  notes = _clip_melody(melody, spec)
  bars = _bars(melody, spec)

  def velocity(start_quarters: float, offset: int = 0) -> int:
    # A small accent on downbeats and a little human unevenness.
    on_downbeat = any(abs(start_quarters - b) < 1e-6 for b in bars)
    v = base_velocity + offset + (8 if on_downbeat else 0) + int(rng.integers(-6, 7))
    return int(np.clip(v, 1, 127))

  lead = [_Note(start, end, pitch, velocity(s))
          for s, start, end, pitch in _melody_voice(melody, spec)]
  second: list[_Note] = []
  if spec.accompaniment == 'octave':
    second = [_Note(n.start, n.end, n.pitch - 12, max(1, n.velocity - 10)) for n in lead]
  elif spec.accompaniment in ('bass', 'chords'):
    beat, beats, _ = _beats(melody.time_signature)
    for bar_start, (root, major) in zip(bars, _bar_chords(melody, spec, notes, bars)):
      if spec.accompaniment == 'bass':
        # Root on the first beat; the fifth at mid-bar when the bar divides in two.
        low_root = 36 + (root - 36) % 12
        events = [(0.0, low_root)]
        if beats % 2 == 0:
          events.append((beats // 2 * beat, low_root + 7))
        span = melody.bar_quarters / len(events)
        for offset, pitch in events:
          start = bar_start + offset
          if start >= 0:
            second.append(_Note(start * seconds, (start + 0.9 * span) * seconds, pitch,
                                velocity(start, -6)))
      else:
        chord_root = 52 + (root - 52) % 12
        if bar_start >= 0:
          for interval in (0, 4 if major else 3, 7):
            second.append(_Note(bar_start * seconds,
                                (bar_start + 0.95 * melody.bar_quarters) * seconds,
                                chord_root + interval, velocity(bar_start, -16)))
  drums: list[_Note] = []
  if spec.drums:
    pattern = _drum_pattern(melody.time_signature, rng)
    for bar_start in bars:
      for position, key, scale in pattern:
        start = bar_start + position
        if start >= 0:
          drums.append(_Note(start * seconds, start * seconds + 0.1, key,
                             int(np.clip(scale * (base_velocity + 5), 1, 127))))
  return lead, second, drums


@functools.lru_cache(maxsize=1)
def _soundfont_bytes() -> bytes:
  """The General MIDI soundfont pretty_midi ships (TimGM6mb, GPL-2), read once per process."""
  import pretty_midi  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(pretty_midi.__file__), 'TimGM6mb.sf2')
  with open(path, 'rb') as f:
    return f.read()


def _render_soundfont(channels: list[tuple[int, int, list[_Note]]], num_samples: int,
                      sample_rate: int, drum_kit: Optional[int]) -> np.ndarray:
  """Plays notes through tinysoundfont; channels are (MIDI channel, GM program, notes)."""
  import tinysoundfont  # pylint: disable=g-import-not-at-top
  # A fresh synth per rendering: no voice or controller state carries over between renderings,
  # so a rendering's samples depend on its spec alone.
  synth = tinysoundfont.Synth(samplerate=sample_rate)
  soundfont = synth.sfload(_soundfont_bytes())
  events = []  # (sample, note-off before note-on at the same sample, channel, key, velocity)
  for channel, program, notes in channels:
    if channel == _DRUM_CHANNEL:
      synth.program_select(channel, soundfont, 128, drum_kit or 0, True)
    else:
      synth.program_select(channel, soundfont, 0, program)
    for n in notes:
      events.append((int(round(n.start * sample_rate)), 1, channel, n.pitch, n.velocity))
      events.append((int(round(n.end * sample_rate)), 0, channel, n.pitch, 0))
  events.sort()
  stereo = np.zeros((num_samples, 2), np.float32)
  position = 0
  for sample, is_on, channel, pitch, velocity in events:
    if sample >= num_samples:
      break
    if sample > position:
      block = synth.generate_simple(sample - position)
      stereo[position:sample] = np.frombuffer(block, np.float32).reshape(-1, 2)
      position = sample
    if is_on:
      synth.noteon(channel, pitch, velocity)
    else:
      synth.noteoff(channel, pitch)
  if position < num_samples:
    block = synth.generate_simple(num_samples - position)
    stereo[position:] = np.frombuffer(block, np.float32).reshape(-1, 2)
  return stereo.mean(axis=1)


def _one_pole(x: np.ndarray, time_constant: float, sample_rate: int) -> np.ndarray:
  """Smooths x with a one-pole low-pass filter of the given time constant (seconds)."""
  a = math.exp(-1.0 / (time_constant * sample_rate))
  return signal.lfilter([1.0 - a], [1.0, -a], x, zi=[x[0] * a])[0]


def _render_voice(notes: list[_Note], num_samples: int, sample_rate: int, whistle: bool,
                  rng: np.random.Generator) -> np.ndarray:
  """A hummed or whistled line: a pitch contour with glides, vibrato and drift, and a timbre.

  Hum: a voice-like tone (a strong fundamental and falling harmonics, like a closed-mouth 'mm'),
  vibrato of 5-6 Hz, a slow pitch drift of some cents, soft onsets and faint breath.
  Whistle: a nearly pure sine (the notes are already moved up an octave or two) with a little
  breath noise, lighter vibrato.
  """
  n = num_samples
  pitch = np.full(n, np.nan)
  gate = np.zeros(n)
  onset_time = np.full(n, np.inf)  # seconds since the current note began (vibrato fades in)
  for note in notes:
    start = int(round(note.start * sample_rate))
    end = min(n, int(round(note.end * sample_rate)))
    if start >= n or end <= start:
      continue
    pitch[start:end] = note.pitch
    # A short breath/re-articulation gap before the note ends, so repeated notes are heard.
    gate[start:max(start + 1, end - int(0.03 * sample_rate))] = 0.85 + 0.3 * rng.random()
    onset_time[start:end] = np.arange(end - start) / sample_rate
  if np.all(np.isnan(pitch)):
    return np.zeros(n, np.float32)
  # Through rests the voice stays on the last pitch (it is silent there), so glides only happen
  # between sung notes.
  valid = ~np.isnan(pitch)
  index = np.where(valid, np.arange(n), 0)
  np.maximum.accumulate(index, out=index)
  pitch = np.where(valid, pitch, pitch[index])
  pitch[:np.argmax(valid)] = pitch[np.argmax(valid)]

  pitch = _one_pole(pitch, 0.012 if whistle else 0.025, sample_rate)  # portamento
  t = np.arange(n) / sample_rate
  vibrato_rate = rng.uniform(5.0, 6.0)
  vibrato_depth = rng.uniform(0.08, 0.15) if whistle else rng.uniform(0.15, 0.3)  # semitones
  vibrato_fade = np.clip(onset_time / 0.25, 0.0, 1.0)
  vibrato = vibrato_depth * vibrato_fade * np.sin(2 * np.pi * vibrato_rate * t
                                                  + rng.uniform(0, 2 * np.pi))
  # Slow drift: a random walk at 20 Hz, low-passed and scaled to about 10 cents.
  control = rng.standard_normal(int(n / sample_rate * 20) + 2)
  walk = np.cumsum(control)
  walk = walk - np.linspace(walk[0], walk[-1], len(walk))  # no net drift over the clip
  walk = walk / (np.std(walk) + 1e-9) * 0.1
  drift = np.interp(t, np.arange(len(walk)) / 20.0, walk)
  f0 = 440.0 * 2.0 ** ((pitch + vibrato + drift - 69.0) / 12.0)
  phase = 2 * np.pi * np.cumsum(f0) / sample_rate

  if whistle:
    amplitudes = (1.0, 0.02)
  else:
    amplitudes = (1.0, 0.45, 0.25, 0.14, 0.09, 0.06, 0.04, 0.025, 0.015, 0.01)
  tone = np.zeros(n)
  for k, amplitude in enumerate(amplitudes, start=1):
    audible = k * f0 < 0.45 * sample_rate  # no aliasing above Nyquist
    tone += amplitude * np.sin(k * phase) * audible
  envelope = _one_pole(gate, 0.02 if whistle else 0.035, sample_rate)
  tremolo = 1.0 + 0.04 * np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t)
  noise = rng.standard_normal(n)
  if whistle:
    breath = signal.lfilter(*signal.butter(2, [1500, 6000], btype='band', fs=sample_rate), noise)
    breath_level = 0.06
  else:
    breath = signal.lfilter(*signal.butter(2, 1200, btype='low', fs=sample_rate), noise)
    breath_level = 0.02
  voice = envelope * (tremolo * tone + breath_level * breath / (np.std(breath) + 1e-9))
  return voice.astype(np.float32)


def _level(audio: np.ndarray, dynamics: str) -> np.ndarray:
  """Scales the clip to its dynamics' loudness, never letting peaks pass _PEAK_LIMIT."""
  rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
  if rms < 1e-9:
    return audio
  gain = 10.0 ** (_DYNAMICS_RMS_DBFS[dynamics] / 20.0) / rms
  peak = float(np.max(np.abs(audio))) * gain
  if peak > _PEAK_LIMIT:
    gain *= _PEAK_LIMIT / peak
  return (audio * gain).astype(np.float32)


def render_rendering(melody: Melody, spec: RenderSpec) -> np.ndarray:
  """Renders `melody` as `spec` says, as mono float32 in [-1, 1] of spec.num_samples samples.

  Args:
    melody: the melody as written.
    spec: the rendering (see sample_render_spec, or build one by hand).

  Returns:
    The clip: the excerpt of the (looped) melody starting at spec.start_quarters, transposed by
    spec.transposition, at spec.tempo_bpm, with the spec's timbre, accompaniment and drums,
    levelled to the spec's dynamics.
  """
  if spec.timbre not in TIMBRES:
    raise ValueError(f'timbre {spec.timbre!r} not in {TIMBRES}')
  if spec.accompaniment not in ACCOMPANIMENTS:
    raise ValueError(f'accompaniment {spec.accompaniment!r} not in {ACCOMPANIMENTS}')
  rng = np.random.default_rng([spec.seed, 0, 0])
  if spec.timbre == 'instrument':
    lead, second, drums = _instrument_notes(melody, spec, rng)
    channels = [(_MELODY_CHANNEL, spec.programs[0], lead)]
    if second:
      channels.append((_SECOND_CHANNEL, spec.programs[1], second))
    if drums:
      channels.append((_DRUM_CHANNEL, 0, drums))
    audio = _render_soundfont(channels, spec.num_samples, spec.sample_rate, spec.drum_kit)
  else:
    notes = [_Note(start, end, pitch, 0) for _, start, end, pitch in _melody_voice(melody, spec)]
    audio = _render_voice(notes, spec.num_samples, spec.sample_rate, spec.timbre == 'whistle',
                          rng)
  return _level(audio, spec.dynamics)


def to_int16(audio: np.ndarray) -> np.ndarray:
  """float32 audio in [-1, 1] as int16 PCM (rounded, saturated)."""
  return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
