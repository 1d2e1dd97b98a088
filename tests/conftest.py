import warnings

import pytest
import torch

warnings.filterwarnings("ignore", module="compressai")
warnings.filterwarnings("ignore", message=".*torch_geometric.*")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
