"""This process's resident memory from ``/proc`` (Linux): the peak-memory benchmarks measure a configuration in a
fresh process by resetting the kernel's RSS high-water mark after warm-up and reading it after the measured work."""
from __future__ import annotations

from pathlib import Path


def vm_status(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_rss_high_water() -> bool:
    """Reset the RSS high-water mark (VmHWM, and with it ru_maxrss) to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return vm_status("VmHWM") <= vm_status("VmRSS") + 1024
