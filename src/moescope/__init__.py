"""moescope: train mixture-of-experts language models and see what their experts learn.

Layers (imports point downward only):
  1. computation  -- tensors/arrays in, tensors/arrays out (moe.layer, analysis.metrics, cluster.merge, ...)
  2. data and I/O -- files, formats, sources, checkpoints, plots, reports (data.*, io.*, analysis.report)
  3. orchestration -- CLI, trainer loop, experiments, demo (cli, commands.*, train.trainer, ...)
"""

__version__ = "0.1.0"
