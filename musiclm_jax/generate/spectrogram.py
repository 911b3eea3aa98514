"""Log-mel spectrogram pictures of generated audio (for `musiclm-jax sample` and the notebook)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from musiclm_jax.common import atomic


def log_mel(audio: np.ndarray, sample_rate: int = 24000, n_mels: int = 128,
            hop_length: int = 240) -> np.ndarray:
  """float32 [n_mels, frames] log-mel power in dB (0 dB = the clip's peak, floor -80 dB)."""
  import librosa  # pylint: disable=g-import-not-at-top
  audio = np.asarray(audio, np.float32)
  if audio.ndim != 1 or audio.size == 0:
    raise ValueError(f'expected mono samples [samples], got shape {audio.shape}')
  mel = librosa.feature.melspectrogram(y=audio, sr=sample_rate, n_fft=2048,
                                       hop_length=hop_length, n_mels=n_mels, fmax=sample_rate / 2)
  return librosa.power_to_db(mel, ref=np.max(mel) if np.max(mel) > 0 else 1.0,
                             top_db=80.0).astype(np.float32)


def plot_spectrogram(audio: np.ndarray, sample_rate: int = 24000, ax: Any = None,
                     title: Optional[str] = None, marks_seconds: Sequence[float] = ()) -> Any:
  """Draws the log-mel spectrogram of mono audio on a matplotlib axis (a new figure if None).

  Args:
    audio: float samples [samples].
    sample_rate: their rate.
    ax: the axis to draw on.
    title: the axis title.
    marks_seconds: times to mark with vertical lines (e.g. story boundaries).

  Returns:
    The axis.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  hop = 240
  spec = log_mel(audio, sample_rate, hop_length=hop)
  if ax is None:
    _, ax = plt.subplots(figsize=(10, 3))
  seconds = len(audio) / sample_rate
  image = ax.imshow(spec, origin='lower', aspect='auto', cmap='magma', vmin=-80, vmax=0,
                    extent=(0.0, seconds, 0, spec.shape[0]))
  for t in marks_seconds:
    ax.axvline(t, color='cyan', linewidth=1.0, linestyle='--')
  ax.set_xlabel('seconds')
  ax.set_ylabel('mel band')
  if title:
    ax.set_title(title, fontsize=9)
  ax.figure.colorbar(image, ax=ax, format='%+.0f dB', pad=0.01)
  return ax


def save_spectrogram(path: str, audio: np.ndarray, sample_rate: int = 24000,
                     title: Optional[str] = None, marks_seconds: Sequence[float] = ()) -> str:
  """Writes a PNG of the log-mel spectrogram atomically (a temporary file renamed into place)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(10, 3.2))
  try:
    plot_spectrogram(audio, sample_rate, ax, title, marks_seconds)
    fig.tight_layout()
    return atomic.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format='png'),
                            suffix='.png')
  finally:
    plt.close(fig)
