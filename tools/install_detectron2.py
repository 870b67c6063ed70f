#!/usr/bin/env python
"""Install detectron2 into the running interpreter when it is missing.

Detectron2 publishes no wheels on PyPI. The PyPI project ``sal-detectron2`` 0.7.2 ships the
detectron2 sources (plus a CPython-3.10 ``_C`` extension and a stray top-level ``tools``
package). This script downloads that exact file, checks its sha256, repacks it as a
pure-Python ``detectron2`` 0.7.2 wheel (only the ``detectron2/`` package, no compiled
extension) and installs it with pip.

Without ``_C`` everything this project uses works (models, LazyConfig, data, the pure-Python
COCOeval fallback); only deformable convolution, rotated-box ops and the fast COCO
evaluator are unavailable.

Usage:
    python tools/install_detectron2.py          # no-op when ``import detectron2`` works
    python tools/install_detectron2.py --upstream-tools DIR   # only upstream's tools/*.py

``--upstream-tools`` extracts Detectron2's own scripts (``lazyconfig_train_net.py`` etc.) from
the same pinned wheel into DIR, whether or not detectron2 is installed; the project's interop
test runs upstream's trainer from there (``make venv`` fills ``.venv/detectron2-tools``).

The helpers (:func:`verify_sha256`, :func:`repack_pure_python`, :func:`extract_upstream_tools`)
are pure and unit-tested; :func:`ensure_detectron2` and :func:`ensure_upstream_tools` are the
whole procedures.
"""

import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple

SOURCE_PROJECT = "sal-detectron2"
VERSION = "0.7.2"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
# The only tag the source wheel is published for; its Python code runs on any Python 3.
SOURCE_PYTHON_VERSION = "3.10"
PACKAGE = "detectron2"
# Suffixes of compiled files that a pure-Python wheel must not carry.
BINARY_SUFFIXES = (".so", ".pyd", ".dylib", ".dll", ".pyc")
# Upstream's scripts sit in the wheel's top-level ``tools/`` folder. The ones the project runs
# are pinned by sha256 (the file as released; the wheel's pin alone would not say which member).
TOOLS_FOLDER = "tools"
TRAIN_NET = "lazyconfig_train_net.py"
UPSTREAM_TOOLS_SHA256 = {
    TRAIN_NET: "a6e199628bc73affd0eb1387174b7a5fa5888d2311269aac8ecfcd45c31be975",
}
# Where ``make venv`` puts them: inside the venv, so they are git-ignored and rebuilt with it.
VENV_TOOLS_DIR = "detectron2-tools"

FALLBACK_HELP = (
    "Install detectron2 yourself, e.g. build it from source on a machine with internet "
    "access and a C++ compiler:\n"
    "    pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "then rerun this command."
)
TOOLS_FALLBACK_HELP = (
    f"The scripts come from the {SOURCE_PROJECT} {VERSION} wheel on PyPI: rerun this command "
    "where pip can reach PyPI (or a mirror of it)."
)


class InstallError(RuntimeError):
    """Raised when detectron2 cannot be installed automatically."""


def sha256_hex(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str = SOURCE_SHA256) -> None:
    """Raise :class:`InstallError` naming both hashes unless ``path`` hashes to ``expected``."""
    actual = sha256_hex(path)
    if actual != expected:
        raise InstallError(
            f"refusing to use {path}: its sha256 is {actual}, expected {expected}. "
            "The downloaded file is not the audited release."
        )


def _record_hash(data: bytes) -> str:
    # RECORD uses urlsafe base64 without padding (PEP 376 / wheel spec).
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def _keep_member(name: str, package: str) -> bool:
    return (
        name.startswith(package + "/")
        and not name.endswith("/")
        and "/__pycache__/" not in name
        and not name.endswith(BINARY_SUFFIXES)
    )


