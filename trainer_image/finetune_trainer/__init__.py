"""finetune_trainer: the program the trainer pods run and `finetune run` runs locally.

It reads a FineTuneJob manifest and fine-tunes for real with transformers, datasets and torch; see `job.run`.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
