"""Write a file so that nothing already on disk is lost, even if the process is killed.

The new content goes to a temporary file in the same folder, is flushed to disk, and only then
replaces the target (an atomic rename; the folder is flushed too). On an error the temporary file
is removed and the old file stays. A writer killed outright leaves its temporary behind, named
with its process id: `remove_stale_temporaries` deletes those whose writer is gone. HDF5 files
are written through `atomic_hdf5`.
"""
from __future__ import annotations

# atomic_hdf5 never frees a file whose write failed (a full disk): h5py crashes the process
# (SIGSEGV) freeing one (h5py issue 914), after minidl has said what went wrong.

import contextlib
import errno
import glob
import os
import tempfile
from typing import Iterator

import h5py

from minidl.errors import WriteError


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None) -> Iterator[str]:
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
        raise write_error(path, err) from None


def write_error(path: str, err: OSError) -> WriteError:
    """The one-line WriteError for an OSError met writing `path`."""
    # h5py words its OSErrors itself ("Can't write data (...)"); the errno's words are plainer
    reason = (os.strerror(err.errno) if err.errno
              else (str(err).splitlines() or [type(err).__name__])[0])
    error = WriteError(f"cannot write {path}: {reason}")
    error.errno = err.errno
    return error


@contextlib.contextmanager
def atomic_hdf5(path: str) -> Iterator[h5py.File]:
    """Yield a new h5py.File to write; on success it is closed and becomes `path` (see atomic_path).

    A file whose write failed is never closed nor freed here: h5py crashes the
    process (SIGSEGV) freeing one (h5py issue 914). It is kept, and the command
    line ends the process without freeing it (`hdf5_write_failed`).
    """
    with atomic_path(path) as tmp:
        f = h5py.File(tmp, "w")
        try:
            yield f
            f.close()
        except OSError:
            hold_failed_file(f)
            raise
        except BaseException:
            f.close()
            raise


_failed_files = []  # h5py files whose write failed: kept from being freed


def hold_failed_file(f: h5py.File) -> None:
    """Keep `f`, an h5py file whose write failed, from ever being freed (see atomic_hdf5)."""
    _failed_files.append(f)


def hdf5_write_failed():
    """Whether an HDF5 file failed to write in this process, so that it must end with os._exit."""
    return bool(_failed_files)


@contextlib.contextmanager
def _replacing(path, suffix):
    # the rename would replace a folder or /dev/null
    if os.path.lexists(path) and not os.path.isfile(path):
        raise WriteError(f"cannot write {path}: it exists and is not a file")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = suffix if suffix is not None else os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.",
                               suffix=suffix + ".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def replace_durably(tmp: str, path: str) -> None:
    """Give the finished file `tmp` a normal file's mode, flush it to disk and rename it onto `path`
    (in the same folder), then flush the folder: `path` is the old file or the whole new one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
    _fsync(tmp, os.O_RDONLY)  # the content is on disk before the name points at it
    os.replace(tmp, path)
    try:
        _fsync(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    # some file systems (network, FUSE) cannot flush a folder: the rename stands
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def _fsync(path, flags):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str) -> int:
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
