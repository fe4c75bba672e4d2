"""Experiment trackers: TensorBoard event files under the output and an MLflow run, both fed by rank 0 with the
records of metrics.jsonl (finetune_trainer.history), through the trackers' own libraries (tensorboardX, mlflow).

A tracker mirrors the history, so a resumed run leaves no duplicate steps: TensorBoard's folder is rewritten from the
history the checkpoint carried (the event files of steps past it go), and MLflow, which cannot forget a point, is sent
only the steps it has not seen. Tracking never fails training: a tracker that raises is reported and then left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune_api import trainer_env as var
from finetune_api.manifest import FineTuneJob
from finetune_api.spec import MlflowSpec
from finetune_api.times import parse_time
from finetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
RUN_KEY_TAG = "finetune.dev/run-key"  # one MLflow run per job: its identity, hashed
MAX_FAILURES = 3  # consecutive failures after which a tracker is left alone for the rest of the process


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A history record as tracker scalars: `train/<field>` for a training step, `eval/<metric>` for an evaluation."""
    prefix = "eval" if record.get("type") == "eval" else "train"
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("type", "step", "epoch", "time") and isinstance(v, int | float) and not isinstance(v, bool)}


def _walltime(record: dict[str, Any]) -> float:
    return parse_time(record.get("time")) or time.time()


class Tracker:
    """One destination for the history's records."""

    name = "tracker"

    def restore(self, records: list[dict[str, Any]], resumed: bool) -> None:
        """Make the tracker agree with `records`, the history of the checkpoint the run starts from."""

    def log(self, record: dict[str, Any]) -> None:
        """One new record."""

    def flush(self) -> None:
        """Make what was logged visible (after an evaluation, a checkpoint)."""

    def finish(self, files: Iterable[Path], status: str | None) -> None:
        """The run ended: FINISHED (the output is written; `files` are worth keeping beside the metrics), FAILED,
        or None when interrupted (a restart continues the run)."""

    def describe(self) -> str | None:
        """One line for the console summary."""
        return None


