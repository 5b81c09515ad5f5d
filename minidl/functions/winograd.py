"""Winograd minimal filtering for 3x3 stride-1 convolutions (conv2d's choice on the CPU).

Why. A direct 3x3 convolution spends 9 multiplications per output pixel and
(input, output) channel pair. Winograd's F(m x m, 3 x 3) (Lavin & Gray 2016,
"Fast Algorithms for Convolutional Neural Networks") computes an m x m block
of outputs from a t x t input tile, t = m + 2, with t*t multiplications
instead of 9*m*m: 16 instead of 36 for F(2x2, 3x3) (2.25x fewer), 36 instead
of 144 for F(4x4, 3x3) (4x fewer). The channel sums stay matrix products.

How. In one dimension, F(m, 3) gives m outputs of the correlation of an input
d (t values) with a filter g (3 values) as

    y = A^T [(G g) * (B^T d)]          (* elementwise, t products)

and in two dimensions, for a t x t input tile d and a 3x3 filter g,

    Y = A^T [(G g G^T) * (B^T d B)] A.

B^T (t x t), G (t x 3) and A^T (m x t) come from polynomial interpolation
at t points (0, +-1, +-2, ... and infinity); they are the matrices below. For a
convolution layer, U = G g G^T is the transformed filter for each (output,
input) channel pair and V = B^T d B the transformed input for each (input
channel, tile) pair. The sum over input channels commutes with the transforms,
so for each of the t*t transform positions p the layer is ONE matrix product

    M[p] = U[p] @ V[p]      (out, in) @ (in, tiles)  ->  (out, tiles)

(per group, the batch inside the tiles, as in conv.py's direct path), and
Y = A^T M A per tile gives the output. The transforms are written as products
with Kronecker matrices (kron(B^T, B^T) maps a flattened tile to its flattened
transform), so they too run in the BLAS.

Tiles. Output tiles are m x m; input tiles overlap by 2. The input is padded
with zeros on the right and bottom so that whole tiles cover the output
(13x13 maps take 7x7 tiles of F(2x2) = 14x14 outputs, or 4x4 tiles of F(4x4)
= 16x16); the outputs past the real map are cut off.

Backward. Every step above is linear, so the gradients are its adjoints, in
reverse order: gM = A gY A^T per tile; the weight gradient
gU[p] = gM[p] @ V[p]^T summed over the tiles, then gW = G^T gU G; the input
gradient gV[p] = U[p]^T @ gM[p], then gd = B gV B^T per tile, summed back
into the input where tiles overlap (scatter_tiles). They are the exact
adjoints of the forward: float64 gradient checks pass.

Devices. Everything but the tile copies is matrix products, the same code
for NumPy and CuPy arrays. The copies are a pair per device: on the CPU
NumPy copies in a channels-last layout, each core taking a share of the
batch; on a GPU the two kernels of winograd.cu (the scatter a gather per
pixel, as conv.cu's col2im, so no atomics). conv2d's "auto" takes this path
on the CPU only (benchmarks/NOTES.md says why); "winograd" takes it anywhere.

Error. The transforms multiply and add values of different sizes (F(4x4)'s
B^T has entries 4 and -5, its A^T up to 8, its G 1/6 and 1/24), so rounding
errors grow. In float32, against a float64 direct convolution at AlexNet's
conv4 shape, the direct path is off by about 3e-7 of the output's size (rms),
F(2x2) by 4e-7 and F(4x4) by 3e-6 (largest errors 4e-7, 7e-7 and 1e-5 of the
largest output): the gradients likewise (tests/test_winograd.py,
benchmarks/NOTES.md). Far below what training notices, and F(4x4) is used
where it saves the most multiplications (fastest_tile).
"""
import numpy as np

from minidl import kernels
from minidl.cpu_parallel import in_parallel
from minidl.device import cupy
# conv imports this module for Conv2d, and this module checks arguments with conv's check:
# a module import (attributes looked up at call time) works whichever is imported first
from minidl.functions import conv
from minidl.errors import MinidlError


