"""The shape checks shared by conv.py's direct path, winograd.py and pooling.py."""
from minidl.errors import MinidlError


def output_size(size: int, ksize: int, stride: int, pad: int, what: str = "convolution") -> int:
    """(size + 2*pad - ksize) // stride + 1, or an error when the window does not fit."""
    if stride < 1:
        raise MinidlError(f"{what} stride must be at least 1, got {stride}")
    if size + 2 * pad < ksize:
        raise MinidlError(f"{what} window {ksize} is larger than the padded input {size} + 2*{pad}")
    return (size + 2 * pad - ksize) // stride + 1


def check_arguments(x, W, b, stride: int, pad: int, groups: int) -> tuple[int, int]:
    """(OH, OW) of conv2d(x, W, b, stride, pad, groups), or a one-line MinidlError saying what
    does not fit."""
    if x.ndim != 4 or W.ndim != 4:
        raise MinidlError(f"conv2d wants x of shape (N, C, H, W) and W of shape "
                          f"(out, in/groups, kh, kw), got {x.shape} and {W.shape}")
    n, c, h, w = x.shape
    out, cg, kh, kw = W.shape
    if groups < 1 or out % groups:
        raise MinidlError(f"conv2d: {out} output channels cannot be split into {groups} groups")
    if cg * groups != c:
        raise MinidlError(f"conv2d: the input has {c} channels but W of shape {W.shape} "
                          f"with groups={groups} expects {cg * groups}")
    if b is not None and b.shape != (out,):
        raise MinidlError(f"conv2d: bias of shape {b.shape} for {out} output channels")
    return output_size(h, kh, stride, pad), output_size(w, kw, stride, pad)
