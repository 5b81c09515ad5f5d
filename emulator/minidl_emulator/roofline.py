"""A roofline time model of the cost ledger (ledger.py): what a step would take on an H100, H200 or A100.

One operation takes max(FLOPs / (unit peak x efficiency), bytes / (HBM bandwidth x
efficiency)) + a launch gap; a copy takes its bytes over its link (PCIe pageable or
pinned, NVLink). On one GPU every kernel shares the SMs, so kernels are serial across
streams; copies between host and device, and peer copies, run on copy engines beside
them, but never beside their own stream's work. The host issues every operation (one
Python process, serially) and blocking reads split the step into segments, each
max(host issue, device busy) + a sync latency. Constants, sources and calibration:
benchmarks/NOTES.md ("The GPU time model").
"""
import collections
import dataclasses

from minidl_emulator.ledger import Entry


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    peak: dict  # compute unit -> dense FLOP/s
    hbm: float  # bytes/s
    nvlink: float  # bytes/s, one direction
    pcie: float  # bytes/s, one direction of the x16 link


TERA, GIGA = 1e12, 1e9
# NVIDIA datasheets: H100 SXM5 (FP32 67, TF32 494.7 dense / 989 sparse, FP16 and BF16 989.4 dense, FP64 tensor 67
# TFLOP/s; HBM3 3.35 TB/s; NVLink 900 GB/s both directions; PCIe Gen5 x16 128 GB/s both directions); H200 SXM (the
# same compute; HBM3e 4.8 TB/s); A100 SXM4 80GB (FP32 19.5, TF32 156, FP16/BF16 312, FP64 tensor 19.5; HBM2e
# 2.039 TB/s; NVLink 600 GB/s; PCIe Gen4 64 GB/s both directions).
_HOPPER = {"fp32-simt": 66.9 * TERA, "tf32": 494.7 * TERA, "fp16": 989.4 * TERA, "bf16": 989.4 * TERA,
           "fp64": 66.9 * TERA}
GPUS = {
    "h100": GPU("H100 SXM5 80GB", _HOPPER, 3.35e12, 450 * GIGA, 64 * GIGA),
    "h200": GPU("H200 SXM 141GB", _HOPPER, 4.8e12, 450 * GIGA, 64 * GIGA),
    "a100": GPU("A100 SXM4 80GB", {"fp32-simt": 19.5 * TERA, "tf32": 156 * TERA, "fp16": 312 * TERA,
                                   "bf16": 312 * TERA, "fp64": 19.5 * TERA}, 2.039e12, 300 * GIGA, 32 * GIGA),
}

# Fitted on the H100 GEMM anchors (CuPy GEMMs alone, AlexNet batch 128: 3.82 ms TF32, 2.07 ms FP16) by
# fit_gemm_efficiency over CALIBRATION_GEMMS; bf16 taken as fp16. FP32 SIMT: no anchor, an assumption
# (cuBLAS SGEMM reaches 70-80% of peak on large shapes; these are not large).
GEMM_EFFICIENCY = {"tf32": 0.302, "fp16": 0.282, "bf16": 0.282, "fp32-simt": 0.6, "fp64": 0.6}
MEMORY_EFFICIENCY = 0.8  # of HBM bandwidth, for memory-bound kernels and copies on the device (STREAM-like)
NVLINK_EFFICIENCY = 0.8
PCIE_EFFICIENCY = {"pinned": 0.8, "pageable": 0.4}  # pageable: staged through a pinned buffer by the driver
LAUNCH_S = 2.5e-6  # the shortest a kernel or copy takes on the device, back to back
HOST_ISSUE_S = 8e-6  # CuPy's Python cost of one launch (an elementwise kernel, a RawKernel call, a copy)
SYNC_S = 10e-6  # a blocking read: the host waits, is woken, copies back
COPY_ENGINE_LINKS = ("h2d", "d2h", "peer")

# The GEMMs of AlexNet's im2col training step at batch 128, both towers: (FLOPs, bytes in float32, how many),
# from the ledger of benchmarks/time_model.py (529.4 GFLOP in all): the GEMMs the anchors timed.
CALIBRATION_GEMMS = (
    (28665446400, 496287744, 6),
    (26986291200, 711038592, 2),
    (19138609152, 217743360, 6),
    (14353956864, 167460864, 6),
    (9569304576, 161480704, 6),
    (4831838208, 81264640, 6),
    (2147483648, 36700160, 6),
    (1048576000, 18993152, 3),
)


