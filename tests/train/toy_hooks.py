"""Gin-bindable step hooks used by the resume tests (loaded with --module_import)."""
import os
import signal

import gin


@gin.configurable
def signal_at_step(step: int = gin.REQUIRED, signum: int = int(signal.SIGKILL)):
  """A hook that sends `signum` to this process right after `step` (SIGKILL = kill -9)."""
  def hook(done_step, metrics):
    del metrics
    if done_step == step:
      os.kill(os.getpid(), signum)
  return hook
