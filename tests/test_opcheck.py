"""Every op is a real custom op: torch.library.opcheck passes on every sample of tests/op_samples.py,
on every backend (schema, autograd registration, fake tensors, AOT dispatch)."""

import pytest
import torch

from dsv3_kernels import dispatch
from op_samples import SAMPLES


@pytest.mark.ops(*SAMPLES)
def test_opcheck(op, device, backend):
    impl = dispatch.implementation(op, backend)
    impl = impl.default if isinstance(impl, torch._ops.OpOverloadPacket) else impl
    for args, utils in SAMPLES[op](device, backend):
        torch.library.opcheck(impl, args, test_utils=utils)
