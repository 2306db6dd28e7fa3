"""Device memory bandwidth ceilings on a GPU, in GB/s (bytes read + written): JAX's copy as the benchmarks measure
it (bench/forward.py device_copy_gbps) at three sizes, and torch's `copy_` timed with CUDA events.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 PYTHONPATH=. python3 scripts/copy_bandwidth.py
"""
import torch

from axpo_jax.bench.forward import device_copy_gbps

for mib in (1024, 2048, 4096):
    print("jax", mib, "MiB", device_copy_gbps(mib), "GB/s", flush=True)

a = torch.randn(2**29, device="cuda")  # 2 GiB
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    b.copy_(a)
end.record()
torch.cuda.synchronize()
print("torch copy_ 2048 MiB", round(2 * a.nbytes * 20 / (start.elapsed_time(end) / 1e3) / 1e9, 1), "GB/s")
