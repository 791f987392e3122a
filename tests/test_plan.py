"""The plan as a table of situations: (spec, status, observed Jobs, now) → actions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_operator.api import VisionR1Run, VisionR1RunStatus
from visionr1_operator.plan import (
    CreateStage,
    FinishRun,
    ObservedJob,
    Requeue,
    ResumeStage,
    RetryPolicy,
    RetryStage,
    StageFailed,
    StageProgress,
    StageSucceeded,
    StartRun,
    SuspendStage,
    apply,
    describe,
    invalid_spec,
    job_name,
    plan,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
FIVE = ("synthesis", "filter", "sft", "grpo", "eval")


def load(example: str = "tiny-cpu.yaml", **spec: Any) -> VisionR1Run:
    obj = yaml.safe_load((EXAMPLES / example).read_text())
    obj["spec"].update(spec)
    return VisionR1Run.model_validate(obj)


def job(stage: str, attempt: int = 0, **kw: Any) -> ObservedJob:
    return ObservedJob(
        name=job_name("tiny-cpu", stage, attempt), stage=stage, attempt=attempt, **kw
    )


def drive(run: VisionR1Run, steps: list[tuple[list[ObservedJob], datetime]]) -> VisionR1RunStatus:
    """Plan and apply over a sequence of observations, as a caller would."""
    status = None
    for jobs, now in steps:
        status = apply(status, plan(run, status, jobs, now), now)
    assert status is not None
    return status


def status_after(
    run: VisionR1Run, *stages_done: str, running: str | None = None
) -> VisionR1RunStatus:
    """Status of a run whose ``stages_done`` succeeded and ``running`` has attempt 0 going."""
    status = apply(None, [StartRun(FIVE, ())], T0)
    if running and not stages_done:
        stages_done = FIVE[: FIVE.index(running)]
    for s in stages_done:
        status = apply(
            status,
            [
                CreateStage(s, 0, job_name("tiny-cpu", s, 0)),
                StageSucceeded(s, job_name("tiny-cpu", s, 0)),
            ],
            T0,
        )
    if running:
        status = apply(status, [CreateStage(running, 0, job_name("tiny-cpu", running, 0))], T0)
    return status


RUN = load()
SUSPENDED = load(suspend=True)
QUEUED = load(queueName="gpu-team")

# (id, run, status, jobs, now, expected actions)
SITUATIONS: list[tuple[str, VisionR1Run, Any, list[ObservedJob], datetime, list[Any]]] = [
    (
        "new run starts and creates the first stage",
        RUN,
        None,
        [],
        T0,
        [StartRun(FIVE, ()), CreateStage("synthesis", 0, "tiny-cpu-synthesis-0")],
    ),
    (
        "a running Job's progress is recorded",
        RUN,
        status_after(RUN, running="synthesis"),
        [job("synthesis", active=1)],
        T0,
        [StageProgress("synthesis", "Running", "1 pod running")],
    ),
    (
        "an Indexed Job reports shards done",
        RUN,
        status_after(RUN, running="synthesis"),
        [job("synthesis", completions=4, active=2, succeeded=2)],
        T0,
        [StageProgress("synthesis", "Running", "2/4 pods done, 2 running")],
    ),
    (
        "a succeeded Job completes the stage and creates the next one at once",
        RUN,
        status_after(RUN, running="synthesis"),
        [job("synthesis", succeeded=1, complete=True)],
        T0,
        [
            StageSucceeded("synthesis", "tiny-cpu-synthesis-0"),
            CreateStage("filter", 0, "tiny-cpu-filter-0"),
        ],
    ),
    (
        "all completions succeeded counts as success before the Complete condition",
        RUN,
        status_after(RUN, "synthesis", running="filter"),
        [job("filter", completions=2, succeeded=2)],
        T0,
        [StageSucceeded("filter", "tiny-cpu-filter-0"), CreateStage("sft", 0, "tiny-cpu-sft-0")],
    ),
    (
        "the last stage's success finishes the run",
        RUN,
        status_after(RUN, "synthesis", "filter", "sft", "grpo", running="eval"),
        [job("eval", succeeded=1, complete=True)],
        T0,
        [
            StageSucceeded("eval", "tiny-cpu-eval-0"),
            FinishRun(
                "Succeeded",
                "AllStagesSucceeded",
                "5 stage(s) succeeded: synthesis, filter, sft, grpo, eval",
            ),
        ],
    ),
    (
        "a retryable failure schedules a retry after the backoff",
        RUN,
        status_after(RUN, running="sft"),
        [job("sft", failed=1, failed_reason="BackoffLimitExceeded", exit_code=1, finished_at=T0)],
        T0,
        [
            RetryStage(
                "sft",
                1,
                T0 + timedelta(seconds=10),
                "attempt 1 failed (exit code 1: BackoffLimitExceeded); retry 1/3 at "
                "2025-01-01T12:00:10Z",
            ),
            Requeue(10.0),
        ],
    ),
    (
        "a retryable failure whose backoff has passed is retried at once",
        RUN,
        status_after(RUN, running="sft"),
        [job("sft", failed=1, failed_reason="BackoffLimitExceeded", finished_at=T0)],
        T0 + timedelta(seconds=11),
        [
            RetryStage(
                "sft",
                1,
                T0 + timedelta(seconds=10),
                "attempt 1 failed (BackoffLimitExceeded); retry 1/3 at 2025-01-01T12:00:10Z",
            ),
            CreateStage("sft", 1, "tiny-cpu-sft-1", reason="StageRetried"),
        ],
    ),
    (
        "exit code 65 (invalid input) fails the run without a retry",
        RUN,
        status_after(RUN, running="filter"),
        [
            job(
                "filter",
                failed=1,
                failed_reason="PodFailurePolicy",
                exit_code=65,
                message="Container stage failed with exit code 65 matching FailJob rule",
            )
        ],
        T0,
        [
            StageFailed(
                "filter",
                "InvalidInput",
                "tiny-cpu-filter-0: Container stage failed with exit code 65 matching "
                "FailJob rule (not retried)",
            ),
            FinishRun(
                "Failed",
                "StageFailed",
                "filter: Container stage failed with exit code 65 matching FailJob rule",
            ),
        ],
    ),
    (
        "a deadline is permanent too",
        RUN,
        status_after(RUN, running="sft"),
        [job("sft", failed=1, failed_reason="DeadlineExceeded", message="too long")],
        T0,
        [
            StageFailed("sft", "DeadlineExceeded", "tiny-cpu-sft-0: too long (not retried)"),
            FinishRun("Failed", "StageFailed", "sft: too long"),
        ],
    ),
    (
        "spec.suspend suspends the running Job",
        SUSPENDED,
        status_after(SUSPENDED, running="grpo"),
        [job("grpo", active=1)],
        T0,
        [SuspendStage("grpo", "tiny-cpu-grpo-0")],
    ),
    (
        "spec.suspend before the start creates no Job",
        SUSPENDED,
        None,
        [],
        T0,
        [StartRun(FIVE, ()), SuspendStage("synthesis", None)],
    ),
    (
        "a Job the operator held is resumed when spec.suspend is cleared",
        RUN,
        apply(status_after(RUN, running="grpo"), [SuspendStage("grpo", "tiny-cpu-grpo-0")], T0),
        [job("grpo", suspended=True, held=True)],
        T0,
        [ResumeStage("grpo", "tiny-cpu-grpo-0")],
    ),
    (
        "with Kueue a suspended Job waits for admission and is left alone",
        QUEUED,
        status_after(QUEUED, running="sft"),
        [job("sft", suspended=True)],
        T0,
        [
            StageProgress(
                "sft", "Pending", "queued", "waiting for Kueue to admit it (LocalQueue gpu-team)"
            )
        ],
    ),
    (
        "a Job created just before a crash is adopted, not duplicated",
        RUN,
        status_after(RUN, "synthesis"),
        [job("synthesis", succeeded=1, complete=True), job("filter", active=1)],
        T0,
        [
            CreateStage("filter", 0, "tiny-cpu-filter-0", reason="JobAdopted"),
            StageProgress("filter", "Running", "1 pod running"),
        ],
    ),
    (
        "a running attempt's Job deleted by hand is created again",
        RUN,
        status_after(RUN, running="sft"),
        [],
        T0,
        [CreateStage("sft", 0, "tiny-cpu-sft-0", reason="JobRecreated")],
    ),
    (
        "a finished run is never run again",
        RUN,
        apply(None, [StartRun(FIVE, ()), FinishRun("Succeeded", "AllStagesSucceeded", "")], T0),
        [],
        T0,
        [],
    ),
    (
        "an invalid spec recorded as Failed is never run",
        RUN,
        apply(None, [invalid_spec("spec.stages.sft.nodes: must be >= 1")], T0),
        [],
        T0,
        [],
    ),
    (
        "disabled stages are skipped (Vision-R1-Zero starts at grpo)",
        load("zero.yaml"),
        None,
        [],
        T0,
        [
            StartRun(("grpo", "eval"), ("synthesis", "filter", "sft")),
            CreateStage("grpo", 0, "qwen25vl-7b-zero-grpo-0"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("run", "status", "jobs", "now", "expected"),
    [s[1:] for s in SITUATIONS],
    ids=[s[0] for s in SITUATIONS],
)
def test_situation(run, status, jobs, now, expected) -> None:
    assert plan(run, status, jobs, now) == expected


def test_retries_up_to_the_limit_then_fail() -> None:
    run = load()
    run.spec.stages.sft.backoff_limit = 2
    status = status_after(run, running="sft")
    now = T0
    for attempt in range(3):
        failed = job(
            "sft",
            attempt,
            failed=1,
            failed_reason="BackoffLimitExceeded",
            exit_code=137,
            finished_at=now,
        )
        actions = plan(run, status, [failed], now)
        status = apply(status, actions, now)
        if attempt < 2:
            assert isinstance(actions[0], RetryStage) and isinstance(actions[-1], Requeue)
            assert actions[-1].after_s == RetryPolicy().delay(attempt + 1)
            now += timedelta(seconds=actions[-1].after_s)
            actions = plan(run, status, [failed], now)
            assert actions == [
                CreateStage(
                    "sft", attempt + 1, f"tiny-cpu-sft-{attempt + 1}", reason="StageRetried"
                )
            ]
            status = apply(status, actions, now)
        else:
            assert [type(a) for a in actions] == [StageFailed, FinishRun]
            assert actions[0].reason == "RetriesExhausted"
    assert status.phase == "Failed"
    assert status.stages["sft"].attempts == 3
    failed_cond = next(c for c in status.conditions if c.type == "Failed")
    assert failed_cond.status == "True" and "exit code 137" in failed_cond.message


def test_whole_run_with_local_exit_codes_reaches_a_fixed_point() -> None:
    """The local executor's way: subprocess exit codes → ObservedJob.exited."""
    run = load()
    status = None
    jobs: dict[str, ObservedJob] = {}
    created: list[str] = []
    now = T0
    for _ in range(40):
        actions = plan(run, status, list(jobs.values()), now)
        status = apply(status, actions, now)
        for a in actions:
            if isinstance(a, CreateStage):
                created.append(a.job_name)
                jobs[a.stage] = ObservedJob.running(a.job_name, a.stage, a.attempt)
        # Planning again on what the executed actions left: progress at most, then nothing.
        again = plan(run, status, list(jobs.values()), now)
        assert all(isinstance(a, StageProgress | Requeue) for a in again), again
        status = apply(status, again, now)
        assert [
            a for a in plan(run, status, list(jobs.values()), now) if not isinstance(a, Requeue)
        ] == []
        if status.phase in ("Succeeded", "Failed"):
            break
        # every stage's subprocess exits 0 except the first sft attempt (a retryable code)
        for stage, j in list(jobs.items()):
            if j.outcome == "running":
                code = 1 if stage == "sft" and j.attempt == 0 else 0
                jobs[stage] = ObservedJob.exited(j.name, stage, j.attempt, code, now)
        now += timedelta(seconds=30)
    assert status is not None and status.phase == "Succeeded"
    assert status.progress == "5/5"
    assert created == [job_name("tiny-cpu", s, 0) for s in FIVE[:3]] + [
        "tiny-cpu-sft-1",
        "tiny-cpu-grpo-0",
        "tiny-cpu-eval-0",
    ]
    assert status.stages["sft"].attempts == 2
    assert [c.type for c in status.conditions if c.status == "True"] == ["Succeeded"]