class TensorBoard(Tracker):
    """Event files in <output>/tensorboard, written with tensorboardX's SummaryWriter (no server)."""

    name = "TensorBoard"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None

    def restore(self, records: list[dict[str, Any]], resumed: bool) -> None:
        """Replay the checkpoint's history into a new event file, then drop the older files: steps logged after the
        checkpoint by a process that died are gone with them."""
        from tensorboardX import SummaryWriter

        self.folder.mkdir(parents=True, exist_ok=True)
        old = sorted(self.folder.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(logdir=str(self.folder), flush_secs=30)
        for record in records:
            self.log(record)
        self.writer.flush()
        for path in old:
            path.unlink(missing_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        walltime = _walltime(record)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(record["step"]), walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, files: Iterable[Path], status: str | None) -> None:
        if self.writer is not None:  # None: the run ended before it started
            self.writer.close()

    def describe(self) -> str:
        return f"TensorBoard: tensorboard --logdir {self.folder}"


class Mlflow(Tracker):
    """One MLflow run per FineTuneJob, continued by every restart; metrics by step, hyperparameters as params."""

    name = "MLflow"

    def __init__(self, spec: MlflowSpec, job: str, namespace: str | None, uid: str | None, output_uri: str,
                 params: dict[str, Any]) -> None:
        if not os.environ.get(var.MLFLOW_TRACKING_URI):
            raise ConfigError(f"tracking.mlflow is set but {var.MLFLOW_TRACKING_URI} is not: in a pod the operator "
                              "sets it from tracking.mlflow.trackingUri; for `finetune run` export it")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(f"tracking.mlflow needs the mlflow client (pip install mlflow-skinny): {exc}") from None
        # A tracking server that does not answer should cost seconds, not the client's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.client = MlflowClient()  # the URI and the login come from MLflow's own variables
        self.experiment_name = spec.experiment or namespace or "finetune"
        # The job's identity: its uid in a cluster; name and output locally (a recreated job is a new run).
        self.key = hashlib.sha256((uid or f"{job}@{output_uri}").encode()).hexdigest()[:32]
        self.job, self.params = job, params
        self.run_id: str | None = None
        self.seen: dict[str, int] = {}

    def restore(self, records: list[dict[str, Any]], resumed: bool) -> None:
        client = self.client
        experiment = client.get_experiment_by_name(self.experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment_name)
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.key}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        # The same job's run goes on after a restart; a finished run started again from scratch is a new run.
        if runs and (resumed or runs[0].info.status != "FINISHED"):
            self.run_id = runs[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=self.job, tags={RUN_KEY_TAG: self.key,
                                                                            "finetune.dev/job": self.job})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in self.params.items()])
        # Points MLflow already holds (a process that died may have logged past its last checkpoint) are not sent
        # again: the same steps recomputed after the resume would be duplicates.
        seen: dict[str, int] = {}
        for key in sorted({k for r in records for k in scalars(r)}):
            history = client.get_metric_history(self.run_id, key)
            seen[key] = max((m.step for m in history), default=-1)
        self._send(records, seen)
        self.seen = seen
        log.info("MLflow: run %s in experiment %r", self.run_id, self.experiment_name)

    def _send(self, records: list[dict[str, Any]], seen: dict[str, int]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for record in records:
            stamp = int(_walltime(record) * 1000)
            for key, value in scalars(record).items():
                if int(record["step"]) > seen.get(key, -1):
                    metrics.append(Metric(key, value, stamp, int(record["step"])))
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log(self, record: dict[str, Any]) -> None:
        self._send([record], self.seen)

    def finish(self, files: Iterable[Path], status: str | None) -> None:
        if self.run_id is None:  # the run ended before it started
            return
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if status is not None:
            self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"MLflow: run {self.run_id} in experiment {self.experiment_name!r}"


class Trackers:
    """Every configured tracker, each isolated: one that keeps failing is dropped with a warning."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.failures: dict[str, int] = {}

    def _each(self, what: str, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
                self.failures[tracker.name] = 0
            except Exception as exc:
                n = self.failures[tracker.name] = self.failures.get(tracker.name, 0) + 1
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if n >= MAX_FAILURES or call in ("restore", "finish"):
                    log.warning("%s: %s failed (%s); no more tracking there for this run", tracker.name, what,
                                first)
                    self.trackers.remove(tracker)
                else:
                    log.warning("%s: %s failed (%s)", tracker.name, what, first)

    def restore(self, records: list[dict[str, Any]], resumed: bool) -> None:
        self._each("starting", "restore", records, resumed)

    def log(self, record: dict[str, Any]) -> None:
        self._each("logging", "log", record)

    def flush(self) -> None:
        self._each("flushing", "flush")

    def finish(self, files: Iterable[Path], status: str | None) -> None:
        self._each("finishing", "finish", list(files), status)

    def describe(self) -> list[str]:
        return [line for t in self.trackers if (line := t.describe())]


def flat_params(prefix: str, value: Any) -> dict[str, Any]:
    """Nested settings as dotted names (`lrScheduler.type`): MLflow's params and the model card's table."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items()
                for k, v in flat_params(f"{prefix}.{key}" if prefix else key, item).items()}
    return {prefix: value}


def for_job(job: FineTuneJob, output: Path) -> Trackers:
    """The trackers the job's spec asks for; TensorBoard writes under the output folder (local or staging)."""
    spec = job.spec
    found: list[Tracker] = []
    if spec.tracking.tensorboard:
        found.append(TensorBoard(output / TENSORBOARD_DIR))
    if spec.tracking.mlflow is not None:
        params = {"task": spec.task.type, "model": spec.model.source, "method": spec.method.type,
                  **flat_params("hyperparameters", spec.hyperparameters.model_dump(by_alias=True, exclude_none=True,
                                                                                  mode="json"))}
        own = spec.task.model_dump(by_alias=True, exclude={"type"}, exclude_none=True, mode="json")
        params.update(flat_params("task", {k: v for k, v in own.items() if isinstance(v, dict)}))  # task.dpo.beta
        if spec.method.lora:
            params.update(flat_params("lora", spec.method.lora.model_dump(by_alias=True, exclude_none=True,
                                                                          mode="json")))
        meta = job.metadata
        found.append(Mlflow(spec.tracking.mlflow, meta.name, meta.namespace, (meta.model_extra or {}).get("uid"),
                            spec.output.storage, params))
    return Trackers(found)
