"""One run per folder: a lock file inside a stage folder, held while a stage works in it.

    with hold(folder, world, log=log.warning):   # rank 0 takes it; every rank stops if another run holds it
        ...                                      # train, sample, write checkpoints
    lock = RunLock(folder).acquire()             # the same on one process; RunLockError names the holder
    lock.release()

Two runs given the same --output-dir would delete each other's metrics and overwrite each
other's checkpoints, so the second one stops at once with one line naming the first: pid, host,
start time and command line, read from the lock file's body (JSON).

The lock itself is the kernel's: `fcntl.flock` on `folder/.pebr-run.lock`, kept for as long as
the stage runs. The kernel drops it when its holder dies, even by SIGKILL, so a killed run never
blocks the next one; a body left behind by a run that ended without releasing (killed) is taken
over with a log line. A clean release empties the body (the file stays: unlinking a lock file
others may have open would let two runs lock two different files).

Where there is no fcntl, or the file system refuses flock, the body alone is the lock: created
with O_EXCL, taken over when its pid no longer runs on this host, refused when it runs or when it
was written on another host (which cannot be checked from here: the message says which file to
delete). Under torchrun only rank 0 takes the lock; it tells the other ranks whether to go on, so
none waits on a rank that stopped. Multi-node runs rely on flock working on the shared file system.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import time
from typing import Callable

from pebr.errors import RunLockError  # noqa: F401  (raised here; importable from here as before)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".pebr-run.lock"
# flock refused by the file system (some network file systems): fall back to the pid check
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


_HELD: set = set()  # this process's locks, released at a clean interpreter exit if still held


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD):
        lock.release()




def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a process we may not signal still runs)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes

        k32 = ctypes.windll.kernel32
        h = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not h:
            return False
        code = ctypes.c_ulong()
        ok = k32.GetExitCodeProcess(h, ctypes.byref(code))
        k32.CloseHandle(h)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict:
    cmd = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": shlex.join(str(a) for a in cmd)}


def _parse(body: str) -> dict | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def describe(owner: dict | None) -> str:
    """'pid 123 on host h, started ..., command: ...' (one line) of a lock body."""
    if not owner:
        return "a process whose details are not readable (being written, or a damaged lock file)"
    cmd = " ".join(str(owner.get("command", "?")).split())  # one line whatever the arguments held
    pid, host, started = (owner.get(k, "?") for k in ("pid", "host", "started"))
    return f"pid {pid} on host {host}, started {started}, command: {cmd}"


class RunLock:
    """The lock of `folder` (created if missing) for this process."""

    def __init__(self, folder: str | os.PathLike, *, log: Callable[[str], None] | None = None):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._fd: int | None = None
        self._pid_mode = False

    @property
    def held(self) -> bool:
        return self._fd is not None or self._pid_mode

    def acquire(self) -> "RunLock":
        """Take the lock -> self; RunLockError naming the holder when another live process has it."""
        if self.held:
            return self
        os.makedirs(self.folder, exist_ok=True)
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)  # a live process holds it
                holder = self._read_holder(fd) if busy else None
                os.close(fd)
                if busy:
                    raise RunLockError(self._busy(holder)) from None
                if exc.errno not in _NO_FLOCK:
                    raise
            else:
                self._fd = fd
                old = _parse(self._read(fd))
                if old:  # its writer ended without releasing: killed, or its machine went down
                    self.log(f"{self.folder}: taking over the lock left by a run that no longer holds it "
                             f"({describe(old)})")
                self._write(fd, json.dumps(_owner()))
                _HELD.add(self)
                return self
        self._acquire_by_pid()
        return self

    def release(self) -> None:
        """Let the next run in: empty the body (flock) or remove the file (pid check)."""
        _HELD.discard(self)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            finally:
                os.close(fd)  # drops the flock
        elif self._pid_mode:
            self._pid_mode = False
            mine = _parse(self._read_path()) or {}
            if mine.get("pid") == os.getpid() and mine.get("host") == socket.gethostname():
                with contextlib.suppress(OSError):
                    os.remove(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- pieces

    def _busy(self, holder: dict | None) -> str:
        return (f"{self.folder} is in use by another run ({describe(holder)}); "
                f"wait for it to end, stop it, or pass another --output-dir")

    def _read_holder(self, fd: int) -> dict | None:
        for _ in range(10):  # the holder may be between truncating and writing its body
            doc = _parse(self._read(fd))
            if doc:
                return doc
            time.sleep(0.05)
        return None

    @staticmethod
    def _read(fd: int) -> str:
        try:
            return os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
        except OSError:
            return ""

    def _read_path(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(1 << 16)
        except OSError:
            return ""

    @staticmethod
    def _write(fd: int, body: str) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (body + "\n").encode(), 0)
        os.fsync(fd)

    def _acquire_by_pid(self) -> None:
        """No flock: the body is the lock (O_EXCL create; a dead pid on this host is taken over)."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _parse(self._read_path())
                if holder and holder.get("host") != socket.gethostname():
                    raise RunLockError(self._busy(holder) + f" (written on another host, so not checked from here: "
                                       f"if that run is gone, delete {self.path})") from None
                if holder and _pid_alive(int(holder.get("pid", -1))) and holder.get("pid") != os.getpid():
                    raise RunLockError(self._busy(holder)) from None
                if holder:
                    self.log(f"{self.folder}: taking over the lock of a run that is no longer alive "
                             f"({describe(holder)})")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)  # stale (or an empty body a clean flock release left): retry the create
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(_owner()) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._pid_mode = True
            _HELD.add(self)
            return
        raise RunLockError(f"could not take the lock {self.path}: another run is starting in {self.folder}")