def _metadata(source_metadata: str, name: str, version: str, source_name: str) -> str:
    """METADATA for the repacked wheel: new name, same runtime requirements.

    The source pins ``numpy<2`` although the pure-Python code runs on numpy 2 (the project's
    tests cover it); the pin is dropped so ``pip check`` agrees with the environment.
    """
    requires = []
    for line in source_metadata.splitlines():
        if not line.startswith("Requires-Dist:") or "extra ==" in line:
            continue
        requirement = line.split(":", 1)[1].strip()
        if requirement.startswith("dataclasses"):
            continue  # backport for Python < 3.7 only
        if requirement.replace(" ", "") == "numpy<2":
            requirement = "numpy"
        requires.append(f"Requires-Dist: {requirement}")
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        "Summary: Detectron2 (pure-Python repack without the compiled _C extension)",
        "Home-page: https://github.com/facebookresearch/detectron2",
        "Author: FAIR",
        "License: Apache-2.0",
        "Requires-Python: >=3.8",
        *requires,
        "",
        f"Repacked by iTPN-D2's tools/install_detectron2.py from {source_name}.",
        "",
    ]
    return "\n".join(lines)


def repack_pure_python(
    source_wheel: Path,
    out_dir: Path,
    package: str = PACKAGE,
    version: str = VERSION,
) -> Path:
    """Write a ``{package}-{version}-py3-none-any.whl`` holding only ``package/`` of the source.

    Compiled files, ``__pycache__`` and any other top-level package are dropped; a new
    ``.dist-info`` (METADATA, WHEEL, top_level.txt, the source's LICENSE, RECORD) is written.

    Args:
        source_wheel: the wheel to repack.
        out_dir: folder for the new wheel (created if missing).
        package: the top-level package to keep; also the new distribution name.
        version: version of the new distribution.

    Returns:
        Path of the new wheel.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info = f"{package}-{version}.dist-info"
    target = out_dir / f"{package}-{version}-py3-none-any.whl"

    with zipfile.ZipFile(source_wheel) as src:
        names = src.namelist()
        kept = sorted(n for n in names if _keep_member(n, package))
        if f"{package}/__init__.py" not in kept:
            raise InstallError(f"{source_wheel} holds no {package}/__init__.py")
        source_meta = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        license_file = next((n for n in names if n.endswith(".dist-info/LICENSE")), None)
        files: List[Tuple[str, bytes]] = [(n, src.read(n)) for n in kept]
        metadata = _metadata(
            src.read(source_meta).decode("utf-8") if source_meta else "",
            package,
            version,
            Path(source_wheel).name,
        )
        if license_file:
            files.append((f"{dist_info}/LICENSE", src.read(license_file)))

    wheel_file = (
        "Wheel-Version: 1.0\n"
        "Generator: itpn-d2 tools/install_detectron2.py\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n"
    )
    files += [
        (f"{dist_info}/METADATA", metadata.encode("utf-8")),
        (f"{dist_info}/WHEEL", wheel_file.encode("utf-8")),
        (f"{dist_info}/top_level.txt", f"{package}\n".encode("utf-8")),
    ]
    record = "".join(f"{n},{_record_hash(data)},{len(data)}\n" for n, data in files)
    record += f"{dist_info}/RECORD,,\n"
    files.append((f"{dist_info}/RECORD", record.encode("utf-8")))

    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
    tmp.replace(target)
    return target


def extract_upstream_tools(
    source_wheel: Path,
    out_dir: Path,
    expected: Dict[str, str] = UPSTREAM_TOOLS_SHA256,
) -> List[Path]:
    """Copy the wheel's ``tools/*.py`` (and its LICENSE) into ``out_dir``.

    Every file named in ``expected`` must be present with that sha256; nothing is written
    otherwise, so a bad wheel cannot leave a half-updated folder.

    Args:
        source_wheel: the sal-detectron2 wheel.
        out_dir: destination folder (created if missing); existing files are overwritten.
        expected: file name -> sha256 of the pinned scripts.

    Returns:
        Paths of the extracted scripts, sorted.
    """
    with zipfile.ZipFile(source_wheel) as src:
        names = src.namelist()
        scripts = {
            PurePosixPath(n).name: src.read(n)
            for n in names
            if str(PurePosixPath(n).parent) == TOOLS_FOLDER and n.endswith(".py")
        }
        license_file = next((n for n in names if n.endswith(".dist-info/LICENSE")), None)
        license_text = src.read(license_file) if license_file else None
    for name, sha in expected.items():
        if name not in scripts:
            raise InstallError(f"{source_wheel} holds no {TOOLS_FOLDER}/{name}")
        actual = hashlib.sha256(scripts[name]).hexdigest()
        if actual != sha:
            raise InstallError(
                f"refusing to use {TOOLS_FOLDER}/{name} of {source_wheel}: its sha256 is "
                f"{actual}, expected {sha}. The file is not the audited release."
            )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = dict(scripts)
    if license_text is not None:
        files["LICENSE"] = license_text  # Apache-2.0 travels with the code
    for name, data in files.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out_dir / name)  # atomic: an interrupted run leaves no truncated script
    return sorted(out_dir / name for name in scripts)


def installed_detectron2(python: str = sys.executable) -> Optional[str]:
    """``"VERSION at PATH"`` if ``python`` can import detectron2, else ``None``."""
    probe = (
        "import os, detectron2; "
        "print(detectron2.__version__, 'at', os.path.dirname(detectron2.__file__))"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def _run(cmd: Sequence[str], what: str) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(list(cmd))
    if result.returncode != 0:
        raise InstallError(f"{what} failed (exit code {result.returncode})")


def download_source_wheel(dest: Path, python: str = sys.executable) -> Path:
    """Download the pinned source wheel into ``dest`` with pip and return its path."""
    _run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            SOURCE_PYTHON_VERSION,
            "-d",
            str(dest),
            f"{SOURCE_PROJECT}=={VERSION}",
        ],
        f"downloading {SOURCE_PROJECT}=={VERSION}",
    )
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def ensure_detectron2(python: str = sys.executable) -> str:
    """Make ``import detectron2`` work for ``python``; return ``"VERSION at PATH"``.

    Does nothing when detectron2 is already importable. Raises :class:`InstallError` with an
    explanation otherwise.
    """
    found = installed_detectron2(python)
    if found:
        print(f"detectron2 {found} is already installed; nothing to do.")
        return found

    with tempfile.TemporaryDirectory(prefix="itpn-d2-detectron2-") as tmp:
        tmp = Path(tmp)
        source = download_source_wheel(tmp / "download", python)
        verify_sha256(source)
        wheel = repack_pure_python(source, tmp / "wheel")
        _run(
            [python, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
            f"installing {wheel.name}",
        )

    found = installed_detectron2(python)
    if not found:
        raise InstallError(f"detectron2 was installed but `{python} -c 'import detectron2'` fails")
    print(f"detectron2 {found} installed.")
    return found


def ensure_upstream_tools(out_dir: Path, python: str = sys.executable) -> Path:
    """Make ``out_dir`` hold upstream's ``tools/*.py`` of the pinned release; return the path
    of its ``lazyconfig_train_net.py``.

    Independent of whether detectron2 is installed. No download when every pinned script is
    already there with the right sha256.
    """
    out_dir = Path(out_dir)
    pinned = [out_dir / name for name in UPSTREAM_TOOLS_SHA256]
    if all(p.is_file() and sha256_hex(p) == UPSTREAM_TOOLS_SHA256[p.name] for p in pinned):
        print(f"Detectron2 {VERSION} tools are already in {out_dir}; nothing to do.")
        return out_dir / TRAIN_NET
    with tempfile.TemporaryDirectory(prefix="itpn-d2-detectron2-") as tmp:
        source = download_source_wheel(Path(tmp) / "download", python)
        verify_sha256(source)
        scripts = extract_upstream_tools(source, out_dir, UPSTREAM_TOOLS_SHA256)
    print(f"Detectron2 {VERSION} tools ({len(scripts)} scripts) extracted into {out_dir}.")
    return out_dir / TRAIN_NET


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--upstream-tools",
        metavar="DIR",
        type=Path,
        help="instead of installing detectron2, put Detectron2's own tools/*.py "
        f"(lazyconfig_train_net.py, ...) of the pinned {VERSION} release into DIR",
    )
    args = parser.parse_args(argv)
    try:
        if args.upstream_tools is not None:
            ensure_upstream_tools(args.upstream_tools)
        else:
            ensure_detectron2()
    except InstallError as e:
        if args.upstream_tools is not None:
            print(f"ERROR: could not fetch Detectron2's tools: {e}\n{TOOLS_FALLBACK_HELP}",
                  file=sys.stderr)
        else:
            print(f"ERROR: could not install detectron2 automatically: {e}\n{FALLBACK_HELP}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
