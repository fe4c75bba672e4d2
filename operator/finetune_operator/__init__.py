"""finetune_operator: the kopf operator that turns FineTuneJobs into Indexed batch/v1 Jobs and reports their progress.

Layers: handlers (kopf wiring) -> controller (the reconcile pass) -> pure builders/state/conditions/progress/ledger;
k8s is the only module that calls the Kubernetes API.
"""

from finetune_api import __version__

__all__ = ["__version__"]
