// The momentum update of optim.py, fused: one pass over a parameter instead of
// six elementwise operations (each a launch and a full read or write of w, g or v).
// The order of the arithmetic is the NumPy path's, (m*v - decay*w) - lr*g, so
// results agree (up to NVRTC's contraction into FMAs on a real GPU).

template <typename T>
__global__ void momentum_update(T* w, const T* g, T* v, long long total, T momentum, T decay, T lr) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        T velocity = momentum * v[i] - decay * w[i] - lr * g[i];
        v[i] = velocity;
        w[i] += velocity;
    }
}

template __global__ void momentum_update<float>(float*, const float*, float*, long long, float, float, float);
template __global__ void momentum_update<double>(double*, const double*, double*, long long, double, double,
                                                 double);