def test_suspend_and_resume_in_sequence() -> None:
    run = load()
    suspended = load(suspend=True)
    running = [job("synthesis", active=1)]
    status = drive(run, [([], T0), (running, T0)])
    assert status.phase == "Running"
    actions = plan(suspended, status, running, T0)
    assert actions == [SuspendStage("synthesis", "tiny-cpu-synthesis-0")]
    status = apply(status, actions, T0)
    held = [replace(running[0], suspended=True, held=True, active=0)]
    assert plan(suspended, status, held, T0) == []
    assert status.phase == "Suspended"
    assert next(c for c in status.conditions if c.type == "Suspended").status == "True"
    actions = plan(run, status, held, T0)
    assert actions == [ResumeStage("synthesis", "tiny-cpu-synthesis-0")]
    status = apply(status, actions, T0)
    assert status.phase == "Running"
    assert next(c for c in status.conditions if c.type == "Suspended").status == "False"


def test_exited_maps_exit_codes() -> None:
    ok = ObservedJob.exited("j", "sft", 0, 0, T0)
    bad = ObservedJob.exited("j", "sft", 0, 65, T0)
    flaky = ObservedJob.exited("j", "sft", 0, 137, T0)
    assert (ok.outcome, bad.outcome, flaky.outcome) == ("succeeded", "failed", "failed")
    assert (bad.permanent, flaky.permanent) == (True, False)