@contextlib.contextmanager
def hold(folder: str | os.PathLike, world=None, *, log: Callable[[str], None] | None = None):
    """Hold `folder`'s lock for the block. Distributed: rank 0 takes it and broadcasts whether every
    rank may go on (RunLockError on all: rank 0's names the holder, the others' are quiet)."""
    lock, error = None, None
    is_main = world is None or world.is_main
    if is_main:
        try:
            lock = RunLock(folder, log=log).acquire()
        except RunLockError as exc:
            error = str(exc)
        except OSError as exc:  # an unwritable folder: say so on every rank rather than leave them waiting
            error = f"cannot lock {folder}: {exc}"
    if world is not None:
        error = world.broadcast_object(error)
    if error:
        raise RunLockError(error, quiet=not is_main)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


# ---- readers of a folder another process may delete (a trainer pruning its checkpoints)

READER_PREFIX = ".reader-"  # a reader's mark inside the folder it reads
_mark_count = 0


class ReaderMark:
    """This process reads `folder`: a file `folder/.reader-<host>-<pid>-<n>` holding the reader's
    pid, host, start time and command, share-locked (flock LOCK_SH) until `release`. Whoever would
    delete the folder asks `live_readers` first. The mark appears under its name already locked
    (written under a temporary name, locked, then renamed), so no one sees an unlocked live mark; a
    mark a killed reader left is unlocked (the kernel dropped its lock) and counts for nothing.

        mark = ReaderMark(folder).place()   # FileNotFoundError: the folder is gone
        ...                                 # read
        mark.release()
    """

    def __init__(self, folder: str | os.PathLike):
        global _mark_count
        _mark_count += 1
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, f"{READER_PREFIX}{socket.gethostname()}-{os.getpid()}-{_mark_count}")
        self._fd: int | None = None

    def place(self) -> "ReaderMark":
        """Put the mark -> self. FileNotFoundError when `folder` no longer exists; another OSError
        (a folder this user may not write) leaves no mark behind."""
        tmp = os.path.join(self.folder, ".tmp" + os.path.basename(self.path))
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                except OSError as exc:
                    if exc.errno not in _NO_FLOCK:
                        raise  # no flock on this file system: the pid in the body tells (live_readers)
            os.pwrite(fd, (json.dumps(_owner()) + "\n").encode(), 0)
            os.rename(tmp, self.path)  # the lock is the open file's: it comes along
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.remove(self.path)  # gone already when the folder was deleted after all
            os.close(fd)

    def __enter__(self) -> "ReaderMark":
        return self.place()

    def __exit__(self, *exc) -> None:
        self.release()


_STALE_UNCHECKABLE_S = 24 * 3600  # a mark of another host without flock: trusted this long


def live_readers(folder: str | os.PathLike) -> list[dict]:
    """The readers of `folder` whose marks are live (ReaderMark): their bodies (pid, host, started,
    command), or {} where unreadable. Marks whose reader is gone are removed. [] when the folder
    is gone or holds no mark."""
    folder = os.fspath(folder)
    try:
        names = [n for n in os.listdir(folder) if n.startswith(READER_PREFIX)]
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # released meanwhile
            continue
        try:
            body = _parse(RunLock._read(fd)) or {}
            alive = None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    alive = False  # nobody holds its shared lock: the reader ended without releasing
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        alive = True
                    elif exc.errno not in _NO_FLOCK:
                        raise
            if alive is None:  # no flock here: the pid on this host, or the mark's age on another
                if body.get("host") == socket.gethostname():
                    alive = _pid_alive(int(body.get("pid", -1)))
                else:
                    alive = time.time() - os.fstat(fd).st_mtime < _STALE_UNCHECKABLE_S
            if alive:
                out.append(body)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
        finally:
            os.close(fd)
    return out


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, wait_s: float = 30.0):
    """An exclusive flock on the folder itself (no file is created: a reader may not write there) for
    a short block: a pruner's check-then-delete against a reader's place-then-check. Yields whether
    it is held: False where the folder cannot be opened or flock is refused (some network file
    systems), or after `wait_s` (a stopped holder), and the block runs anyway: the lock narrows a
    race, it never stops a run."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    held = False
    if fd is not None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)
