"""slots: the global concurrency slot is taken when the body's last part arrives, not before."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ccproxy import errors
from ccproxy.slots import GlobalSlots, SlotAfterBody


class Gauge:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


def _receive(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)
    return receive


def test_the_slot_is_taken_with_the_last_part_of_the_body_and_released_once() -> None:
    gauge = Gauge()
    slots = GlobalSlots(gauge)
    slot = SlotAfterBody(slots, _receive({"type": "http.request", "body": b"{", "more_body": True},
                                         {"type": "http.request", "body": b"}"},
                                         {"type": "http.disconnect"}), limit=1)

    async def run() -> None:
        await slot()
        assert slots.in_use == 0 and not slot.held  # uploading: no slot
        await slot()
        assert slots.in_use == 1 and slot.held and gauge.value == 1
        await slot()  # later messages (a disconnect) take nothing more
        assert slots.in_use == 1

    asyncio.run(run())
    slot.release()
    slot.release()
    assert slots.in_use == 0 and gauge.value == 0


def test_a_full_gateway_refuses_when_the_body_is_in() -> None:
    slots = GlobalSlots()
    slots.take(1)
    slot = SlotAfterBody(slots, _receive({"type": "http.request", "body": b"{}"}), limit=1)
    with pytest.raises(errors.Overloaded, match="limits.max_concurrent") as info:
        asyncio.run(slot())
    assert info.value.status == 503 and info.value.headers["retry-after"] == "1"
    slot.release()  # nothing was taken: nothing is given back
    assert slots.in_use == 1


def test_a_client_gone_during_the_upload_takes_no_slot() -> None:
    slots = GlobalSlots()
    slot = SlotAfterBody(slots, _receive({"type": "http.request", "body": b"{", "more_body": True},
                                         {"type": "http.disconnect"}), limit=1)

    async def run() -> None:
        await slot()
        await slot()

    asyncio.run(run())
    assert slots.in_use == 0 and not slot.held
