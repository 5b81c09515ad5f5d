"""Winograd minimal filtering (Lavin & Gray 2016) for 3x3 and 5x5 convolutions, and strided ones.

winograd_conv_forward(x, W, b, pad, groups, tile, stride) computes conv2d's result by
F(m x m, r x r) over t x t tiles, t = m + r - 1, one matrix product per transform position;
winograd_conv_backward gives the exact adjoints. A stride-s convolution runs as a stride-1 one
over s x s blocks of pixels taken as channels (11x11 at stride 4: 3x3 over 48 channels). NumPy
arrays run on the CPU, CuPy arrays on their GPU (the tile copies as winograd.cu's kernels).
On a GPU, float16 and bfloat16 x, W and gy (the "fp16" and "bf16" precisions) are computed in float32: the
tiles, their transforms and products are float32 (winograd.cu widens the 16-bit maps as it copies them into
tiles and rounds each output value once as it sums them back), so y, gx and gW are the float32 path's results
on the same values rounded once (y's float32 bias added after, rounded again, as on the direct path). 16-bit
intermediates would be rounded at each step, and the transforms amplify those roundings (F(5, 3) in float16:
10 to 50 float16 ulps of gx's largest value, measured; under one here). The tiles are float32 then, twice the memory
of 16-bit ones: on a GPU Winograd runs only when asked for. On a GPU every product goes through
minidl.functions.gemm (the transforms 2-D, the per-position products gemm.batched_matmul's cuBLAS strided-batched
GEMMs), at minidl.precision's compute type (TF32 tensor cores for float32 under "tf32"), except that the float32
tiles of 16-bit maps are multiplied in exact FP32 whatever the precision (gemm_precision). The derivation,
float32 error and timings: benchmarks/NOTES.md, "Winograd".
"""
from fractions import Fraction
from math import prod

import ml_dtypes
import numpy as np

from minidl import kernels
from minidl.cpu import openblas
from minidl.cpu import threads as cpu_threads
from minidl.device import cupy
from minidl.errors import MinidlError
from minidl.functions import gemm
from minidl.functions.conv_arguments import check_arguments


def polynomial(roots):
    """The coefficients (lowest degree first) of prod (x - a) over the roots, exactly."""
    coefficients = [Fraction(1)]
    for a in roots:
        coefficients = [Fraction(0)] + coefficients  # times x ...
        for i in range(len(coefficients) - 1):
            coefficients[i] -= a * coefficients[i + 1]  # ... minus a times
    return coefficients


def toom_cook(m, r, points):
    """(B^T, G, A^T) of F(m, r), t = m + r - 1, for t - 1 finite interpolation `points` and
    infinity.

    Lavin & Gray 2016 (and their wincnn tool): evaluate at the points (A^T's columns, G's rows),
    multiply, interpolate back. B^T = V^-T for V the Vandermonde matrix at the points; with G's
    rows scaled by 1 / prod_{l != j}(a_j - a_l), B^T's rows are the coefficients of
    prod_{l != j}(x - a_l) (and of prod_l(x - a_l) for infinity), exact in Fractions.
    """
    t = m + r - 1
    points = [Fraction(a) for a in points]
    if len(set(points)) != t - 1:
        raise ValueError(f"F({m}, {r}) needs {t - 1} distinct finite points, got {points}")
    AT = [[a ** i for a in points] + [int(i == m - 1)] for i in range(m)]
    G = [[a ** k / prod(a - b for b in points if b != a) for k in range(r)] for a in points]
    G.append([int(k == r - 1) for k in range(r)])
    BT = [polynomial([b for b in points if b != a]) + [0] for a in points] + [polynomial(points)]
    return BT, G, AT


