"""Softmax cross-entropy, the network's loss."""
from minidl.core import Function, Tensor
from minidl.errors import MinidlError


def log_softmax_array(xp, logits):
    """log softmax over the last axis, stable for large logits (subtract the row max)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


class SoftmaxCrossEntropy(Function):
    """Mean over the batch of -log softmax(logits)[label]."""

    def forward(self, logits, labels):
        xp = self.device.xp
        if logits.ndim != 2:
            raise MinidlError(f"softmax_cross_entropy wants logits of shape (batch, classes), got {logits.shape}")
        if labels.shape != (logits.shape[0],):
            raise MinidlError(f"labels of shape {labels.shape} for logits of shape {logits.shape}: "
                              "want one integer label per row")
        if labels.dtype.kind not in "iu":
            raise MinidlError(f"labels must be integers, got dtype {labels.dtype}")
        n, classes = logits.shape
        if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise MinidlError(f"a label is outside 0..{classes - 1}: labels range "
                              f"{int(labels.min())}..{int(labels.max())}")
        log_p = log_softmax_array(xp, logits)
        self.save(log_p, labels)
        return -log_p[xp.arange(n), labels].mean()

    def backward(self, gy):
        xp = self.device.xp
        log_p, labels = self.saved
        n = log_p.shape[0]
        grad = xp.exp(log_p)
        grad[xp.arange(n), labels] -= 1
        return grad * (gy / n), None


def softmax_cross_entropy(logits, labels):
    if not isinstance(labels, Tensor):  # copied to the logits' device on its stream (Tensor does that)
        labels = Tensor(labels, device=logits.device)
    return SoftmaxCrossEntropy()(logits, labels)


def softmax(logits):
    """Probabilities over the last axis (no graph needed for evaluation)."""
    xp = logits.device.xp
    with logits.device:
        return Tensor(xp.exp(log_softmax_array(xp, logits.data)), device=logits.device)
