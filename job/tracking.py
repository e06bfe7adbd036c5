"""MLflow tracking (tracking.mlflow=true): the run directory mirrored to one MLflow run that
survives kills, preemption and restarts, with no point logged twice and none lost.

metrics.jsonl is the run's truth, and already reads like one uninterrupted run after a resume
(job/metrics.py drops the events past the checkpoint it resumes from). The MLflow run mirrors it,
and only rank 0 talks to the server (one MLflow run per job, never one per rank):
- The run's id is kept in the run directory (RunDir.mlflow_run), written atomically as soon as
  the run is created, so every later start of the same run directory (a kill before the first
  checkpoint included, and a fallback to an older checkpoint) continues that MLflow run, and a new
  run directory (run.name) opens a new one. The checkpoint format is left alone.
- Points go to the server after each checkpoint is on disk, and only those the checkpoint covers
  (step <= its step); the rest at the end. A killed job resumes from a checkpoint at or after
  every point it sent, so it never logs a sent point again. Each start asks the server for the
  last step it holds per metric and sends only the steps above it, so a point the resumed job logs
  again (after falling back to an older checkpoint) is not sent twice either; a point resent after
  an answer was lost is the same (key, step, time, value), which the server stores once.
- A server that is unreachable at start is bad input (one line, exit 2, before training and
  before the run directory is written). One that stops answering mid-run costs one warning: the
  points wait in metrics.jsonl and go with the next checkpoint it answers at; what is still unsent
  at the end is said in one line, and running the same command again sends it.
- Every request has a short timeout and no retry (the MLflow client's defaults are 120 s and 7
  retries with backoff), and after a failure the next try waits RETRY_AFTER_S: a dead server
  costs a checkpoint at most one timeout, never a training step.

mlflow is imported only here, and only when tracking is on: the job runs without the extra.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from job.config import Config, config_to_dict
from job.errors import BadInputError, ConfigError, RunFailedError, message_line
from job.provenance import source_commit
from job.run_dir import RunDir
from job.safe_io import atomic_write_json

log = logging.getLogger(__name__)

METRICS = {
    "train": {"loss": "train/loss", "lr": "train/lr"},
    "train_epoch": {"samples_per_second": "train/samples_per_second"},
    "test": {"test_loss": "test/loss", "test_accuracy": "test/accuracy"},
}
"""metrics.jsonl event -> its fields sent to MLflow -> the metric's name there (TensorBoard's names)."""

CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""The MLflow client's settings unless the environment sets them: seconds per request, retries
(a failed sync is retried at the next checkpoint instead), no usage reports to MLflow's own
servers from a training job (a cluster's NetworkPolicy lets the pods reach the tracking server
only), and no emoji lines on stdout at the end (the job logs the run's address once, at start)."""

RETRY_AFTER_S = 30.0
"""After a failed request, checkpoints within this many seconds do not try the server again."""

BATCH = 1000
"""Points per request: the MLflow REST API's limit for one log-batch."""

ARTIFACTS = ("model", "summary", "config")
"""The RunDir files uploaded at the end: model.pt, summary.json, config.yaml."""


@dataclass(frozen=True)
class Point:
    """One metric value as MLflow stores it: the metrics.jsonl event's step and time (ms)."""

    key: str
    value: float
    timestamp: int
    step: int


def tracking_uri(cfg: Config) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI; ConfigError when neither is set."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise ConfigError(
            "tracking.mlflow=true needs a tracking server: set tracking.uri=http://host:port (or "
            "MLFLOW_TRACKING_URI), or set tracking.mlflow=false"
        )
    return uri