class Transform:
    """F(m x m, r x r): its 1-D matrices, checked exact when built, and the filters' 2-D Kronecker
    form."""

    def __init__(self, BT, G, AT):
        self.BT, self.G, self.AT = (np.array(matrix, dtype=np.float64) for matrix in (BT, G, AT))
        self.m, self.t = self.AT.shape  # outputs and inputs per tile side
        self.r = self.G.shape[1]        # the filter's side
        # y_i = sum_j A^T[i, j] (G g)_j (B^T d)_j must be sum_k g_k d_(i+k) for every d and g: the
        # coefficient of g_k d_l is [l == i + k]. Rounding of the float64 entries leaves ~1e-15.
        products = np.einsum("ij,jk,jl->ikl", self.AT, self.G, self.BT)
        correlation = np.array([[np.eye(self.t)[i + k] for k in range(self.r)]
                                for i in range(self.m)])
        error = np.abs(products - correlation).max()
        if error > 1e-12:
            raise ValueError(f"F({self.m}, {self.r}): the matrices are off the correlation by "
                             f"{error:.1e}")
        self.filter = np.kron(self.G, self.G)  # (t*t, r*r): flattened g -> flattened G g G^T

    def filter_matrix(self, xp, dtype):
        """kron(G, G) as an array of xp (a copy to the GPU)."""
        return xp.asarray(self.filter, dtype=dtype)

    def factor(self, name, adjoint=False):
        """The tiles' transform `name` ("input": B^T d B, "output": A^T M A), or its adjoint, is
        kron(P, P) for this 1-D matrix P: B^T or A^T, or their transposes."""
        P = {"input": self.BT, "output": self.AT}[name]
        return P.T if adjoint else P


# The finite interpolation points of F(m x m, r x r), keyed (m, r); infinity is always the last. For
# 3x3 Lavin & Gray's (the matrices equal theirs up to the sign of a position,
# tests/test_winograd.py); for 5x5 the sets with the smallest float32 error of those tried
# (benchmarks/NOTES.md).
POINTS = {
    (2, 3): (0, 1, -1),
    (4, 3): (0, 1, -1, 2, -2),
    (5, 3): (0, 1, -1, Fraction(1, 2), -Fraction(1, 2), 2),
    (2, 5): (0, 1, -1, 2, -Fraction(1, 2)),
    (3, 5): (0, 1, -1, Fraction(1, 2), -Fraction(1, 2), 2),
    (4, 5): (0, 1, -1, Fraction(1, 2), -Fraction(1, 2), 2, -2),
}
TRANSFORMS = {key: Transform(*toom_cook(*key, points)) for key, points in POINTS.items()}


def tiles_for(r):
    """The output tile sizes m with a transform for r x r filters (empty when there is none)."""
    return sorted(m for m, size in TRANSFORMS if size == r)


# Below this many input or output channels per group the transforms, whose work grows with
# in + out, outweigh the saving in the products, which grows with in * out (measurements:
# benchmarks/NOTES.md, "Winograd: how it works").
MIN_CHANNELS = 16


