"""Work that Ctrl-C must not cut in half.

A KeyboardInterrupt raised while a C extension module initialises (matplotlib's
ft2font runs Python code as it is imported) leaves the module half made: the
import fails ("initialization failed") and the interpreter then crashes as it
exits. Such work runs with Ctrl-C held back; the interrupt comes right after it.
"""
import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_held():
    """Inside, a SIGINT is noted, not acted on; on leaving, the usual handler gets it. Only the main thread
    receives Python's signals: elsewhere this holds nothing back, nor needs to."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
