"""Clients whose pins clash with vLLM's, each in a venv of its own under .venv/: lorax-client
(tests/engine/test_tgi.py) and Instructor 1.17, which pins jiter below what the openai client
here needs (tests/engine/test_structured.py).

`make venv` builds them beside the project's venv (`python -m tests.side_venvs`, from PyPI), so
that a test run does not spend its time on pip; a test that finds one missing builds it then.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VENVS = Path(__file__).resolve().parents[1] / ".venv"
INSTALL_SECONDS = 300


@dataclass(frozen=True)
class SideVenv:
    requirement: str  # what pip installs
    folder_name: str  # under .venv/
    module: str  # imported to tell that the venv is whole

    @property
    def folder(self) -> Path:
        return VENVS / self.folder_name

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"

    def ready(self) -> bool:
        if not self.python.exists():
            return False
        return subprocess.run([self.python, "-c", f"import {self.module}"], capture_output=True).returncode == 0

    def build(self) -> None:
        """Create it afresh and install the requirement: CalledProcessError or TimeoutExpired if that fails."""
        subprocess.run([sys.executable, "-m", "venv", "--clear", self.folder], check=True, timeout=60)
        subprocess.run(
            [self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", self.requirement],
            check=True,
            timeout=INSTALL_SECONDS,
            capture_output=True,
            text=True,
        )

    def python_for_tests(self) -> Path:
        """Its python, built first if missing; a failure fails the test with how to build it by hand."""
        import pytest

        if self.ready():
            return self.python
        how = f"build it with `{sys.executable} -m venv {self.folder} && {self.python} -m pip install '{self.requirement}'`"
        try:
            self.build()
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"could not install {self.requirement} into {self.folder}: {exc.stderr[-2000:]}\n{how}")
        except subprocess.TimeoutExpired:
            pytest.fail(f"installing {self.requirement} took over {INSTALL_SECONDS} s; {how}")
        return self.python


LORAX = SideVenv("lorax-client==0.6.3", "lorax-client-0.6.3", "lorax")
INSTRUCTOR = SideVenv("instructor==1.17.*", "instructor-1.17", "instructor")


def main() -> int:
    for venv in (LORAX, INSTRUCTOR):
        if not venv.ready():
            print(f"building {venv.folder} ({venv.requirement})", flush=True)
            venv.build()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
