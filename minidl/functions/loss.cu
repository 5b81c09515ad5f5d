// Softmax cross-entropy for loss.py, where CuPy takes about a dozen whole-array
// operations (max, shift, exp, sum, log, the label gather, ...): two kernels, each
// reading the logits or the saved log-probabilities once. The forward keeps the
// arithmetic of the NumPy path, in its order: log_p = (x - max) - log(sum(exp(x - max))).

// One warp per row, the rows spread over the GPU's blocks. Each of the warp's 32 threads
// takes the row's max and sum by itself, in the same order: its lanes load the same
// addresses at once, so the warp pays for one walk of the row, and no thread needs another's
// result (no shared memory, no shuffles). Then each lane writes every 32nd log-probability,
// so the warp's writes are coalesced. A launch of 32 threads per row; any other size is
// still correct (the grid-stride loop), only slower.
#include "window.cuh"

template <typename T>
__global__ void log_softmax_nll(const T* logits, const int* labels, T* log_p, T* row_loss, long long rows,
                                long long classes) {
    const long long lanes = 32;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < rows * lanes;
         t += (long long)blockDim.x * gridDim.x) {
        long long r = t / lanes, lane = t % lanes;
        const T* x = logits + r * classes;
        T top = x[0];
        for (long long c = 1; c < classes; ++c) top = x[c] > top ? x[c] : top;
        T sum = T(0);
        for (long long c = 0; c < classes; ++c) sum += exp(x[c] - top);
        T log_sum = log(sum);
        for (long long c = lane; c < classes; c += lanes) log_p[r * classes + c] = (x[c] - top) - log_sum;
        if (lane != 0) continue;
        // a label outside 0..C-1 (possible only where the caller vouched for labels it did not
        // check) gives a NaN loss, never a read outside the row
        int label = labels[r];
        row_loss[r] = label >= 0 && label < classes ? -((x[label] - top) - log_sum) : T(nan(""));
    }
}

// d loss / d logits = (softmax - onehot(label)) * (gy / N), gy the loss's gradient (a 0-d array).
template <typename T>
__global__ void softmax_nll_backward(const T* log_p, const int* labels, const T* gy, T* gx, long long total,
                                     long long classes, long long rows) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        T p = exp(log_p[i]);
        QuotientRemainder row_class = divide(i, classes);
        if (row_class.remainder == labels[row_class.quotient]) p -= T(1);
        gx[i] = p * (gy[0] / T(rows));
    }
}

template __global__ void log_softmax_nll<float>(const float*, const int*, float*, float*, long long, long long);
template __global__ void log_softmax_nll<double>(const double*, const int*, double*, double*, long long,
                                                 long long);
template __global__ void softmax_nll_backward<float>(const float*, const int*, const float*, float*, long long,
                                                     long long, long long);
template __global__ void softmax_nll_backward<double>(const double*, const int*, const double*, double*,
                                                      long long, long long, long long);
