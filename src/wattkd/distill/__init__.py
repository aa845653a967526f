"""Distillation: losses, modes and the fused LM-head loss.

Importing the package registers every loss (torchdistill style: the registry imports no loss;
the package imports the modules that fill it).
"""

from wattkd.distill import losses  # noqa: F401 - registers the losses
