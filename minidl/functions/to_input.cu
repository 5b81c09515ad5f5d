// The network's input from uint8 crops, for to_input.py: one thread per output value.
// crops (N, crop, crop, 3) uint8, already cut and mirrored on the CPU; mean (size, size, 3), the
// training mean image; where (N, 3) int: each crop's top, left and mirror flag, to cut the mean
// where the crop came from (mirrored with it); shift (N, 3), each image's PCA lighting (zeros
// without). out (N, 3, crop, crop) = ((pixel - mean) + shift) * scale, each step rounded to T as
// the NumPy path rounds it (no product is followed by a sum: nothing to contract into an FMA).
// Neighbouring threads write neighbouring values: the stores are coalesced.

template <typename T>
__global__ void crops_to_input(const unsigned char* crops, const T* mean, const int* where, const T* shift,
                               T* out, long long total, long long crop, long long size, T scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long x = i % crop, y = (i / crop) % crop, c = (i / (crop * crop)) % 3, n = i / (3 * crop * crop);
        long long top = where[3 * n], left = where[3 * n + 1];
        long long mean_x = left + (where[3 * n + 2] ? crop - 1 - x : x);
        T value = T(crops[((n * crop + y) * crop + x) * 3 + c]) - mean[((top + y) * size + mean_x) * 3 + c];
        value = value + shift[3 * n + c];
        out[i] = value * scale;
    }
}
