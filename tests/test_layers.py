"""The import graph points one way: server/ over adapters/, no circles, and vLLM only in the engine room."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, with_members: bool = False) -> set[str]:
    """Every module a file imports, at the top or inside a function.

    With `with_members`, `from package import name` also yields `package.name`, which is the
    module imported when `name` is one.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if with_members:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path.relative_to(ROOT)}: relative import; the tree uses absolute ones")
    return names


def modules_under(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def top_level(module: str) -> str:
    return module.partition(".")[0]


@pytest.mark.parametrize("path", modules_under("adapters"), ids=lambda p: str(p.relative_to(ROOT)))
def test_adapters_never_import_server(path):
    assert "server" not in {top_level(m) for m in imported_modules(path)}


@pytest.mark.parametrize("path", modules_under("adapters"), ids=lambda p: str(p.relative_to(ROOT)))
def test_adapters_never_import_vllm_or_the_web_framework(path):
    assert not {top_level(m) for m in imported_modules(path)} & {"vllm", "fastapi", "starlette", "uvicorn"}


def test_only_the_engine_room_imports_vllm():
    outside = [
        str(path.relative_to(ROOT))
        for path in modules_under("server")
        if "vllm" in {top_level(m) for m in imported_modules(path)} and path.parent != ROOT / "server" / "engine"
    ]
    assert outside == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def load():\n    from server.http.errors import GatewayError\n    import vllm.lora\n")
    assert imported_modules(sample) == {"server.http.errors", "vllm.lora"}


# -- circles --------------------------------------------------------------------------------------

PACKAGES = ("server", "adapters", "bench")


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (package faces, __init__.py, left out)."""
    files = {module_of(path): path for package in PACKAGES for path in modules_under(package)}
    modules = {name for name, path in files.items() if path.name != "__init__.py"}
    return {
        name: {m for m in imported_modules(files[name], with_members=True) if m in modules and m != name}
        for name in modules
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            group.append(node)
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def room_of(module: str) -> str:
    """server's rooms: each folder is one room, and each file at its top level is one."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "server" else parts[0]


def test_no_module_imports_itself_around_a_circle():
    assert circles(import_graph()) == []


def test_no_two_rooms_of_server_import_each_other_around_a_circle():
    rooms: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        if module.startswith("server."):
            rooms.setdefault(room_of(module), set()).update(
                room_of(m) for m in imported if m.startswith("server.") and room_of(m) != room_of(module)
            )
    assert circles(rooms) == []


def test_the_circle_check_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
