"""Shared by the bench scripts: how busy the rest of the machine was while we timed (timings on a loaded 2-core CPU
are meaningless, so every script prints it)."""

import os
import time


def cpu_snapshot() -> tuple[float, float, float]:
    """(CPU-seconds used by the whole machine, by this process, wall clock) at this instant."""
    try:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
        busy = (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def other_cpus(s0, s1) -> float:
    """Mean number of CPUs used by other processes (or stolen by the hypervisor) between two snapshots."""
    return max(0.0, (s1[0] - s0[0]) - (s1[1] - s0[1])) / (s1[2] - s0[2])
