"""scripts/import_layers.py (fast, no torch): rrr's imports go one way, the run plumbing imports nothing
above it, and the checker finds a cycle, an upward import and a layer on small trees."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_layers", ROOT / "scripts" / "import_layers.py")
import_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_layers)


def make_package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "rrr"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_this_checkout_has_no_cycle_and_no_upward_import_into_run_plumbing(capsys):
    graph = import_layers.import_graph(ROOT / "rrr")
    assert import_layers.cycles(graph) == []
    assert import_layers.upward_into_plumbing(graph) == []
    assert "rrr.engines" not in graph["rrr.run_dir"] and "rrr.models" not in graph["rrr.run_dir"]
    assert import_layers.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer 0: ") and "rrr.run_dir" in out


def test_layers_count_lazy_imports_and_skip_type_checking_ones(tmp_path):
    package = make_package(tmp_path, {
        "config.py": "",
        "run_dir.py": "from rrr.config import UserError\n",
        "engines/__init__.py": "def build():\n    from rrr import run_dir\n",
        "cli.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rrr import nothing\n"
                  "import rrr.engines\n",
    })
    graph = import_layers.import_graph(package)
    assert graph["rrr.engines"] == {"rrr.run_dir"}                 # the lazy import counts
    assert graph["rrr.cli"] == {"rrr.engines"}                     # the TYPE_CHECKING one does not
    assert import_layers.layers(graph) == {"rrr": 0, "rrr.config": 0, "rrr.run_dir": 1, "rrr.engines": 2,
                                           "rrr.cli": 3}


def test_a_cycle_and_an_upward_import_into_run_plumbing_fail(tmp_path, capsys):
    package = make_package(tmp_path, {
        "config.py": "",
        "run_dir.py": "def f():\n    from rrr.engines import build\n",    # plumbing importing upward
        "engines/__init__.py": "from rrr.rollout import x\n",
        "rollout.py": "def g():\n    from rrr.engines import build\n",    # engines <-> rollout
    })
    assert import_layers.main(["--package", str(package)]) == 1
    err = capsys.readouterr().err
    assert "import cycle: rrr.engines <-> rrr.rollout" in err
    assert "upward import into run plumbing: rrr.run_dir imports rrr.engines" in err
