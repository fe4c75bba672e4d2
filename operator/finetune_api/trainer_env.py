"""The trainer's environment: the variables the operator sets in trainer pods and the trainer reads.

Each name is written here once; the operator's builders set them and the trainer's configuration reads them.
Flags of the trainer's command line win over these; see trainer_image/README.md for defaults.
"""

PVC_ROOT = "FINETUNE_PVC_ROOT"  # folder under which pvc://<claim>/<path> is mounted
METRICS_PORT = "FINETUNE_METRICS_PORT"  # port of the trainer's GET /metrics and GET /progress (0: off)
PROGRESS_URL = "FINETUNE_PROGRESS_URL"  # where rank 0 POSTs progress reports
PROGRESS_TOKEN = "FINETUNE_PROGRESS_TOKEN"  # bearer token of those POSTs (from the job's Secret)
PROGRESS_INTERVAL = "FINETUNE_PROGRESS_INTERVAL"  # seconds between regular pushes
GRACE_PERIOD = "FINETUNE_GRACE_PERIOD"  # seconds after SIGTERM to save a checkpoint and exit
TERMINATION_LOG = "FINETUNE_TERMINATION_LOG"  # where the one-paragraph failure message goes
THREADS = "FINETUNE_THREADS"  # torch CPU threads per process
CACHE_DIR = "FINETUNE_CACHE_DIR"  # downloads, the datasets cache, staging of remote storage
LOG_LEVEL = "FINETUNE_LOG_LEVEL"  # INFO, DEBUG, ...
PREFLIGHT_MAX_EXAMPLES = "FINETUNE_PREFLIGHT_MAX_EXAMPLES"  # the pre-flight reads a split whole up to this many rows

# MLflow's own variables (read by the mlflow client in the trainer), set by the operator from
# spec.tracking.mlflow's Secret references.
MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
MLFLOW_TRACKING_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"
