"""The one error type users see.

Anything a user can cause (a bad file, a bad shape, a missing device) raises
MinidlError or a subclass with a one-line message; the CLI prints that line and
exits non-zero. Anything else is a bug in minidl and keeps its traceback.
"""


class MinidlError(Exception):
    """A problem with the user's input, stated in one line."""


class DeviceError(MinidlError):
    """A device name that cannot be parsed, or a device that is not there."""


class DataError(MinidlError):
    """A dataset file that is missing, unreadable or not a minidl dataset."""


class CheckpointError(MinidlError):
    """A checkpoint that is missing, corrupt or does not fit the model."""


class NonFiniteError(MinidlError):
    """A loss, gradient or output that is NaN or infinite: the run diverged."""


class WriteError(MinidlError, OSError):
    """A file that could not be written (a full disk, a read-only folder), named with the reason.
    Also an OSError, so code that carries on without a file it failed to write (a cache) still
    catches it."""
