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


@pytest.fixture(scope="session")
def smoke_run_1_to_4(tmp_path_factory):
    """A smoke run folder with stages 1-4 done, built once per session and shared. Treat it as
    read-only (figures and caches aside): a test that adds artefacts works on a `copy_run` of it."""
    from diffusion_fixtures import build_smoke_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the function-scoped `one_thread`
    try:
        return build_smoke_run(tmp_path_factory.mktemp("smoke-1-4") / "run")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_run_0_to_6(smoke_run_1_to_4, tmp_path_factory):
    """A finished smoke run folder: stages 0-6 of the smoke preset (stages 1-4 are
    `smoke_run_1_to_4`'s, copied), built once per session and shared by the end-to-end tests that
    only read a finished run. Treat it as read-only: a test that writes works on a `copy_run` of it."""
    from diffusion_fixtures import copy_run

    from ncis_core.config import load_config
    from ncis_core.runs import RunDir
    from ncis_core.stages import data_summary, evaluate, train_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = copy_run(smoke_run_1_to_4, tmp_path_factory.mktemp("smoke-0-6") / "run")
        cfg = load_config("smoke", out=str(root))
        run = RunDir.create(cfg)
        data_summary.run(cfg, run)
        for stage in (train_classifier, evaluate):
            stage.run(cfg, run, progress=False)
        return root
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def restore_scores():
    """The score registry as before the test (a test's toy score must not leak into others)."""
    from ncis_core.scores import SCORES

    saved = dict(SCORES)
    yield
    SCORES.clear()
    SCORES.update(saved)