def without_credentials(uri: str) -> str:
    """The URI as messages, params and the run directory may show it: no user:password@."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as config.yaml writes them."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
        params = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                params.update(flat(value, f"{prefix}{key}."))
            else:
                params[prefix + key] = _written(value)
        return params

    tree = config_to_dict(cfg)
    tree["run"]["dir"] = str(cfg.run_dir)
    if tree["tracking"]["uri"]:
        tree["tracking"]["uri"] = without_credentials(tree["tracking"]["uri"])
    return flat(tree)


class Tracking:
    """Rank 0's MLflow run for one run directory: connect() before anything is written, begin()
    once metrics.jsonl is open, sync() after each checkpoint, finish() after the results. Only
    connect() raises; the others warn and leave what they could not send for the next call."""

    def __init__(self, cfg: Config, client: Any, uri: str, experiment_id: str, run_id: str | None) -> None:
        self.cfg, self.client, self.uri = cfg, client, without_credentials(uri)
        self.run = RunDir(cfg.run_dir)
        self.experiment_id, self.run_id = experiment_id, run_id
        self.tags: dict[str, str] = {}
        self.sent: dict[str, int] | None = None  # metric -> the last step the server holds; None: not begun
        self.pending: list[Point] = []
        self.offset = 0  # bytes of metrics.jsonl already read into `pending`
        self.failed_at: float | None = None  # when the last request failed; None: the server answers

    @classmethod
    def connect(cls, cfg: Config) -> Tracking:
        """Rank 0, before the run directory is written: the server answers and holds this run
        directory's MLflow run (if it has one). BadInputError (exit 2) otherwise, in one line."""
        uri = tracking_uri(cfg)
        for name, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                "tracking.mlflow=true needs the MLflow client (mlflow-skinny, the `tracking` extra), which this "
                "Python lacks: pip install --require-hashes -r requirements.lock (the image has it), or set "
                "tracking.mlflow=false"
            ) from None
        run_dir = RunDir(cfg.run_dir)
        saved = _saved_run_id(run_dir)
        shown = without_credentials(uri)
        try:
            client = MlflowClient(tracking_uri=uri)
            if saved:
                return cls(cfg, client, uri, _saved_run_experiment(client, saved, run_dir, shown), saved)
            return cls(cfg, client, uri, _experiment_id(client, cfg.tracking.experiment, shown), None)
        except BadInputError:
            raise
        except (MlflowException, OSError, ValueError) as e:  # refused, timed out, no such scheme, HTTP errors
            raise BadInputError(
                f"the MLflow tracking server {shown} cannot be used ({_reason(e)}); start it, or correct "
                "tracking.uri (or MLFLOW_TRACKING_URI), or set tracking.mlflow=false"
            ) from None

    def begin(self, environment: dict[str, Any] | None = None, launcher: str | None = None) -> None:
        """Create the MLflow run (keeping its id in the run directory) or reopen it, log the params
        it lacks and the tags of this start, and read the last step the server holds per metric.
        environment/launcher: what the bits depend on and who started the job (tags); None on a
        start that trains nothing. RunFailedError when the run directory refuses the id file."""
        if environment is not None:
            self.tags = {
                "mlflow.source.git.commit": source_commit(),
                "launcher": str(launcher),
                "run_dir": str(self.run.path.resolve()),
                **{key: str(value) for key, value in environment.items()},
            }
        self._try(self._begin)

    def sync(self, covered_step: int | None) -> None:
        """Send the points of metrics.jsonl the server lacks, up to `covered_step` (the newest
        checkpoint's; None: all of them). Never raises; a failure warns once and waits."""
        waiting = self.failed_at is not None and time.monotonic() - self.failed_at < RETRY_AFTER_S
        if waiting and covered_step is not None:
            return
        if self.sent is None and not self._try(self._begin):
            return
        if self._try(lambda: self._send(covered_step)) and self.failed_at is not None:
            self.failed_at = None
            log.info(f"the MLflow server {self.uri} answers again: the waiting points were sent")

    def finish(self) -> None:
        """At the end, once model.pt and summary.json are written: every point left, the results as
        artifacts, and the run marked finished; what could not be sent is said in one line."""
        self.sync(None)  # None: tries even within RETRY_AFTER_S of a failure
        if not (self.sent is not None and not self.pending and self._try(self._upload_results)):
            steps = sorted({point.step for point in self.pending})
            what = f"{len(self.pending)} point(s), steps {steps[0]} to {steps[-1]}, and " if steps else ""
            what = "the points and " if self.sent is None else what  # the run itself was never reached
            log.warning(
                f"the MLflow server {self.uri} did not take {what}the results ({self._last_error}): they stay in "
                f"{self.run.path} (metrics.jsonl); run the same command again to send them"
            )

    # --- the requests ----------------------------------------------------------------------

    def _try(self, request: Any) -> bool:
        """request(); False after a failure, which warns the first time the server stops answering."""
        try:
            request()
            return True
        except RunFailedError:
            raise
        except Exception as e:  # noqa: BLE001 (whatever the client raises: the server must never stop training)
            self._last_error = _reason(e)
            if self.failed_at is None:
                log.warning(
                    f"the MLflow server {self.uri} does not answer ({self._last_error}): training goes on; the "
                    "points wait in metrics.jsonl and are sent at the next checkpoint it answers"
                )
            self.failed_at = time.monotonic()
            return False

    def _begin(self) -> None:
        from mlflow.entities import Param, RunStatus, RunTag

        if self.run_id is None:
            name = self.cfg.tracking.run_name or self.cfg.run.name
            self.run_id = self.client.create_run(self.experiment_id, run_name=name).info.run_id
            try:
                atomic_write_json(
                    self.run.mlflow_run,
                    {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri},
                )
            except OSError as e:
                raise RunFailedError(
                    f"cannot write {self.run.mlflow_run} ({e.strerror or message_line(e)}); free space there or make "
                    "it writable, and run the same command again"
                ) from None
            held: dict[str, str] = {}
            self.sent = {}
            log.info(f"Tracking in MLflow run {self.run_id} ({name}) of experiment {self.experiment_id} at {self.uri}")
        else:
            mlflow_run = self.client.get_run(self.run_id)
            held = mlflow_run.data.params
            if mlflow_run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                self.client.update_run(self.run_id, status="RUNNING")
            self.sent = {key: self._last_step(key) for fields in METRICS.values() for key in fields.values()}
            log.info(f"Tracking in MLflow run {self.run_id} at {self.uri}, continued")
        params = [Param(key, value) for key, value in config_params(self.cfg).items() if key not in held]
        changed = [key for key, value in config_params(self.cfg).items() if held.get(key, value) != value]
        if changed:  # an MLflow param cannot change; the new values are in config.yaml
            log.info(f"MLflow keeps the first value of the params {', '.join(changed)} (this start changed them)")
        self.client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in self.tags.items()])
        self.offset, self.pending = 0, []

    def _last_step(self, key: str) -> int:
        return max((metric.step for metric in self.client.get_metric_history(self.run_id, key)), default=-1)

    def _send(self, covered_step: int | None) -> None:
        from mlflow.entities import Metric

        self._read_new_points()
        ready = sorted(
            (p for p in self.pending if covered_step is None or p.step <= covered_step), key=lambda p: p.step
        )
        for start in range(0, len(ready), BATCH):
            batch = ready[start : start + BATCH]
            self.client.log_batch(
                self.run_id, metrics=[Metric(p.key, p.value, p.timestamp, p.step) for p in batch], synchronous=True
            )
            done = set(batch)
            self.pending = [p for p in self.pending if p not in done]
            for p in batch:
                self.sent[p.key] = max(self.sent.get(p.key, -1), p.step)

    def _read_new_points(self) -> None:
        """metrics.jsonl's complete lines past `offset` as points the server lacks, into `pending`."""
        try:
            with open(self.run.metrics, "rb") as f:
                f.seek(self.offset)
                text = f.read()
        except FileNotFoundError:
            return
        complete = text[: text.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            event = json.loads(line)
            for field, key in METRICS.get(event.get("event"), {}).items():
                step = event["step"]
                if field in event and step > self.sent.get(key, -1):
                    self.pending.append(Point(key, float(event[field]), int(event["time"] * 1000), step))

    def _upload_results(self) -> None:
        for name in ARTIFACTS:
            path = getattr(self.run, name)
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED")

    _last_error = ""


def _saved_run_id(run: RunDir) -> str | None:
    """The MLflow run id kept in the run directory, None when it has none."""
    try:
        return json.loads(run.mlflow_run.read_text())["run_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise BadInputError(
            f"{run.mlflow_run} is damaged; delete it to mirror this run directory to a new MLflow run"
        ) from None


def _saved_run_experiment(client: Any, run_id: str, run: RunDir, shown: str) -> str:
    """The experiment of the MLflow run `run_id`; BadInputError when the server lacks it."""
    from mlflow.exceptions import MlflowException

    try:
        info = client.get_run(run_id).info
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        info = None
    if info is None or info.lifecycle_stage == "deleted":
        raise BadInputError(
            f"{run.path} is mirrored to MLflow run {run_id} ({run.mlflow_run}), which {shown} does not hold"
            f"{' (it was deleted)' if info is not None else ''}; point tracking.uri at the server it was logged to, "
            f"or delete {run.mlflow_run} to start a new MLflow run"
        )
    return info.experiment_id


def _experiment_id(client: Any, name: str, shown: str) -> str:
    """The id of the experiment `name`, created when missing; BadInputError when it was deleted."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as e:  # another job created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise e from None
    if experiment.lifecycle_stage == "deleted":
        raise BadInputError(
            f"the MLflow experiment {name!r} on {shown} is deleted; restore it (mlflow experiments restore) or "
            "choose another tracking.experiment"
        )
    return experiment.experiment_id


def _written(value: Any) -> str:
    """A config value as config.yaml writes a scalar: null, true/false, the number, the text."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before str(): True would read "True"
        return "true" if value else "false"
    return str(value)


def _reason(error: BaseException) -> str:
    """The client's error in at most one short line."""
    line = message_line(error)
    return line if len(line) <= 200 else line[:197] + "..."
