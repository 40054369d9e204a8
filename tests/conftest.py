"""Fixtures for the whole suite."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for every test, restored afterwards.

    The tests run tiny tensors: a second intra-op thread only adds contention on the shared
    2-core machine the suite runs on.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
