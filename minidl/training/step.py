"""One training step, shared by the trainer (train.py) and the benchmark (bench.py)."""
from typing import Callable, Optional

from minidl.core import Tensor
from minidl.functions import softmax_cross_entropy
from minidl.layers import Layer, seed_dropout
from minidl.optim import MomentumSGD


def train_step(model: Layer, optimizer: MomentumSGD, x: Tensor, labels, dropout_seed: int, *, first_row: int = 0,
               checked: bool = False, accept: Optional[Callable[[Tensor], bool]] = None):
    """Dropout masks, forward, loss, backward and update; returns (logits, loss, updated).

    `labels` are the loss's (a Tensor on the output device, or host integers it checks);
    `checked` says they were checked against the classes already. `first_row` is the
    batch's first row in the global batch (the dropout masks are a function of it).
    `accept(loss)`, called after backward, returns False to skip the update.
    """
    seed_dropout(model, dropout_seed, first_row=first_row)
    logits = model(x)
    loss = softmax_cross_entropy(logits, labels, checked=checked)
    optimizer.zero_grad()
    loss.backward()
    if accept is not None and not accept(loss):
        return logits, loss, False
    optimizer.step()
    return logits, loss, True
