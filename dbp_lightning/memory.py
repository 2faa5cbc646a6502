"""Resident memory of this process, for reports and benchmarks: the peak (VmHWM), and the
anonymous and file-backed parts apart (RssAnon, RssFile).

A prune memory-maps its pool, so its resident set holds pages of the store that the kernel may
drop at any time (RssFile) beside what the process itself allocated (RssAnon). Only the second is
a bound a user can plan on: the first moves with the page cache and the machine's other work.
"""

from __future__ import annotations

import resource
import threading


def _status() -> dict[str, float]:
    """The ``Vm*``/``Rss*`` lines of /proc/self/status in MiB ({} where there is no /proc)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Reads VmHWM from /proc (Linux), which starts afresh at exec; ``ru_maxrss`` would report
    the parent's peak in a process started by subprocess. Falls back to ``ru_maxrss``.
    """
    hwm = _status().get("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssPeaks:
    """Peaks of RssAnon and RssFile (MiB) while the context is open, sampled every
    ``interval`` seconds by a daemon thread (the kernel keeps a peak of the total only).

    ``peaks()`` gives the peaks so far and, after :meth:`reset`, since the reset; on a system
    without /proc every value is None.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._anon = self._file = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = _status()
        if "RssAnon" in s:
            self._anon = max(self._anon or 0.0, s["RssAnon"])
            self._file = max(self._file or 0.0, s["RssFile"] + s.get("RssShmem", 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "RssPeaks":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self._anon = self._file = None
        self._sample()

    def peaks(self) -> dict:
        self._sample()
        return {"rss_anon_peak_mb": None if self._anon is None else round(self._anon, 1),
                "rss_file_peak_mb": None if self._file is None else round(self._file, 1)}
