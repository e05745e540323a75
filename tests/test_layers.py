"""The import graph points one way: server/ over adapters/, and vLLM only in the engine room."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
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
