"""The `minidl` command (minidl_cli.main), and the process-wide settings it makes first."""
import os

# Before NumPy loads OpenBLAS, which reads it once: its worker threads otherwise spin for about 0.1 s
# after every matrix product, holding the cores that minidl's CPU threads (minidl.cpu.threads) need
# between products. A value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
