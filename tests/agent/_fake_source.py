"""An in-memory SecretSource the tests control: the stand-in for the secret
manager when the SDS server is the unit under test."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from fastca.agent.secrets import ROOT_CERT, WORKLOAD_CERT, SecretItem, SecretUnavailable


def tls_item(name: str = WORKLOAD_CERT, version: str = "1") -> SecretItem:
    return SecretItem(name=name, version=version,
                      certificate_chain=f"-----BEGIN CERTIFICATE-----\n{name} chain v{version}\n".encode(),
                      private_key=f"-----BEGIN PRIVATE KEY-----\n{name} key v{version}\n".encode())


def root_item(name: str = ROOT_CERT, version: str = "1") -> SecretItem:
    return SecretItem(name=name, version=version,
                      trusted_ca=f"-----BEGIN CERTIFICATE-----\n{name} roots v{version}\n".encode())


class FakeSource:
    def __init__(self, *items: SecretItem) -> None:
        self.items: dict[str, SecretItem] = {i.name: i for i in items}
        self.listeners: list[Callable[[str], None]] = []
        self.get_calls: Counter[str] = Counter()
        self.released: list[str] = []
        self.subscribes = 0
        self.unsubscribes = 0
        self.gate: asyncio.Event | None = None      # when set, get() waits for it

    # -- what the tests drive ------------------------------------------------

    def set(self, item: SecretItem, *, notify: bool = True) -> None:
        self.items[item.name] = item
        if notify:
            self.notify(item.name)

    def remove(self, name: str, *, notify: bool = False) -> None:
        self.items.pop(name, None)
        if notify:
            self.notify(name)

    def notify(self, name: str) -> None:
        for listener in list(self.listeners):
            listener(name)

    # -- SecretSource ----------------------------------------------------------

    async def get(self, name: str) -> SecretItem:
        self.get_calls[name] += 1
        if self.gate is not None:
            await self.gate.wait()
        try:
            return self.items[name]
        except KeyError:
            raise SecretUnavailable(f"no secret {name!r}") from None

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        self.subscribes += 1
        self.listeners.append(listener)

        def unsubscribe() -> None:
            self.unsubscribes += 1
            self.listeners.remove(listener)

        return unsubscribe

    def release(self, name: str) -> None:
        self.released.append(name)
