from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import httpx
import psutil
import pytest
from _pytest.mark.expression import Expression
from hypothesis import settings as hypothesis_settings

from adapters.database import Database, engine_url
from adapters.registry import Registry
from adapters.spec import SHARED
from server.app import build_app
from server.config import Settings
from tests.fakes import FakeEngine, fake_spec

# Session fixtures for real PostgreSQL, S3 (moto's server) and Chromium; each starts only when a test asks.
pytest_plugins = ["tests.services.postgres", "tests.services.s3", "tests.services.browser"]


# Hypothesis's cases per operation in the schemathesis fuzz (tests/test_fuzz.py), the one test that
# draws them: 40 by default (make test, CI); `make test-fast` asks for the quick profile
# (--hypothesis-profile=quick), 10, for a 2-minute loop: the fuzz drew 31 s of CPU with 40, 15 s
# with 10 (2026-12-07). Either way every operation also gets schemathesis's coverage cases, its
# boundary values and wrong types, in full.
hypothesis_settings.register_profile("thorough", max_examples=40)
hypothesis_settings.register_profile("quick", max_examples=10)
hypothesis_settings.load_profile("thorough")


TESTS = Path(__file__).parent
ENGINE_FOLDERS = ("engine", "ray")  # every test in these is marked so
ENGINE_GROUP = "engine"  # the prefix of the xdist groups of the tests that start a real engine
SHARED_GATEWAY_GROUP = f"{ENGINE_GROUP}:shared-gateway"  # the files that ask for tests/engine/'s gateway
DEMO_TESTS = TESTS / "test_demo.py"  # the demo's own tests, which build it: one group, first


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With `-m "not engine and not ray"` (make test-fast), tests/engine/ and tests/ray/ are not even
    imported: `-m` would deselect every test in them by the markers their folder gives, whatever
    other markers they carry, and importing them costs each worker seconds."""
    if collection_path.parent != TESTS or collection_path.name not in ENGINE_FOLDERS or not config.option.markexpr:
        return None
    given = {"engine"} | ({"ray"} if collection_path.name == "ray" else set())
    expression = Expression.compile(config.option.markexpr)

    def marked(others: bool):  # a test with its folder's markers, and all others or none
        return lambda name, **_: name in given or others

    if not any(expression.evaluate(marked(others)) for others in (False, True)):
        return True
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark by folder, before `-m` selects: tests/engine/ starts real engines, tests/ray/ Ray as well.

    Under pytest-xdist with `--dist loadgroup` (make test), the tests marked `engine` (those
    folders, and the tests elsewhere that start a real gateway) go to the workers in groups
    (engine_group): a group runs on one worker, in file order, as in one process. The engine-free
    tests go one by one, except that the tests of a file that share a module-scoped fixture go
    together, so that it is built once, and so do tests/test_demo.py's. The files marked
    `imports(module)` go together by module: the tests that run vLLM's grammar checks or PEFT in
    this process, each of which costs the worker that first imports it 5-12 s of CPU; one worker
    pays it, not all. The engine's groups come first (run_order), so the long ones start first.
    """
    grouping = config.getoption("loadgroup", default=False)  # set in xdist's workers
    counts = Counter(item.nodeid for item in items)
    sharing = files_sharing_the_gateway(items)
    for item in items:
        node_id = item.nodeid
        if counts[node_id] > 1 and not node_id.endswith(f"::{item.name}"):
            # Schemathesis gives each of its tests (`test_x[GET /path]`) one and the same node id;
            # xdist keys its work by node id, and ran one of test_fuzz.py's 42 tests.
            node_id = f"{node_id.rpartition('::')[0]}::{item.name}"
        folder = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else ""
        if folder in ENGINE_FOLDERS:
            item.add_marker(pytest.mark.engine)
            if folder == "ray":
                item.add_marker(pytest.mark.ray)
        if grouping:
            if item.get_closest_marker("engine"):
                group = SHARED_GATEWAY_GROUP if item.path in sharing else engine_group(item, folder)
                node_id = f"{node_id}@{group}"  # the suffix xdist's loadgroup groups by
            elif (heavy := heavy_import(item)) is not None:
                node_id = f"{node_id}@imports:{heavy}"
            elif item.path == DEMO_TESTS:
                node_id = f"{node_id}@{DEMO_TESTS.name}"
            elif shares_a_module_fixture(item):
                node_id = f"{node_id}@{item.nodeid.partition('::')[0]}"
        if node_id != item.nodeid:
            set_node_id(item, node_id)
    # A test marked `last` ends a session fixture that others use first (a gateway it kills, say).
    # Before it, the longest groups first, so that neither worker starts one late (xdist hands out
    # groups in this order): Ray's (minutes, one group), then the other engine tests, then the rest.
    # The shared gateway's group first among the engine's: it is the longest after Ray's.
    items.sort(
        key=lambda item: (item.get_closest_marker("last") is not None, run_order(item), item.path not in sharing)
    )


