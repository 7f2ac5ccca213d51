"""Suite-wide fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for every test: the tensors are tiny, so threads buy nothing, and on
    oversubscribed cores (a papermill kernel or a second job beside the suite) OpenMP thread teams
    turn millisecond kernels into tenths of a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
