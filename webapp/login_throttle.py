"""Slowing down password guessing at the login form (README.md "Accounts and projects").

After `max_failures` wrong passwords for one user name from one address (or from one address for
any names), further attempts from there are refused for a while without checking the password,
at first `base_seconds`, doubling with each further failure up to `max_seconds`. The wait is
always bounded, so an attacker can slow the admin down but never lock them out for good; a
success clears the record, and the record of a quiet key is forgotten after `max_seconds`.

In the web app's memory: the web app is one process (`app.py web`); a restart forgets it.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Record:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


@dataclass
class LoginThrottle:
    max_failures: int = 5
    base_seconds: float = 30.0
    max_seconds: float = 900.0
    # Failures from one address over any names count against it at this multiple of max_failures.
    per_address_factor: int = 4
    clock: Callable[[], float] = time.monotonic
    _records: dict[tuple, _Record] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _keys(self, name: str, address: str) -> list[tuple[tuple, int]]:
        return [(("name", name.lower(), address), self.max_failures),
                (("address", address), self.max_failures * self.per_address_factor)]

    def wait_seconds(self, name: str, address: str) -> int:
        """Seconds to wait before this name may be tried from this address; 0: go ahead."""
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            waits = [record.locked_until - now for key, _ in self._keys(name, address)
                     if (record := self._records.get(key)) is not None]
        return max(0, math.ceil(max(waits, default=0.0)))

    def failed(self, name: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key, allowed in self._keys(name, address):
                record = self._records.setdefault(key, _Record())
                record.failures += 1
                record.last_failure = now
                if record.failures >= allowed:
                    extra = record.failures - allowed
                    record.locked_until = now + min(self.max_seconds, self.base_seconds * 2 ** min(extra, 30))

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._records.pop(("name", name.lower(), address), None)

    def _forget_old(self, now: float) -> None:
        stale = [key for key, record in self._records.items()
                 if now - record.last_failure > self.max_seconds and now >= record.locked_until]
        for key in stale:
            del self._records[key]
