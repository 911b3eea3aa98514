"""Per-frame pitch labels from the `melody_notes` of `embedded_music` (melody_voice_notes)."""
from __future__ import annotations

import numpy as np

NO_PITCH = -1


def frame_pitches(notes: np.ndarray, num_frames: int, frame_rate: float) -> np.ndarray:
  """The MIDI pitch of the melody sounding at the centre of each frame, -1 where none does.

  Convention: frame t covers [t / frame_rate, (t + 1) / frame_rate) seconds and is labelled by
  what sounds at its centre c_t = (t + 0.5) / frame_rate. A note (start, end, pitch) sounds at
  c_t when start <= c_t < end (a note starting exactly at a centre labels that frame, one
  ending exactly there does not). Where notes overlap, the latest-starting one wins (between
  notes starting together, the later row). Frames past the last note, in rests, or beyond the
  clip are NO_PITCH (-1).

  Args:
    notes: float [n, 3] rows (start_seconds, end_seconds, midi_pitch), e.g. an example's
      `melody_notes`; any row order.
    num_frames: how many frames to label.
    frame_rate: frames per second (e.g. 50.0 for 20 ms frames).

  Returns:
    int32 [num_frames]: the sounding MIDI pitch per frame, or -1.
  """
  notes = np.asarray(notes, np.float64).reshape(-1, 3)
  if frame_rate <= 0:
    raise ValueError(f'frame_rate must be positive, got {frame_rate}')
  labels = np.full(int(num_frames), NO_PITCH, np.int32)
  centres = (np.arange(int(num_frames), dtype=np.float64) + 0.5) / float(frame_rate)
  # Painting in order of start lets later-starting notes overwrite earlier ones.
  for start, end, pitch in notes[np.argsort(notes[:, 0], kind='stable')]:
    first, stop = np.searchsorted(centres, [start, end], side='left')
    labels[first:stop] = int(np.rint(pitch))
  return labels
