"""Errors the CLI reports as one line (never a traceback), each kind with its own exit code.

The exit code is the error's kind, so launchers and cluster policies can tell them apart
(a Kubernetes podFailurePolicy, Slurm's RequeueExit, job.launch's no-restart rule):
What each code means and what the launchers make of it: docs/EXIT-CODES.md (the one table).
Raise one of these (or a subclass) so that the exit code shows where the error is raised;
JobError is only the base the CLI catches.
"""

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


def message_line(error: BaseException, last: bool = False) -> str:
    """One line of an exception's message for a one-line report: the first (or last) non-empty
    line, or the exception's type when the message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if last else lines[0]


class JobError(Exception):
    """The base of the job's one-line errors: what is wrong and how to fix it.

    Most errors look the same from every rank, so only the first process on each host
    prints them (one clear line, not one per rank). An error that only one rank can see
    sets `rank_specific`; a rank that stops only because a peer failed sets `quiet`,
    since the peer already said why.
    """

    exit_code: int
    rank_specific = False
    quiet = False


class BadInputError(JobError):
    """Bad input (config, data, launcher env, paths, files): retrying cannot help."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInputError):
    """The config file, an override, or a value in it is wrong."""


class DataError(BadInputError):
    """MNIST is missing, cannot be fetched, or its files are damaged."""


class NewerFileError(BadInputError):
    """A file written by a newer torch or a newer version of this job than the one reading it: intact,
    only unreadable here. Never skipped as damaged and never replaced: the fix is the newer program."""


class LaunchError(BadInputError):
    """The launcher environment or the hardware does not fit the config."""


class LaunchEnvError(LaunchError):
    """This process's launcher variables are inconsistent; they may differ per rank, so every rank says so."""

    rank_specific = True


class RunFailedError(JobError):
    """Input was fine but the run could not go on (a full disk, a lost peer): a restart may help."""

    exit_code = EXIT_FAILED


class PeerLostError(RunFailedError):
    """A collective failed: a peer died or stopped answering. Each surviving rank sees it itself."""

    rank_specific = True


class PreemptedError(JobError):
    """SIGTERM: the job stopped at a step boundary (after checkpointing, when it was training)."""

    exit_code = EXIT_PREEMPTED


class PeerFailedError(JobError):
    """Another rank failed a step this rank waited on; that rank printed the reason. This rank
    exits with the failed rank's code, so that a supervisor (a Job's podFailurePolicy) reads the
    same verdict from every pod: 2 bad input, 1 a run-time failure worth a retry."""

    quiet = True

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
