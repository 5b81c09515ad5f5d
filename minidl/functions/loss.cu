// Softmax cross-entropy for loss.py, one thread per row of logits (N, C): where
// CuPy takes about a dozen whole-array operations (max, shift, exp, sum, log,
// the label gather, ...) these are two kernels, each reading the logits or the
// saved log-probabilities once. A row is a few thousand classes at most, so a
// thread per row keeps the arithmetic of the NumPy path, in its order:
// log_p = (x - max) - log(sum(exp(x - max))).

template <typename T>
__global__ void log_softmax_nll(const T* logits, const int* labels, T* log_p, T* row_loss, long long rows,
                                long long classes) {
    for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < rows;
         r += (long long)blockDim.x * gridDim.x) {
        const T* x = logits + r * classes;
        T* out = log_p + r * classes;
        T top = x[0];
        for (long long c = 1; c < classes; ++c) top = x[c] > top ? x[c] : top;
        T sum = T(0);
        for (long long c = 0; c < classes; ++c) sum += exp(x[c] - top);
        T log_sum = log(sum);
        for (long long c = 0; c < classes; ++c) out[c] = (x[c] - top) - log_sum;
        // a label outside 0..C-1 (possible only where the caller vouched for labels it did not
        // check) gives a NaN loss, never a read outside the row
        int label = labels[r];
        row_loss[r] = label >= 0 && label < classes ? -out[label] : T(nan(""));
    }
}

// d loss / d logits = (softmax - onehot(label)) * (gy / N), gy the loss's gradient (a 0-d array).
template <typename T>
__global__ void softmax_nll_backward(const T* log_p, const int* labels, const T* gy, T* gx, long long total,
                                     long long classes, long long rows) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        T p = exp(log_p[i]);
        if (i % classes == labels[i / classes]) p -= T(1);
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
