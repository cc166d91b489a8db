import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: thread hand-offs cost far more than the math (50x on a busy 2-core machine). The one
    # such fixture: every test under tests/methods/ runs on one torch thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
