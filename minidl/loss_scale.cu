// Dynamic loss scaling's update for loss_scale.py, after a step: one thread changes the
// state in place, so the scale never leaves the device (no read a step).
//
// state = [scale, clean steps, 1/scale]; verdict[0] is the step's (0, or NaN where a loss or
// gradient was not finite and the step was skipped). A bad step multiplies the scale by
// `backoff` and restarts the count; `interval` clean steps in a row multiply it by `growth`
// where the result stays finite. The scale is a power of two (growth and backoff are), so
// 1/scale is exact.
template <typename T>
__global__ void loss_scale_update(T* state, const T* verdict, T growth, T backoff, long long interval) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    T scale = state[0];
    T clean = state[1];
    if (!isfinite(verdict[0])) {
        scale = scale * backoff;
        clean = T(0);
    } else {
        clean = clean + T(1);
        if (clean >= T(interval)) {
            T grown = scale * growth;
            if (isfinite(grown)) scale = grown;
            clean = T(0);
        }
    }
    state[0] = scale;
    state[1] = clean;
    state[2] = T(1) / scale;
}

template __global__ void loss_scale_update<float>(float*, const float*, float, float, long long);
template __global__ void loss_scale_update<double>(double*, const double*, double, double, long long);
