"""What this host's CPU is, read from Linux's /proc/cpuinfo (None elsewhere)."""

from __future__ import annotations

CPUINFO = '/proc/cpuinfo'


def cpuinfo(key: str, path: str = CPUINFO) -> str | None:
    """The value of the first `key : value` line of /proc/cpuinfo ('model name', 'flags')."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(':')
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None
