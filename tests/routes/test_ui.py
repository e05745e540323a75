"""The console's files at /ui: served from the package, with a strict Content-Security-Policy."""

from __future__ import annotations

import pytest

from server.console.router import UI_DIR

UI_FILES = sorted(p.relative_to(UI_DIR).as_posix() for p in UI_DIR.rglob("*") if p.is_file())


def csp_directives(header: str) -> dict[str, str]:
    return {part.split()[0]: " ".join(part.split()[1:]) for part in header.split(";") if part.strip()}


async def test_the_console_page_is_served_with_a_strict_policy(gateway):
    response = await gateway.client.get("/ui/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'label for="api-key">API key<' in response.text
    policy = csp_directives(response.headers["content-security-policy"])
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'"
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert "unsafe-eval" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("path", UI_FILES)
async def test_every_file_carries_the_policy(gateway, path):
    response = await gateway.client.get(f"/ui/{path}")
    assert response.status_code == 200
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_the_page_has_no_inline_script_or_style():
    """The policy would block them: everything is in files, and no element carries a style attribute."""
    html = (UI_DIR / "index.html").read_text()
    assert "<style" not in html and " style=" not in html
    assert all("src=" in tag for tag in html.split("<script")[1:])
    for script in (UI_DIR / "js").glob("*.js"):
        text = script.read_text()
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text, script.name


async def test_a_browser_asking_for_the_root_goes_to_the_console(gateway):
    response = await gateway.client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert response.status_code == 307
    assert response.headers["location"] == "/ui/"
    followed = await gateway.client.get("/ui", follow_redirects=True)
    assert followed.status_code == 200 and followed.url.path == "/ui/"


async def test_other_clients_get_the_usual_404_at_the_root(gateway):
    response = await gateway.client.get("/", headers={"Accept": "application/json"})
    assert response.status_code == 404
    assert "error" in response.json()
