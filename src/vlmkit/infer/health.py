"""What /health checks: a live model thread that makes progress, image loads that finish, and file descriptors
(a server that cannot open files cannot serve, whatever else says ok)."""

from __future__ import annotations

import errno
import os
import resource
import time

from vlmkit.infer.api import ServerConfig
from vlmkit.infer.batching import BatchWorker


def health_problems(worker: BatchWorker, loads: dict[object, float], config: ServerConfig) -> list[str]:
    """Why the server cannot serve right now (empty when it can)."""
    problems = []
    if not worker.alive:
        problems.append("the generation worker is not running")
    elif (stalled := worker.stalled_for()) > config.stall_timeout_s:
        problems.append(f"the generation worker has made no progress for {stalled:.0f} s")
    now = time.monotonic()
    stuck = [now - start for start in list(loads.values()) if now - start > config.stall_timeout_s]
    if stuck:
        problems.append(f"{len(stuck)} image load(s) stuck for up to {max(stuck):.0f} s")
    return problems + fd_problems(config.min_free_fds)


def fd_problems(min_free: int) -> list[str]:
    """File descriptors: the server must be able to open files (and sockets), with some headroom."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        used = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    except OSError as err:
        reason = "too many open files" if err.errno in (errno.EMFILE, errno.ENFILE) else err.strerror
        return [f"the server cannot open files: {reason}"]
    if soft != resource.RLIM_INFINITY and used and soft - used < min_free:
        return [f"only {soft - used} of {soft} file descriptors are free"]
    return []
