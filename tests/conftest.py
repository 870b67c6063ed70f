"""Shared fixtures, the opt-in ``slow`` marker (``pytest --runslow``) and the ``gpu`` marker
(tests that need CUDA: skipped where it is not available)."""

import pytest
import torch

from itpn_d2.data.toy import make_toy_dataset


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        no_cuda = pytest.mark.skip(reason="gpu: needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(no_cuda)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy dataset (16 train / 8 val images, 128 px), made once per session."""
    root = tmp_path_factory.mktemp("itpn_toy")
    make_toy_dataset(root, num_train=16, num_val=8, image_size=128, seed=0)
    return root
