"""Melodies of the embedded corpus: music21 corpus tunes chosen by seed and parsed to note lists."""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Iterable, Optional, Sequence

import numpy as np

# Corpus folders whose encodings are licensed for use (music21/corpus/license.txt): public-domain
# tunes and chorales. Palestrina and Monteverdi may be added through a config's `collections`
# (their top voice is taken), but their files are slower to parse and less song-like.
DEFAULT_COLLECTIONS = ('oneills1850', 'ryansMammoth', 'airdsAirs', 'bach', 'miscFolk')
OPTIONAL_COLLECTIONS = ('palestrina', 'monteverdi')
# The Essen folk song collection is licensed for NON-COMMERCIAL use only, so it is never selected
# unless a config opts in explicitly (`include_essen=True`).
ESSEN_COLLECTION = 'essenFolksong'

# A tune with fewer notes, fewer distinct pitches or fewer bars than these is too degenerate to
# stand for a melody (a fragment, an exercise, a single repeated note).
MIN_NOTES = 12
MIN_DISTINCT_PITCHES = 3
MIN_BARS = 2
# A part that rests for much of its length (an accompanying voice) leaves clips nearly silent.
MIN_SOUNDING_SHARE = 0.6

# Third word of the seed for the tune order, beyond any melody index so no stream is reused.
_SELECTION_STREAM = 1_000_000_001


