"""A non-editable install (pip --target) imports both packages from another folder, with entry points."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_target_install_imports_from_another_folder(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    shutil.copy(REPO / "setup.py", src)
    for package in ("itpn_d2", "pretrain"):
        shutil.copytree(REPO / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(target), str(src)],
                   check=True, capture_output=True)
    shutil.rmtree(src)  # imports must come from the install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ITPN_TOY_ROOT"}
    env["PYTHONPATH"] = str(target)
    code = ("import itpn_d2, pretrain, pretrain.export, itpn_d2.d2\n"
            "from itpn_d2.data.toy import default_toy_root\n"
            "print(itpn_d2.__file__, pretrain.__file__, default_toy_root(), sep='\\n')")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(target / "itpn_d2" / "__init__.py"), str(target / "pretrain" / "__init__.py"),
                   str(elsewhere / "datasets" / "itpn_toy")]

    # Every console entry point is installed, named in the README, and runs.
    (dist_info,) = target.glob("itpn_d2-*.dist-info")
    text = (dist_info / "entry_points.txt").read_text()
    scripts = re.findall(r"^(itpn-[\w-]+) = ([\w.]+):(\w+)$", text, flags=re.M)
    assert {name for name, _, _ in scripts} >= {"itpn-pretrain", "itpn-export-backbone"}
    readme = (REPO / "README.md").read_text()
    for name, _, _ in scripts:
        assert (target / "bin" / name).is_file() and f"`{name}`" in readme, name
    made = subprocess.run([str(target / "bin" / "itpn-make-toy"), "toy", "--num-train", "1",
                           "--num-val", "1", "--image-size", "32"], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (elsewhere / "toy" / "meta.json").is_file()


def _module_imports(path: Path, package: str) -> set:
    """Modules of ``package`` that ``path`` imports when it runs (type-checking-only imports
    under ``if TYPE_CHECKING:`` do not count)."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level == 1:
                name = f"{package}.{name}" if name else package
            if name == package:  # from . import x / from pretrain import x
                found.update(f"{package}.{a.name}" for a in node.names)
            elif name.startswith(package + "."):
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package + "."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_pretrain_has_no_import_cycle():
    package = REPO / "pretrain"
    graph = {f"pretrain.{p.stem}": _module_imports(p, "pretrain")
             for p in package.glob("*.py") if p.stem != "__init__"}
    assert "pretrain.engine" in graph and graph["pretrain.engine"]

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles
    assert max(len(p.read_text().splitlines()) for p in package.glob("*.py")) <= 600
    assert len((package / "engine.py").read_text().splitlines()) < 450
