"""Interruptions of retraining: Ctrl-C that a library swallows, and orphaned workers.

- :func:`interruption_guard` -- scikit-learn's ``MLPClassifier`` and skorch nets catch
  ``KeyboardInterrupt`` inside ``fit`` and return a half-trained model. While the guard
  is active, a SIGINT that raises ``KeyboardInterrupt`` is also recorded, and leaving
  the guard re-raises it, so the half-trained model's result is never used (nor
  cached). It works in the main thread of any process: the caller's, and each worker
  of a process pool.
- :func:`watch_parent` -- a worker process whose parent is killed (SIGKILL, OOM) would
  otherwise wait for work forever; a daemon thread ends it once its parent is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

__all__ = ["interruption_guard", "watch_parent"]

#: Seconds between two checks of the parent process by :func:`watch_parent`.
POLL_SECONDS = 0.2

_watcher = None


class _Interrupted:
    """Whether a SIGINT raised ``KeyboardInterrupt`` while the guard was active."""

    def __init__(self):
        self.interrupted = False


@contextlib.contextmanager
def interruption_guard():
    """Re-raise on exit a ``KeyboardInterrupt`` the guarded code swallowed.

    The SIGINT handler in place is still called (the default one raises
    ``KeyboardInterrupt``); a handler that ignores the signal, or returns without
    raising, leaves the guarded work uninterrupted. Outside the main thread signal
    handlers cannot be installed and the guard does nothing.

    Yields
    ------
    state : object
        ``state.interrupted`` tells whether the block was interrupted.

    Raises
    ------
    KeyboardInterrupt
        On exit, when the block was interrupted but returned normally.
    """
    state = _Interrupted()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if previous is signal.SIG_IGN:
            return
        if not callable(previous):  # SIG_DFL, or a handler installed outside Python
            state.interrupted = True
            raise KeyboardInterrupt
        try:
            previous(signum, frame)
        except BaseException:
            state.interrupted = True
            raise

    signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
    if state.interrupted:
        raise KeyboardInterrupt("a retrain was interrupted; its result was discarded")


def _watch(parent):
    while True:
        time.sleep(POLL_SECONDS)
        if os.getppid() != parent:  # re-parented: the parent died
            os._exit(1)


def watch_parent(parent):
    """In a child process of ``parent`` (a pid), exit as soon as ``parent`` dies.

    Does nothing in ``parent`` itself, in processes that are not its direct
    children (e.g. a Dask worker started by a nanny), and after the first call of
    a process.
    """
    global _watcher
    if _watcher is not None or os.getpid() == parent or os.getppid() != parent:
        return
    _watcher = threading.Thread(target=_watch, args=(parent,), daemon=True,
                                name="skdattri-parent-watch")
    _watcher.start()
