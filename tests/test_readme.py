"""Docs test: every command in README.md's ```bash blocks is one this repository can run.

Commands are checked as a user would type them, without the hours they would take:

* ``python <script> ...`` and ``torchrun [...] <script> ...``: the script exists and its
  argument parser accepts the arguments (the script runs up to its ``parse_args`` call, which
  then stops it); torchrun's own options go through torchrun's parser. For Detectron2 tools
  with ``--config-file``, the recipe also loads and takes every ``key=value`` override.
* ``make <target>``: the target exists (``make -n``) and runs what the README says.
* A few setup commands (``pip install``, ``export``) are listed and not run.

What the quick-start commands do at toy scale is run for real elsewhere: ``make demo`` is
``tools/demo.py`` (tests/test_demo.py runs every stage with the smoke preset) and
``tools/transfer_study.py`` runs a tiny study in tests/test_transfer_study.py; the tools the
demo calls (toy data, pretraining, export, training, evaluation, visualisation) run inside it.
"""

import argparse
import contextlib
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SETUP_COMMANDS = ("pip", "export")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def readme_commands():
    """Commands of the ```bash blocks: continuation lines joined, comments dropped."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


COMMANDS = readme_commands()


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parse():
    """Make ArgumentParser.parse_args raise _Parsed(namespace) once it has parsed."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_script(script: Path, argv):
    """Run ``script`` as __main__ with ``argv`` until its arguments are parsed."""
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))
    try:
        with _stop_after_parse():
            runpy.run_path(str(script), run_name="__main__")
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        if e.code in (0, None) and ("--help" in argv or "-h" in argv):
            return None  # help printed
        raise AssertionError(f"{script.name} rejected {shlex.join(argv)} (exit {e.code})")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    raise AssertionError(f"{script} ran to the end without parsing its arguments")


def split_env(words):
    env = {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def check_script(words, env):
    script = REPO / words[0]
    assert script.is_file(), f"README refers to {words[0]}, which does not exist"
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ns = parse_script(script, words[1:])
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if ns is None:
        return None
    config = getattr(ns, "config_file", None)
    if config and script.parent.name == "tools" and script.name != "transfer_study.py":
        from detectron2.config import LazyConfig

        assert (REPO / config).is_file(), f"{config} does not exist"
        opts = list(getattr(ns, "opts", None) or [])
        # Trailing overrides swallow whatever follows them: options must come first.
        assert all("=" in o for o in opts), f"not key=value (options after overrides?): {opts}"
        cfg = LazyConfig.load(str(REPO / config))
        LazyConfig.apply_overrides(cfg, opts)
    return ns


def check_torchrun(words, env):
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(words)
    return check_script([args.training_script, *args.training_script_args], env)


def test_readme_documents_every_tool_and_full_recipe():
    """Each script of tools/ and each COCO / ADE20K recipe is named in the README (a new one
    without documentation fails here), and no placeholder of an unfinished edit is left."""
    text = README.read_text()
    entry_points = sorted(p.relative_to(REPO).as_posix() for pattern in (
        "tools/*.py", "configs/coco/*.py", "configs/ade20k/*.py") for p in REPO.glob(pattern))
    assert len(entry_points) > 20
    assert [p for p in entry_points if p not in text] == []
    assert COMMANDS[:2] == ["make demo", "make test"]
    assert not re.findall(r"DEMO_OUTPUT|TRANSFER_TABLE|\bTODO\b|\bTBD\b", text)


@pytest.mark.parametrize("target,needle", [("demo", "tools/demo.py"), ("test", "pytest")])
def test_make_targets(target, needle):
    out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert needle in out.stdout


def test_every_readme_command_parses():
    checked = 0
    for command in COMMANDS:
        env, words = split_env(shlex.split(command))
        head = words[0]
        if head == "make":
            assert words[1] in ("demo", "test", "venv"), command
            continue
        if head in SETUP_COMMANDS:
            continue
        try:
            if head in ("python", "python3"):
                check_script(words[1:], env)
            elif head == "torchrun":
                check_torchrun(words[1:], env)
            else:
                raise AssertionError(f"unexpected command in README: {command}")
        except AssertionError as e:
            raise AssertionError(f"README command failed: {command}\n{e}") from None
        checked += 1
    assert checked >= 30
