"""Softmax cross-entropy, the network's loss.

On a GPU the loss is two kernels (loss.cu), forward (a warp per row) and
backward (a thread per element), instead of about twenty whole-array
operations; for float16 or bfloat16 logits they compute in float32, and the
loss (and the log-probabilities kept for backward) are float32. Labels given as a host array are checked on the host, before they
are copied to the device. Labels already on a GPU are checked there, which
reads two numbers back to the host (a wait for the device every step), unless
the caller vouches for them (`checked=True`, as for labels the loader checked
when it read them); a label out of range then gives a NaN loss.
"""
from __future__ import annotations

import numpy as np

from minidl import kernels
from minidl.core import Function, Tensor
from minidl.device import is_array
from minidl.errors import MinidlError

CU = kernels.KernelFile.beside(__file__, "loss.cu", ("log_softmax_nll", "softmax_nll_backward"),
                               types=kernels.HALF_TYPES)


def log_softmax_array(xp, logits):
    """log softmax over the last axis, stable for large logits (subtract the row max)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def _check(logits, labels, read_labels):
    """Shapes and dtypes; the label range too when `read_labels` (a read from the device for device
    labels)."""
    if logits.ndim != 2:
        raise MinidlError("softmax_cross_entropy wants logits of shape (batch, classes), got "
                          f"{logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise MinidlError(f"labels of shape {labels.shape} for logits of shape {logits.shape}: "
                          "want one integer label per row")
    if labels.dtype.kind not in "iu":
        raise MinidlError(f"labels must be integers, got dtype {labels.dtype}")
    n, classes = logits.shape
    if read_labels and n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise MinidlError(f"a label is outside 0..{classes - 1}: labels range "
                          f"{int(labels.min())}..{int(labels.max())}")


class SoftmaxCrossEntropy(Function):
    """Mean over the batch of -log softmax(logits)[label]; of 16-bit logits, in float32 (as autocast does).

    Forward also leaves `top1`, the fraction of rows whose label scored highest (argmax's first maximum), a
    one-element array on the logits' device: the training step's accuracy, made in the loss's own passes."""

    keeps_float32 = True

    def __init__(self, labels_checked=False):
        self.labels_checked = labels_checked  # on a GPU: whether to skip reading the labels back

    def forward_cpu(self, logits, labels):
        _check(logits, labels, read_labels=True)  # host memory: a check costs no wait
        n = logits.shape[0]
        log_p = log_softmax_array(np, logits)
        self.save(log_p, labels)
        self.top1 = (logits.argmax(axis=1) == labels).mean(keepdims=True, dtype=log_p.dtype)
        return -log_p[np.arange(n), labels].mean()

    def backward_cpu(self, gy):
        log_p, labels = self.saved
        n = log_p.shape[0]
        grad = np.exp(log_p)
        grad[np.arange(n), labels] -= 1
        return grad * (gy / n), None

    def forward_gpu(self, logits, labels):
        _check(logits, labels, read_labels=not self.labels_checked)
        n, classes = logits.shape
        # in 0..classes-1 (checked or vouched for): they fit
        labels = labels.astype(np.int32, copy=False)
        # the log-probabilities and losses in the kernels' accumulation type: the logits' dtype, or
        # float32 for float16 and bfloat16 logits (loss.cu)
        accumulated = kernels.scalar_dtype(logits.dtype)
        log_p = kernels.empty(logits.shape, accumulated)
        rows = kernels.empty((2, n), accumulated)  # each row's loss, and whether its label scored highest
        kernels.launch(CU, "log_softmax_nll", logits.dtype, n * 32,  # a warp (32 threads) per row
                       logits, labels, log_p, rows[0], rows[1], n, classes)
        self.logits_dtype = logits.dtype
        self.save(log_p, labels)
        means = rows.mean(axis=1)  # the loss and the top-1 fraction in one reduction
        self.top1 = means[1:]
        return means[0]

    def backward_gpu(self, gy):
        log_p, labels = self.saved
        gx = kernels.empty(log_p.shape, self.logits_dtype)
        kernels.launch(CU, "softmax_nll_backward", self.logits_dtype, log_p.size, log_p, labels,
                       gy.astype(log_p.dtype, copy=False), gx, log_p.size, log_p.shape[1],
                       log_p.shape[0])
        return gx, None


def softmax_cross_entropy(logits: Tensor, labels, checked: bool = False, top1: bool = False):
    """The loss of `logits` (N, C) for integer `labels` (N,); with `top1`, (loss, top-1 fraction): the
    fraction of rows whose label scored highest, a one-element array on the logits' device, not read back.

    Labels are a host array or list (checked here, on the host), or a Tensor or
    device array, checked on its device unless `checked` says they are known to
    be in 0..C-1 already: a GPU then computes without reading them back.
    """
    if isinstance(labels, Tensor):
        function = SoftmaxCrossEntropy(checked)
    elif is_array(labels) and not isinstance(labels, np.ndarray):
        function, labels = SoftmaxCrossEntropy(checked), Tensor(labels, device=logits.device)
    else:
        labels = np.asarray(labels)
        _check(logits.data, labels, read_labels=True)
        if logits.device.is_cuda:
            labels = labels.astype(np.int32)  # what the kernels read: in range, so they fit
        # copied to the logits' device on its stream (Tensor does that)
        function, labels = SoftmaxCrossEntropy(labels_checked=True), Tensor(labels, device=logits.device)
    loss = function(logits, labels)
    return (loss, function.top1) if top1 else loss


def softmax(logits: Tensor) -> Tensor:
    """Probabilities over the last axis (no graph needed for evaluation)."""
    xp = logits.device.xp
    with logits.device:
        return Tensor(xp.exp(log_softmax_array(xp, logits.data)), device=logits.device)
