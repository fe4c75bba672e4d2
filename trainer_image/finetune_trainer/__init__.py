"""finetune_trainer: the program the trainer pods run and `finetune run` runs locally.

It reads a FineTuneJob manifest and fine-tunes for real with transformers, datasets and torch; see `job.run`.
"""

from finetune_api import __version__

# The logger of what every rank says at INFO, not only rank 0 (the others log warnings only): where it starts.
START_LOGGER = "finetune_trainer.start"

__all__ = ["START_LOGGER", "__version__"]
