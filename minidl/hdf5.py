"""Opening minidl's HDF5 files (datasets, checkpoints) and checking what they hold before it is trusted.

Every reader goes through `open_minidl_file`, so a missing file, a file that is
not HDF5 and an HDF5 file of another kind are each refused in one line, the
same way for every kind of file. Then it reads through a `FileCheck`, which
checks each dataset's type and shape before a byte of it is read (a crafted
header may claim 10^12 rows that no memory holds) and each attribute's type
and range, and refuses anything else in one line naming the file and the problem.
"""
import contextlib
import math
import os
from typing import Callable, NamedTuple

import h5py
import numpy as np

# dtype kinds (numpy's letters) a dataset may have; "T" stands for strings of either
# HDF5 kind (fixed or variable length), as numpy 2 names its string kind
FLOAT, INTEGER, FLAG, TEXT = "f", "iu", "iub", "T"
KIND_WORDS = {"f": "floating", "i": "integer", "u": "integer", "b": "boolean", "T": "string"}

# bounds no real file comes near, and that keep what a reader allocates from a header modest
MAX_CLASSES = 10 ** 6
MAX_IMAGE_SIZE = 4096
IMAGE_SIZES = range(1, MAX_IMAGE_SIZE + 1)
MAX_SEED = 2 ** 63 - 1  # a checkpoint keeps the seed as a 64-bit integer; NumPy's generators take any


class Rule(NamedTuple):
    """What an attribute must be: a test of its (Python) value and the words for it in messages."""
    ok: Callable
    expected: str


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # True is an int to Python


def whole(low=0, high=None):
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v and (high is None or v <= high),
                f"a whole number in {low}..{high}" if high is not None else f"a whole number >= {low}")


FINITE = Rule(lambda v: _is_number(v) and math.isfinite(v), "a finite number")
STRING = Rule(lambda v: isinstance(v, str), "a string")


def show(value):
    """A value for a one-line message: short, and an array by its shape, not its contents."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    text = repr(value)  # repr escapes newlines, so the message stays one line
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(dtype):
    if h5py.check_string_dtype(dtype):
        return "strings"
    return {"O": "objects", "V": "a compound type"}.get(dtype.kind, str(dtype))


def _where(parent, name):
    """The path of parent[name] in the file, for messages: 'params/fc.W'."""
    return f"{parent.name}/{name}".lstrip("/")


def _first_line(err):
    return (str(err).splitlines() or [type(err).__name__])[0]


def _fits(shape, spec):
    """Whether `shape` meets `spec`: per axis an exact length or a range of allowed lengths."""
    return len(shape) == len(spec) and all(n in axis if isinstance(axis, range) else n == axis
                                           for n, axis in zip(shape, spec))


def _show_shape(shape):
    axes = [f"{a.start}..{a.stop - 1}" if isinstance(a, range) else str(a) for a in shape]
    return f"({axes[0]},)" if len(axes) == 1 else f"({', '.join(axes)})"


class FileCheck:
    """The checks a reader makes on one open file, each refusing with `error` (a MinidlError class)
    in one line that names the file (`path`) and the problem; `kind` names the file ("dataset")."""

    def __init__(self, path, kind, error):
        self.path, self.kind, self.error = path, kind, error

    def corrupt(self, problem):
        return self.error(f"{self.path} is corrupt: {problem}")

    def missing(self, what):
        return self.error(f"{self.path} is not a minidl {self.kind} (missing {what})")

    @contextlib.contextmanager
    def reading(self, errors=(OSError, KeyError, RuntimeError)):
        """Reads inside this block that fail on a damaged file are refused in one line. h5py raises
        OSError where data cannot be read, KeyError or RuntimeError where metadata is broken."""
        try:
            yield
        except errors as err:
            raise self.error(f"{self.path} is damaged or truncated ({_first_line(err)})") from None

    def member(self, parent, name, cls=h5py.Dataset, required=True):
        """parent[name] as an h5py `cls` (Dataset or Group); None if absent and not `required`.

        Only a plain (hard) link is followed: a soft or external link could lead into
        another file, or to a FIFO that would block the reader forever.
        """
        where = _where(parent, name)
        link = parent.get(name, getlink=True)  # the link itself: nothing is followed yet
        if link is None:
            if required:
                raise self.missing(f"'{where}'")
            return None
        if not isinstance(link, h5py.HardLink):
            raise self.corrupt(f"'{where}' is a link, not stored in the file")
        item = parent[name]
        if not isinstance(item, cls):
            raise self.corrupt(f"'{where}' is not a{' dataset' if cls is h5py.Dataset else ' group'}")
        if cls is h5py.Dataset and (item.is_virtual or item.external):
            raise self.corrupt(f"'{where}' keeps its values in another file")
        return item

    def dataset(self, parent, name, dtype, shape=None, required=True):
        """parent[name], checked before any of it is read: of `dtype` (a numpy dtype, or a string of
        kinds such as FLOAT) and `shape` (per axis an exact length or a range of them; None: any shape)."""
        d = self.member(parent, name, required=required)
        if d is None:
            return None
        kind = "T" if h5py.check_string_dtype(d.dtype) else d.dtype.kind
        dtype_ok = d.dtype == dtype if isinstance(dtype, np.dtype) else kind in dtype
        if not (dtype_ok and d.shape is not None and (shape is None or _fits(d.shape, shape))):
            wanted = str(dtype) if isinstance(dtype, np.dtype) else \
                "/".join(dict.fromkeys(KIND_WORDS[k] for k in dtype))  # "integer" once for "iu"
            has = "an empty dataspace" if d.shape is None else f"{_describe(d.dtype)} of shape {d.shape}"
            raise self.corrupt(f"'{_where(parent, name)}' is {has}, expected {wanted}"
                               + ("" if shape is None else f" of shape {_show_shape(shape)}"))
        return d

    def array(self, parent, name, dtype, shape=None, required=True):
        """The values of `dataset(...)`; floating ones refused if any is NaN or infinite."""
        d = self.dataset(parent, name, dtype, shape, required)
        if d is None:
            return None
        values = d[()]
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise self.corrupt(f"'{_where(parent, name)}' holds NaN or infinity")
        return values

    def fields(self, mapping, rules, where="attribute ", optional=()):
        """{key: value} for each key of `rules` ({key: Rule}), from h5py attrs or a dict, each checked;
        a key in `optional` may be absent (then it is absent from the result too).

        NumPy scalars become Python ones (np.int64 -> int), so a Rule tests plain values.
        """
        values = {}
        for key, rule in rules.items():
            if key not in mapping:
                if key in optional:
                    continue
                raise self.missing(f"{where}'{key}'")
            value = mapping[key]
            value = value.item() if isinstance(value, np.generic) else value
            if not rule.ok(value):
                raise self.corrupt(f"{where}'{key}' is {show(value)}, expected {rule.expected}")
            values[key] = value
        return values


def open_minidl_file(path, kind, format_mark, version, error):
    """`path` as a read-only h5py.File carrying `format_mark` and a version up to `version`; else `error`.

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
        raise error(f"{path} is not a readable HDF5 file ({_first_line(err)})") from None
    check = FileCheck(path, kind, error)
    try:
        with check.reading():
            mark = f.attrs.get("format")
            if not (isinstance(mark, str) and mark == format_mark):
                raise error(f"{path} is not a minidl {kind} (no '{format_mark}' format mark)")
            found = check.fields(f.attrs, {"version": whole(1)})["version"]
        if found > version:
            raise error(f"{path} is a version {found} {kind}; this minidl reads version {version}")
    except BaseException:
        f.close()
        raise
    return f
