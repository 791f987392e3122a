"""``visionr1 run-local FILE [--workdir DIR]``: run a VisionR1Run on this machine.

The same pipeline as the cluster: the operator's pure ``plan`` decides what happens next, and this
executor plays the Job controller with subprocesses of the same entry point the pods run
(``python -m visionr1_jobs STAGE --config FILE``). MLflow defaults to sqlite in the workspace.
State lives in ``<workdir>/.visionr1/state.json`` (written atomically after every step), so a
rerun after Ctrl-C continues from the last finished stage, and the interrupted stage resumes from
its own checkpoints; a finished run is never run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import yaml

from visionr1_jobs.config import BASE_MODEL_ENV, BASE_MODEL_REVISION_ENV, EXIT_INVALID_INPUT
from visionr1_jobs.contract import atomic_write_json, parse_progress, read_manifest
from visionr1_operator import plan as planner
from visionr1_operator.api import VisionR1Run, VisionR1RunStatus
from visionr1_operator.mlflow_runs import run_tags
from visionr1_operator.resolve import OUTPUT_DIRS, resolve_stage_config
from visionr1_operator.validate import validate_object

STATE = ".visionr1/state.json"
# Locally a retry should not wait minutes: the cluster's backoff protects shared resources.
LOCAL_RETRY = planner.RetryPolicy(base_s=1.0, max_s=10.0)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Attempt:
    stage: str
    attempt: int
    job_name: str
    exit_code: int | None = None  # None = started, not finished (interrupted)
    finished_at: str | None = None
    seconds: float = 0.0


@dataclass
class LocalState:
    status: VisionR1RunStatus = field(default_factory=VisionR1RunStatus)
    parent_run_id: str | None = None
    stage_runs: dict[str, str] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> LocalState:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            status=VisionR1RunStatus.model_validate(raw["status"]),
            parent_run_id=raw.get("parentRunId"),
            stage_runs=raw.get("stageRuns", {}),
            attempts=[Attempt(**a) for a in raw.get("attempts", [])],
        )

    def save(self, path: Path) -> None:
        atomic_write_json(
            path,
            {
                "status": self.status.dump(),
                "parentRunId": self.parent_run_id,
                "stageRuns": self.stage_runs,
                "attempts": [a.__dict__ for a in self.attempts],
            },
        )

    def observed(self) -> list[planner.ObservedJob]:
        out = []
        for a in self.attempts:
            if a.exit_code is None:
                out.append(planner.ObservedJob.running(a.job_name, a.stage, a.attempt))
            else:
                at = planner.parse_time(a.finished_at) or _now()
                out.append(
                    planner.ObservedJob.exited(a.job_name, a.stage, a.attempt, a.exit_code, at)
                )
        return out


class Tracker:
    """The MLflow side of the executor: parent run and one pre-created nested run per stage."""

    def __init__(self, uri: str, experiment: str, artifacts: Path) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifacts.resolve().as_uri() if uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id
        from visionr1_operator.mlflow_runs import mark_training_experiment

        mark_training_experiment(uri, self.experiment_id)

    def open_parent(self, run: VisionR1Run, manifest_text: str) -> str:
        tags = {
            "visionr1.run": run.metadata.name,
            "visionr1.namespace": run.metadata.namespace or "local",
            "visionr1.executor": "local",
            "visionr1.version": _version(),
            **run_tags(run),
        }
        r = self.client.create_run(self.experiment_id, run_name=run.metadata.name, tags=tags)
        self.client.log_text(r.info.run_id, manifest_text, "visionr1run.yaml")
        return r.info.run_id

    def stage_run(self, parent: str, stage: str) -> str:
        tags = {"mlflow.parentRunId": parent, "visionr1.stage": stage}
        return self.client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id

    def set_status(self, run_id: str, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("visionr1")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


class Display:
    """Live progress for people: one line per update on a TTY, throttled otherwise."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = 0.0
        self.first: dict[str, tuple[float, int]] = {}

    def progress(self, stage: str, p: dict[str, Any]) -> None:
        done, total = int(p.get("done") or 0), p.get("total")
        now = time.monotonic()
        t0, d0 = self.first.setdefault(stage, (now, done))
        text = f"  {stage:<9} {done}/{total or '?'}"
        if total:
            text += f" {100 * done / max(int(total), 1):3.0f}%"
            rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
            if rate > 0:
                text += f"  ETA {_fmt_s((int(total) - done) / rate)}"
        extra = {k: v for k, v in p.items() if k not in ("stage", "done", "total", "time")}
        if extra:
            text += "  " + " ".join(f"{k}={_short(v)}" for k, v in list(extra.items())[:4])
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
        elif now - self.last >= 5 or (total and done >= int(total)):
            print(text, file=self.out, flush=True)
            self.last = now

    def line(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(text, file=self.out, flush=True)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt_s(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    )


class Executor:
    def __init__(
        self,
        run: VisionR1Run,
        manifest_text: str,
        workdir: Path,
        *,
        python: str = sys.executable,
        out: IO[str] = sys.stdout,
        policy: planner.RetryPolicy = LOCAL_RETRY,
    ) -> None:
        self.run = run
        self.manifest_text = manifest_text
        self.workdir = workdir.resolve()
        self.python = python
        self.display = Display(out)
        self.out = out
        self.policy = policy
        self.state_path = self.workdir / STATE
        self.state = LocalState.load(self.state_path)
        uri = run.spec.mlflow.tracking_uri or f"sqlite:///{self.workdir / 'mlflow.db'}"
        self.tracker = Tracker(uri, run.spec.mlflow.experiment, self.workdir / "mlartifacts")
        self.child: subprocess.Popen[str] | None = None

    # ------------------------------------------------------------------ main loop

    def execute(self) -> int:
        st = self.state.status
        if st.phase in ("Succeeded", "Failed") and self.state.attempts:
            self.display.line(
                f"run {self.run.metadata.name} already {st.phase}; nothing to do "
                f"(delete {self.workdir / STATE} to start over)"
            )
            self.summary()
            return 0 if st.phase == "Succeeded" else 1
        if self.state.parent_run_id:
            self.tracker.set_status(self.state.parent_run_id, "RUNNING")
        try:
            self._resume_interrupted()
            while self.state.status.phase not in ("Succeeded", "Failed"):
                actions = planner.plan(
                    self.run,
                    self.state.status if self.state.attempts or self.state.parent_run_id else None,
                    self.state.observed(),
                    _now(),
                    self.policy,
                )
                if not actions:
                    raise RuntimeError("the plan has nothing to do but the run is not finished")
                for action in actions:
                    self._do(action)
        except KeyboardInterrupt:
            self._interrupt()
            return 130
        self.summary()
        return 0 if self.state.status.phase == "Succeeded" else 1

    def _commit(self, action: planner.Action) -> None:
        self.state.status = planner.apply(self.state.status, [action], _now())
        self.state.save(self.state_path)

    def _do(self, action: planner.Action) -> None:
        if isinstance(action, planner.StartRun):
            if not self.state.parent_run_id:
                self.state.parent_run_id = self.tracker.open_parent(self.run, self.manifest_text)
            self.display.line(
                f"run {self.run.metadata.name}: stages {' → '.join(action.stages)}"
                + (f" (skipped: {', '.join(action.skipped)})" if action.skipped else "")
            )
            self._commit(action)
        elif isinstance(action, planner.CreateStage):
            self._commit(action)
            self._launch(action.stage, action.attempt, action.job_name)
        elif isinstance(action, planner.Requeue):
            time.sleep(min(action.after_s, 10.0))
        elif isinstance(action, planner.FinishRun):
            self._commit(action)
            assert self.state.parent_run_id
            self._summarize_parent()
            self.tracker.set_status(
                self.state.parent_run_id, "FINISHED" if action.phase == "Succeeded" else "FAILED"
            )
            self.display.line(f"run {action.phase.lower()}: {action.message}")
        else:
            if isinstance(
                action, planner.StageSucceeded | planner.StageFailed | planner.RetryStage
            ):
                _, _, message = planner.describe(action)
                self.display.line(f"  {message}")
            self._commit(action)

    def _summarize_parent(self) -> None:
        """Headline metrics, params, tags, datasets and the final model on the parent run."""
        from visionr1_operator.mlflow_runs import summarize_parent

        assert self.state.parent_run_id
        try:
            summarize_parent(
                self.tracker.uri, self.state.parent_run_id, self.run, workspace=str(self.workdir)
            )
        except Exception as exc:  # noqa: BLE001 - the run's outcome must not hang on MLflow
            self.display.line(f"  (could not summarize the MLflow parent run: {exc})")

    def _resume_interrupted(self) -> None:
        """An attempt started before Ctrl-C is rerun as the same attempt (like a restarted pod)."""
        for a in list(self.state.attempts):
            if a.exit_code is None:
                self.display.line(
                    f"resuming {a.stage} (attempt {a.attempt + 1}) from its checkpoints"
                )
                self.state.attempts.remove(a)
                self._launch(a.stage, a.attempt, a.job_name)

    # ------------------------------------------------------------------ one stage

    def _launch(self, stage: str, attempt: int, job_name: str) -> None:
        assert self.state.parent_run_id
        stage_run = self.state.stage_runs.get(stage)
        if stage_run is None:
            stage_run = self.tracker.stage_run(self.state.parent_run_id, stage)
            self.state.stage_runs[stage] = stage_run
        else:
            self.tracker.set_status(stage_run, "RUNNING")
        cfg = resolve_stage_config(
            self.run,
            stage,
            str(self.workdir),
            mlflow_tracking_uri=self.tracker.uri,
            parent_run_id=self.state.parent_run_id,
            stage_run_id=stage_run,
        )
        cfg_path = self.workdir / ".visionr1" / "configs" / f"{job_name}.json"
        atomic_write_json(cfg_path, cfg.dump())
        rec = Attempt(stage, attempt, job_name)
        self.state.attempts.append(rec)
        self.state.save(self.state_path)

        log_path = self.workdir / "logs" / f"{job_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.tracker.uri,
            "MLFLOW_EXPERIMENT_NAME": self.run.spec.mlflow.experiment,
            "VISIONR1_PARENT_RUN_ID": self.state.parent_run_id,
            "VISIONR1_STAGE_RUN_ID": stage_run,
            "JOB_COMPLETION_INDEX": "0",
            "VISIONR1_SHARDS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
            BASE_MODEL_ENV: self.run.spec.base_model.name,
            BASE_MODEL_REVISION_ENV: self.run.spec.base_model.revision or "",
        }
        env.setdefault("HF_HOME", str(self.workdir / ".cache" / "huggingface"))
        self.display.line(f"▶ {stage} (attempt {attempt + 1}) · log: {log_path}")
        t0 = time.monotonic()
        with open(log_path, "a") as log:
            self.child = subprocess.Popen(
                [self.python, "-m", "visionr1_jobs", stage, "--config", str(cfg_path)],
                stdout=log,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches us; we stop the child ourselves
            )
            assert self.child.stderr is not None
            for line in self.child.stderr:
                log.write(line)
                p = parse_progress(line)
                if p is not None:
                    self.state.status.stages[stage].progress = f"{p.get('done')}/{p.get('total')}"
                    self.display.progress(stage, p)
            code = self.child.wait()
        self.child = None
        rec.exit_code = code
        rec.seconds = round(time.monotonic() - t0, 1)
        rec.finished_at = planner.rfc3339(_now())
        self.state.save(self.state_path)
        if code != 0:
            tail = log_path.read_text().splitlines()[-15:]
            kind = "invalid input (permanent)" if code == EXIT_INVALID_INPUT else "retryable"
            self.display.line(f"✗ {stage} exited {code} ({kind}); last lines of {log_path}:")
            for t in tail:
                self.display.line(f"    {t}")
            self.tracker.set_status(stage_run, "FAILED")
        else:
            self.display.line(f"✓ {stage} done in {_fmt_s(rec.seconds)}")

    def _interrupt(self) -> None:
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGTERM)
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
        self.state.save(self.state_path)
        for run_id in [self.state.parent_run_id, *self.state.stage_runs.values()]:
            if run_id:
                try:
                    if self.tracker.client.get_run(run_id).info.status == "RUNNING":
                        self.tracker.set_status(run_id, "KILLED")
                except Exception:  # noqa: BLE001 - never hide the interrupt behind MLflow
                    pass
        self.display.line(
            "\ninterrupted: rerun the same command to continue from the last finished stage "
            "(the interrupted stage resumes from its newest checkpoint)"
        )

    # ------------------------------------------------------------------ summary

    def summary(self) -> None:
        seconds: dict[str, float] = {}
        for a in self.state.attempts:
            seconds[a.stage] = seconds.get(a.stage, 0.0) + a.seconds
        rows = [("stage", "outcome", "time", "key metrics")]
        for stage, st in self.state.status.stages.items():
            man = read_manifest(self.workdir, OUTPUT_DIRS[stage])
            metrics = _key_metrics(stage, man.metrics if man else {})
            rows.append(
                (
                    stage,
                    st.phase,
                    _fmt_s(seconds.get(stage, 0.0)) if stage in seconds else "-",
                    metrics,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        self.display.line("")
        for r in rows:
            self.display.line(
                f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}"
            )
        evals = eval_table(self.workdir)
        if evals:
            self.display.line("\n  eval per checkpoint (accuracy, format rate, mean tokens):")
            for ckpt, per_bench in evals.items():
                cells = "  ".join(
                    f"{b}: acc={m.get('accuracy', float('nan')):.3f} "
                    f"format={m.get('format_rate', float('nan')):.2f} "
                    f"tokens={m.get('mean_response_tokens', float('nan')):.0f}"
                    for b, m in per_bench.items()
                )
                self.display.line(f"    {ckpt:<14} {cells}")
        self.display.line(
            f"\nMLflow: mlflow ui --backend-store-uri {self.tracker.uri}  (then open "
            f"http://127.0.0.1:5000/#/experiments/{self.tracker.experiment_id}/runs"
            "?workflowType=machine_learning)"
        )
        report = self.workdir / "eval" / "report.md"
        if report.exists():
            self.display.line(f"Report: {report}")
        self.display.line(f"Workspace: {self.workdir}")


_KEY_METRICS = {
    "synthesis": ("rows", "samples_per_s", "tokens_per_s"),
    "filter": ("rows_in", "kept", "keep_rate"),
    "sft": ("global_step", "train_loss", "train_runtime"),
    "grpo": ("mean_reward", "mean_format", "mean_accuracy", "mean_completion_length"),
}


def _key_metrics(stage: str, metrics: dict[str, float]) -> str:
    """A few metrics worth a glance; GRPO's per PTST sub-stage (``stage-N/...``)."""
    wanted = _KEY_METRICS.get(stage, ())
    parts = []
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/")
        if name in wanted:
            label = f"{prefix}/{name.removeprefix('mean_')}" if prefix else name
            parts.append(f"{label}={_short(value)}")
    return "  ".join(parts)


def eval_table(workdir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """checkpoint → benchmark → {accuracy, format_rate, ...}, from the eval stage's manifest."""
    man = read_manifest(workdir, OUTPUT_DIRS["eval"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in (man.metrics if man else {}).items():
        parts = key.rsplit(".", 2)
        if len(parts) == 3:
            ckpt, bench, metric = parts
            out.setdefault(ckpt, {}).setdefault(bench, {})[metric] = value
    # Pipeline order: base, sft, each PTST sub-stage, the final model, then anything else.
    order = {"base": 0, "sft": 1, "grpo": 3}
    return dict(
        sorted(out.items(), key=lambda kv: (order.get(kv[0], 2 if "stage-" in kv[0] else 4), kv[0]))
    )


# --------------------------------------------------------------------------- CLI


def load_run(path: Path) -> tuple[VisionR1Run, str]:
    text = path.read_text()
    obj = yaml.safe_load(text)
    problems = validate_object(obj)
    if problems:
        raise SystemExit(f"{path}: invalid manifest:\n" + "\n".join(f"  - {p}" for p in problems))
    return VisionR1Run.model_validate(obj), text


def add_arguments(parser: Any) -> None:
    parser.description = (
        "Run a VisionR1Run on this machine: the operator's plan, each stage a subprocess of "
        "`python -m visionr1_jobs`, MLflow in sqlite. Rerun to continue after Ctrl-C."
    )
    parser.add_argument("file", metavar="FILE", help="VisionR1Run manifest")
    parser.add_argument(
        "--workdir",
        help="workspace directory (default: spec.storage.localDir, else .visionr1/NAME)",
    )


def main(args: Any) -> int:
    path = Path(args.file)
    try:
        run, text = load_run(path)
    except OSError as exc:
        print(f"{path}: cannot read ({exc.strerror or exc})", file=sys.stderr)
        return 1
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        return 1
    workdir = Path(args.workdir or run.spec.storage.local_dir or f".visionr1/{run.metadata.name}")
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return Executor(run, text, workdir).execute()
