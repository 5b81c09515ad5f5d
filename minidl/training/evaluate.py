"""Evaluation: loss, top-1 and top-5 over a loader, with centre or 10-crop input."""
from contextlib import closing
from typing import Callable, Optional

from minidl.core import Tensor, no_grad
from minidl.data import Loader
from minidl.errors import DataError, NonFiniteError
from minidl.functions.loss import log_softmax_array
from minidl.layers import Layer


def topk_correct(xp, scores, labels, k: int):
    """How many rows have their label among the k highest scores."""
    k = min(k, scores.shape[1])
    if k == 1:  # the training step's count: one pass, not a sort of every row
        return (scores.argmax(axis=1) == labels).sum()
    top = xp.argsort(-scores, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1).sum()


def mean_of_probabilities(xp, log_p):
    """log(mean over axis 1 of exp(log_p)), shifted by the maximum so that a confident
    model's tiny probabilities do not underflow to log(0) = -inf."""
    top = log_p.max(axis=1, keepdims=True)
    return xp.log(xp.exp(log_p - top).mean(axis=1)) + top[:, 0]


def check_labels(num_model_classes: int, num_data_classes: int, data_path: str) -> None:
    """DataError if the data has labels beyond the model's classes."""
    if num_data_classes > num_model_classes:
        raise DataError(f"{data_path} has {num_data_classes} classes but the model has only "
                        f"{num_model_classes}: labels beyond the model's classes")


def evaluate(model: Layer, loader: Loader, reduce: Optional[Callable[[list], list]] = None) -> dict:
    """Mean loss, top-1 and top-5 accuracy of `model` on every batch of `loader`.

    With a 10-crop loader (batches of shape (B, 10, 3, S, S)) the softmax outputs
    of the ten crops are averaged, as in the paper. `reduce` sums a list of
    numbers over the ranks of a data-parallel run, whose loaders each give a shard
    of the split: the figures are then the whole split's, the same on every rank.
    """
    device = model.input_device
    xp = model.output_device.xp
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = nonfinite = 0
    seen = 0
    # closing: an error or Ctrl-C in the loop stops the loader's thread (see BackgroundIterator)
    with no_grad(), closing(loader.epoch_batches(0)) as batches:
        for images, labels in batches:
            crops = images.shape[1] if images.ndim == 5 else 1
            x = Tensor(images.reshape((-1,) + images.shape[-3:]), device=device)
            logits = model(x)
            with model.output_device:
                y = xp.asarray(labels)
                # argmax of NaN is no prediction: images with a non-finite output are counted, and refused below
                outputs_finite = xp.isfinite(logits.data).all(axis=1).reshape(len(labels), crops).all(axis=1)
                nonfinite += (~outputs_finite).sum()
                log_p = log_softmax_array(xp, logits.data)
                if crops > 1:
                    log_p = mean_of_probabilities(xp, log_p.reshape(len(labels), crops, -1))
                loss_sum += -log_p[xp.arange(len(labels)), y].sum()
                top1 += topk_correct(xp, log_p, y, 1)
                top5 += topk_correct(xp, log_p, y, 5)
            seen += len(labels)
    model.train(was_training)
    with model.output_device:  # the one read from the device
        totals = [float(loss_sum), int(top1), int(top5), int(nonfinite), seen]
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, top1, top5, nonfinite, seen = totals
    seen, nonfinite = int(seen), int(nonfinite)
    if seen == 0:
        raise DataError("no images to evaluate: the split is empty")
    if nonfinite:
        raise NonFiniteError(f"the model's outputs are NaN or infinite for {nonfinite} of {seen} images: "
                             "its weights diverged, so no accuracy can be reported")
    return dict(loss=float(loss_sum) / seen, top1=float(top1) / seen, top5=float(top5) / seen, count=seen)
