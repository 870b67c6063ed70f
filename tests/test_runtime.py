"""Tests of itpn_d2/runtime.py."""

from itpn_d2.runtime import set_omp_wait_policy


def test_set_omp_wait_policy_defaults_to_passive_and_keeps_a_set_value():
    env = {}
    set_omp_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    set_omp_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
