"""The PostgreSQL test service itself: it serves, isolates databases, and survives a stop and start."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import pytest

from tests.services.postgres import PostgresServer


def test_server_accepts_a_connection_and_runs_a_query(postgres_url):
    with psycopg.connect(postgres_url, connect_timeout=5) as connection:
        row = connection.execute("SELECT current_database(), current_user, inet_server_addr()::text, 6 * 7").fetchone()
    assert row == (urlsplit(postgres_url).path.lstrip("/"), "lgw", "127.0.0.1/32", 42)


def test_new_databases_are_distinct_and_isolated(postgres_server: PostgresServer):
    first, second = postgres_server.new_database("iso"), postgres_server.new_database("iso")
    assert first != second
    with psycopg.connect(first, autocommit=True, connect_timeout=5) as connection:
        connection.execute("CREATE TABLE adapters (name text PRIMARY KEY)")
        connection.execute("INSERT INTO adapters VALUES ('pirate')")
    with psycopg.connect(second, connect_timeout=5) as connection:
        assert connection.execute("SELECT to_regclass('adapters')").fetchone() == (None,)
    with psycopg.connect(postgres_server.url, connect_timeout=5) as connection:
        names = {name for (name,) in connection.execute("SELECT datname FROM pg_database")}
    assert {urlsplit(first).path.lstrip("/"), urlsplit(second).path.lstrip("/")} <= names


def test_stop_refuses_connections_and_start_brings_the_data_back(postgres_server: PostgresServer):
    url = postgres_server.new_database("fault")
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
        connection.execute("CREATE TABLE tenants (name text PRIMARY KEY)")
        connection.execute("INSERT INTO tenants VALUES ('acme'), ('globex')")
    try:
        postgres_server.stop()
        assert not postgres_server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)

        postgres_server.start()
        assert postgres_server.running
        with psycopg.connect(url, connect_timeout=5) as connection:
            names = [name for (name,) in connection.execute("SELECT name FROM tenants ORDER BY name")]
        assert names == ["acme", "globex"]
    finally:
        postgres_server.start()  # for the tests after this one, whatever happened here


def test_postgres_url_restarts_a_stopped_server(postgres_server: PostgresServer, request):
    postgres_server.stop()
    url = request.getfixturevalue("postgres_url")
    assert postgres_server.running
    with psycopg.connect(url, connect_timeout=5) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
