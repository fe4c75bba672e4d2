"""finetune_api: the FineTuneJob API as pydantic models, importable by the operator and the trainer alike.

Depends on pydantic and PyYAML only, never on kopf, kubernetes or torch.
"""

from finetune_api._version import __version__
from finetune_api.names import API_VERSION, GROUP, KIND, PLURAL, VERSION
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "FineTuneJobSpec", "FineTuneJobStatus", "__version__"]