def files_sharing_the_gateway(items: list[pytest.Item]) -> set[Path]:
    """The files of engine tests that ask for tests/engine/'s shared gateway (all of a file's tests
    go together: they may share module-scoped fixtures too)."""
    return {
        item.path
        for item in items
        if item.get_closest_marker("engine") and not item.get_closest_marker("ray")
        if "gateway" in getattr(item, "fixturenames", ())
    }


def heavy_import(item: pytest.Item) -> str | None:
    """The module a test's file imports in this process and marks with `imports(module)`, or None."""
    mark = item.get_closest_marker("imports")
    return None if mark is None else str(mark.args[0])


def run_order(item: pytest.Item) -> tuple[int, int]:
    """Ray's tests, the other engine tests, then the engine-free ones: tests/test_demo.py (one group,
    which builds the session's demo and then one more) and the groups of the `imports` marker,
    those that need no demo, and those that do.

    Under make test-fast, one worker builds the demo (20 s) while the other runs tests that need
    none, instead of waiting on the build's lock; the tests that need it come once it is built.
    """
    if item.get_closest_marker("ray"):
        return 0, 0
    if item.get_closest_marker("engine"):
        return 1, 0
    if item.path == DEMO_TESTS or heavy_import(item) is not None:
        return 2, 0
    return 2, 2 if "demo" in getattr(item, "fixturenames", ()) else 1


def engine_group(item: pytest.Item, folder: str) -> str:
    """The xdist group of a test that starts a real engine, unless its file asks for the shared
    gateway (SHARED_GATEWAY_GROUP): each file of tests/engine/, tests/ray/ as a whole (its tests
    share Ray's gateway, which stops once they are done), and each other folder's engine tests as
    a whole (tests/security/'s share the gateway run as `nobody`, which the last of them kills).

    The two workers take these groups as they free up, beside the engine-free tests: one worker
    takes every test of the shared gateway, which so starts once in a session, while the other
    runs Ray's and the tests that start gateways of their own.
    """
    if folder == "ray":
        return "ray"
    path = item.path.relative_to(TESTS) if item.path.is_relative_to(TESTS) else item.path
    return f"{ENGINE_GROUP}:{path if folder == 'engine' else path.parent}"


def shares_a_module_fixture(item: pytest.Item) -> bool:
    """Whether the test uses a module-scoped fixture (a demo build, say), which its file's other
    tests share: on two workers that would be built twice."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values() if defs)


def set_node_id(item: pytest.Item, node_id: str) -> None:
    """What xdist's xdist_group marker does, for pytest 9.2 too, whose nodes keep their id in `_id`."""
    if hasattr(item, "_id"):
        item._id = type(item._id).parse(node_id)
    else:
        item._nodeid = node_id


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The run's wall time beside the slowest tests: README (Tests) says what it should be."""
    seconds = time.time() - psutil.Process().create_time()  # from the start of pytest's process
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    terminalreporter.write_sep(
        "=", f"wall time {seconds // 60:.0f} min {seconds % 60:.0f} s on {os.cpu_count()} CPUs (load average {load})"
    )


