"""finetune_operator: the kopf operator that turns FineTuneJobs into Indexed batch/v1 Jobs and reports their progress.

Layers: handlers (kopf wiring) -> controller (intake, records, queue) -> runner (workers) -> reconcile (the pass)
-> children (child objects on the API); pure builders/state/conditions/progress/ledger/gang/observe decide; k8s is the
only module that calls the Kubernetes API. operator/README.md has a map of where each behaviour lives.
"""

from finetune_api import __version__

__all__ = ["__version__"]
