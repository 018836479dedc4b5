"""This process's resident memory from /proc (Linux): the peak-memory scripts' one reader."""


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` field in MiB (``VmRSS``: now, ``VmHWM``: the high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(key)


def reset_high_water_mark() -> None:
    """Reset VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