def test_backoff_grows_and_is_capped() -> None:
    p = RetryPolicy(base_s=5, max_s=30)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]


def test_every_transition_has_an_event() -> None:
    for a in [
        StartRun(FIVE, ()),
        CreateStage("sft", 0, "x"),
        StageSucceeded("sft", "x"),
        RetryStage("sft", 1, T0, "m"),
        StageFailed("sft", "InvalidInput", "m"),
        SuspendStage("sft", None),
        ResumeStage("sft", None),
        FinishRun("Failed", "R", "m"),
    ]:
        kind, reason, message = describe(a)  # type: ignore[misc]
        assert kind in ("Normal", "Warning") and reason and message
    assert describe(Requeue(1.0)) is None


# --------------------------------------------------------------------------- retries, pods, re-merge


def test_the_next_retry_time_is_its_own_field_not_a_finish_time() -> None:
    run = load()
    status = status_after(run, running="sft")
    failed_at = T0 + timedelta(seconds=5)
    failed = job("sft", failed=1, failed_reason="BackoffLimitExceeded", finished_at=failed_at)
    status = apply(status, plan(run, status, [failed], failed_at), failed_at)
    st = status.stages["sft"]
    assert st.finish_time == "2025-01-01T12:00:05Z"  # when the attempt ended: now
    assert st.next_retry_time == "2025-01-01T12:00:15Z"  # + RetryPolicy().delay(1) = 10 s
    retried = apply(status, plan(run, status, [failed], T0 + timedelta(seconds=15)), T0)
    assert retried.stages["sft"].next_retry_time is None
    assert retried.stages["sft"].finish_time is None


