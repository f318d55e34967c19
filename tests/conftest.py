"""Shared fixtures: a private Mosquitto per test module, started from the project's config."""

import socket
from collections.abc import Iterator

import pytest

from broker.launcher import PrivateBroker


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    b = PrivateBroker(tmp_path_factory.mktemp("broker")).start()
    try:
        yield b
    finally:
        b.close()


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