@pytest.fixture(autouse=True)
def _root_logger_as_it_was():
    """The root logger's handlers and level after each test as before it.

    A test that runs the command line in process (`cli.main`) leaves configure_logging's handler
    on the root logger, writing to that test's captured stderr, which pytest closes after it:
    every record any later test logged then failed, and logging printed the stack of each
    failure: 3,200 of them in a run of the engine-free tests on three workers, 6,100 (12 s of
    CPU) in one process.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def demo():
    """The embedded demo (a base model and three adapters), built once per machine and demo version
    in this user's cache, beside the one `serve` builds (~/.cache/lora-gateway/): a build takes
    20-30 s, which the first engine tests of every session used to wait for.

    ensure_demo takes a lock: workers and sessions side by side build it once, and the others load
    it. A build records its recipe (adapters/demo.py's code and the libraries' versions), and one
    by another recipe is rebuilt: a change to the build shows here, never as stale answers.
    """
    from adapters.demo import DEMO_VERSION, ensure_demo
    from server.config import default_cache_dir

    return ensure_demo(default_cache_dir() / f"test-demo-{DEMO_VERSION}")


def new_catalog(location: str | Path) -> Database:
    """The catalog at `location`, as the gateway opens it; a new SQLite file starts as a copy of an
    empty catalog this process migrated once (migrated_catalog), and the gateway finds it at the
    newest schema.

    Migrating a new file takes 40-50 ms of CPU, opening a migrated one 7 ms, and most engine-free
    tests build a gateway: in tests/routes/ the migrations took 17 of the 79 CPU seconds. The
    migrations themselves still run: here once per process, and from every schema in
    tests/test_database.py."""
    url = engine_url(location)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_catalog(), url.database)
    return Database(location)


@cache
def migrated_catalog() -> Path:
    """An empty SQLite catalog at the newest schema, closed (so its write-ahead log is merged in)."""
    folder = Path(tempfile.mkdtemp(prefix="lora-gateway-catalog-"))
    atexit.register(shutil.rmtree, folder, True)
    Database(folder / "catalog.sqlite3").close()
    return folder / "catalog.sqlite3"


@dataclass
class FakeGateway:
    client: httpx.AsyncClient
    engine: FakeEngine
    registry: Registry
    app: object = None


@pytest.fixture
async def gateway(tmp_path) -> AsyncIterator[FakeGateway]:
    """The whole app over a FakeEngine, serving base model 'base' and adapters 'alpha' and 'beta'."""
    settings = Settings(served_model_name="base", max_cpu_loras=3, max_loras=2, state_dir=tmp_path)
    engine = FakeEngine(cache_size=3)  # two adapters and the zero adapter, as the real engine gets
    registry = Registry(
        engine,
        base_name="base",
        base_adapter=fake_spec("__base__", 1),
        max_resident=2,
        catalog=new_catalog(tmp_path / "catalog.sqlite3"),
    )
    app = build_app(settings, engine, registry)
    async with app.router.lifespan_context(app):
        await registry.register(SHARED, "alpha", fake_spec("alpha"), load=True)
        await registry.register(SHARED, "beta", fake_spec("beta", 16), load=True)
        transport = httpx.ASGITransport(app=app)
        # Open mode answers local names only (server/http/open_mode.py).
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield FakeGateway(client, engine, registry, app)


ADMIN_KEY = "admin-secret-key-for-the-fast-tests-0123"


@dataclass
class FullGateway:
    """An app with a store, catalog and admin key over a FakeEngine."""

    client: httpx.AsyncClient
    engine: FakeEngine
    registry: Registry
    app: object

    def as_(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.as_(ADMIN_KEY)


@asynccontextmanager
async def full_gateway(
    state_dir: Path, engine: FakeEngine | None = None, zero_adapter: bool = True, **overrides
) -> AsyncIterator[FullGateway]:
    """Build (or rebuild, on the same state_dir) the whole gateway around a FakeEngine.

    zero_adapter: base requests run through a zero adapter (--lora-ops vllm), or carry none.
    """
    from adapters.registry import AdapterRules
    from server.gateway import open_store
    from tests.adapter_files import TINY_BASE

    settings = Settings(
        served_model_name="base",
        state_dir=state_dir,
        admin_key=ADMIN_KEY,
        lora_ops="vllm" if zero_adapter else "grouped",
        **({"max_cpu_loras": 2, "max_loras": 2} | overrides),
    )
    engine = engine or FakeEngine(cache_size=settings.max_cpu_loras + zero_adapter)
    registry = Registry(
        engine,
        base_name="base",
        base_adapter=fake_spec("__base__", 1) if zero_adapter else None,
        max_resident=settings.max_cpu_loras,
        catalog=new_catalog(settings.catalog_location),
        store=open_store(settings),
        rules=AdapterRules(TINY_BASE, settings.max_lora_rank, settings.max_adapter_bytes),
    )
    app = build_app(settings, engine, registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield FullGateway(client, engine, registry, app)
    registry.catalog.close()


@pytest.fixture
async def full(tmp_path) -> AsyncIterator[FullGateway]:
    async with full_gateway(tmp_path / "state") as gateway:
        yield gateway
