"""A lean, portable install: optional dependencies are extras, and each one's absence is one sentence.

* pyproject.toml: matplotlib only in ``[plot]``, psycopg only in ``[postgres]``; the ``test`` extra
  (what ``make test`` and ``make demo`` install) pulls both; uvloop only where it is built.
* A missing matplotlib makes ``--plot`` one sentence naming the flag and the extra, exit code 2,
  before any computation; a missing psycopg does the same for a PostgreSQL key store.
* A missing uvloop makes ``qkdstack node`` run on asyncio's own loop, said once in the log.

Absence is simulated in-process: ``sys.modules[name] = None`` makes ``import name`` raise ImportError.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from qkdstack.cli import main
from qkdstack.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def test_optional_dependencies_are_extras() -> None:
    core = _names(PYPROJECT["dependencies"])
    extras = PYPROJECT["optional-dependencies"]
    assert "matplotlib" not in core and "psycopg" not in core
    assert "matplotlib" in _names(extras["plot"])
    assert "psycopg" in _names(extras["postgres"])
    # the test extra (make test, make demo) pulls both back in
    own = [Requirement(r) for r in extras["test"] if Requirement(r).name == "qkdstack"]
    assert own and {"plot", "postgres"} <= set().union(*(r.extras for r in own))
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-e '\.\[test\]'", makefile)


def test_uvloop_only_where_it_is_built() -> None:
    uvloop = _names(PYPROJECT["dependencies"])["uvloop"]
    assert uvloop.marker is not None
    linux = default_environment() | {"sys_platform": "linux", "platform_python_implementation": "CPython"}
    windows = linux | {"sys_platform": "win32"}
    assert uvloop.marker.evaluate(linux)
    assert not uvloop.marker.evaluate(windows)


@pytest.mark.parametrize("argv", [
    ["keyrate", "--distance-km", "0:100:10", "--optimize"],
    ["simulate", "--pulses", "1e8"],
    ["distill", "--distance-km", "10", "--rounds", "3"],
])
def test_missing_matplotlib_is_one_sentence_before_any_work(argv: list[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "x.png"
    assert main([*argv, "--plot", str(png)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing computed, nothing printed
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--plot needs matplotlib" in err and "pip install 'qkdstack[plot]'" in err
    assert not png.exists()


def test_missing_psycopg_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdstack.kms.store import open_store

    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"\[kms\] store .*pip install 'qkdstack\[postgres\]'"):
        open_store("postgresql://127.0.0.1:1/nothing")


def _loop_module() -> str:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    from qkdstack.commands.node import loop_runner

    return loop_runner()(which())


def test_node_runs_on_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("uvloop")
    assert _loop_module().startswith("uvloop")  # where it is installed, the node runs on it
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with caplog.at_level(logging.INFO, logger="qkdstack.node"):
        assert _loop_module().startswith("asyncio")
    lines = [r.getMessage() for r in caplog.records if "uvloop" in r.getMessage()]
    assert lines == ["uvloop is not installed here; running on asyncio's own event loop"]


@pytest.mark.slow
def test_demo_runs_without_uvloop(tmp_path: Path) -> None:
    """Both node processes of ``qkdstack demo`` on asyncio's loop: a ``uvloop`` that cannot be imported comes
    first on their path (it notes each attempt), and the demo still delivers identical keys."""
    import os
    import subprocess

    blocker = tmp_path / "block"
    blocker.mkdir()
    marks = tmp_path / "attempts"
    (blocker / "uvloop.py").write_text(
        "import os\n"
        "with open(os.environ['QKDSTACK_TEST_UVLOOP_MARK'], 'a') as f:\n"
        "    f.write('import\\n')\n"
        "raise ImportError('uvloop is not installed (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
           "QKDSTACK_TEST_UVLOOP_MARK": str(marks)}
    proc = subprocess.run([sys.executable, "-m", "qkdstack.cli", "demo", "--rounds", "2"], env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "identical at both sites: True" in proc.stdout
    assert marks.read_text().count("import") >= 2  # each node looked for uvloop and went on without it
