"""What the hub's Web Push tests share: the VAPID subject the servers and the stub agree on,
the settings that turn push on, and a wait for the push service to finish what it was asked."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer

SUBJECT = "mailto:ops@example.com"


def push_settings(vapid: tuple[str, str], **changes: Any) -> dict[str, Any]:
    """The hub settings of push on against the local stub (a private address), with no
    interval between pushes and a short deadline; keyword arguments change or add settings."""
    settings = {"push-vapid-key": vapid[0], "push-vapid-subject": SUBJECT,
                "push-allow-private": True, "push-min-interval": 0, "push-timeout": 2.0}
    settings.update({k.replace("_", "-"): v for k, v in changes.items()})
    return settings


async def settle(*servers: Any) -> None:
    """Wait until every server's push service has stored, looked up and sent everything asked
    so far."""
    @defer.inlineCallbacks
    def idle(push: Any) -> Any:
        for _ in range(20):
            # a push ending during the flush may queue store work after it: flush only when
            # no push is under way, and check again after
            if push.in_flight:
                yield defer.DeferredList(list(push.in_flight))
                continue
            yield push.flush()
            if not push.in_flight and not push.queue:
                return
        raise AssertionError("push service never went idle")

    for server in servers:
        await server.wait(idle(server.mode("hub").push))
