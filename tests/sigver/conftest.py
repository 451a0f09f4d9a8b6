"""Fixtures of the sigver tests over real sockets, on one node and across nodes."""
from __future__ import annotations

from typing import Any

import pytest

from sigver.test_core import compile_spec_proto


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The spec's .proto compiled by protoc: the client side of every frame."""
    return compile_spec_proto(tmp_path_factory.mktemp("protoc"))