class Transform:
    """F(m x m, 3 x 3): its 1-D matrices and their 2-D Kronecker forms."""

    def __init__(self, BT, G, AT):
        self.BT, self.G, self.AT = (np.array(matrix, dtype=np.float64) for matrix in (BT, G, AT))
        self.m, self.t = self.AT.shape  # outputs and inputs per tile side
        self.input = np.kron(self.BT, self.BT)    # (t*t, t*t): flattened d -> flattened B^T d B
        self.filter = np.kron(self.G, self.G)     # (t*t, 9):   flattened g -> flattened G g G^T
        self.output = np.kron(self.AT, self.AT)   # (m*m, t*t): flattened M -> flattened A^T M A

    def matrix(self, name, xp, dtype):
        """The Kronecker matrix `name` ("input", "filter" or "output") as an array of xp (a copy to the GPU)."""
        return xp.asarray(getattr(self, name), dtype=dtype)


# Lavin & Gray 2016, section 4.1 (F(2x2)) and 4.2 (F(4x4)); interpolation points 0, +-1 (, +-2), infinity
TRANSFORMS = {
    2: Transform(BT=[[1, 0, -1, 0],
                     [0, 1, 1, 0],
                     [0, -1, 1, 0],
                     [0, 1, 0, -1]],
                 G=[[1, 0, 0],
                    [1 / 2, 1 / 2, 1 / 2],
                    [1 / 2, -1 / 2, 1 / 2],
                    [0, 0, 1]],
                 AT=[[1, 1, 1, 0],
                     [0, 1, -1, -1]]),
    4: Transform(BT=[[4, 0, -5, 0, 1, 0],
                     [0, -4, -4, 1, 1, 0],
                     [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0],
                     [0, 4, 0, -5, 0, 1]],
                 G=[[1 / 4, 0, 0],
                    [-1 / 6, -1 / 6, -1 / 6],
                    [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6],
                    [1 / 24, -1 / 12, 1 / 6],
                    [0, 0, 1]],
                 AT=[[1, 1, 1, 1, 1, 0],
                     [0, 1, -1, 2, -2, 0],
                     [0, 1, 1, 4, 4, 0],
                     [0, 1, -1, 8, -8, 1]]),
}

# Below this many input or output channels per group the transforms, whose work grows with
# in + out, outweigh the saving in the products, which grows with in * out. Measured on one core:
# 3 -> 16 channels (32x32 maps) 2-3x slower than direct, 16 -> 16 (13x13) a tie, 192 -> 128 2x faster.
MIN_CHANNELS = 16


