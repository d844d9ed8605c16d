"""One writer per run folder: an exclusive lock file held for the whole run.

Two `tf_free.train` processes on one `--model_dir` would both pass the
config check and then interleave their checkpoints, logs and `config.json`.
The first one takes `<model_dir>/.tf_free.lock`; a second gets `RunLockedError`
naming the holder (PID, host, start time).

The lock is a POSIX `fcntl.flock` on that file, so the kernel releases it when
its process dies, even by SIGKILL: a lock file whose holder is gone is taken
over, with a log line saying whose it was. (flock does not work across hosts
on every network file system; on a shared folder, use one `--model_dir` per
run.) The holder's details are written into the file for the error message.

Evaluation does not take this lock: it only reads a run folder, and merges
into `eval.json` under a separate lock (`file_lock`), so it can evaluate a run
that is still training.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from absl import logging

LOCK_NAME = ".tf_free.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


def _holder_text(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')}, started {when}"


def _read_info(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return json.loads(raw.decode()) if raw else {}
    except ValueError:
        return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as e:
        return getattr(e, "errno", None) == errno.EPERM
    return True


class RunLock:
    """The exclusive lock of one run folder; `acquire()`, then `release()` (or `with`).

    Args:
      model_dir: the run folder (created if absent).
      what: how the holder is described in the other process's error.
    """

    def __init__(self, model_dir: str, what: str = "tf_free.train"):
        self.path = os.path.join(model_dir, LOCK_NAME)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock, or raises RunLockedError naming the live holder."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{os.path.dirname(self.path) or '.'} is in use by another "
                    f"{info.get('what', 'tf_free process')} ({_holder_text(info)}); wait for it "
                    f"to finish, stop it, or use another --model_dir"
                ) from None
            # The previous holder may have unlinked the file between our open and
            # our flock (release removes it): then we locked an orphan; retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_info(fd)
        if previous:
            alive = previous.get("host") == socket.gethostname() and _pid_alive(previous.get("pid"))
            logging.warning(
                "%s: taking over the stale lock of %s (%s)",
                self.path,
                _holder_text(previous),
                "its process holds no lock" if alive else "its process is gone",
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "what": self.what,
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file and releases the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def file_lock(path: str):
    """A blocking exclusive flock for a read-modify-write of `path`.

    It locks the folder that holds `path` (flock works on a directory opened
    read-only), so no lock file is left behind and it also works in a folder
    the caller may only read. Other tf_free processes updating a file in the
    same folder wait for each other.
    """
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
