"""Offline tests of tools/install_detectron2.py: hash check, wheel repacking, upstream tools."""

import base64
import csv
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "install_detectron2.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("install_detectron2", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_source_wheel(path: Path) -> Path:
    members = {
        "detectron2/__init__.py": b'__version__ = "0.7.2"\n',
        "detectron2/layers/__init__.py": b"",
        "detectron2/_C.cpython-310-x86_64-linux-gnu.so": b"\x7fELF not really",
        "detectron2/__pycache__/__init__.cpython-310.pyc": b"\x00",
        "tools/__init__.py": b"",
        "tools/train_net.py": b"print('train')\n",
        "tools/deploy/export_model.py": b"print('export')\n",
        "sal_detectron2-0.7.2.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: sal-detectron2\nVersion: 0.7.2\n"
            b"Requires-Dist: numpy<2\nRequires-Dist: yacs>=0.1.8\n"
            b'Requires-Dist: dataclasses; python_version < "3.7"\n'
            b'Requires-Dist: timm; extra == "all"\n'
        ),
        "sal_detectron2-0.7.2.dist-info/LICENSE": b"Apache License\n",
        "sal_detectron2-0.7.2.dist-info/WHEEL": (
            b"Root-Is-Purelib: false\nTag: cp310-cp310-linux_x86_64\n"
        ),
        "sal_detectron2-0.7.2.dist-info/top_level.txt": b"detectron2\ntools\n",
        "sal_detectron2-0.7.2.dist-info/RECORD": b"",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_repack_keeps_only_pure_python_package(tool, tmp_path):
    source = _fake_source_wheel(tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl")
    wheel = tool.repack_pure_python(source, tmp_path / "out")
    assert wheel.name == "detectron2-0.7.2-py3-none-any.whl"

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = "detectron2-0.7.2.dist-info"
        package_files = {n for n in names if not n.startswith(dist_info + "/")}
        assert package_files == {"detectron2/__init__.py", "detectron2/layers/__init__.py"}
        assert {
            f"{dist_info}/{f}" for f in ("METADATA", "WHEEL", "top_level.txt", "RECORD")
        } <= names

        wheel_meta = z.read(f"{dist_info}/WHEEL").decode()
        assert "Root-Is-Purelib: true" in wheel_meta and "Tag: py3-none-any" in wheel_meta
        assert z.read(f"{dist_info}/top_level.txt").decode().split() == ["detectron2"]
        metadata = z.read(f"{dist_info}/METADATA").decode()
        assert "Name: detectron2\n" in metadata and "Version: 0.7.2\n" in metadata
        requires = [l for l in metadata.splitlines() if l.startswith("Requires-Dist:")]
        assert requires == ["Requires-Dist: numpy", "Requires-Dist: yacs>=0.1.8"]

        rows = list(csv.reader(io.StringIO(z.read(f"{dist_info}/RECORD").decode())))
        recorded = {row[0]: row for row in rows}
        assert set(recorded) == names
        assert recorded[f"{dist_info}/RECORD"][1:] == ["", ""]
        for name, algo_hash, size in (r for r in rows if r[0] != f"{dist_info}/RECORD"):
            data = z.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert algo_hash == "sha256=" + digest.decode()
            assert int(size) == len(data)


def test_repack_rejects_wheel_without_package(tool, tmp_path):
    source = tmp_path / "empty.whl"
    with zipfile.ZipFile(source, "w") as z:
        z.writestr("tools/train_net.py", b"")
    with pytest.raises(tool.InstallError, match="detectron2/__init__.py"):
        tool.repack_pure_python(source, tmp_path / "out")


def test_verify_sha256_names_both_hashes(tool, tmp_path):
    path = tmp_path / "file.whl"
    path.write_bytes(b"not the release")
    actual = hashlib.sha256(b"not the release").hexdigest()
    with pytest.raises(tool.InstallError) as excinfo:
        tool.verify_sha256(path)
    assert tool.SOURCE_SHA256 in str(excinfo.value) and actual in str(excinfo.value)
    tool.verify_sha256(path, expected=actual)


def test_ensure_is_a_noop_when_detectron2_imports(tool, monkeypatch):
    pytest.importorskip("detectron2")

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when detectron2 is installed")

    monkeypatch.setattr(tool, "download_source_wheel", no_download)
    assert " at " in tool.ensure_detectron2()


TRAIN_NET_SHA256 = hashlib.sha256(b"print('train')\n").hexdigest()


def test_extract_upstream_tools_copies_top_level_scripts_and_license(tool, tmp_path):
    source = _fake_source_wheel(tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl")
    out = tmp_path / "tools"
    scripts = tool.extract_upstream_tools(source, out, {"train_net.py": TRAIN_NET_SHA256})
    assert scripts == [out / "__init__.py", out / "train_net.py"]
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "__init__.py", "train_net.py"]
    assert (out / "train_net.py").read_bytes() == b"print('train')\n"
    assert (out / "LICENSE").read_bytes() == b"Apache License\n"


def test_extract_upstream_tools_refuses_a_changed_script(tool, tmp_path):
    source = _fake_source_wheel(tmp_path / "sal.whl")
    out = tmp_path / "tools"
    with pytest.raises(tool.InstallError) as excinfo:
        tool.extract_upstream_tools(source, out, {"train_net.py": "0" * 64})
    assert str(excinfo.value) == (
        f"refusing to use tools/train_net.py of {source}: its sha256 is {TRAIN_NET_SHA256}, "
        f"expected {'0' * 64}. The file is not the audited release."
    )
    assert not out.exists()  # nothing written
    with pytest.raises(tool.InstallError, match="holds no tools/lazyconfig_train_net.py"):
        tool.extract_upstream_tools(source, out)


def test_ensure_upstream_tools_downloads_once(tool, tmp_path, monkeypatch):
    source = _fake_source_wheel(tmp_path / "sal.whl")
    downloads = []

    def fake_download(dest, python=None):
        downloads.append(dest)
        return source

    monkeypatch.setattr(tool, "download_source_wheel", fake_download)
    monkeypatch.setattr(tool, "verify_sha256", lambda path: None)
    monkeypatch.setattr(tool, "TRAIN_NET", "train_net.py")
    monkeypatch.setattr(tool, "UPSTREAM_TOOLS_SHA256", {"train_net.py": TRAIN_NET_SHA256})
    out = tmp_path / "tools"
    assert tool.ensure_upstream_tools(out) == out / "train_net.py"
    assert tool.ensure_upstream_tools(out) == out / "train_net.py"  # already there
    assert len(downloads) == 1
    (out / "train_net.py").write_bytes(b"edited")  # a changed file is fetched again
    tool.ensure_upstream_tools(out)
    assert len(downloads) == 2 and (out / "train_net.py").read_bytes() == b"print('train')\n"
