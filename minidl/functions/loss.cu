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
//
// Lane 0 also writes whether the row's label scored highest (1 or 0), the training step's top-1 count:
// the first maximum, as argmax takes it, found in the walk that finds the max, and a NaN scores highest
// (argmax's rule) so that a NaN row never counts as right. The count then costs no launch of its own.
//
// 16-bit logits (half.cuh) are read as floats: the log-probabilities, the per-row losses and the
// loss's gradient gy are floats (Acc<T>::type), only the logits' gradient gx is rounded to T. A
// log-probability rounded to 16 bits would lose |log p| * 2^-11 of p's relative accuracy (0.3% at
// log p = -7, a thousand classes), which the gradient p - 1 of the label's class would magnify.
#include "half.cuh"
#include "window.cuh"

template <typename T>
__global__ void log_softmax_nll(const T* logits, const int* labels, typename Acc<T>::type* log_p,
                                typename Acc<T>::type* row_loss, typename Acc<T>::type* row_top1, long long rows,
                                long long classes) {
    typedef typename Acc<T>::type A;
    const long long lanes = 32;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < rows * lanes;
         t += (long long)blockDim.x * gridDim.x) {
        long long r = t / lanes, lane = t % lanes;
        const T* x = logits + r * classes;
        A top = to_acc(x[0]);
        long long first_top = 0, first_nan = isnan(top) ? 0 : -1;
        for (long long c = 1; c < classes; ++c) {
            A v = to_acc(x[c]);
            if (v > top) top = v, first_top = c;
            if (first_nan < 0 && isnan(v)) first_nan = c;
        }
        A sum = A(0);
        for (long long c = 0; c < classes; ++c) sum += exp(to_acc(x[c]) - top);
        A log_sum = log(sum);
        for (long long c = lane; c < classes; c += lanes) log_p[r * classes + c] = (to_acc(x[c]) - top) - log_sum;
        if (lane != 0) continue;
        // a label outside 0..C-1 (possible only where the caller vouched for labels it did not
        // check) gives a NaN loss, never a read outside the row
        int label = labels[r];
        row_loss[r] = label >= 0 && label < classes ? -((to_acc(x[label]) - top) - log_sum) : A(nan(""));
        row_top1[r] = A((first_nan < 0 ? first_top : first_nan) == label ? 1 : 0);
    }
}

// d loss / d logits = (softmax - onehot(label)) * (gy / N), gy the loss's gradient (a 0-d array).
template <typename T>
__global__ void softmax_nll_backward(const typename Acc<T>::type* log_p, const int* labels,
                                     const typename Acc<T>::type* gy, T* gx, long long total, long long classes,
                                     long long rows) {
    typedef typename Acc<T>::type A;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        A p = exp(log_p[i]);
        QuotientRemainder row_class = divide(i, classes);
        if (row_class.remainder == labels[row_class.quotient]) p -= A(1);
        gx[i] = from_acc<T>(p * (gy[0] / A(rows)));
    }
}

// T, and A = Acc<T>::type: the type of the log-probabilities, the losses and their gradient
#define MINIDL_LOSS_KERNELS(T, A)                                                                            \
    template __global__ void log_softmax_nll<T>(const T*, const int*, A*, A*, A*, long long, long long);       \
    template __global__ void softmax_nll_backward<T>(const A*, const int*, const A*, T*, long long, long long, \
                                                     long long);
MINIDL_LOSS_KERNELS(float, float)
MINIDL_LOSS_KERNELS(double, double)
MINIDL_LOSS_KERNELS(__half, float)
MINIDL_LOSS_KERNELS(__nv_bfloat16, float)
