"""FineTuneJob status: written by the operator alone (status subresource); read by people, dashboards and GitOps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune_api.rules import SpecModel

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = ("Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended")
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class Condition(SpecModel):
    """A Kubernetes-convention condition (metav1.Condition)."""

    type: str = Field(description="Condition type in CamelCase: Ready (kstatus: True while running, suspended or "
                      "succeeded), Created, Queued, Running, Suspended, Succeeded, Failed, Reconciling, Stalled.",
                      max_length=316, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                      r"[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word for machines, e.g. Unschedulable, BackoffLimitExceeded.",
                        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(description="Human-readable details.", max_length=32768)
    observed_generation: int | None = Field(default=None, description="The .metadata.generation this condition "
                                            "was set from.", ge=0)
    last_transition_time: str = Field(description="When status last changed (RFC 3339).",
                                      json_schema_extra={"format": "date-time"})


class ProgressStatus(SpecModel):
    """Live training progress, reported by the trainer and relayed by the operator."""

    step: int | None = Field(default=None, description="Optimizer steps done.", ge=0)
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.", ge=0)
    epoch: float | None = Field(default=None, description="Fractional epoch reached.", ge=0)
    percent: float | None = Field(default=None, description="step / totalSteps, in percent.", ge=0, le=100)
    loss: float | None = Field(default=None, description="Latest training loss (running mean).")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    samples_per_second: float | None = Field(default=None, description="Training throughput.", ge=0)
    tokens_per_second: float | None = Field(default=None, description="Non-padding tokens per second.", ge=0)
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to the end of training.", ge=0)
    eta: str | None = Field(default=None, description="ETA for people, e.g. 1h02m.", max_length=32)
    updated_at: str | None = Field(default=None, description="When the trainer reported this (RFC 3339).",
                                   json_schema_extra={"format": "date-time"})


class CheckpointRef(SpecModel):
    """One complete checkpoint."""

    step: int = Field(description="Optimizer step the checkpoint holds.", ge=0)
    path: str = Field(description="Location of the checkpoint folder.", max_length=2048)
    time: str | None = Field(default=None, description="When it was completed (RFC 3339).",
                             json_schema_extra={"format": "date-time"})


class CheckpointsStatus(SpecModel):
    """The checkpoint ledger: the job resumes from `latest` after any interruption."""

    latest: CheckpointRef | None = Field(default=None, description="Latest complete checkpoint.")
    count: int = Field(default=0, description="Complete checkpoints written so far.", ge=0)


class OutputStatus(SpecModel):
    """The final model."""

    path: str = Field(description="Where the fine-tuned model was written.", max_length=2048)
    metrics: dict[str, float] | None = Field(default=None, description="Evaluation metrics of the written model "
                                             "(with output.model best, those of the best evaluation).", max_length=64)
    step: int | None = Field(default=None, description="Optimizer step whose weights were written.", ge=0)
    model: Literal["best", "last"] | None = Field(default=None, description="best: the checkpoint of the best "
                                                  "evaluation; last: the weights after the last optimizer step.")
    reason: str | None = Field(default=None, description="Why that step became the model, e.g. 'best f1Macro 0.9712 "
                               "(max) of 4 evaluations, at step 100; training stopped early at step 150 ...'.",
                               max_length=1024)


class MemoryPlanStatus(SpecModel):
    """How the trainer laid out training before its first step, and the per-device memory it estimated."""

    sharding: Literal["none", "fsdp"] = Field(description="The sharding in use: none (a full copy per device, DDP) "
                                              "or fsdp. What resources.sharding auto resolved to.")
    reason: str = Field(description="Why: what auto decided and on which numbers, or 'as requested'.",
                        max_length=512)
    per_device_bytes: int = Field(description="Estimated bytes per device: parameters, gradients, optimizer "
                                  "state, activations at batchSize x maxSeqLength, and transients.", ge=0)
    device_bytes: int = Field(description="Memory of one device (on CPU: one process's share of the pod's "
                              "memory).", ge=0)
    breakdown: dict[str, int] | None = Field(default=None, description="The estimate by part, in bytes: "
                                             "parameters, gradients, optimizer, activations, working.",
                                             max_length=8)


class QueueStatus(SpecModel):
    """Where Kueue holds the job, read from its Workload (the Queued condition says why it waits)."""

    workload: str | None = Field(default=None, description="Kueue's Workload of the job's Job.", max_length=253)
    local_queue: str | None = Field(default=None, description="The LocalQueue it was submitted to.", max_length=63)
    cluster_queue: str | None = Field(default=None, description="The ClusterQueue whose quota it holds, while "
                                      "admitted.", max_length=253)
    flavor: str | None = Field(default=None, description="The ResourceFlavor(s) of the admission, while admitted "
                               "(resource=flavor pairs when they differ by resource).", max_length=512)
    priority_class: str | None = Field(default=None, description="Its WorkloadPriorityClass.", max_length=253)
    requeues: int | None = Field(default=None, description="Times Kueue evicted it and put it back in its queue "
                                 "(preemption, a PodsReady timeout, ...).", ge=0)
class SplitStats(SpecModel):
    """One split as the pre-flight read it."""

    examples: int = Field(description="Examples in the split (after maxSamples and validationSplit).", ge=0)
    tokens: int = Field(description="Tokens of all its examples, as the trainer feeds them (no padding); with a "
                        "sample, extrapolated from it.", ge=0)
    longest: int = Field(description="Tokens of the longest example (of the sample, when sampled).", ge=0)
    checked: int = Field(description="Examples read, checked and tokenised: all of them, or a seeded sample of "
                         "data too large to read whole.", ge=0)


class PreflightMemory(SpecModel):
    """The memory plan for the requested devices, computed on CPU before any GPU is requested."""

    sharding: Literal["none", "fsdp"] = Field(description="The sharding the plan chose (resources.sharding, auto "
                                              "resolved).")
    reason: str = Field(description="Why that sharding.", max_length=512)
    per_device_bytes: int = Field(description="Estimated peak bytes per device: training state, activations of the "
                                  "widest batch of the real data, transients, and on CPU the process itself.", ge=0)
    device_bytes: int | None = Field(default=None, description="Memory of one device; absent when unknown.", ge=0)
    device_memory_from: str = Field(description="Where the device memory came from: spec.preflight.gpuMemory, the "
                                    "nodeSelector label nvidia.com/gpu.memory, spec.resources.memory (CPU), or "
                                    "unknown (the plan is then not checked).", max_length=128)
    fits: bool | None = Field(default=None, description="Whether the estimate fits the usable part of the device; "
                              "absent when the device memory is unknown.")
    breakdown: dict[str, int] | None = Field(default=None, description="The estimate by part, in bytes.",
                                             max_length=8)


class PreflightEstimate(SpecModel):
    """How long training should take, and what it costs in GPU time."""

    tokens_per_second: float = Field(description="Training tokens per second per device the estimate assumes.",
                                     ge=0)
    basis: str = Field(description="Where that throughput comes from and how it was derived (spec, or model FLOPs "
                       "over a device's peak with an assumed utilisation).", max_length=512)
    wall_seconds: int = Field(description="Estimated seconds of training, evaluations included.", ge=0)
    wall: str = Field(description="The same for people, e.g. 1h02m.", max_length=32)
    gpu_seconds: int = Field(description="wallSeconds x every GPU of the job (0 for CPU jobs).", ge=0)


class PreflightStatus(SpecModel):
    """What the pre-flight found: the data, the steps, the memory plan and the time, before any GPU was requested.
    The pre-flight pod writes exactly this document (compact JSON) as its termination message."""

    train: SplitStats = Field(description="The training split.")
    validation: SplitStats | None = Field(default=None, description="The validation split, when there is one.")
    sampled: bool = Field(default=False, description="True when a split was too large to read whole and a seeded "
                          "sample was checked instead (counts extrapolated; the token cache is then not written).")
    steps_per_epoch: int = Field(description="Optimizer steps per epoch on the requested processes.", ge=0)
    total_steps: int = Field(description="Optimizer steps of the whole run.", ge=0)
    memory_plan: PreflightMemory = Field(description="The memory plan for the requested devices.")
    estimate: PreflightEstimate | None = Field(default=None, description="Time and GPU-time the run should take.")
    token_cache: str | None = Field(default=None, description="Where the tokenised data was written for the "
                                    "trainer pods (absent when sampled).", max_length=2048)
    seconds: float | None = Field(default=None, description="How long the pre-flight took.", ge=0)


class FineTuneJobStatus(SpecModel):
    """Observed state, written once per reconcile pass and only when it changed."""

    phase: Phase | None = Field(default=None, description="Pending, Queued, Running, Succeeded, Failed or Suspended.")
    conditions: list[Condition] | None = Field(
        default=None,
        description="Latest observations (Kubernetes conventions), one per type.",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: ProgressStatus | None = Field(default=None, description="Live training progress.")
    metrics: dict[str, float] | None = Field(default=None, description="Latest train/eval loss and task metrics "
                                             "(accuracy, f1Macro, perplexity, chrf, ...).", max_length=64)
    checkpoints: CheckpointsStatus | None = Field(default=None, description="Checkpoint ledger.")
    output: OutputStatus | None = Field(default=None, description="Final model location and metrics.")
    memory_plan: MemoryPlanStatus | None = Field(default=None, description="The trainer's memory plan: the sharding "
                                                 "it chose (resolving resources.sharding auto) and its per-device "
                                                 "estimate, reported before the first training step.")
    preflight: PreflightStatus | None = Field(default=None, description="What the pre-flight check found: examples "
                                              "and tokens per split, steps, the memory plan for the requested "
                                              "devices and the estimated time, before any GPU was requested.")
    restarts: int | None = Field(default=None, description="Times training restarted from a checkpoint after an "
                                 "interruption or crash.", ge=0)
    start_time: str | None = Field(default=None, description="When the first trainer pod started running.",
                                   json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, description="When the job succeeded or failed.",
                                        json_schema_extra={"format": "date-time"})
    gpu_seconds: float | None = Field(default=None, description="GPU-seconds consumed by trainer pods so far.", ge=0)
    job_name: str | None = Field(default=None, description="The batch/v1 Job running the trainer.", max_length=63)
    queue: QueueStatus | None = Field(default=None, description="Kueue: the Workload, its queues, the flavor of "
                                      "the admission and the requeues.")
    observed_generation: int | None = Field(default=None, description="The .metadata.generation last reconciled.",
                                            ge=0)
