"""Progress tokens and reports: HMAC per job identity, tolerant parsing, idempotent folding into status."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from finetune_api.progress import ProgressReport, merge_reports
from finetune_api.status import FineTuneJobStatus
from finetune_api.times import humanize_eta
from finetune_operator.progress import apply_report, job_token, token_valid

KEY = b"k" * 32


def test_token_is_hmac_of_namespace_name_uid() -> None:
    import hashlib
    import hmac

    expected = hmac.new(KEY, b"team-a/job/uid-1", hashlib.sha256).hexdigest()
    assert job_token(KEY, "team-a", "job", "uid-1") == expected
    assert token_valid(KEY, "team-a", "job", "uid-1", expected)
    assert token_valid(KEY, "team-a", "job", "uid-1", expected + "\n")


@pytest.mark.parametrize(("ns", "name", "uid", "key"), [
    ("team-b", "job", "uid-1", KEY),  # another namespace
    ("team-a", "other", "uid-1", KEY),  # another job
    ("team-a", "job", "uid-2", KEY),  # same name, recreated (new uid)
    ("team-a", "job", "uid-1", b"x" * 32),  # another operator key
])
def test_token_opens_exactly_one_job(ns: str, name: str, uid: str, key: bytes) -> None:
    assert not token_valid(key, ns, name, uid, job_token(KEY, "team-a", "job", "uid-1"))


def test_report_parsing_ignores_unknown_keys_and_rejects_bad_values() -> None:
    r = ProgressReport.model_validate({"step": 3, "totalSteps": 10, "futureField": {"x": 1}})
    assert (r.step, r.total_steps) == (3, 10)
    with pytest.raises(ValidationError):
        ProgressReport.model_validate({"step": -1})
    assert ProgressReport.model_validate({"state": "evaluating"}).state == "evaluating"  # newer trainers may say more
    with pytest.raises(ValidationError):
        ProgressReport.model_validate({"state": "x" * 100})
    with pytest.raises(ValidationError):
        ProgressReport.model_validate({"metrics": {f"m{i}": 1.0 for i in range(65)}})


def test_apply_report_is_idempotent_and_counts_new_checkpoints_once() -> None:
    r1 = ProgressReport.model_validate({"step": 10, "checkpoint": {"step": 10, "path": "p/checkpoint-10"}})
    s1 = apply_report(FineTuneJobStatus(), r1)
    assert s1.checkpoints is not None and s1.checkpoints.count == 1
    assert apply_report(s1, r1) == s1
    r2 = merge_reports(r1, ProgressReport.model_validate({"step": 20, "checkpoint": {"step": 20,
                                                                                     "path": "p/checkpoint-20"}}))
    s2 = apply_report(s1, r2)
    assert s2.checkpoints is not None and s2.checkpoints.count == 2 and s2.checkpoints.latest is not None
    assert s2.checkpoints.latest.step == 20
    r3 = ProgressReport.model_validate({"checkpoint": {"step": 30, "path": "p/checkpoint-30", "count": 7}})
    s3 = apply_report(s2, r3)
    assert s3.checkpoints is not None and s3.checkpoints.count == 7


def test_non_finite_numbers_never_reach_status() -> None:
    r = ProgressReport.model_validate({"step": 1, "loss": math.nan, "learningRate": math.inf,
                                       "metrics": {"evalLoss": math.nan, "accuracy": 0.5}})
    s = apply_report(FineTuneJobStatus(), r)
    assert s.progress is not None and s.progress.loss is None and s.progress.learning_rate is None
    assert s.metrics == {"accuracy": 0.5}


def test_loss_is_stored_with_four_significant_digits() -> None:
    """`kubectl get ftj` prints status.progress.loss as stored: 0.6931, not 0.693147180559945."""
    for loss, stored in ((0.693147180559945, 0.6931), (12.3456789, 12.35), (1.23456e-05, 1.235e-05), (2.0, 2.0)):
        s = apply_report(FineTuneJobStatus(), ProgressReport.model_validate({"step": 1, "loss": loss}))
        assert s.progress is not None and s.progress.loss == stored


def test_merge_keeps_metrics_and_later_values_win() -> None:
    a = ProgressReport.model_validate({"step": 1, "loss": 2.0, "metrics": {"evalAccuracy": 0.7}})
    b = ProgressReport.model_validate({"step": 2, "metrics": {"trainLoss": 1.5}})
    m = merge_reports(a, b)
    assert (m.step, m.loss, m.metrics) == (2, 2.0, {"evalAccuracy": 0.7, "trainLoss": 1.5})


def test_percent_eta_and_finished_state() -> None:
    s = apply_report(FineTuneJobStatus(), ProgressReport.model_validate({"step": 1, "totalSteps": 3}))
    assert s.progress is not None and s.progress.percent == 33.33
    done = apply_report(s, ProgressReport.model_validate({"state": "finished", "step": 3, "totalSteps": 3,
                                                          "etaSeconds": 12}))
    assert done.progress is not None and (done.progress.percent, done.progress.eta) == (100.0, "0s")


def test_output_says_which_step_became_the_model_and_why() -> None:
    reason = "best f1Macro 0.9712 (max) of 4 evaluations, at step 100; training stopped early at step 150"
    r = ProgressReport.model_validate({"state": "finished", "step": 150, "totalSteps": 400, "output": {
        "path": "pvc://runs/out", "metrics": {"f1Macro": 0.9712, "evalLoss": math.inf}, "step": 100,
        "model": "best", "reason": reason}})
    s = apply_report(FineTuneJobStatus(), r)
    assert s.output is not None
    assert s.output.model_dump(by_alias=True, exclude_none=True) == {
        "path": "pvc://runs/out", "metrics": {"f1Macro": 0.9712}, "step": 100, "model": "best", "reason": reason}
    # An older trainer says only where: the rest stays absent; an unknown choice is not copied into status.
    old = apply_report(FineTuneJobStatus(), ProgressReport.model_validate({"output": {"path": "p"}}))
    assert old.output is not None and old.output.model_dump(exclude_none=True) == {"path": "p"}
    odd = apply_report(FineTuneJobStatus(), ProgressReport.model_validate({"output": {"path": "p", "model": "x"}}))
    assert odd.output is not None and odd.output.model is None


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.6, "1m00s"), (61, "1m01s"), (3725, "1h02m"),
                                              (90000, "1d01h"), (None, None), (math.inf, None)])
def test_humanize_eta(seconds: float | None, text: str | None) -> None:
    assert humanize_eta(seconds) == text


def test_memory_plan_reaches_status_as_reported_and_stays_when_later_reports_omit_it() -> None:
    plan = {"sharding": "fsdp", "reason": "auto: a full copy per device would need 108.00 GB, more than the 72.60 GB "
            "usable", "perDeviceBytes": 13_500_000_000, "deviceBytes": 80_000_000_000,
            "breakdown": {"parameters": 3_350_000_000, "gradients": 3_350_000_000, "optimizer": 6_700_000_000}}
    first = merge_reports(None, ProgressReport.model_validate({"step": 0, "memoryPlan": plan}))
    status = apply_report(FineTuneJobStatus(), first)
    assert status.memory_plan is not None
    assert status.model_dump(by_alias=True, exclude_none=True)["memoryPlan"] == plan
    later = apply_report(status, merge_reports(first, ProgressReport.model_validate({"step": 5})))
    assert later.memory_plan == status.memory_plan
    odd = ProgressReport.model_validate({"memoryPlan": {**plan, "sharding": "zero3"}})  # a newer trainer's layout
    assert apply_report(FineTuneJobStatus(), odd).memory_plan is None
