"""The channel follower in-process, over a real store and fake engines whose loads a test holds open."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from mlserve.bundles import channels
from mlserve.bundles.store import Bundle, Store
from mlserve.engine.fake import FakeEngine, FakeScript
from mlserve.server.auth import build_guard
from mlserve.server.follow import Followers, FollowPlan
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel, ServerState


def _store(cli: Callable[..., object], make_gguf: Callable[..., Path], n: int) -> Store:
    for seed in range(1, n + 1):
        assert cli("pack", make_gguf(seed), "--name", "m").exit_code == 0  # type: ignore[attr-defined]
    store = Store()
    channels.promote(store, "m:1", "production")
    return store


class Loads:
    """Builds served models whose engine start waits on a gate the test opens."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.built: dict[str, FakeEngine] = {}

    def build(self, bundle: Bundle) -> ServedModel:
        gate = self.gates.setdefault(bundle.version, asyncio.Event())
        engine = FakeEngine(bundle.ref, FakeScript(start_gate=gate))
        self.built[bundle.version] = engine
        return ServedModel(bundle.name, bundle.version, bundle.digest, engine)


async def _follower(store: Store, loads: Loads) -> tuple[ServerState, Followers, ServedModel]:
    first = loads.build(store.resolve("m:1"))
    loads.gates["1"].set()
    await first.engine.start()
    settings = ServerSettings()
    state = ServerState([first], settings, build_guard(settings))
    followers = Followers(state, FollowPlan(store, loads.build, ((first, "production"),)))
    return state, followers, first


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


def test_channel_follow_race_rollback_during_load_never_switches(cli, make_gguf) -> None:  # type: ignore[no-untyped-def]
    store = _store(cli, make_gguf, 2)

    async def scenario() -> None:
        loads = Loads()
        state, followers, first = await _follower(store, loads)
        follower = followers.followers[0]
        channels.promote(store, "m:2", "production")
        check = asyncio.create_task(follower.check())
        await _until(lambda: "2" in loads.built)  # m:2 verified and loading
        channels.rollback(store, "m", "production")  # back to m:1 while m:2 warms up
        loads.gates["2"].set()
        await check
        assert state.lookup("m@production") is first, "switched to a version the channel no longer names"
        assert state.lookup("m") is first
        assert loads.built["2"].closed, "the abandoned version's engine was left running"

    asyncio.run(scenario())


def test_cancel_between_stable_and_canary_loads_closes_both(cli, make_gguf) -> None:  # type: ignore[no-untyped-def]
    store = _store(cli, make_gguf, 3)

    async def scenario() -> None:
        loads = Loads()
        state, followers, first = await _follower(store, loads)
        follower = followers.followers[0]
        channels.promote(store, "m:2", "production")
        channels.promote(store, "m:3", "production", canary=10)
        loads.gates.setdefault("2", asyncio.Event()).set()
        check = asyncio.create_task(follower.check())
        await _until(lambda: "3" in loads.built)  # stable m:2 loaded, canary m:3 loading
        check.cancel()  # shutdown arrives between the two loads
        await asyncio.gather(check, return_exceptions=True)
        assert loads.built["2"].closed and loads.built["3"].closed, "an engine loaded for the switch leaked"
        assert state.lookup("m@production") is first

    asyncio.run(scenario())
