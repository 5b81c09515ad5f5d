"""Opening minidl's HDF5 files (datasets, checkpoints) and checking what they hold before it is
trusted.

Every reader opens through `open_minidl_file` (a missing file, a non-HDF5 file and one of another
kind are each refused in one line) and reads through a `FileCheck`, which checks each dataset's
type, shape and storage before a byte of it is read, and each attribute's type and range, and
refuses anything else in one line naming the file and the problem.
"""
from __future__ import annotations

# What a check lets a reader take in is bounded three ways, all before reading (a crafted header
# may claim 10^12 rows that no memory holds, or gzip'd zeros that unpack to gigabytes):
# - every value a dataset declares must be stored in the file (all of its chunks, or all of its
#   contiguous bytes), so a count is bounded by what the file holds;
# - one chunk unpacks to at most MAX_CHUNK_BYTES, which bounds each partial read;
# - the arrays read whole are charged, by declared size, against the file's byte budget
#   (`read_budget`), which bounds what any filter can expand them to.
# Strings are capped by length, fixed-length ones by their type before reading, variable-length
# ones one at a time as they are read, and charged too.
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
# a checkpoint keeps the seed as a 64-bit integer; NumPy's generators take any
MAX_SEED = 2 ** 63 - 1
MAX_NAME_CHARS = 1000  # a class name (ImageNet's longest has 120 characters)

# A file may make a reader take in, over all the arrays read whole, at most EXPANSION times its own
# size plus BUDGET_FLOOR bytes. minidl writes everything it reads whole uncompressed (parameters,
# velocities, labels, statistics, features; only the images are compressed, and they are read a
# chunk at a time), so an honest file declares about its own size, a repacked one (h5repack -f GZIP)
# a few times it: float weights barely compress, and the floor covers small files whose zeros do.
# A compression bomb is refused by what it declares, whatever its filter: gzip alone unpacks 1000:1,
# so a ratio test would let a 10 MB file declare 10 GB; this budget lets it declare ~100 MB.
EXPANSION = 8
BUDGET_FLOOR = 16 * 2 ** 20
# One chunk is unpacked whole by any read that touches it: a 4096x4096 RGB image is 48 MiB.
MAX_CHUNK_BYTES = 64 * 2 ** 20


def read_budget(path):
    """The bytes a reader may take in from the file `path` (see EXPANSION)."""
    return EXPANSION * os.path.getsize(path) + BUDGET_FLOOR


class Rule(NamedTuple):
    """What an attribute must be: a test of its (Python) value and the words for it in messages."""
    ok: Callable
    expected: str


def _is_number(value):
    # True is an int to Python
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(low=0, high=None):
    def test(v):
        return (isinstance(v, int) and not isinstance(v, bool) and low <= v
                and (high is None or v <= high))
    what = f"a whole number in {low}..{high}" if high is not None else f"a whole number >= {low}"
    return Rule(test, what)


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


def _file_itemsize(d):
    """Bytes per value as stored in the file (a variable-length string: its 16-byte heap
    reference)."""
    return d.id.get_type().get_size()


def _show_shape(shape):
    axes = [f"{a.start}..{a.stop - 1}" if isinstance(a, range) else str(a) for a in shape]
    return f"({axes[0]},)" if len(axes) == 1 else f"({', '.join(axes)})"


