"""Fixtures of the hub's Web Push tests, on one node and across nodes."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from hub.push_setup import SUBJECT
from hub.webpush_stub import PushServiceStub
from questsig.hub.push import generate_key


@pytest.fixture
def vapid(tmp_path: Path) -> tuple[str, str]:
    """(key file, public key) of a fresh VAPID key pair."""
    path = tmp_path / "vapid.pem"
    return str(path), generate_key(str(path))


@pytest.fixture
def stub(vapid: tuple[str, str]) -> Iterator[PushServiceStub]:
    """The local push service, expecting the VAPID key of ``vapid``; stopped after the test."""
    service = PushServiceStub(vapid[1], SUBJECT)
    yield service
    service.close()
