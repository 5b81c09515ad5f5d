"""Write a file so that nothing already on disk is lost, even if the process is killed.

The new content goes to a temporary file in the same folder (the same file
system, so the rename is atomic), is flushed to disk, and only then replaces
the target; the folder is flushed too, so the rename survives a power cut. On
an error the temporary file is removed and the old file stays. A writer killed
outright (SIGKILL) leaves its temporary behind: its name carries the writer's
process id, and `remove_stale_temporaries` deletes those whose writer is gone.

HDF5 files are written through `atomic_hdf5`, which keeps a failed write (a
full disk) from HDF5: h5py crashes the process (SIGSEGV) when it frees a file
whose write failed (h5py issue 914), after minidl has said what went wrong.
"""
import contextlib
import errno
import glob
import os
import tempfile

import h5py

from minidl.errors import WriteError


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path to write; on success it becomes `path`.

    An OSError while writing (a full disk: ENOSPC) becomes a WriteError naming
    `path` and the reason, in one line; the old file is untouched.
    """
    try:
        with _replacing(path, suffix) as tmp:
            yield tmp
    except WriteError:
        raise
    except OSError as err:
        # h5py words its OSErrors itself ("Can't write data (...)"); the errno's words are plainer
        reason = os.strerror(err.errno) if err.errno else (str(err).splitlines() or [type(err).__name__])[0]
        error = WriteError(f"cannot write {path}: {reason}")
        error.errno = err.errno
        raise error from None


@contextlib.contextmanager
def atomic_hdf5(path):
    """Yield a new h5py.File to write; on success it becomes `path` (see atomic_path).

    HDF5 writes through a file object that records the first failed write and
    reports success, so HDF5 never fails and h5py frees the file cleanly; the
    recorded error is raised once the file is closed, as a WriteError naming `path`.
    """
    with atomic_path(path) as tmp, open(tmp, "w+b") as raw:
        target = _RecordedFailures(raw)
        try:
            with h5py.File(target, "w") as f:
                yield f
        except Exception:
            if target.error is None:
                raise
        if target.error is not None:  # what HDF5 did after it may have failed too: the first cause is the one
            raise target.error from None


class _RecordedFailures:
    """The file object h5py writes through: a write, truncate or flush that fails is recorded, not raised."""

    def __init__(self, raw):
        self.raw, self.error = raw, None
        self.seek, self.tell, self.read, self.readinto = raw.seek, raw.tell, raw.read, raw.readinto

    def _attempt(self, operation, *args):
        if self.error is None:
            try:
                operation(*args)
            except OSError as err:
                self.error = err

    def write(self, data):
        self._attempt(self.raw.write, data)
        return len(data)

    def truncate(self, size):
        self._attempt(self.raw.truncate, size)
        return size

    def flush(self):
        self._attempt(self.raw.flush)


@contextlib.contextmanager
def _replacing(path, suffix):
    if os.path.lexists(path) and not os.path.isfile(path):  # the rename would replace a folder or /dev/null
        raise WriteError(f"cannot write {path}: it exists and is not a file")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = suffix if suffix is not None else os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=suffix + ".tmp",
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        _fsync(tmp, os.O_RDONLY)  # the content is on disk before the name points at it
        os.replace(tmp, path)
        try:
            _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # and so is the new name
        except OSError as e:  # some file systems (network, FUSE) cannot flush a folder: the rename stands
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _fsync(path, flags):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path):
    """Delete the temporaries of `path` whose writing process no longer exists; returns how many."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = 0
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        pid = os.path.basename(tmp)[len(name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
                removed += 1
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
