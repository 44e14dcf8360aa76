"""Peak memory of a training step, measured in a fresh process (CPU has no allocator stats).

    python -m bench.memory PROVIDER   →  one JSON line {"provider": ..., "peak_step_mb": ...}

After a warm-up step (optimizer state allocated, compilation done), the kernel's peak-RSS
counter is reset (/proc/self/clear_refs) and two more steps run; peak_step_mb is that peak
minus the RSS between steps: activations, gradients and workspaces. The caller sets
MALLOC_MMAP_THRESHOLD_ so that every large tensor is its own mapping, returned on free,
and RSS follows live tensors rather than malloc's cache.
"""

from __future__ import annotations

import json
import sys

from .step import build_step


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(provider: str) -> None:
    step = build_step(provider)
    step()
    baseline = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    for _ in range(2):
        step()
    peak = status_kb("VmHWM")
    print(json.dumps({"provider": provider, "peak_step_mb": round((peak - baseline) / 1024, 1)}))


if __name__ == "__main__":
    main(sys.argv[1])
