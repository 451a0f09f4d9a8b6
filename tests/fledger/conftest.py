"""Fixtures of the fledger tests, on one server and across the servers of a cluster."""
from __future__ import annotations

from typing import Any

import pytest
import websockets

from clients import recv
from fledger.nodes import Node, challenge_of


@pytest.fixture
async def connect():
    """``await connect(server)``: a Node whose challenge has been read; closed after the test.
    ``await connect(url)`` connects to that URL."""
    opened: list[Any] = []

    async def open_node(server: Any, path: str = "/") -> Node:
        url = server if isinstance(server, str) else server.url(path)
        ws = await websockets.connect(url, max_size=None)
        opened.append(ws)
        return Node(ws, challenge_of(await recv(ws)))

    yield open_node
    for ws in opened:
        ws.transport.abort()
