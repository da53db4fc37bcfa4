"""The project's ``kedro run``: Kedro's own command, with three changes to how a run ends.

Kedro loads this module's ``cli`` group ahead of its built-in commands and of plugins',
so its ``run`` replaces Kedro's for ``kedro run`` (and for ``python -m clip_dfkd``, through
``find_run_command``). It is Kedro's ``run`` command object itself, every option included,
with only its callback wrapped by :func:`guarded`:

- a user error (:class:`clip_dfkd.errors.UserError`, or Kedro's parameter validation error
  that reports ours) prints ``Error: <message>`` on stderr and exits 1, without a traceback;
  any other exception is a bug and keeps its traceback;
- Ctrl-C ends the active MLflow run as KILLED and exits 130. A KeyboardInterrupt is not an
  ``Exception``, so Kedro calls no ``on_pipeline_error`` hook, and MLflow's exit handler
  would otherwise mark the half-done run FINISHED;
- SIGTERM (``timeout``, ``docker stop``, Slurm, Kubernetes) does the same and exits 143:
  Python's default would end the process at once and leave the run RUNNING for ever.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import mlflow
from kedro.framework.cli.project import run as kedro_run
from kedro.validation import ParameterValidationError

from clip_dfkd.atomic import out_of_space_error
from clip_dfkd.errors import UserError

# How Kedro's ParameterValidator reports each bad parameter (kedro/validation/
# parameter_validator.py). Its exception keeps only the text of the underlying errors.
_KEDRO_HEADER = "Parameter validation failed:"
_KEDRO_MODEL_ERROR = re.compile(
    r"- Parameter '(?P<key>[^']+)': Failed to instantiate \w+ for parameter '(?P=key)': (?P<detail>.+)"
)
_KEDRO_NULL_ERROR = re.compile(r"- Parameter '(?P<key>[^']+)': value is None but type is not Optional")


def _parameter_problems(exc: ParameterValidationError) -> str | None:
    """One line per bad parameter when every problem Kedro lists is a user's: a message of
    :class:`clip_dfkd.params.InvalidParameterError` (it starts with the key it names, e.g.
    ``image_synthesis.generator.width=100: ...``) or a parameter set to null. Anything else,
    e.g. a validator that crashed, is a bug: None, and the traceback shows."""
    lines = str(exc).splitlines()
    if len(lines) < 2 or lines[0] != _KEDRO_HEADER:
        return None
    problems = []
    for line in lines[1:]:
        if (match := _KEDRO_MODEL_ERROR.fullmatch(line)) and match["detail"].startswith(
            (f"{match['key']}=", f"{match['key']}.")
        ):
            problems.append(match["detail"])
        elif match := _KEDRO_NULL_ERROR.fullmatch(line):
            problems.append(f"{match['key']}=None: must be set, not null")
        else:
            return None
    return "\n".join(problems)


# How Kedro's DatasetError names a file dataset that failed to save: its repr holds
# ``filepath=PurePosixPath('...')`` (kedro-datasets' file datasets).
_SAVED_FILEPATH = re.compile(r"Failed while saving data to dataset .*?filepath=\w*Path\('(?P<path>[^']+)'\)")


def user_error_message(exc: BaseException) -> str | None:
    """The message of the user error that ``exc`` is or wraps (``raise ... from``, as Kedro
    wraps a dataset's error), or None for a bug. An exception raised while handling a user
    error (``__context__`` only) is a bug and keeps its traceback.

    A full disk is the user's to fix wherever it struck: a dataset that kedro-datasets writes
    (Parquet, CSV, JSON, plots) raises the bare OSError, which becomes the same one line as
    the project's own writers give (:func:`clip_dfkd.atomic.out_of_space_error`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    saving = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            return str(current)
        if isinstance(current, ParameterValidationError):
            return _parameter_problems(current)
        if saving is None and (match := _SAVED_FILEPATH.match(str(current))):
            saving = match["path"]
        if isinstance(current, OSError) and (
            full := out_of_space_error(current.filename or saving or Path.cwd(), current)
        ):
            return str(full)
        current = current.__cause__
    return None


def _kill_active_mlflow_runs() -> list[str]:
    """Ends every active MLflow run (nested ones first) as KILLED; returns their ids."""
    killed = []
    while (active := mlflow.active_run()) is not None:
        killed.append(active.info.run_id)
        mlflow.end_run(status="KILLED")
    return killed


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT. Not an
    ``Exception``: Kedro's runner and session let it through without calling
    ``on_pipeline_error``, whose kedro-mlflow hook would end the run as FAILED."""


@contextlib.contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in this process; the previous handler
    is back afterwards, and after the first SIGTERM (a second one acts as it would without
    this).

    A process forked meanwhile (a DataLoader worker) inherits the handler: there the signal
    ends it as the default action would, touching none of the parent's runs. When SIGTERM goes
    to every process of a job (Slurm, a process group), the workers end with the main process;
    torch's SIGCHLD handler would then raise "DataLoader worker ... is killed by signal" in the
    main process while it ends its runs, or as it drops their frames after (an "Exception
    ignored" traceback): after a SIGTERM, SIGCHLD is left to its default, as the process ends."""
    owner = os.getpid()
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_killed(reason: str, exit_code: int) -> click.exceptions.Exit:
    """Ends the active MLflow runs as KILLED and says so in one line on stderr; the exit to raise."""
    killed = _kill_active_mlflow_runs()
    runs = f"MLflow run {', '.join(killed)} ended as KILLED" if killed else "no MLflow run was active"
    # The leading newline ends the terminal's ``^C`` echo or a progress bar's line.
    click.echo(f"\n{reason}: {runs}.", err=True)
    return click.exceptions.Exit(exit_code)


def guarded(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` with user errors turned into one-line click errors (exit 1), and Ctrl-C
    and SIGTERM into KILLED MLflow runs (exit 130 and 143, 128 + the signal's number, as a
    shell reports a process that the signal ended); bugs propagate unchanged."""

    @functools.wraps(callback)
    def run_guarded(*args: Any, **kwargs: Any) -> Any:
        with sigterm_raises_terminated():
            try:
                return callback(*args, **kwargs)
            except KeyboardInterrupt:
                raise _end_killed("Interrupted", 128 + signal.SIGINT) from None
            except Terminated:
                raise _end_killed("Terminated", 128 + signal.SIGTERM) from None
            except Exception as exc:
                if (message := user_error_message(exc)) is None:
                    raise
                # click prints it as "Error: <message>" on stderr and exits 1.
                raise click.ClickException(message) from exc

    return run_guarded


@click.group(name="clip_dfkd")
def cli() -> None:
    """Commands of the clip-dfkd project."""


# A copy, so that Kedro's own command object (still registered in its built-in group) is
# left as it is.
run = copy.copy(kedro_run)
run.callback = guarded(kedro_run.callback)
cli.add_command(run)
