// The momentum update of optim.py, fused: one launch updates every parameter of a
// device, where the elementwise path takes six operations per parameter (each a
// launch and a full read or write of w, g or v). The parameters come as tables of
// pointers (w, g, v: one entry per parameter) and `ends`, the running total of
// their sizes: element i of the concatenation is element i - ends[k-1] of
// parameter k, the first k with i < ends[k]. The order of the arithmetic is the
// NumPy path's, (m*v - decay*w) - lr*g, so results agree (up to NVRTC's
// contraction into FMAs on a real GPU). A finite gradient can still overflow
// the update (a huge lr): nonfinite[k] is set to 1 where parameter k gets a
// weight or velocity that is NaN or infinite (many threads may store the same
// 1; the caller zeroed the row, a row of the same table, and reads it later).

template <typename T>
__global__ void momentum_update(T* const* w, const T* const* g, T* const* v, const unsigned long long* ends,
                                unsigned long long* nonfinite, long long count, long long total, T momentum,
                                T decay, T lr) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long lo = 0, hi = count - 1;  // binary search: a device has tens of parameters
        while (lo < hi) {
            long long mid = (lo + hi) / 2;
            if ((unsigned long long)i < ends[mid]) hi = mid;
            else lo = mid + 1;
        }
        long long j = i - (lo ? (long long)ends[lo - 1] : 0);
        T velocity = momentum * v[lo][j] - decay * w[lo][j] - lr * g[lo][j];
        T weight = w[lo][j] + velocity;
        v[lo][j] = velocity;
        w[lo][j] = weight;
        if (!isfinite(velocity) || !isfinite(weight)) nonfinite[lo] = 1;
    }
}

template __global__ void momentum_update<float>(float* const*, const float* const*, float* const*,
                                                const unsigned long long*, unsigned long long*, long long,
                                                long long, float, float, float);
template __global__ void momentum_update<double>(double* const*, const double* const*, double* const*,
                                                 const unsigned long long*, unsigned long long*, long long,
                                                 long long, double, double, double);