def test_running_counts_only_running_pods() -> None:
    run = load()
    status = status_after(run, running="synthesis")
    seen = job("synthesis", completions=4, active=3, succeeded=1, running_pods=1)
    assert plan(run, status, [seen], T0) == [
        StageProgress("synthesis", "Running", "1/4 pods done, 1 running, 2 pending")
    ]


def test_a_pods_trouble_is_a_warning_with_its_reason_in_the_condition() -> None:
    run = load()
    status = status_after(run, running="sft")
    stuck = job(
        "sft",
        active=1,
        running_pods=0,
        pod_problem=("Unschedulable", "pod x cannot be scheduled: 0/3 nodes: Insufficient gpu"),
    )
    actions = plan(run, status, [stuck], T0)
    assert len(actions) == 1 and actions[0].problem == "Unschedulable"
    assert describe(actions[0]) == (
        "Warning",
        "Unschedulable",
        "sft: pod x cannot be scheduled: 0/3 nodes: Insufficient gpu",
    )
    after = apply(status, actions, T0)
    progressing = next(c for c in after.conditions if c.type == "Progressing")
    assert progressing.reason == "Unschedulable" and "Insufficient gpu" in progressing.message
    assert after.stages["sft"].phase == "Pending"
    # once it runs, the condition says so again
    ok = apply(after, plan(run, after, [job("sft", active=1, running_pods=1)], T0), T0)
    assert next(c for c in ok.conditions if c.type == "Progressing").reason == "StageRunning"