def pays(W_shape, groups):
    """Whether Winograd is expected to beat the direct path for filters W_shape (out, in/groups, 3, 3)."""
    return min(W_shape[0] // groups, W_shape[1]) >= MIN_CHANNELS


def fastest_tile(oh, ow):
    """The tile size with the fewest multiplications for (oh, ow) output maps: t*t per tile, whole tiles.

    On 13x13 maps (AlexNet's conv3-conv5) F(4x4) takes 36 * 4*4 = 576 per
    channel pair, F(2x2) 16 * 7*7 = 784, direct 9 * 13*13 = 1521. A tie goes
    to F(2x2), the more accurate.
    """
    return min(TRANSFORMS, key=lambda m: (TRANSFORMS[m].t ** 2 * -(-oh // m) * -(-ow // m), m))


class Saved:
    """What the backward needs: the transformed input and filters, and the shapes."""

    def __init__(self, V, U, x_shape, pad, groups, tile):
        self.V, self.U = V, U  # (t*t, tiles, C) and (t*t, groups, out/groups, C/groups)
        self.x_shape, self.pad, self.groups, self.tile = x_shape, pad, groups, tile


def winograd_conv_forward(x, W, b=None, pad=0, groups=1, tile=None):
    """conv2d(x, W, b, stride=1, pad, groups) for 3x3 W by F(tile x tile, 3x3): (y, Saved for the backward).

    tile: 2 or 4, or None for fastest_tile's choice. NumPy arrays run on the
    CPU, CuPy arrays on their GPU (the tile copies as winograd.cu's kernels).
    """
    oh, ow = conv.check_arguments(x, W, b, 1, pad, groups)
    if W.shape[2:] != (3, 3):
        raise MinidlError(f"winograd convolution is for 3x3 filters, got W of shape {W.shape}")
    if tile is None:
        tile = fastest_tile(oh, ow)
    if tile not in TRANSFORMS:
        raise MinidlError(f"winograd tile must be one of {sorted(TRANSFORMS)}, got {tile}")
    f = TRANSFORMS[tile]
    xp, gather, scatter = _device_parts(x)
    n, c = x.shape[:2]
    out = W.shape[0]
    tiles_h, tiles_w = -(-oh // f.m), -(-ow // f.m)
    positions = f.t * f.t

    d = gather(x, f.t, f.m, pad, tiles_h, tiles_w)  # (t*t, tiles*C): the overlapping input tiles
    V = (f.matrix("input", xp, x.dtype) @ d).reshape(positions, -1, c)  # (t*t, tiles, C): B^T d B of every tile
    del d
    U = transform_filters(f, W, groups, xp)
    M = xp.empty((positions, V.shape[1], out), dtype=x.dtype)
    # the products, one per (position, group): (tiles, C/G) @ (C/G, out/G)
    xp.matmul(by_group(V, groups), U.swapaxes(-1, -2), out=by_group(M, groups))
    y_blocks = f.matrix("output", xp, x.dtype) @ M.reshape(positions, -1)  # (m*m, tiles*out): A^T M A
    del M
    y = scatter(y_blocks, f.m, f.m, 0, (n, out, oh, ow), tiles_h, tiles_w, b)  # the overhang cut off
    return y, Saved(V, U, x.shape, pad, groups, tile)


def winograd_conv_backward(gy, W_shape, saved, needs=(True, True, False)):
    """(gx, gW, gb) of winograd_conv_forward, each None unless `needs` asks for it."""
    f = TRANSFORMS[saved.tile]
    xp, gather, scatter = _device_parts(gy)
    oh, ow = gy.shape[2:]
    tiles_h, tiles_w = -(-oh // f.m), -(-ow // f.m)
    positions = f.t * f.t
    V, U, groups = saved.V, saved.U, saved.groups

    gx = gW = gb = None
    if needs[2]:
        gb = gy.sum(axis=(0, 2, 3))
    # gy's m x m blocks, tile by tile, with zeros on the overhang (the adjoint of cutting it off)
    gy_blocks = gather(gy, f.m, f.m, 0, tiles_h, tiles_w)  # (m*m, tiles*out)
    gM = (f.matrix("output", xp, gy.dtype).T @ gy_blocks).reshape(positions, V.shape[1], -1)  # A gY A^T
    del gy_blocks
    if needs[1]:
        # (t*t, G, out/G, C/G): (out/G, tiles) @ (tiles, C/G), the sum over the tiles inside the product
        gU = by_group(gM, groups).swapaxes(-1, -2) @ by_group(V, groups)
        gW = (gU.reshape(positions, -1).T @ f.matrix("filter", xp, gU.dtype)).reshape(W_shape)  # G^T gU G
    if needs[0]:
        gV = xp.empty_like(V)
        xp.matmul(by_group(gM, groups), U, out=by_group(gV, groups))  # (t*t, tiles, C)
        gd = f.matrix("input", xp, gV.dtype).T @ gV.reshape(positions, -1)  # (t*t, tiles*C): B gV B^T
        del gV
        gx = scatter(gd, f.t, f.m, saved.pad, saved.x_shape, tiles_h, tiles_w)  # overlaps summed
    return gx, gW, gb


def _device_parts(array):
    """(array module, gather, scatter) for the array's device: NumPy's, or CuPy's and winograd.cu's kernels."""
    if isinstance(array, np.ndarray):
        return np, gather_cpu, scatter_cpu
    return cupy(), gather_gpu, scatter_gpu


def transform_filters(f, W, groups, xp=np):
    """U = G g G^T of every filter, as (t*t, groups, out/groups, in/groups)."""
    out, cg = W.shape[:2]
    U = f.matrix("filter", xp, W.dtype) @ W.reshape(out * cg, 9).T  # (t*t, out*C/G), contiguous
    return U.reshape(f.t * f.t, groups, out // groups, cg)


def by_group(a, groups):
    """(t*t, tiles, channels) as a view (t*t, groups, tiles, channels/groups): one matrix per product."""
    positions, tiles, channels = a.shape
    return a.reshape(positions, tiles, groups, channels // groups).transpose(0, 2, 1, 3)


# --- The tile copies: gather (N, C, H, W) maps into (t*t, tiles*C) tiles, and scatter (sum) them back

CU = kernels.KernelFile.beside(__file__, "winograd.cu", ("gather_tiles", "scatter_tiles"))


def gather_cpu(x, t, m, pad, tiles_h, tiles_w):
    """The t x t windows at stride m of x padded by `pad` (zeros past its edges), as (t*t, tiles*C)."""
    x_last = to_channels_last(x, pad, (tiles_h - 1) * m + t, (tiles_w - 1) * m + t)
    return gather_tiles(x_last, t, m, tiles_h, tiles_w)


def scatter_cpu(tiles, t, m, pad, shape, tiles_h, tiles_w, b=None):
    """The adjoint of gather_cpu: maps of `shape` (N, C, H, W), each pixel the sum of the tiles holding it; + b."""
    n, c, h, w = shape
    return from_channels_last(scatter_tiles(tiles, m, n, tiles_h, tiles_w), pad, h, w, b)


def gather_gpu(x, t, m, pad, tiles_h, tiles_w):
    n, c, h, w = x.shape
    tiles = kernels.empty((t * t, n * tiles_h * tiles_w * c), x.dtype)
    kernels.launch(CU, "gather_tiles", x.dtype, tiles.size, x, tiles, tiles.size, n, c, h, w, t, m, pad,
                   tiles_h, tiles_w)
    return tiles


def scatter_gpu(tiles, t, m, pad, shape, tiles_h, tiles_w, b=None):
    out = kernels.empty(shape, tiles.dtype)
    kernels.launch(CU, "scatter_tiles", tiles.dtype, out.size, tiles, out, out.size, *shape, t, m, pad,
                   tiles_h, tiles_w)
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


# --- The CPU's layouts. The tile work runs with the channels last (N, H, W, C): every copy and add then
# moves whole rows of channels, where in NCHW it would move runs of 2 to 7 pixels, which NumPy
# does at a fraction of the speed. Tiles are numbered (image, tile row, tile column).

def to_channels_last(x, pad, rows, cols):
    """(N, rows, cols, C) zeros with x (N, C, H, W) placed at (pad, pad)."""
    n, c, h, w = x.shape
    x_last = np.empty((n, rows, cols, c), dtype=x.dtype)

    def copy(images):
        part = x_last[images]
        part[:, :pad] = 0
        part[:, pad + h:] = 0
        part[:, pad:pad + h, :pad] = 0
        part[:, pad:pad + h, pad + w:] = 0
        part[:, pad:pad + h, pad:pad + w] = x[images].transpose(0, 2, 3, 1)
    in_parallel(copy, x_last)
    return x_last


def from_channels_last(x_last, top_left, h, w, b=None):
    """The (N, C, h, w) maps at (top_left, top_left) of x_last (N, rows, cols, C), plus b per channel."""
    n, c = x_last.shape[0], x_last.shape[3]
    out = np.empty((n, c, h, w), dtype=x_last.dtype)
    window = x_last[:, top_left:top_left + h, top_left:top_left + w].transpose(0, 3, 1, 2)

    def copy(images):
        if b is None:
            out[images] = window[images]
        else:
            np.add(window[images], b.reshape(c, 1, 1), out=out[images])
    in_parallel(copy, out)
    return out


def gather_tiles(x_last, t, m, tiles_h, tiles_w):
    """The t x t windows at stride m of x_last (N, H, W, C), as (t*t, tiles*C): window position first."""
    n, h, w, c = x_last.shape
    tiles = np.empty((t, t, n, tiles_h, tiles_w, c), dtype=x_last.dtype)

    def copy(images):
        for i in range(t):
            for j in range(t):
                tiles[i, j, images] = x_last[images, i:i + m * tiles_h:m, j:j + m * tiles_w:m]
    in_parallel(copy, x_last)
    return tiles.reshape(t * t, -1)


def scatter_tiles(tiles, m, n, tiles_h, tiles_w):
    """The adjoint of gather_tiles: (N, tiles_h*m + t - m, tiles_w*m + t - m, C), overlapping tiles summed."""
    t = round(len(tiles) ** 0.5)
    tiles = tiles.reshape(t, t, n, tiles_h, tiles_w, -1)
    overlap = t - m  # 0 for the output blocks, 2 for the input tiles
    out = np.empty((n, tiles_h * m + overlap, tiles_w * m + overlap, tiles.shape[-1]), dtype=tiles.dtype)

    def add(images):
        if overlap:
            out[images] = 0
        for i in range(t):
            for j in range(t):
                window = out[images, i:i + m * tiles_h:m, j:j + m * tiles_w:m]
                if overlap:
                    window += tiles[i, j, images]
                else:  # the blocks tile the maps exactly: each pixel is written once
                    window[...] = tiles[i, j, images]
    in_parallel(add, out)
    return out
