"""Shared by the peer benchmarks: threads, import shims for audiolm-pytorch, timing, output.

These scripts run in the peers' venv (benchmarks/peers/setup_peers.sh), never the project's.
"""
import importlib.machinery
import json
import os
import statistics
import sys
import time
import types


def set_threads(threads: int):
  """Pins PyTorch to `threads` intra-op threads (XLA:CPU uses one per core) and one inter-op."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:  # already set once in this process
    pass
  return torch


def _stub(name: str):
  module = types.ModuleType(name)
  module.__spec__ = importlib.machinery.ModuleSpec(name, None)
  sys.modules.setdefault(name, module)


def import_audiolm():
  """Imports audiolm_pytorch with stubs for what the benchmarks never call.

  fairseq is imported for HuBERT / vq-wav2vec and wandb by the trainer; neither is installed
  (fairseq does not build here). SemanticTransformer's constructor asks the model hub for the
  T5 config of its text conditioner ('google/t5-v1_1-base') even when unconditioned: a local
  T5Config of the same width (768) stands in.
  """
  _stub('fairseq')
  _stub('wandb')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
  import audiolm_pytorch  # pylint: disable=g-import-not-at-top
  from audiolm_pytorch import t5  # pylint: disable=g-import-not-at-top
  from transformers import T5Config  # pylint: disable=g-import-not-at-top
  t5.T5_CONFIGS.setdefault(t5.DEFAULT_T5_NAME, {'config': T5Config(d_model=768)})
  return audiolm_pytorch


def time_median(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
  """(median seconds, all timed seconds) of `repeats` calls of `fn` after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def versions(*names: str) -> dict:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  return {name: md.version(name) for name in names}


def emit(row: dict):
  """The one JSON line the driver (benchmarks/peers.py) reads: the last line of stdout."""
  print(json.dumps(row), flush=True)


def time_train_step(torch, model, loss_fn, warmup: int, repeats: int
                    ) -> tuple[float, list[float], float]:
  """(median seconds, all timed seconds, last loss) of a training step of `model`.

  The step: `loss_fn()` (forward and loss), backward, gradient-norm clipping at 1.0 and
  `torch.optim.AdamW` (lr 1e-4, weight decay 0.01), as our trainer's step.
  """
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  losses = []

  def step():
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))

  seconds, times = time_median(step, warmup, repeats)
  return seconds, times, losses[-1]
