"""The import layers of lsef_ext: ops -> nn/optim -> train (data beside it) -> demo/bench/export
-> cli.

The top layer, the ``lsef`` command, is the top-level module ``lsef_cli`` beside the package (so
that ``lsef --help`` need not import torch): an import of ``lsef_cli`` counts as one of "cli".

A module may import modules of its own layer or of a lower one, never of a higher one. Every
``import`` and ``from ... import`` counts wherever it stands (module level, inside a function or
class, under ``if TYPE_CHECKING``), in relative (``from .x import``, ``from . import x``) and
absolute (``import lsef_ext.x``, ``from lsef_ext import x``) form, and so does
``importlib.import_module`` / ``__import__`` of a literal name. The test reads the source files
with ``ast``; it imports nothing from lsef_ext.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = "lsef_ext"
COMMAND = "lsef_cli"  # the top layer, outside the package
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE

# Lower number, lower layer. "__init__" is the package itself (``import lsef_ext``, and
# ``from lsef_ext import <name that is not a module>``); "_C" is the compiled library.
LAYERS = {
    "_C": 0,
    "_C_cuda": 0,  # the compiled CUDA kernels
    "_schemas": 0,  # the op schemas
    "__init__": 0,
    "rpca": 0,  # robust-PCA helpers that ops uses
    "ops": 0,
    "nn": 1,
    "optim": 1,
    "data": 2,
    "train": 2,
    "demo": 3,
    "bench": 3,
    "export": 3,  # lsef export: a checkpoint (train) to a deployable program
    "cli": 4,  # lsef_cli, outside the package
}


def _module_names():
    return sorted(p.stem for p in SOURCE.glob("*.py"))


def _resolve_from(level: int, module: str, names, importer: str):
    """The lsef_ext modules a ``from <level dots><module> import <names>`` imports (empty for
    another package). ``importer`` is the module holding the statement (for relative imports)."""
    if level:
        if level > 1:  # lsef_ext has no subpackages: two dots leave the package
            return [f"<{'.' * level}{module} from {importer}: outside {PACKAGE}>"]
        parts = module.split(".") if module else []
    else:
        parts = module.split(".")
        if parts[0] == COMMAND:
            return ["cli"]
        if parts[0] != PACKAGE:
            return []
        parts = parts[1:]
    if parts:
        return [parts[0]]
    # from lsef_ext import a, b / from . import a, b: each name is a submodule or a package
    # attribute
    return [n if n in LAYERS or (SOURCE / f"{n}.py").exists() else "__init__" for n in names]


def _resolve_string(name: str, importer: str):
    """The lsef_ext module that ``importlib.import_module(name)`` imports (relative to lsef_ext)."""
    if name.startswith("."):
        level = len(name) - len(name.lstrip("."))
        return _resolve_from(level, name.lstrip("."), [], importer) or ["__init__"]
    parts = name.split(".")
    if parts[0] == COMMAND:
        return ["cli"]
    if parts[0] != PACKAGE:
        return []
    return [parts[1]] if len(parts) > 1 else ["__init__"]


def imports_of(source: str, importer: str):
    """``[(line, imported lsef_ext module)]`` for every import in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == COMMAND:
                    found.append((node.lineno, "cli"))
                elif parts[0] == PACKAGE:
                    found.append((node.lineno, parts[1] if len(parts) > 1 else "__init__"))
        elif isinstance(node, ast.ImportFrom):
            for target in _resolve_from(
                node.level, node.module or "", [a.name for a in node.names], importer
            ):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = (
                fn.attr
                if isinstance(fn, ast.Attribute)
                else fn.id
                if isinstance(fn, ast.Name)
                else ""
            )
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                for target in _resolve_string(node.args[0].value, importer):
                    found.append((node.lineno, target))
    return found


def violations(source: str, importer: str):
    """Messages for each import in ``source`` (module ``importer``) that goes up a layer or to a
    module missing from LAYERS."""
    out = []
    mine = LAYERS[importer]
    for line, target in imports_of(source, importer):
        if target not in LAYERS:
            out.append(
                f"{PACKAGE}/{importer}.py:{line} imports {target!r}, which has no layer in LAYERS"
            )
        elif LAYERS[target] > mine:
            out.append(
                f"{PACKAGE}/{importer}.py:{line} imports {target} (layer {LAYERS[target]}) "
                f"from layer {mine}"
            )
    return out


def test_every_module_has_a_layer():
    missing = [m for m in _module_names() if m not in LAYERS]
    assert not missing, f"add these modules of {PACKAGE}/ to LAYERS in {__file__}: {missing}"


@pytest.mark.parametrize("module", _module_names())
def test_no_upward_import(module):
    if module not in LAYERS:
        pytest.skip("not in LAYERS (test_every_module_has_a_layer fails)")
    source = (SOURCE / f"{module}.py").read_text(encoding="utf-8")
    found = violations(source, module)
    assert not found, "upward imports:\n" + "\n".join(found)


def test_the_checker_sees_every_form_of_import():
    """The check itself: each form of an upward import is caught, downward ones are not."""
    upward = {
        "from .train import Trainer": "train",
        "from . import demo": "demo",
        "from . import demo as d, ops": "demo",
        "import lsef_ext.cli": "cli",
        "import lsef_cli": "cli",
        "from lsef_cli import UserError": "cli",
        "m = __import__('lsef_cli')": "cli",
        "import lsef_ext.bench as b": "bench",
        "from lsef_ext import train": "train",
        "from lsef_ext.demo import CONDITIONS": "demo",
        "def f():\n    from .train import evaluate\n": "train",
        "class C:\n    def m(self):\n        import lsef_ext.data\n": "data",
        "if TYPE_CHECKING:\n    from .train import TrainConfig\n": "train",
        "try:\n    from .cli import main\nexcept ImportError:\n    pass\n": "cli",
        "import importlib\nm = importlib.import_module('lsef_ext.train')": "train",
        "m = __import__('lsef_ext.demo')": "demo",
    }
    for src, target in upward.items():
        assert target in [t for _, t in imports_of(src, "nn")], src
        assert violations(src, "nn"), src
    downward = [
        "from .ops import get_ops",
        "from . import ops",
        "import lsef_ext",
        "from lsef_ext import build_info",
        "import lsef_ext.ops",
        "from .nn import LSEF",
        "import torch",
        "from lsef_ref import rpca",
    ]
    for src in downward:
        assert violations(src, "train") == [], src
    assert violations("from .nope import x", "bench") == [
        "lsef_ext/bench.py:1 imports 'nope', which has no layer in LAYERS"
    ]
    assert violations("from ..other import x", "bench")