def op_seconds(entry: Entry, gpu: GPU) -> float:
    """The device time of one ledger entry (0 for a sync, which is host time)."""
    if entry.kind == "sync":
        return 0.0
    if entry.kind == "copy" and entry.unit in ("h2d", "d2h"):
        return LAUNCH_S + entry.nbytes / (gpu.pcie * PCIE_EFFICIENCY["pinned" if entry.pinned else "pageable"])
    if entry.kind == "copy" and entry.unit == "peer":
        return LAUNCH_S + entry.nbytes / 2 / (gpu.nvlink * NVLINK_EFFICIENCY)  # charged read + written
    if entry.kind == "collective":  # two GPUs' ring all-reduce: each sends and receives its buffer once
        return LAUNCH_S + entry.nbytes / 2 / (gpu.nvlink * NVLINK_EFFICIENCY)
    # a kernel's reads and writes of another GPU's memory cross NVLink (peer access), the rest HBM
    memory = max((entry.nbytes - entry.peer_nbytes) / (gpu.hbm * MEMORY_EFFICIENCY),
                 entry.peer_nbytes / (gpu.nvlink * NVLINK_EFFICIENCY))
    if entry.kind == "gemm":
        return LAUNCH_S + max(entry.flops / (gpu.peak[entry.unit] * GEMM_EFFICIENCY[entry.unit]), memory)
    return LAUNCH_S + memory


def _device_busy(entries: list, gpu: GPU) -> dict:
    """Per device: max(kernels of all streams in turn, each stream in turn, each copy engine direction)."""
    sm, by_stream, engines = collections.Counter(), collections.Counter(), collections.Counter()
    for entry in entries:
        seconds = op_seconds(entry, gpu)
        by_stream[entry.device, entry.stream] += seconds
        if entry.kind == "copy" and entry.unit in COPY_ENGINE_LINKS:
            engines[entry.device, entry.unit] += seconds
        else:
            sm[entry.device] += seconds
    devices = {device for device, _ in by_stream}
    return {d: max([sm[d]] + [s for (dd, _), s in by_stream.items() if dd == d]
                   + [s for (dd, _), s in engines.items() if dd == d]) for d in devices}


def predict(entries: list, gpu: GPU) -> dict:
    """Predicted milliseconds of the work in `entries` (one step); device time split by kind, name and label."""
    segments, current = [], []
    for entry in entries:
        current.append(entry)
        if entry.kind == "sync":
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    total = device_total = host_total = 0.0
    for segment in segments:
        busy = max(_device_busy(segment, gpu).values(), default=0.0)
        host = HOST_ISSUE_S * sum(e.kind != "sync" for e in segment)
        syncs = sum(e.kind == "sync" for e in segment)
        total += max(busy, host) + SYNC_S * syncs
        device_total, host_total = device_total + busy, host_total + host
    by_kind, by_name, counts, by_label = (collections.Counter() for _ in range(4))
    for entry in entries:
        seconds = op_seconds(entry, gpu)
        by_kind[f"{entry.kind}:{entry.unit}" if entry.unit else entry.kind] += seconds
        by_name[entry.name] += seconds
        counts[entry.name] += 1
        by_label[entry.label] += seconds
    return dict(gpu_name=gpu.name, ms_per_step=1e3 * total, device_ms=1e3 * device_total, host_ms=1e3 * host_total,
                segments=len(segments), ms_by_kind={k: 1e3 * s for k, s in by_kind.most_common()},
                ms_by_name=[(name, 1e3 * s, counts[name]) for name, s in by_name.most_common()],
                ms_by_label={label: 1e3 * s for label, s in by_label.items()})


def summarize(entries: list) -> dict:
    """What the ledger counts: operations, blocking reads, hidden copies, GEMM FLOPs by compute unit."""
    flops = collections.Counter()
    for entry in entries:
        if entry.kind == "gemm":
            flops[entry.unit] += entry.flops
    hidden = [e for e in entries if e.hidden and e.kind == "copy"]
    return dict(device_operations=sum(e.kind != "sync" for e in entries),
                blocking_reads=sum(e.kind == "sync" for e in entries),
                hidden_copies=len(hidden), hidden_copy_bytes=sum(e.nbytes for e in hidden),
                gemm_flops_by_unit=dict(flops), operations_by_kind=dict(collections.Counter(e.kind for e in entries)))


def gemm_seconds(gemms, gpu: GPU, unit: str, efficiency: float | None = None) -> float:
    """The time of GEMMs given as (FLOPs, float32 bytes, count), run on `unit` (16-bit units move half the bytes)."""
    efficiency = GEMM_EFFICIENCY[unit] if efficiency is None else efficiency
    scale = 0.5 if unit in ("fp16", "bf16") else 1.0
    return sum(count * (LAUNCH_S + max(flops / (gpu.peak[unit] * efficiency),
                                       scale * nbytes / (gpu.hbm * MEMORY_EFFICIENCY)))
               for flops, nbytes, count in gemms)


def fit_gemm_efficiency(gemms, gpu: GPU, unit: str, anchor_s: float) -> float:
    """The efficiency at which gemm_seconds equals a measured time (bisection; it falls as efficiency grows)."""
    low, high = 1e-3, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if gemm_seconds(gemms, gpu, unit, middle) > anchor_s else (low, middle)
    return (low + high) / 2
