"""The one view a mode's core has of a connection: something it can send to and close.

The WebSocket base protocol (:class:`questsig.websocket.Connection`) is one; the recording
fakes of the core tests are another. Cores import nothing else of the transport.
"""
from __future__ import annotations

from typing import Iterable, Protocol


class Peer(Protocol):
    def send(self, payload: bytes, binary: bool = False) -> None:
        """Queue one message (text unless ``binary``) to the client."""

    def close(self, code: int, reason: str = "") -> None:
        """Start closing the connection with this close code and reason."""


def send_each(peers: Iterable[Peer], payload: bytes, binary: bool = False) -> None:
    """A core's default fan-out: the same message to every peer, one ``send`` each. Adapters
    pass :func:`questsig.websocket.broadcast` instead, which frames the message once."""
    for peer in peers:
        peer.send(payload, binary)
