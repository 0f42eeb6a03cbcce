"""Shared pieces for tests that build networks: tiny sizes and a one-thread fixture."""

from __future__ import annotations

import pytest
import torch

TINY_UNET = {"features": [4, 4, 8, 8, 16, 4]}
TINY_DIFFUSION = {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 4}


@pytest.fixture()
def one_torch_thread():
    """Tiny tensors on shared cores: one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
