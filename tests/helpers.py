"""What test modules import (tests/conftest.py holds only pytest's hooks and fixtures):

    from helpers import native_only, poison_allocator

(pytest puts this folder on sys.path, as it does for conftest.py.)"""

import pytest
import torch


def native_only(*values, id=None):
    """pytest.param(*values) that Triton's interpreter (triton on the CPU) and the scalar CPU level
    do not run: a case too large for them (conftest.py deselects it there)."""
    return pytest.param(*values, id=id, marks=pytest.mark.native_only)


def poison_allocator(device):
    """Fill the next allocations' memory with NaN bytes, so a kernel that leaves part of its
    output unwritten shows it (the CUDA caching allocator hands the freed block back)."""
    if torch.device(device).type == "cuda":
        torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
        # 0xFF is NaN in fp32/bf16/fp16 and e4m3fn.