class FileCheck:
    """The checks a reader makes on one open file, each refusing with `error` (a MinidlError class)
    in one line that names the file (`path`) and the problem; `kind` names the file ("dataset")."""

    def __init__(self, path, kind, error, budget=None):
        self.path, self.kind, self.error = path, kind, error
        self.limit = budget  # bytes the reader may take in: read_budget(path) unless given
        self.spent = 0

    def charge(self, nbytes, what):
        """Count `nbytes` that the reader is about to take in against the budget, or refuse the
        file."""
        if self.limit is None:  # measured at the first read, when the file is open
            self.limit = read_budget(self.path)
        if self.spent + nbytes > self.limit:
            raise self.corrupt(f"{what} would take {nbytes:,} bytes to read, beyond the "
                               f"{self.limit - self.spent:,} bytes left of what a file of "
                               f"{os.path.getsize(self.path):,} bytes may make minidl read")
        self.spent += nbytes

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
            wanted = "a dataset" if cls is h5py.Dataset else "a group"
            raise self.corrupt(f"'{where}' is not {wanted}")
        if cls is h5py.Dataset and (item.is_virtual or item.external):
            raise self.corrupt(f"'{where}' keeps its values in another file")
        return item

    def _stored(self, d, where):
        """Refuse a dataset whose declared values are not all in the file, or whose chunks unpack to
        more than MAX_CHUNK_BYTES: HDF5 fills what is missing from nothing, so a header alone could
        claim 10^8 images (and a chunk larger than the data is unpacked whole on every read)."""
        if d.shape is None or d.size == 0:
            return
        layout = d.id.get_create_plist().get_layout()
        if layout == h5py.h5d.CHUNKED:
            chunk_bytes = math.prod(d.chunks) * d.dtype.itemsize
            if chunk_bytes > MAX_CHUNK_BYTES:
                raise self.corrupt(f"'{where}' has chunks of {chunk_bytes:,} bytes, beyond "
                                   f"{MAX_CHUNK_BYTES:,}")
            expected = math.prod(-(-n // c) for n, c in zip(d.shape, d.chunks))
            stored = d.id.get_num_chunks()
            if stored != expected:
                raise self.corrupt(f"'{where}' of shape {d.shape} stores {stored:,} of its "
                                   f"{expected:,} chunks")
        elif layout == h5py.h5d.CONTIGUOUS:
            declared = d.size * _file_itemsize(d)
            if not declared <= d.id.get_storage_size() <= os.path.getsize(self.path):
                raise self.corrupt(f"'{where}' of shape {d.shape} declares {declared:,} bytes and "
                                   f"stores {d.id.get_storage_size():,}")
        # compact: the values are in the dataset's header itself (at most 64 KiB)

    def dataset(self, parent, name, dtype, shape=None, required=True):
        """parent[name], checked before any of it is read: of `dtype` (a numpy dtype, or a string of
        kinds such as FLOAT) and `shape` (per axis an exact length or a range of them; None: any
        shape), and every value it declares stored in the file."""
        d = self.member(parent, name, required=required)
        if d is None:
            return None
        kind = "T" if h5py.check_string_dtype(d.dtype) else d.dtype.kind
        dtype_ok = d.dtype == dtype if isinstance(dtype, np.dtype) else kind in dtype
        if not (dtype_ok and d.shape is not None and (shape is None or _fits(d.shape, shape))):
            wanted = str(dtype) if isinstance(dtype, np.dtype) else \
                "/".join(dict.fromkeys(KIND_WORDS[k] for k in dtype))  # "integer" once for "iu"
            has = ("an empty dataspace" if d.shape is None
                   else f"{_describe(d.dtype)} of shape {d.shape}")
            raise self.corrupt(f"'{_where(parent, name)}' is {has}, expected {wanted}"
                               + ("" if shape is None else f" of shape {_show_shape(shape)}"))
        self._stored(d, _where(parent, name))
        return d

    def array(self, parent, name, dtype, shape=None, required=True):
        """The values of `dataset(...)`, charged to the budget before they are read; floating ones
        refused if any is NaN or infinite; strings (TEXT) as a tuple of str, each at most
        MAX_NAME_CHARS long."""
        d = self.dataset(parent, name, dtype, shape, required)
        if d is None:
            return None
        if h5py.check_string_dtype(d.dtype):
            return self._strings(d, _where(parent, name))
        self.charge(d.size * d.dtype.itemsize, f"'{_where(parent, name)}'")
        values = d[()]
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise self.corrupt(f"'{_where(parent, name)}' holds NaN or infinity")
        return values

    def _strings(self, d, where):
        """The strings of `d`, each at most MAX_NAME_CHARS long, charged to the budget.

        Fixed-length ones are judged by their type, before anything is read. Variable-length ones
        live in a heap, and many entries may point at one huge string, which nothing tells before it
        is read: so they are read one at a time (each at most the file's size, and refused if too
        long), and charged as they are read.
        """
        info = h5py.check_string_dtype(d.dtype)
        if info.length is not None:
            if info.length > 4 * MAX_NAME_CHARS:  # UTF-8: up to 4 bytes a character
                raise self.corrupt(f"'{where}' holds strings of {info.length:,} bytes, beyond "
                                   f"{MAX_NAME_CHARS:,} characters")
            self.charge(d.size * info.length, f"'{where}'")
            raw = d[()].reshape(-1)
        else:
            raw, one, space = [], np.empty(1, dtype=object), d.id.get_space()
            memory_space, memory_type = h5py.h5s.create_simple((1,)), h5py.h5t.py_create(d.dtype)
            for index in np.ndindex(d.shape):
                space.select_hyperslab(index, (1,) * len(index))
                d.id.read(memory_space, space, one, memory_type)
                if len(one[0]) > 4 * MAX_NAME_CHARS:
                    raise self.corrupt(f"'{where}' holds a string of {len(one[0]):,} bytes, beyond "
                                       f"{MAX_NAME_CHARS:,} characters")
                # 64: what a Python str costs beyond its text
                self.charge(len(one[0]) + 64, f"'{where}'")
                raw.append(one[0])
        try:
            text = tuple(v.decode("utf-8") if isinstance(v, bytes) else v for v in raw)
        except UnicodeDecodeError:
            raise self.corrupt(f"'{where}' is not UTF-8 text") from None
        if any(len(t) > MAX_NAME_CHARS for t in text):
            raise self.corrupt(f"'{where}' holds a string longer than {MAX_NAME_CHARS:,} "
                               "characters")
        return text

    def _small_attribute(self, attrs, key, where):
        """Refuse, before reading it, an attribute that is an array: every minidl attribute is one
        value, and an array of variable-length strings may point each entry at one huge string."""
        shape = attrs.get_id(key).shape
        if shape and math.prod(shape) != 1:
            raise self.corrupt(f"{where}'{key}' is an array of shape {shape}, expected one value")

    def fields(self, mapping, rules, where="attribute ", optional=()):
        """{key: value} for each key of `rules` ({key: Rule}), from h5py attrs or a dict, each
        checked; a key in `optional` may be absent (then it is absent from the result too).

        NumPy scalars become Python ones (np.int64 -> int), so a Rule tests plain values.
        """
        values = {}
        for key, rule in rules.items():
            if key not in mapping:
                if key in optional:
                    continue
                raise self.missing(f"{where}'{key}'")
            if isinstance(mapping, h5py.AttributeManager):
                self._small_attribute(mapping, key, where)
            value = mapping[key]
            value = value.item() if isinstance(value, np.generic) else value
            if not rule.ok(value):
                raise self.corrupt(f"{where}'{key}' is {show(value)}, expected {rule.expected}")
            values[key] = value
        return values


def open_minidl_file(path: str, kind: str, format_mark: str, version: int,
                     error: type[Exception]) -> h5py.File:
    """`path` as a read-only h5py.File carrying `format_mark` and a version up to `version`; else
    `error`.

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
            # the mark's shape first: an array of strings could be anything
            one_value = "format" in f.attrs and f.attrs.get_id("format").shape == ()
            mark = f.attrs["format"] if one_value else None
            if not (isinstance(mark, str) and mark == format_mark):
                raise error(f"{path} is not a minidl {kind} (no '{format_mark}' format mark)")
            found = check.fields(f.attrs, {"version": whole(1)})["version"]
        if found > version:
            raise error(f"{path} is a version {found} {kind}; this minidl reads version {version}")
    except BaseException:
        f.close()
        raise
    return f