def test_a_missing_input_re_merges_the_sharded_producer_then_retries_the_consumer() -> None:
    run = load()
    status = status_after(run, running="filter")
    synthesis_done = job("synthesis", succeeded=1, complete=True)
    # the filter found no synthesis/_manifest.json (exit 66 through its FailJob rule)
    missing = job(
        "filter",
        failed=1,
        failed_reason="PodFailurePolicy",
        exit_code=66,
        message="Container stage for pod ml/tiny-cpu-filter-0-x failed with exit code 66 "
        "matching FailJob rule at index 0",
        finished_at=T0,
    )
    assert not missing.permanent and missing.input_missing
    actions = plan(run, status, [synthesis_done, missing], T0)
    assert [type(a).__name__ for a in actions] == ["RemergeStage", "CreateStage"]
    assert actions[0].stage == "synthesis" and actions[0].consumer == "filter"
    assert actions[1] == CreateStage("synthesis", 1, "tiny-cpu-synthesis-1", reason="StageRemerged")
    assert describe(actions[0])[1] == "StageRemerging"
    status = apply(status, actions, T0)
    assert status.phase == "Running" and status.stages["filter"].phase == "Pending"
    # the re-merge succeeds: the filter is retried (attempt 2), not failed as invalid input
    remerged = job("synthesis", 1, succeeded=1, complete=True)
    actions = plan(run, status, [synthesis_done, remerged, missing], T0)
    assert actions == [
        StageSucceeded("synthesis", "tiny-cpu-synthesis-1"),
        CreateStage("filter", 1, "tiny-cpu-filter-1", reason="StageRetried"),
    ]


def test_a_missing_input_of_a_non_sharded_producer_is_an_ordinary_retry() -> None:
    run = load()
    status = status_after(run, running="grpo")  # grpo reads sft's model: not sharded
    missing = job("grpo", failed=1, failed_reason="PodFailurePolicy", exit_code=66, finished_at=T0)
    actions = plan(run, status, [missing], T0)
    assert isinstance(actions[0], RetryStage) and isinstance(actions[-1], Requeue)


def test_invalid_input_through_the_failjob_rule_stays_permanent() -> None:
    bad = job("filter", failed=1, failed_reason="PodFailurePolicy", exit_code=65)
    assert bad.permanent


