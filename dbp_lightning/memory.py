"""Peak resident memory of this process, for reports and benchmarks."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Reads VmHWM from /proc (Linux), which starts afresh at exec; ``ru_maxrss`` would report
    the parent's peak in a process started by subprocess. Falls back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