class SkipMelody(Exception):
  """A tune that cannot serve as a melody; `reason` is the short name under which it is counted."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class CorpusTune:
  """One work of the music21 core corpus, known from its metadata only (nothing parsed yet).

  Attributes:
    key: the metadata bundle's key, unique over the corpus (e.g. 'oneills1850_0001-0050_abc_7');
      it is also the melody_id of the melody parsed from this tune.
    source_path: the path inside the corpus (e.g. 'oneills1850/0001-0050.abc').
    number: the tune's number inside a multi-tune file (abc), or None for one-work files.
    collection: the corpus folder (e.g. 'oneills1850', 'bach', 'essenFolksong').
    title: the title from the metadata, else the file name.
  """
  key: str
  source_path: str
  number: Optional[str]
  collection: str
  title: str

  def parse(self):
    """Parses this one tune (not the whole multi-tune file) into a music21 Score."""
    from music21 import corpus  # pylint: disable=g-import-not-at-top
    # forceSource: never read or write music21's pickle cache outside the data_dir.
    if self.number is not None:
      return corpus.parse(self.source_path, number=int(self.number), forceSource=True)
    return corpus.parse(self.source_path, forceSource=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Melody:
  """A monophonic melody as written (before any transposition), with its meter and key.

  Times are in quarter notes from the start of the tune (a pickup starts at 0).

  Attributes:
    melody_id: stable identifier; all renderings of this melody carry it.
    collection: corpus folder the tune comes from ('custom' for hand-made melodies).
    title: the tune's title.
    pitches: MIDI pitch of each note, int32 [n].
    onsets: onset of each note in quarter notes, float64 [n], strictly increasing.
    durations: sounding length of each note in quarter notes, float64 [n], never past the next
      onset.
    time_signature: e.g. '6/8'; one meter for the whole tune.
    bar_quarters: the length of one bar in quarter notes (3.0 for 6/8).
    downbeat_phase: where the first downbeat falls, in quarter notes (the pickup's length).
    tonic_pitch_class: tonic of the written key, 0 = C ... 11 = B.
    mode: 'major' or 'minor'.
    length_quarters: the loop period: the tune's length rounded up to whole bars, so that a
      looped tune keeps its bar lines (and its pickup) in place.
  """
  melody_id: str
  collection: str
  title: str
  pitches: np.ndarray
  onsets: np.ndarray
  durations: np.ndarray
  time_signature: str
  bar_quarters: float
  downbeat_phase: float
  tonic_pitch_class: int
  mode: str
  length_quarters: float

  @classmethod
  def from_notes(cls, pitches: Sequence[int], durations: Sequence[float], *,
                 melody_id: str = 'custom', title: str = 'custom melody',
                 time_signature: str = '4/4', tonic_pitch_class: int = 0,
                 mode: str = 'major', downbeat_phase: float = 0.0) -> Melody:
    """A melody from consecutive notes (no rests), e.g. for tests or a user's own tune.

    Args:
      pitches: MIDI pitches, one per note.
      durations: note lengths in quarter notes; each note starts where the previous one ends.
      melody_id: identifier of the melody.
      title: title of the melody.
      time_signature: meter, e.g. '3/4'.
      tonic_pitch_class: tonic of the key the notes are written in (0 = C).
      mode: 'major' or 'minor'.
      downbeat_phase: length of a pickup before the first downbeat, in quarter notes.

    Returns:
      The melody, with onsets accumulated from the durations.
    """
    durations = np.asarray(durations, np.float64)
    onsets = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    bar = bar_quarters_of(time_signature)
    return cls(melody_id=melody_id, collection='custom', title=title,
               pitches=np.asarray(pitches, np.int32), onsets=onsets, durations=durations,
               time_signature=time_signature, bar_quarters=bar, downbeat_phase=downbeat_phase,
               tonic_pitch_class=tonic_pitch_class, mode=mode,
               length_quarters=_whole_bars(float(onsets[-1] + durations[-1]), bar))


def bar_quarters_of(time_signature: str) -> float:
  """Length of one bar of `time_signature` ('6/8') in quarter notes (3.0)."""
  numerator, denominator = (int(x) for x in time_signature.split('/'))
  return numerator * 4.0 / denominator


def _whole_bars(length_quarters: float, bar_quarters: float) -> float:
  # The small tolerance keeps a tune that ends exactly on a bar line from gaining an empty bar.
  return max(1, math.ceil(length_quarters / bar_quarters - 1e-6)) * bar_quarters


@functools.lru_cache(maxsize=1)
def _all_corpus_tunes() -> tuple[CorpusTune, ...]:
  """Every work of music21's core corpus, sorted by path and tune number (from metadata only)."""
  from music21 import corpus  # pylint: disable=g-import-not-at-top
  bundle = corpus.corpora.CoreCorpus().metadataBundle
  # bundle[:] lists the entries in one pass; iterating the bundle is quadratic (each step
  # rebuilds the list of entries), 11 s for the 15,112 works.
  tunes = []
  for entry in bundle[:]:
    source_path = str(entry.sourcePath)
    metadata = entry.metadata
    title = (metadata.title if metadata is not None else None) or _title_from_path(source_path)
    tunes.append(CorpusTune(key=entry.corpusPath, source_path=source_path,
                            number=None if entry.number is None else str(entry.number),
                            collection=source_path.split('/', 1)[0], title=' '.join(title.split())))
  return tuple(sorted(tunes, key=_tune_sort_key))


def _title_from_path(source_path: str) -> str:
  """A title for an untitled work: 'bach/bwv101.7.mxl' -> 'BWV 101.7'."""
  stem = source_path.rsplit('/', 1)[-1].rsplit('.', 1)[0]
  if stem.startswith('bwv'):
    return 'BWV ' + stem[3:]
  return stem


def _tune_sort_key(tune: CorpusTune):
  number = int(tune.number) if tune.number is not None and tune.number.isdigit() else -1
  return (tune.source_path, number, tune.key)


def list_tunes(collections: Iterable[str] = DEFAULT_COLLECTIONS,
               include_essen: bool = False) -> list[CorpusTune]:
  """The corpus works a build may choose from, in a fixed order (sorted by path and number).

  Args:
    collections: corpus folders to draw from (see DEFAULT_COLLECTIONS, OPTIONAL_COLLECTIONS).
    include_essen: also draw from the Essen folk songs, which are licensed for non-commercial
      use only. Naming ESSEN_COLLECTION in `collections` without this flag is an error, so the
      non-commercial material never enters a build by accident.

  Returns:
    The tunes of those collections.
  """
  wanted = list(dict.fromkeys(collections))  # ordered de-duplication
  if ESSEN_COLLECTION in wanted and not include_essen:
    raise ValueError(f'{ESSEN_COLLECTION} is non-commercial only: pass include_essen=True to '
                     'use it')
  if include_essen and ESSEN_COLLECTION not in wanted:
    wanted.append(ESSEN_COLLECTION)
  known = set(DEFAULT_COLLECTIONS + OPTIONAL_COLLECTIONS + (ESSEN_COLLECTION,))
  unknown = [c for c in wanted if c not in known]
  if unknown:
    raise ValueError(f'Unknown collections {unknown}; choose from {sorted(known)}')
  return [t for t in _all_corpus_tunes() if t.collection in wanted]


def selection_order(tunes: Sequence[CorpusTune], seed: int) -> list[CorpusTune]:
  """`tunes` in a seeded random order; a build takes melodies from the front of it."""
  order = np.random.default_rng([seed, _SELECTION_STREAM, 0]).permutation(len(tunes))
  return [tunes[i] for i in order]


def melody_from_score(score, tune: CorpusTune) -> Melody:
  """The top part of a parsed tune as a Melody, or SkipMelody if it cannot serve as one.

  Args:
    score: the music21 Score of `tune` (or a Part / Stream holding the notes).
    tune: where it came from (id, collection, title).

  Returns:
    The melody: the first (top) part, ties merged, chords reduced to their highest note, grace
    notes and chord symbols dropped, overlaps cut so it is monophonic.

  Raises:
    SkipMelody: with reason 'no_time_signature', 'meter_change', 'no_notes', 'too_few_notes',
      'too_few_pitches', 'too_short' or 'mostly_rests'.
  """
  from music21 import chord, harmony, meter, note, stream  # pylint: disable=g-import-not-at-top
  from music21 import key as key_module  # pylint: disable=g-import-not-at-top
  parts = list(score.parts) if hasattr(score, 'parts') else []
  # The melody is the soprano where the parts are named (some Bach cantata chorales list their
  # trumpets and timpani first), otherwise the top part.
  sopranos = [p for p in parts if 'soprano' in (p.partName or '').lower()]
  part = sopranos[0] if sopranos else parts[0] if parts else score
  flat = part.flatten()

  signatures = flat.getElementsByClass(meter.TimeSignature)
  meters = list(dict.fromkeys(ts.ratioString for ts in signatures))
  if not meters:
    raise SkipMelody('no_time_signature')
  if len(meters) > 1:
    # A rendering states one meter and its drums follow it; a tune that changes meter would
    # make that attribute false for part of the audio.
    raise SkipMelody('meter_change', ' '.join(meters))
  time_signature = meters[0]
  bar = bar_quarters_of(time_signature)

  onset_to_pitch: dict[float, tuple[int, float]] = {}
  for element in flat.stripTies().notes:
    length = float(element.quarterLength)
    if isinstance(element, harmony.Harmony) or length <= 0:  # chord symbols, grace notes
      continue
    if isinstance(element, note.Note):
      pitch = element.pitch.midi
    elif isinstance(element, chord.Chord) and element.pitches:
      pitch = max(p.midi for p in element.pitches)  # the melody is the top of a double stop
    else:
      continue
    onset = float(element.offset)
    if onset not in onset_to_pitch or pitch > onset_to_pitch[onset][0]:
      onset_to_pitch[onset] = (pitch, length)
  if not onset_to_pitch:
    raise SkipMelody('no_notes')
  onsets = np.array(sorted(onset_to_pitch), np.float64)
  pitches = np.array([onset_to_pitch[o][0] for o in onsets], np.int32)
  durations = np.array([onset_to_pitch[o][1] for o in onsets], np.float64)
  durations[:-1] = np.minimum(durations[:-1], np.diff(onsets))  # monophonic: cut overlaps
  measures = list(part.getElementsByClass(stream.Measure))
  # A pickup bar makes the second bar start early; its start is where the downbeats fall.
  phase = float(measures[1].offset - measures[0].offset) % bar if len(measures) > 1 else 0.0
  # Whole bars of rest before the first note (a part that waits for its entry) are cut, keeping
  # the bar lines where they are.
  onsets -= bar * max(0, math.floor((onsets[0] - phase) / bar))
  if len(pitches) < MIN_NOTES:
    raise SkipMelody('too_few_notes', str(len(pitches)))
  if len(np.unique(pitches)) < MIN_DISTINCT_PITCHES:
    raise SkipMelody('too_few_pitches')
  end = float(onsets[-1] + durations[-1])
  if end < MIN_BARS * bar:
    raise SkipMelody('too_short', f'{end} quarters')
  if float(np.sum(durations)) < MIN_SOUNDING_SHARE * end:
    raise SkipMelody('mostly_rests')

  melody_stream = stream.Stream()
  for pitch, onset, length in zip(pitches, onsets, durations):
    melody_stream.insert(float(onset), note.Note(int(pitch), quarterLength=float(length)))
  # The key heard in the melody itself (Krumhansl-Schmuckler style profile matching), which is
  # what the rendered audio carries; a folk tune's written signature is often a mode.
  analyzed: key_module.Key = melody_stream.analyze('key')
  return Melody(melody_id=tune.key, collection=tune.collection, title=tune.title,
                pitches=pitches, onsets=onsets, durations=durations,
                time_signature=time_signature, bar_quarters=bar, downbeat_phase=phase,
                tonic_pitch_class=analyzed.tonic.pitchClass, mode=analyzed.mode,
                length_quarters=_whole_bars(end, bar))


def load_melody(tune: CorpusTune) -> Melody:
  """Parses one tune into a Melody; every failure becomes a SkipMelody with a counted reason."""
  try:
    score = tune.parse()
  except Exception as e:  # pylint: disable=broad-except  # any parser failure is a skip
    raise SkipMelody('parse_error', f'{type(e).__name__}: {e}') from e
  try:
    melody = melody_from_score(score, tune)
  except SkipMelody:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SkipMelody('conversion_error', f'{type(e).__name__}: {e}') from e
  if melody.mode not in ('major', 'minor'):
    raise SkipMelody('no_key', melody.mode)
  return melody


def collect_melodies(tunes: Iterable[CorpusTune],
                     num_melodies: int) -> tuple[list[Melody], dict[str, int]]:
  """The first `num_melodies` tunes of `tunes` that parse to usable melodies.

  Args:
    tunes: candidates in the order to try them (see selection_order).
    num_melodies: how many melodies to return.

  Returns:
    (melodies, skip_counts): the melodies in candidate order, and how many tunes were skipped for
    each reason (sorted by reason), so a build can report what it left out.

  Raises:
    ValueError: if the candidates run out before `num_melodies` melodies were found.
  """
  melodies = []
  skips: collections.Counter[str] = collections.Counter()
  for tune in tunes:
    if len(melodies) == num_melodies:
      break
    try:
      melodies.append(load_melody(tune))
    except SkipMelody as skip:
      skips[skip.reason] += 1
  if len(melodies) < num_melodies:
    raise ValueError(f'Only {len(melodies)} usable melodies among the candidates, '
                     f'{num_melodies} asked for (skipped: {dict(skips)})')
  return melodies, dict(sorted(skips.items()))
