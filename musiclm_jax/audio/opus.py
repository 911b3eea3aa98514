"""Opus round trips through Debian's opus-tools (`opusenc` / `opusdec`): the codec baseline.

The evaluation (`musiclm-jax eval`: the 'opus_6kbps' row beside the codec's resynthesis) and
benchmarks/codec_quality.py compare the codec with Opus at the same bitrate on the same clips.
Install: `sudo apt-get install opus-tools`; without it `available()` is False and callers skip
Opus, saying so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Optional

import numpy as np


def available() -> bool:
  return bool(shutil.which('opusenc') and shutil.which('opusdec'))


def roundtrip(audio: np.ndarray, sample_rate: int, kbps: float,
              workdir: Optional[str] = None) -> np.ndarray:
  """Mono float samples encoded at `kbps` (hard CBR) and decoded; float32, same length."""
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    src, enc, dec = (os.path.join(tmp, n) for n in ('in.wav', 'out.opus', 'out.wav'))
    sf.write(src, np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate,
             subtype='PCM_16')
    subprocess.run(['opusenc', '--quiet', '--bitrate', f'{kbps:g}', '--hard-cbr', src, enc],
                   check=True)
    subprocess.run(['opusdec', '--quiet', '--rate', str(sample_rate), enc, dec], check=True)
    out, rate = sf.read(dec, dtype='float32')
  if rate != sample_rate:
    raise RuntimeError(f'opusdec wrote {rate} Hz, asked for {sample_rate}')
  if out.ndim == 2:
    out = out.mean(axis=1)
  out = out[:len(audio)]
  return np.pad(out, (0, len(audio) - len(out))).astype(np.float32)
