"""A gin-bindable step hook for the stage training test (loaded with --module_import)."""
import gin

LOSSES: dict[int, float] = {}


@gin.configurable
def record_stage_losses():
  """A step hook keeping each step's training loss in LOSSES."""
  LOSSES.clear()

  def hook(step, metrics):
    LOSSES[step] = metrics['loss']
  return hook
