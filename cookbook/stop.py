"""Stopping on signals: SIGTERM (timeout, schedulers, Kubernetes) and SIGINT end the work in hand as Ctrl-C does."""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import StoreFailure, StoreUnusable


def at_most(seconds: float, call: Callable[[], object], name: str) -> bool:
    """call() on a daemon thread, waited on for at most `seconds`; True if it returned. For best-effort calls to a store
    only (its error is dropped): MLflow's HTTP client retries for minutes with no limit of its own."""
    def quietly():
        with contextlib.suppress(Exception):
            call()

    thread = threading.Thread(target=quietly, name=name, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that runs end KILLED with every step they trained."""


class _Deferred:
    """How many `uninterrupted` blocks are open, and the signal that arrived in one."""

    depth = 0
    signum: int | None = None


def _stop(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _raise(signum, frame):
    # A second signal during the clean-up the first one started would cut it short (a run left RUNNING): ignore it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _Deferred.depth:
        _Deferred.signum = signum
        return
    raise _stop(signum)


@contextlib.contextmanager
def uninterrupted():
    """A signal during the block (a handover of rows to the hooks) raises as the block ends, not halfway through it."""
    _Deferred.depth += 1
    try:
        yield
    finally:
        _Deferred.depth -= 1
        if not _Deferred.depth and _Deferred.signum is not None:  # raised even over an error of the block (its context)
            signum, _Deferred.signum = _Deferred.signum, None
            raise _stop(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise in the main thread (even where a background shell started us with SIGINT ignored)."""
    before = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def process_id() -> str:
    """host:pid:start of this process (start: when it started, where /proc says; host:pid where not), stored on each
    run and trial it owns."""
    started = start_time(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{started}" if started else "")


def start_time(pid: int) -> str | None:
    """When process pid started, in clock ticks since the epoch (boot time + its start after boot), or None where there
    is no /proc: with the pid, it names one process even after a reboot or container restart hands the pid out again."""
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        after_boot = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return str(boot * os.sysconf("SC_CLK_TCK") + after_boot)


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (killed but not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): trust kill(0)
        return True


def pid_of(process: str) -> int | None:
    """The pid in a process_id (host:pid:start, or host:pid as recorded before starts were); None if it has none."""
    fields = process.split(":")
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def elsewhere(process: str) -> bool:
    """True if `process` (a process_id) ran on another host than this one."""
    return process.split(":")[0] != socket.gethostname()


def gone(process: str) -> bool:
    """True if `process` (a process_id) ran on this host and exists no more: its pid is free, or another process holds it
    now (the same pid, another start)."""
    fields, pid = process.split(":"), pid_of(process)
    if elsewhere(process) or pid is None:
        return False
    return not pid_alive(pid) or (len(fields) > 2 and start_time(pid) not in (None, fields[2]))


def stopped_by(e: KeyboardInterrupt) -> tuple[str, int]:
    """The signal's name and the exit code a shell expects for it (128 + signal number)."""
    return ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT", 130)


def exit_now(code: int) -> None:
    """sys.exit(code) from a command's process, without the second or so the interpreter spends collecting torch's and
    MLflow's objects as it shuts down (every sweep worker and study phase paid it): they are frozen, not collected;
    atexit handlers still run."""
    gc.freeze()
    sys.exit(code)


# A store's errors while a command reads it: MLflow's, and SQLAlchemy's (a database store away, a file not a database)
STORE_ERRORS = (("mlflow.exceptions", "MlflowException"), ("sqlalchemy.exc", "SQLAlchemyError"))


def exit_code(command: Callable[[], int], bad_input: tuple[type[Exception], ...], stopped: str) -> int:
    """Run a command-line command: bad input or an unusable store is one line and exit 2 (nothing was started), a store
    that failed mid-run one line and 1, SIGTERM/SIGINT one line ("stopped by X; " + stopped) and 143/130; any other
    error of the store (away while a command reads it) one line and 1."""
    try:
        with stop_on_signals():
            return command()
    except (*bad_input, StoreUnusable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoreFailure as e:  # the tracker kept what the store did not take; the message says where
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        store_errors = tuple(getattr(sys.modules[module], name) for module, name in STORE_ERRORS if module in sys.modules)
        if not isinstance(e, store_errors):  # a module not imported raised nothing (the library trains without either)
            raise
        import mlflow

        from .delivery import first_line
        print(f"error: tracking store {mlflow.get_tracking_uri()}: {first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        name, code = stopped_by(e)
        print(f"stopped by {name}; {stopped}", file=sys.stderr)
        return code
