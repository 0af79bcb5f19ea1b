"""Following a signer's state directory while the server runs: the phases
of a CA rotation (fastca.ca.rotation) applied as the plan reaches them.

Each look (every ``server.ca_watch_seconds``) reads the directory off the
event loop and compares what it says with what the server does:

- the CA's own roots in the bundle changed (the new root goes out, later the
  old one leaves): the signer's ``TrustBundle`` gets them, and through it
  every response's root bundle, GetTrustBundle and the ConfigMap publisher;
- the signing certificate changed (the activation): the new key is opened
  (its public key must be the new certificate's) and the Authority switches
  to it between two batches; ``on_switch`` then lets the server re-issue its
  own serving certificate under the new key.

A look that fails (a half-copied plan, the HSM unreachable for the new key)
changes nothing: the server keeps signing as it did, says why in the log
once, and tries again at the next look.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path

from fastca.authority import Authority
from fastca.ca.material import open_signer
from fastca.ca.rotation import CAView, Phase, ca_view
from fastca.clock import Clock
from fastca.errors import FastcaError
from fastca.observability.logging import get_logger
from fastca.signing.base import Signer
from fastca.trust.bundle import TrustBundle

__all__ = ["CAFollower"]

log = get_logger("fastca.rotation")
_PHASES = [phase.value for phase in Phase]


class CAFollower:
    def __init__(self, authority: Authority, state_dir: Path, bundle: TrustBundle, *, clock: Clock,
                 executor: Executor, metrics: object,
                 on_change: Callable[[Authority, CAView, bool], Awaitable[None]] | None = None) -> None:
        self.authority = authority
        self.state_dir = state_dir
        self.bundle = bundle
        self._clock = clock
        self._executor = executor
        self._metrics = metrics
        self._on_change = on_change
        self.phase: Phase | None = None
        self._last_problem: str | None = None

    async def check(self) -> Phase | None:
        """One look; returns the phase the server is now in (None: unreadable)."""
        loop = asyncio.get_running_loop()
        authority = self.authority
        try:
            view = await loop.run_in_executor(self._executor, ca_view, self.state_dir, self._clock.utcnow())
        except FastcaError as error:
            self._problem(f"the state directory does not read: {error}")
            return self.phase
        switched = False
        if view.material.signing_cert != authority.material.signing_cert:
            try:
                signer = await loop.run_in_executor(self._executor, self._open, view)
            except FastcaError as error:
                self._problem(f"cannot open the new signing key yet: {error}")
                # The roots still follow the plan: handing out the new root early is harmless.
            else:
                authority.switch_ca(view.material, signer)
                switched = True
                log.info("signing with the rotated CA", signer=authority.name,
                         subject=view.material.signing_cert.subject.rfc4514_string(),
                         not_after=view.material.valid_until.isoformat())
        # The bundle's subscribers rebuild the response tail (from the chain now in use).
        roots_changed = self.bundle.set_own(view.roots)
        if view.phase is not self.phase:
            log.info("CA rotation phase", signer=authority.name, phase=view.phase.value,
                     roots=len(view.roots), activate_at=_iso(view.plan.activate_at if view.plan else None),
                     retire_at=_iso(view.plan.retire_at if view.plan else None))
            self.phase = view.phase
            set_phase = getattr(self._metrics, "set_rotation_phase", None)
            if set_phase is not None:
                set_phase(authority.name, view.phase.value, _PHASES)
        if (switched or roots_changed) and self._on_change is not None:
            await self._on_change(authority, view, switched)
        self._last_problem = None
        return self.phase

    def _open(self, view: CAView) -> Signer:
        return open_signer(view.signer, self.state_dir, expected_public_key=view.material.signing_cert.public_key())

    def _problem(self, text: str) -> None:
        if text != self._last_problem:
            log.error("CA rotation not followed", signer=self.authority.name, reason=text)
            self._last_problem = text

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except Exception as error:      # never let the watch die; the next look tries again
                self._problem(f"unexpected error: {error!r}")


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
