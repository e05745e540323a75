"""Clients whose pins clash with vLLM's, each in a venv of its own under .venv/: lorax-client
(tests/engine/test_tgi.py) and Instructor 1.17, which pins jiter below what the openai client
here needs (tests/engine/test_structured.py).

lm-evaluation-harness (tests/engine/test_lm_eval.py) clashes with nothing, but brings
scikit-learn, which transformers imports in every process that loads a model when it is
installed: 1.4 s of each start of a gateway's engine, a training job or a merge. Its venv sees
the project's packages (torch, transformers, PEFT for its `hf` model), so pip installs only what
lm-eval adds.

`make venv` builds them beside the project's venv (`python -m tests.side_venvs`, from PyPI), so
that a test run does not spend its time on pip; a test that finds one missing builds it then.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

VENVS = Path(__file__).resolve().parents[1] / ".venv"
INSTALL_SECONDS = 300


@dataclass(frozen=True)
class SideVenv:
    requirement: str  # what pip installs
    folder_name: str  # under .venv/
    module: str  # imported to tell that the venv is whole
    sees_project_packages: bool = False  # the project venv's packages too, after its own

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
        if self.sees_project_packages:
            # Its site-packages, as this same interpreter lays out a venv at its folder.
            own = sysconfig.get_path("purelib", vars={"base": str(self.folder), "platbase": str(self.folder)})
            # A .pth line that starts with `import` runs at startup; addsitedir also runs the
            # project venv's own .pth files (its editable install among them).
            project = sysconfig.get_path("purelib")
            (Path(own) / "project_venv.pth").write_text(f"import site; site.addsitedir({project!r})\n")
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
LM_EVAL = SideVenv("lm-eval[api]==0.4.13", "lm-eval-0.4.13", "lm_eval", sees_project_packages=True)


def main() -> int:
    for venv in (LORAX, INSTRUCTOR, LM_EVAL):
        if not venv.ready():
            print(f"building {venv.folder} ({venv.requirement})", flush=True)
            venv.build()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
