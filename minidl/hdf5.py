"""Opening minidl's HDF5 files (datasets, checkpoints) after checking that they are ones.

Every reader goes through `open_minidl_file`, so a missing file, a file that is
not HDF5 and an HDF5 file of another kind are each refused in one line, the
same way for every kind of file.
"""
import os

import h5py


def open_minidl_file(path, kind, format_mark, error):
    """`path` as a read-only h5py.File, checked to carry `format_mark`; else `error` (a MinidlError class).

    `kind` names the file in messages ("dataset", "checkpoint"). Use it as a
    context manager: `with open_minidl_file(...) as f:`.
    """
    if not os.path.isfile(path):
        raise error(f"no such {kind} file: {path}")
    if not h5py.is_hdf5(path):
        raise error(f"{path} is not a minidl {kind} (not an HDF5 file)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise error(f"{path} is not a readable HDF5 file ({err})") from None
    if f.attrs.get("format") != format_mark:
        f.close()
        raise error(f"{path} is not a minidl {kind} (no '{format_mark}' format mark)")
    return f
