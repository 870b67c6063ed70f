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
