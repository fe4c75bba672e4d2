"""loss.png: the run's curves from the metric history, drawn with matplotlib on the Agg backend (no display).

Left: training loss (each metrics.jsonl training line) and validation loss (each evaluation's evalLoss). Right: the
chosen metric (checkpointing.selectBest's unless that is evalLoss, else the task's first) at each evaluation. A
dashed line marks the step whose weights became the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PLOT_FILE = "loss.png"


def chosen_metric(records: list[dict[str, Any]], preferred: str | None, task_metrics: tuple[str, ...]) -> str | None:
    """The metric of the right panel: the preferred one, else the first of the task's the evaluations reported
    (the loss is on the left already)."""
    reported = {k for r in records if r.get("type") == "eval" for k in r}
    for name in [preferred, *task_metrics]:
        if name and name != "evalLoss" and name in reported:
            return name
    return None


def plot_history(records: list[dict[str, Any]], path: Path, title: str, metric: str | None,
                 model_step: int | None) -> None:
    """Draw the curves into `path` (written to a temporary name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and "loss" in r]
    evals = [r for r in records if r.get("type") == "eval"]
    val = [(r["step"], r["evalLoss"]) for r in evals if "evalLoss" in r]
    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    if train:
        loss_ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1.2)
    if val:
        loss_ax.plot(*zip(*val, strict=True), marker="o", markersize=3, label="validation loss", linewidth=1.2)
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    if metric:
        points = [(r["step"], r[metric]) for r in evals if metric in r]
        metric_ax.plot(*zip(*points, strict=True), marker="o", markersize=3, color="tab:green", label=metric)
        metric_ax.set(xlabel="optimizer step", ylabel=metric, title=f"validation {metric}")
    else:
        metric_ax.text(0.5, 0.5, "no evaluation metric", ha="center", va="center", transform=metric_ax.transAxes)
        metric_ax.set_axis_off()
    for ax in (loss_ax, metric_ax) if metric else (loss_ax,):
        if model_step is not None:
            ax.axvline(model_step, color="grey", linestyle="--", linewidth=1, label=f"model (step {model_step})")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
