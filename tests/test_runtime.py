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


def test_pretrain_command_line_waits_passively_unless_told_otherwise():
    code = "import os, pretrain.main; print(os.environ.get('OMP_WAIT_POLICY'))"
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out == want