def test_a_lost_merge_is_re_merged_even_with_backoff_limit_zero() -> None:
    run = load()
    run.spec.stages.filter.backoff_limit = 0
    status = status_after(run, running="filter")
    synthesis_done = job("synthesis", succeeded=1, complete=True)
    missing = job(
        "filter", failed=1, failed_reason="PodFailurePolicy", exit_code=66, finished_at=T0
    )
    actions = plan(run, status, [synthesis_done, missing], T0)
    assert [type(a).__name__ for a in actions] == ["RemergeStage", "CreateStage"]
    status = apply(status, actions, T0)
    assert status.phase == "Running"
    remerged = job("synthesis", 1, succeeded=1, complete=True)
    actions = plan(run, status, [synthesis_done, remerged, missing], T0)
    assert actions[-1] == CreateStage("filter", 1, "tiny-cpu-filter-1", reason="StageRetried")
    status = apply(status, actions, T0)
    # the retried filter still finds no input: now its attempts are spent, the run fails
    again = job("filter", 1, failed=1, failed_reason="PodFailurePolicy", exit_code=66)
    actions = plan(run, status, [synthesis_done, remerged, again], T0)
    assert [type(a).__name__ for a in actions] == ["StageFailed", "FinishRun"]
    assert actions[0].reason == "RetriesExhausted"


def test_a_new_message_for_the_same_pod_trouble_updates_the_status_without_an_event() -> None:
    run = load()
    status = status_after(run, running="sft")
    first = ("Unschedulable", "pod x cannot be scheduled: 0/3 nodes: Insufficient memory")
    stuck = job("sft", active=1, running_pods=0, pod_problem=first)
    actions = plan(run, status, [stuck], T0)
    assert [describe(a) for a in actions] == [("Warning", "Unschedulable", f"sft: {first[1]}")]
    status = apply(status, actions, T0)
    assert plan(run, status, [stuck], T0) == []  # the same message: nothing to write
    second = ("Unschedulable", "pod x cannot be scheduled: 0/4 nodes: Insufficient memory")
    actions = plan(run, status, [replace(stuck, pod_problem=second)], T0)
    assert len(actions) == 1 and actions[0].repeat and describe(actions[0]) is None
    status = apply(status, actions, T0)
    progressing = next(c for c in status.conditions if c.type == "Progressing")
    assert progressing.reason == "Unschedulable" and "0/4 nodes" in progressing.message
    # another reason is news again: a Warning
    pulled = ("ErrImagePull", "pod x: container stage: not found")
    actions = plan(run, status, [replace(stuck, pod_problem=pulled)], T0)
    assert describe(actions[0]) == ("Warning", "ErrImagePull", f"sft: {pulled[1]}")


def test_a_pod_creation_refusal_is_named_then_cleared_when_pods_exist() -> None:
    run = load()
    status = status_after(run, running="sft")
    quota = (
        "QuotaExceeded",
        "ResourceQuota gpu refused the pods: requested requests.nvidia.com/gpu=2, "
        "used requests.nvidia.com/gpu=0, limited requests.nvidia.com/gpu=1",
    )
    refused = job("sft", running_pods=0, pod_problem=quota)
    status = apply(status, plan(run, status, [refused], T0), T0)
    progressing = next(c for c in status.conditions if c.type == "Progressing")
    assert progressing.reason == "QuotaExceeded" and "limited requests.nvidia.com/gpu=1" in (
        progressing.message
    )
    assert status.stages["sft"].progress == "0 pods running"
    created = job("sft", active=1, running_pods=1)
    status = apply(status, plan(run, status, [created], T0), T0)
    progressing = next(c for c in status.conditions if c.type == "Progressing")
    assert progressing.reason == "StageRunning" and "gpu" not in progressing.message


def test_the_next_stage_starts_with_empty_run_columns() -> None:
    """STEP, ETA and METRIC of the run follow the running stage: SFT's last values never show
    under STAGE grpo; a retry of the same stage keeps them until its poll."""
    status = VisionR1RunStatus(
        phase="Running", current_stage="sft", step="6/6", eta="0s", metric="loss=4.7"
    )
    retried = apply(status, [CreateStage("sft", 1, job_name("r", "sft", 1))], T0)
    assert (retried.step, retried.metric) == ("6/6", "loss=4.7")
    grpo = apply(status, [CreateStage("grpo", 0, job_name("r", "grpo", 0))], T0)
    assert (grpo.current_stage, grpo.step, grpo.eta, grpo.metric) == ("grpo", None, None, None)
