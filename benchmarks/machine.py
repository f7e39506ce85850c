"""How busy the machine is around a benchmark run (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def machine_load(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy (0..1) over ``seconds``, from /proc/stat; None where unavailable.

    Sampled while this benchmark itself is idle, so it measures other work on the machine.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def load_note(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return f"machine: {os.cpu_count()} CPUs"
    text = (
        f"machine: {os.cpu_count()} CPUs; other CPU use {before:.0%} just before, "
        f"{after:.0%} just after the run"
    )
    if max(before, after) > 0.2:
        text += "\nWARNING: other work was running on the machine; timings are noisy"
    return text
