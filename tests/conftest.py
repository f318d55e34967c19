"""Shared fixtures: a private Mosquitto per test module, started from the project's config;
a store on each backend (`kind`, `store`) for the sink tests."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sink_support import fresh_store

from broker.launcher import PrivateBroker
from cloud_sink.store import Store


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands that keep a cache (`ccus ops devices`: ~/.cache/ccus-touch/fleet.json) write
    into a temp folder, never the real home; subprocesses inherit it."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    b = PrivateBroker(tmp_path_factory.mktemp("broker")).start()
    try:
        yield b
    finally:
        b.close()


# The PostgreSQL server the tests use; scripts/setup-test-services.sh (run by ./dev.sh test)
# installs it, starts it and creates this role on a fresh machine.
PG_ADMIN_URL = os.environ.get("CCUS_TEST_PG_URL",
                              "postgresql://ccus_test:ccus_test@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test module, dropped afterwards."""
    import psycopg

    name = f"ccus_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}; "
                    "run scripts/setup-test-services.sh", pytrace=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh store of `kind` (PostgreSQL: a per-test database from `pg_url`)."""
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    with fresh_store(kind, tmp_path, url) as s:
        yield s
