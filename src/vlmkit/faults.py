"""Deterministic crash points for resume tests: `VLMKIT_KILL_AT=NAME[:N]` SIGKILLs the process at the N-th
`kill_point(NAME)` it reaches (N defaults to 1; counted per process)."""

from __future__ import annotations

import os
import signal

ENV = "VLMKIT_KILL_AT"
_seen: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here when `VLMKIT_KILL_AT` names this point (and this is the N-th time)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
