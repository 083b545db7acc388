"""raydistill: language-model distillation experiments on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