def block_side(k, stride):
    """The side of k x k filters at `stride` once stride x stride blocks of pixels are channels."""
    return -(-k // stride)


def applies(W_shape, stride):
    """Whether Winograd can compute a convolution: square filters of a size with transforms, at
    stride 1 or, over stride x stride blocks of pixels, at their stride (11x11 at stride 4: 3x3
    blocks)."""
    return W_shape[2] == W_shape[3] and bool(tiles_for(block_side(W_shape[2], stride)))


def pays(W_shape, groups, stride=1):
    """Whether Winograd is expected to beat the direct path for filters W_shape
    (out, in/groups, k, k)."""
    return min(W_shape[0] // groups, W_shape[1] * stride * stride) >= MIN_CHANNELS


def fastest_tile(oh, ow, r=3):
    """The tile size with the fewest multiplications for (oh, ow) output maps: t*t per tile, whole
    tiles; a tie goes to the smaller tile, the more accurate (AlexNet's counts:
    benchmarks/NOTES.md).
    """
    def multiplications(m):
        return TRANSFORMS[m, r].t ** 2 * -(-oh // m) * -(-ow // m), m
    return min(tiles_for(r), key=multiplications)


class Saved:
    """What the backward needs: the transformed input and filters, and the shapes."""

    def __init__(self, V, U, x_shape, pad, groups, transform):
        self.V, self.U = V, U  # (t*t, tiles, C) and (t*t, groups, out/groups, C/groups)
        self.x_shape, self.pad, self.groups, self.transform = x_shape, pad, groups, transform
        # for a strided convolution: (stride, pad, x's shape), to map the gradients back
        self.blocks = None


def winograd_conv_forward(x, W, b=None, pad=0, groups=1, tile=None, stride=1):
    """conv2d(x, W, b, stride, pad, groups) for r x r W by F(tile x tile, r x r): (y, Saved for
    the backward).

    W's side r: 3 or 5 (a size in POINTS), or at stride s > 1 its side in s x s
    blocks, ceil(k/s). tile: one of tiles_for(r) (2, 4 or 5 for 3x3, 2, 3 or 4
    for 5x5), or None for fastest_tile's choice. NumPy arrays run on the CPU, CuPy arrays
    on their GPU (the tile copies as winograd.cu's kernels).
    """
    oh, ow = check_arguments(x, W, b, stride, pad, groups)
    if not applies(W.shape, stride):
        sizes = " or ".join(f"{side}x{side}" for side in sorted({side for _, side in TRANSFORMS}))
        raise MinidlError(f"winograd convolution is for {sizes} filters, or strided ones that are "
                          f"{sizes} in stride x stride blocks; got W of shape {W.shape} at stride "
                          f"{stride}")
    if stride > 1:
        r = block_side(W.shape[2], stride)
        blocks = to_blocks(x, stride, pad, oh + r - 1, ow + r - 1)
        y, saved = winograd_conv_forward(blocks, filters_to_blocks(W, stride), b, 0, groups, tile)
        saved.blocks = (stride, pad, x.shape)
        return y, saved
    r = W.shape[2]
    if tile is None:
        tile = fastest_tile(oh, ow, r)
    if tile not in tiles_for(r):
        raise MinidlError(f"winograd tile for {r}x{r} filters must be one of {tiles_for(r)}, got "
                          f"{tile}")
    f = TRANSFORMS[tile, r]
    xp, gather, scatter = _device_parts(x)
    n, c = x.shape[:2]
    out = W.shape[0]
    tiles_h, tiles_w = -(-oh // f.m), -(-ow // f.m)
    positions = f.t * f.t

    # B^T d B of every t x t input tile d (the tiles overlap), as (t*t, tiles, C)
    V = gather(x, f.factor("input"), f.t, f.m, pad, tiles_h, tiles_w).reshape(positions, -1, c)
    U = transform_filters(f, W, groups, xp)
    M = xp.empty((positions, V.shape[1], out), dtype=V.dtype)
    # the products, one per (position, group): (tiles, C/G) @ (C/G, out/G)
    gemm.batched_matmul(by_group(V, groups), U.swapaxes(-1, -2), out=by_group(M, groups),
                        at_precision=gemm_precision(x.dtype))
    # A^T M A of every tile: the m x m output blocks, the overhang past the maps cut off
    y = scatter(M.reshape(positions, -1), f.factor("output"), f.m, f.m, 0, (n, out, oh, ow),
                tiles_h, tiles_w, b, x.dtype)
    return y, Saved(V, U, x.shape, pad, groups, f)


def winograd_conv_backward(gy, W_shape, saved, needs=(True, True, False)):
    """(gx, gW, gb) of winograd_conv_forward, each None unless `needs` asks for it."""
    if saved.blocks is not None:  # a strided convolution: the gradients of the blocks, mapped back
        stride, pad, x_shape = saved.blocks
        side = block_side(W_shape[2], stride)
        blocks_W_shape = (W_shape[0], W_shape[1] * stride * stride, side, side)
        gx, gW, gb = _stride_1_backward(gy, blocks_W_shape, saved, needs)
        return (None if gx is None else from_blocks(gx, stride, pad, x_shape),
                None if gW is None else filters_from_blocks(gW, stride, W_shape), gb)
    return _stride_1_backward(gy, W_shape, saved, needs)


def _stride_1_backward(gy, W_shape, saved, needs):
    f = saved.transform
    xp, gather, scatter = _device_parts(gy)
    oh, ow = gy.shape[2:]
    tiles_h, tiles_w = -(-oh // f.m), -(-ow // f.m)
    positions = f.t * f.t
    V, U, groups = saved.V, saved.U, saved.groups

    gx = gW = gb = None
    at = gemm_precision(gy.dtype)
    if needs[2]:  # a 16-bit gy's sum in float32, as the direct path's (a float32 bias's gradient)
        gb = gy.sum(axis=(0, 2, 3), dtype=np.float32 if gy.dtype in HALF_DTYPES else None)
    # A gY A^T of gy's m x m blocks gY, with zeros on the overhang (the adjoint of cutting it off)
    gM = gather(gy, f.factor("output", adjoint=True), f.m, f.m, 0, tiles_h, tiles_w)
    gM = gM.reshape(positions, V.shape[1], -1)
    if needs[1]:
        # (t*t, G, out/G, C/G): (out/G, tiles) @ (tiles, C/G), the sum over the tiles inside the
        # product
        gU = gemm.batched_matmul(by_group(gM, groups).swapaxes(-1, -2), by_group(V, groups), at_precision=at)
        # G^T gU G (for 16-bit gy: in float32, rounded once to gy's dtype)
        gW = gemm.matmul(gU.reshape(positions, -1).T, f.filter_matrix(xp, gU.dtype), at).reshape(W_shape)
        gW = gW.astype(gy.dtype, copy=False)
    if needs[0]:
        gV = xp.empty_like(V)
        gemm.batched_matmul(by_group(gM, groups), U, out=by_group(gV, groups), at_precision=at)  # (t*t, tiles, C)
        # B gV B^T of every tile, summed where the tiles overlap
        gx = scatter(gV.reshape(positions, -1), f.factor("input", adjoint=True), f.t, f.m,
                     saved.pad, saved.x_shape, tiles_h, tiles_w, None, gy.dtype)
    return gx, gW, gb


def _device_parts(array):
    """(array module, gather, scatter) for the array's device: NumPy's, or CuPy's and winograd.cu's
    kernels."""
    if isinstance(array, np.ndarray):
        return np, gather_cpu, scatter_cpu
    return cupy(), gather_gpu, scatter_gpu


def transform_filters(f, W, groups, xp=np):
    """U = G g G^T of every filter, as (t*t, groups, out/groups, in/groups): in W's dtype, float32 for 16-bit
    W (kron(G, G) is not exact in 16 bits)."""
    out, cg = W.shape[:2]
    dtype = accumulation_dtype(W.dtype)
    # (t*t, out*C/G), contiguous
    U = gemm.matmul(f.filter_matrix(xp, dtype), W.reshape(out * cg, f.r * f.r).T.astype(dtype, copy=False),
                    gemm_precision(W.dtype))
    return U.reshape(f.t * f.t, groups, out // groups, cg)


# float16 and bfloat16: computed in float32 (their accumulation type, half.cuh's Acc)
HALF_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def accumulation_dtype(dtype) -> np.dtype:
    """The dtype of the tiles, transforms and products for maps of `dtype`: float32 for 16-bit ones."""
    return np.dtype(np.float32) if np.dtype(dtype) in HALF_DTYPES else np.dtype(dtype)


def gemm_precision(dtype):
    """The precision of the GEMMs on the tiles of maps of `dtype` (gemm's at_precision): exact FP32 for 16-bit
    maps, whose float32 tiles TF32 would round to about the maps' own 11 bits, which the transforms amplify
    (F(4, 3), F(5, 3), F(3, 5), F(4, 5) with TF32 GEMMs: 10 to 41 float16 ulps of the largest value, measured,
    against under one with FP32: benchmarks/NOTES.md, "Winograd's products"); None (minidl.precision's) for
    the others."""
    return "fp32" if np.dtype(dtype) in HALF_DTYPES else None


def by_group(a, groups):
    """(t*t, tiles, channels) as a view (t*t, groups, tiles, channels/groups): one matrix per
    product."""
    positions, tiles, channels = a.shape
    return a.reshape(positions, tiles, groups, channels // groups).transpose(0, 2, 1, 3)


# --- Strided convolutions as stride-1 ones over blocks of pixels (space to depth)

def to_blocks(x, s, pad, rows, cols):
    """x (N, C, H, W), padded by `pad`, as (N, C*s*s, rows, cols): pixel (s*i + a, s*j + b) as pixel
    (i, j) of channel c*s*s + a*s + b, zeros past the padded input. The same copies on both devices;
    on the CPU each core takes a share of the batch."""
    xp = cupy() if not isinstance(x, np.ndarray) else np
    n, c, h, w = x.shape
    blocks = xp.zeros((n, c, s, s, rows, cols), dtype=x.dtype)

    def copy(images):
        for a, (i0, i1, first_row) in enumerate(_block_spans(s, pad, h, rows)):
            for b, (j0, j1, first_col) in enumerate(_block_spans(s, pad, w, cols)):
                pixels = x[images, :, first_row::s, first_col::s]
                blocks[images, :, a, b, i0:i1, j0:j1] = pixels[:, :, :i1 - i0, :j1 - j0]
    if xp is np:
        cpu_threads.in_parallel(copy, blocks)
    else:
        copy(slice(None))
    return blocks.reshape(n, c * s * s, rows, cols)


def from_blocks(blocks, s, pad, shape):
    """The adjoint of to_blocks, (N, C*s*s, rows, cols) -> (N, C, H, W) of `shape`: each pixel from
    its one place among the blocks (zeros for pixels no block holds)."""
    xp = cupy() if not isinstance(blocks, np.ndarray) else np
    n, c, h, w = shape
    rows, cols = blocks.shape[2:]
    blocks = blocks.reshape(n, c, s, s, rows, cols)
    x = xp.zeros(shape, dtype=blocks.dtype)
    for a, (i0, i1, first_row) in enumerate(_block_spans(s, pad, h, rows)):
        for b, (j0, j1, first_col) in enumerate(_block_spans(s, pad, w, cols)):
            x[:, :, first_row:first_row + s * (i1 - i0):s,
              first_col:first_col + s * (j1 - j0):s] = \
                blocks[:, :, a, b, i0:i1, j0:j1]
    return x


def _block_spans(s, pad, size, count):
    """For each offset a in a block: (first, end, source) such that blocks first..end-1 at offset a
    hold the input pixels source, source + s, ... (padded position s*i + a is input pixel
    s*i + a - pad)."""
    spans = []
    for a in range(s):
        first = max(0, -(-(pad - a) // s))  # the first block whose pixel a is inside the input
        end = min(count, (size + pad - a + s - 1) // s)  # one past the last
        spans.append((first, max(first, end), s * first + a - pad))
    return spans


def filters_to_blocks(W, s):
    """W (out, C, k, k), padded with zeros to a multiple of s, as (out, C*s*s, k', k'),
    k' = ceil(k/s): tap (s*u + a, s*v + b) as tap (u, v) of channel c*s*s + a*s + b, matching
    to_blocks."""
    xp = cupy() if not isinstance(W, np.ndarray) else np
    out, c, k = W.shape[:3]
    side = block_side(k, s)
    padded = xp.zeros((out, c, side * s, side * s), dtype=W.dtype)
    padded[:, :, :k, :k] = W
    by_offset = padded.reshape(out, c, side, s, side, s).transpose(0, 1, 3, 5, 2, 4)
    return by_offset.reshape(out, c * s * s, side, side)


def filters_from_blocks(gW, s, W_shape):
    """The adjoint of filters_to_blocks: (out, C*s*s, k', k') -> W_shape (out, C, k, k), the padding
    dropped."""
    xp = cupy() if not isinstance(gW, np.ndarray) else np
    out, c, k = W_shape[:3]
    side = gW.shape[2]
    by_tap = gW.reshape(out, c, s, s, side, side).transpose(0, 1, 4, 2, 5, 3)
    full = by_tap.reshape(out, c, side * s, side * s)
    return xp.ascontiguousarray(full[:, :, :k, :k])


# --- The tiles: gather (N, C, H, W) maps into transformed t x t windows, (side*side, tiles*C), and
# scatter (sum) them back. The transform of a window is kron(P, P) @ its flattened pixels: P applied
# along each side.

CU = kernels.KernelFile.beside(__file__, "winograd.cu", ("gather_tiles", "scatter_tiles"),
                               types=kernels.HALF_TYPES)


def gather_gpu(x, P, t, m, pad, tiles_h, tiles_w):
    """kron(P, P) @ the t x t windows at stride m of x padded by `pad` (zeros past its edges), for P
    (side, t): (side*side, tiles*C), in x's accumulation dtype (float32 for 16-bit x, widened exactly)."""
    n, c, h, w = x.shape
    acc = accumulation_dtype(x.dtype)
    windows = kernels.empty((t * t, n * tiles_h * tiles_w * c), acc)
    kernels.launch(CU, "gather_tiles", x.dtype, windows.size, x, windows, windows.size, n, c, h, w,
                   t, m, pad, tiles_h, tiles_w)
    return gemm.matmul(cupy().asarray(np.kron(P, P), dtype=acc), windows, gemm_precision(x.dtype))


def scatter_gpu(tiles, P, t, m, pad, shape, tiles_h, tiles_w, b=None, dtype=None):
    """The adjoint of gather_gpu for P (t, a), tiles (a*a, tiles*C): maps of `shape` (N, C, H, W),
    each pixel the sum of the t x t windows kron(P, P) @ tiles that hold it; plus b per channel. The maps'
    `dtype`: tiles' own, or a 16-bit one for float32 tiles (each sum rounded once)."""
    dtype = tiles.dtype if dtype is None else np.dtype(dtype)
    windows = gemm.matmul(cupy().asarray(np.kron(P, P), dtype=tiles.dtype), tiles, gemm_precision(dtype))
    out = kernels.empty(shape, dtype)
    kernels.launch(CU, "scatter_tiles", dtype, out.size, windows, out, out.size, *shape, t, m,
                   pad, tiles_h, tiles_w)
    if b is not None and b.dtype != out.dtype:  # a float32 bias of 16-bit maps: added in float32, rounded once
        out = (out + b.reshape(1, -1, 1, 1)).astype(out.dtype)
    elif b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


# On the CPU both go a few images at a time (a slab), each core taking a share of the batch: a
# slab's windows stay in the cache from their copy through both passes of the transform.

SLAB_BYTES = 1 << 21  # the windows of a slab's images (2 MB: benchmarks/NOTES.md, "by_slabs")


def gather_cpu(x, P, t, m, pad, tiles_h, tiles_w):
    """kron(P, P) @ the t x t windows at stride m of x padded by `pad` (zeros past its edges), for P
    (side, t): (side*side, tiles*C)."""
    n, c, h, w = x.shape
    P = P.astype(x.dtype)
    side = len(P)
    per_image = tiles_h * tiles_w * c  # columns
    out = np.empty((side, side, n * per_image), dtype=x.dtype)

    def slab(images):
        x_last = to_channels_last(x[images], pad, (tiles_h - 1) * m + t, (tiles_w - 1) * m + t)
        windows = gather_windows(x_last, t, m, tiles_h, tiles_w)
        kron_product(P, windows, out[:, :, images.start * per_image:images.stop * per_image])
    by_slabs(n, x.itemsize * max(t, side) ** 2 * per_image, slab)
    return out.reshape(side * side, -1)


def scatter_cpu(tiles, P, t, m, pad, shape, tiles_h, tiles_w, b=None, dtype=None):
    """The adjoint of gather_cpu for P (t, a), tiles (a*a, tiles*C): maps of `shape` (N, C, H, W),
    each pixel the sum of the t x t windows kron(P, P) @ tiles that hold it; plus b per channel. `dtype` is
    ignored: the CPU computes in the tiles' dtype (its Functions widen 16-bit arrays to float32)."""
    n, c, h, w = shape
    a = P.shape[1]
    P = P.astype(tiles.dtype)
    per_image = tiles_h * tiles_w * c
    tiles = tiles.reshape(a, a, -1)
    out = np.empty(shape, dtype=tiles.dtype)

    def slab(images):
        windows = np.empty((t, t, images.stop - images.start, tiles_h, tiles_w, c),
                           dtype=tiles.dtype)
        kron_product(P, tiles[:, :, images.start * per_image:images.stop * per_image],
                     windows.reshape(t, t, -1))
        from_channels_last(add_windows(windows, m), pad, h, w, out[images], b)
    by_slabs(n, tiles.itemsize * max(t, a) ** 2 * per_image, slab)
    return out


def by_slabs(n, image_bytes, slab):
    """slab(images) for slices of range(n), about SLAB_BYTES' worth of images each, shared out
    among the cores.

    The slabs are cut the same way whatever the core count, and their products run on one BLAS
    thread (cpu_threads.in_slabs), so that the results do not depend on the core count (the BLAS
    rounds a column by where it falls in a product and by its thread count).
    """
    per_slab = max(1, SLAB_BYTES // image_bytes)
    slabs = [slice(first, min(n, first + per_slab)) for first in range(0, n, per_slab)]
    cpu_threads.in_slabs(slab, slabs)


def kron_product(P, x, out):
    """out = kron(P, P) @ x, for x (a, a, columns) and out (b, b, columns) of P (b, a).

    P goes along each side in turn: b*a*a + b*b*a multiplications a column instead of the
    Kronecker matrix's b*b*a*a (benchmarks/NOTES.md, "kron_product").
    """
    b, a = P.shape
    half = np.empty((a, b, x.shape[2]), dtype=x.dtype)
    np.matmul(P, x.transpose(1, 0, 2), out=half)  # half[j, k] = sum_i P[k, i] x[i, j]
    np.matmul(P, half.transpose(1, 0, 2), out=out)  # out[k, l] = sum_j P[l, j] half[j, k]


# --- The CPU's layouts. The window copies run with the channels last (N, H, W, C): every copy and
# add then moves whole rows of channels, where in NCHW it would move runs of 2 to 7 pixels, which
# NumPy does at a fraction of the speed. Windows are numbered (image, tile row, tile column).

def to_channels_last(x, pad, rows, cols):
    """(N, rows, cols, C) zeros with x (N, C, H, W) placed at (pad, pad)."""
    n, c, h, w = x.shape
    x_last = np.empty((n, rows, cols, c), dtype=x.dtype)
    x_last[:, :pad] = 0
    x_last[:, pad + h:] = 0
    x_last[:, pad:pad + h, :pad] = 0
    x_last[:, pad:pad + h, pad + w:] = 0
    # an image's pixels are then the first h*w rows of its (rows*cols, C)
    unpadded = pad == 0 and cols == w
    pixels = None if unpadded else np.empty((h * w, c), dtype=x.dtype)
    for image in range(n):  # each image's (C, H*W) matrix transposed
        if unpadded:
            openblas.transpose(x[image].reshape(c, h * w),
                               x_last[image].reshape(rows * cols, c)[:h * w])
        else:
            openblas.transpose(x[image].reshape(c, h * w), pixels)
            x_last[image, pad:pad + h, pad:pad + w] = pixels.reshape(h, w, c)
    return x_last


def from_channels_last(x_last, top_left, h, w, out, b=None):
    """The (N, C, h, w) maps at (top_left, top_left) of x_last (N, rows, cols, C), plus b per
    channel, into out."""
    n, rows, cols, c = x_last.shape
    unpadded = top_left == 0 and cols == w
    for image in range(n):
        if unpadded:
            pixels = x_last[image].reshape(rows * cols, c)[:h * w]
        else:
            pixels = np.ascontiguousarray(x_last[image, top_left:top_left + h,
                                                 top_left:top_left + w]).reshape(h * w, c)
        openblas.transpose(pixels, out[image].reshape(c, h * w))
    if b is not None:
        out += b.reshape(c, 1, 1)
    return out


def gather_windows(x_last, t, m, tiles_h, tiles_w):
    """The t x t windows at stride m of x_last (N, H, W, C), as (t, t, windows*C): window position
    first."""
    n, h, w, c = x_last.shape
    windows = np.empty((t, t, n, tiles_h, tiles_w, c), dtype=x_last.dtype)
    windows[...] = window_view(x_last, range(t), range(t), m, tiles_h, tiles_w)
    return windows.reshape(t, t, -1)


def add_windows(windows, m):
    """The adjoint of gather_windows for windows (t, t, N, tiles_h, tiles_w, C):
    (N, tiles_h*m + t - m, tiles_w*m + t - m, C), overlapping windows summed."""
    t, _, n, tiles_h, tiles_w, c = windows.shape
    out = np.empty((n, tiles_h * m + t - m, tiles_w * m + t - m, c), dtype=windows.dtype)
    # the overhang of the last tiles, which the first positions below do not reach
    out[:, tiles_h * m:] = 0
    out[:, :tiles_h * m, tiles_w * m:] = 0
    # Positions i, i + 1, ... i + m - 1 of every window cover each row once; so do m columns. Each
    # such m x m group of positions is one copy (the first) or one add, with no pixel twice in a
    # call.
    groups = [range(first, min(t, first + m)) for first in range(0, t, m)]
    for rows in groups:
        for cols in groups:
            view = window_view(out, rows, cols, m, tiles_h, tiles_w)
            if rows.start == cols.start == 0:
                view[...] = windows[rows.start:rows.stop, cols.start:cols.stop]
            else:
                view += windows[rows.start:rows.stop, cols.start:cols.stop]
    return out


def window_view(a, rows, cols, m, tiles_h, tiles_w):
    """A view (len(rows), len(cols), N, tiles_h, tiles_w, C) of a (N, H, W, C): [i, j, n, y, x] is
    pixel (m*y + rows[i], m*x + cols[j]) of image n, position (rows[i], cols[j]) of window
    (y, x)."""
    image, row, col, channel = a.strides
    return np.lib.stride_tricks.as_strided(a[:, rows.start:, cols.start:],
                                           shape=(len(rows), len(cols), a.shape[0], tiles_h,
                                                  tiles_w, a.shape[3]),
                                           strides=(row, col, image, m * row, m * col, channel))
