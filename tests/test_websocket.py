"""The Autobahn glue every mode shares (questsig.websocket), end to end through the hub."""
from __future__ import annotations

import websockets

from clients import closed_with, echo_round_trip


async def test_a_failing_handler_closes_only_its_connection(serve) -> None:
    """An exception while handling one message closes that connection with 1011; the server
    and every other client go on."""
    server = serve(mounts=["/=hub"])
    hub = server.mode("hub").hub
    receive = hub.receive

    def fragile(client, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("a bug")
        receive(client, payload)

    server.call(setattr, hub, "receive", fragile)
    async with websockets.connect(server.url("/?user=victim")) as victim, \
            websockets.connect(server.url("/?user=other")) as other:
        await victim.send("boom")
        code, reason = await closed_with(victim)
        assert (code, reason) == (1011, "internal error")
        await echo_round_trip(other)
