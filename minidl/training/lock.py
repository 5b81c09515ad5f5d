"""One training run per output folder: an advisory lock held while a run writes there.

Two runs writing one --out would mix their files (one run's last.h5, the other's
best.h5), and one would delete the other's temporaries as stale. So a run holds
an flock on `.lock` in the folder from before it touches anything there until it
ends; a second run is refused in one line naming the holder's process id. The
kernel drops an flock when its process dies, so a run killed even with kill -9
never leaves the folder locked.
"""
import errno
import fcntl
import os

from minidl.errors import MinidlError

LOCK_NAME = ".lock"


class FolderLock:
    """A held lock on a folder; release() (or the end of the process) frees it."""

    def __init__(self, folder, fd):
        self.folder, self.fd = folder, fd

    def release(self) -> None:
        if self.fd is not None:
            try:  # before the close: a forked child's copy of the fd must not keep the lock
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:  # a file system without locks: there is none to drop
                pass
            os.close(self.fd)
            self.fd = None


def lock_folder(folder: str) -> "FolderLock":
    """A FolderLock on `folder` (made if missing); MinidlError in one line if another run holds it."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise MinidlError(f"cannot write checkpoints to {folder}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks: go on unlocked
            return FolderLock(folder, fd)
        holder = os.pread(fd, 20, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MinidlError(f"{folder} is in use by another training run (pid {holder}): wait for it to end, "
                              "or give another --out") from None
        raise MinidlError(f"cannot lock {folder}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message a second run prints
    return FolderLock(folder, fd)
