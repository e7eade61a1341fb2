"""Follow ``NAME@CHANNEL``: when the channel moves, load the new version beside the old one and switch.

A follower polls its channel's pointer file (every ~0.5 s, and at once on SIGHUP). When the
pointer changes it verifies and loads each new target with a fresh engine, warms it, then
re-routes ``NAME@CHANNEL`` (and ``NAME`` when that named this channel) in one step on the event
loop. Requests already running hold their ``ServedModel`` and finish there; a retired version
is closed once its in-flight count reaches 0. A version that fails to verify or load is never
routed to: the old one keeps serving, the log says why and
``mlserve_channel_switch_failures_total`` counts it. A failed target is retried only when the
pointer changes again or on SIGHUP, never in a hot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from mlserve.bundles.store import Bundle, Store
from mlserve.errors import MlserveError
from mlserve.server.state import ServedModel, ServerState

log = logging.getLogger("mlserve.server")
Build = Callable[[Bundle], ServedModel]


@dataclass(frozen=True)
class FollowPlan:
    """What ``serve`` asks for: which served models track which channel, and how to build a version."""

    store: Store
    build: Build
    channels: tuple[tuple[ServedModel, str], ...]  # (the model first served for NAME@CHANNEL, CHANNEL)
    interval: float = 0.5


class _Metrics:
    def __init__(self, state: ServerState) -> None:
        r = state.metrics.registry
        labels = ["model", "channel"]
        self.failures = Counter(
            "mlserve_channel_switch_failures", "Channel moves not followed (verify or load failed)", labels, registry=r
        )
        self.switches = Counter("mlserve_channel_switches", "Channel moves followed", labels, registry=r)


class ChannelFollower:
    """Keeps ``NAME@CHANNEL`` routed to what the channel's pointer names."""

    def __init__(self, state: ServerState, plan: FollowPlan, initial: ServedModel, channel: str, m: _Metrics) -> None:
        self.state, self.plan, self.channel, self.metrics = state, plan, channel, m
        self.name = initial.name
        self.label = f"{self.name}@{channel}"
        self.path = plan.store.channel_path(self.name, channel)
        self.stable = initial
        self.canary: tuple[ServedModel, float] | None = None
        self.idents = [self.label] + ([self.name] if state.routed(self.name) is initial else [])
        self._seen: bytes | None = None
        self._wake = asyncio.Event()
        self.retiring: set[asyncio.Task[None]] = set()
        state.route(self.label, initial)

    def poke(self) -> None:
        """Look at the pointer again now, even if it did not change (SIGHUP; runs on the event loop)."""
        self._seen = None
        self._wake.set()

    async def run(self) -> None:
        """Poll until cancelled."""
        while self.stable.engine.health().state == "loading":  # the first load is app.py's
            await asyncio.sleep(0.1)
        while True:
            try:
                await self.check()
            except Exception as exc:  # a bad pointer or store must never stop the follower or the server
                log.error("channel %s: could not follow: %s", self.label, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.plan.interval)
            self._wake.clear()

    async def check(self) -> None:
        """Act on the pointer when its bytes changed since the last look."""
        if self.state.draining:
            return
        data = self._read()
        if data == self._seen:
            return
        self._seen = data
        if not data:
            log.warning("channel %s is gone; still serving %s", self.label, self.stable.id)
            return
        pointer: dict[str, Any] = json.loads(data)
        fresh: list[ServedModel] = []  # loaded by this look: closed unless traffic was switched to them
        try:
            stable = await self._ensure(pointer, fresh)
            if stable is None:
                return
            canary: tuple[ServedModel, float] | None = None
            want = pointer.get("canary")
            if isinstance(want, dict):
                model = await self._ensure(want, fresh)
                canary = None if model is None else (model, float(want["percent"]))
            if self._read() != data:
                # The channel moved while we verified and loaded (a rollback, say): never switch to a
                # version it no longer names; look again at once.
                log.info("channel %s moved while loading; looking again", self.label)
                self._seen = None
                self._wake.set()
                return
            self._switch(stable, canary)
        finally:
            for m in fresh:
                if all(m is not live for live in self._live()):
                    await m.engine.close()

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _live(self) -> list[ServedModel]:
        return [self.stable] + ([self.canary[0]] if self.canary else [])

    async def _ensure(self, target: dict[str, Any], fresh: list[ServedModel]) -> ServedModel | None:
        """The served model for ``target`` (``version``, ``digest``): already live, or verified, loaded and warmed."""
        version, digest = str(target["version"]), str(target["digest"])
        for m in self._live():
            if m.version == version and m.digest == digest:
                return m
        ident = f"{self.name}:{version}"
        store = self.plan.store
        started = time.monotonic()
        model: ServedModel | None = None
        try:
            bundle = store.get(self.name, version)
            if bundle is None or bundle.digest != digest:
                raise MlserveError(f"{ident} with digest {digest[:19]} is not in the store")
            problems = await asyncio.to_thread(store.verify, bundle)
            if problems:
                raise MlserveError(f"verification failed: {'; '.join(problems)}")
            log.info("channel %s: loading %s beside %s", self.label, ident, self.stable.id)
            model = self.plan.build(bundle)
            fresh.append(model)
            await model.engine.start()
        except (MlserveError, OSError, ValueError, KeyError) as exc:
            if model is not None:
                fresh.remove(model)
                await model.engine.close()
            self.metrics.failures.labels(ident, self.label).inc()
            log.error("channel %s: not switching to %s: %s; still serving %s", self.label, ident, exc, self.stable.id)
            return None
        self.state.metrics.engine_up.labels(model.id).set(1)
        log.info("channel %s: %s ready in %.1f s", self.label, ident, time.monotonic() - started)
        return model

    def _switch(self, stable: ServedModel, canary: tuple[ServedModel, float] | None) -> None:
        """Re-route in one step (no await), then retire what is no longer routed."""
        before = self._live()
        before_canary = self.canary
        self.stable, self.canary = stable, canary
        keep = self._live()
        for m in keep:
            if all(m is not s for s in self.state.models):
                self.state.models.append(m)
            self.state.route(m.id, m)
        for ident in self.idents:
            self.state.route(ident, stable, canary)
        for old in before:
            if all(old is not k for k in keep):
                self.state.unroute(old)
                task = asyncio.create_task(self._retire(old))
                self.retiring.add(task)
                task.add_done_callback(self.retiring.discard)
        changed = [m.id for m in keep if all(m is not b for b in before)]
        if changed or canary != before_canary:
            for ident in changed:
                self.metrics.switches.labels(ident, self.label).inc()
            share = f", {canary[1]:g}% to {canary[0].id}" if canary else ""
            log.info("channel %s: now serving %s%s", self.label, stable.id, share)

    async def _retire(self, model: ServedModel) -> None:
        """Close a version nobody is routed to once its in-flight requests are done."""
        limit = (self.state.settings.request_timeout or 600.0) + 5
        deadline = time.monotonic() + limit
        try:
            while model.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if model.in_flight > 0:
                log.warning(
                    "channel %s: closing %s, %d request(s) still running", self.label, model.id, model.in_flight
                )
        finally:  # also at shutdown, when this task is cancelled
            await model.engine.close()
            self.state.metrics.engine_up.labels(model.id).set(0)
            log.info("channel %s: closed %s", self.label, model.id)


class Followers:
    """Every channel follower of one app: started and stopped by its lifespan."""

    def __init__(self, state: ServerState, plan: FollowPlan) -> None:
        metrics = _Metrics(state)
        self.followers = [ChannelFollower(state, plan, m, ch, metrics) for m, ch in plan.channels]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start polling (inside the running event loop)."""
        self._tasks = [asyncio.create_task(f.run()) for f in self.followers]

    def reload(self) -> None:
        """SIGHUP: every follower looks at its channel now."""
        log.info("SIGHUP: checking %d followed channel(s)", len(self.followers))
        for f in self.followers:
            f.poke()

    async def close(self) -> None:
        """Stop polling and close versions still being retired."""
        for task in self._tasks:
            task.cancel()
        retiring = [t for f in self.followers for t in f.retiring]
        for task in retiring:
            task.cancel()
        await asyncio.gather(*self._tasks, *retiring, return_exceptions=True)
