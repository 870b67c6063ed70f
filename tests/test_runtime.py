"""Tests of itpn_d2/runtime.py."""

import os
import subprocess
import sys

from itpn_d2.runtime import set_omp_wait_policy


def test_set_omp_wait_policy_defaults_to_passive_and_keeps_a_set_value():
    env = {}
    set_omp_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    set_omp_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_pretrain_command_waits_passively_unless_told_and_imports_change_nothing():
    """``itpn-pretrain`` (pretrain.launch) defaults OMP_WAIT_POLICY to PASSIVE before torch
    loads and keeps a given value; importing pretrain.main sets nothing."""
    code = ("import os, pretrain.main; print(os.environ.get('OMP_WAIT_POLICY'))\n"
            "from pretrain import launch\n"
            "try: launch.cli(['--help'])\nexcept SystemExit: pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout.splitlines()
        assert (out[0], out[-1]) == (str(given), want)
