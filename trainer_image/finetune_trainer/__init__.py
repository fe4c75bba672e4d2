"""finetune_trainer: the program the trainer pods run and `finetune run` runs locally.

It reads a FineTuneJob manifest and fine-tunes for real with transformers, datasets and torch; see `job.run`.
"""

from finetune_api import __version__

__all__ = ["__version__"]
