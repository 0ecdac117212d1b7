"""Where Triton's interpreter (TRITON_INTERPRET=1) computes otherwise than a GPU, shown on the raw
operations, so that the kernels' workarounds (keyed on registration.INTERPRETED) are known to
answer the interpreter and not a kernel bug; if one of these starts to fail after a Triton
upgrade, the interpreter was fixed and that workaround can go.

- bf16 <-> fp32 casts: the interpreter converts by a generic bit recipe that truncates instead of
  rounding and mangles subnormal values (below 2^-126): mla._to / mla._f32 convert on the bits
  there (mla_cache_write, rms_norm, the MoE kernels' bf16 stores).
- e4m3 -> fp32: it reads the NaN codes 0x7F / 0xFF as +-480: fp8._e4m3_to_f32 puts the NaN back.
On a GPU the same raw operations must give torch's values (the hardware conversions).
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dsv3_kernels.triton import fp8 as tfp8  # noqa: E402
from dsv3_kernels.triton import mla as tmla  # noqa: E402
from dsv3_kernels.triton.registration import INTERPRETED  # noqa: E402

if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton runs here neither on a GPU nor in its interpreter", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"


@triton.jit
def _bf16_casts(x_ptr, raw_ptr, fixed_ptr, raw_back_ptr, fixed_back_ptr, N: tl.constexpr,
                INTERPRET: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(raw_ptr + i, x.to(tl.bfloat16))
    tl.store(fixed_ptr + i, tmla._to(x, tl.bfloat16, INTERPRET))
    b = tl.load(fixed_ptr + i)
    tl.store(raw_back_ptr + i, b.to(tl.float32))
    tl.store(fixed_back_ptr + i, tmla._f32(b, INTERPRET))


@triton.jit
def _e4m3_casts(x_ptr, raw_ptr, fixed_ptr, N: tl.constexpr, INTERPRET: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(raw_ptr + i, x.to(tl.float32))
    tl.store(fixed_ptr + i, tfp8._e4m3_to_f32(x, INTERPRET))


def _bits(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def test_bf16_casts():
    """Subnormal fp32 values and halfway cases -> bf16 -> fp32: torch's round-to-nearest-even bits
    through _to / _f32 everywhere; the raw casts the same on a GPU, not in the interpreter."""
    n = 64
    tiny = torch.randn(n // 2) * torch.randint(-140, -126, (n // 2,)).float().exp2()  # bf16 subnormals
    halfway = 1 + (2 * torch.arange(n // 2) + 1).float() * 2.0 ** -8  # exactly between two bf16
    x = torch.cat([tiny, halfway]).to(DEVICE)
    raw, fixed = torch.empty(n, dtype=torch.bfloat16, device=DEVICE), torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    raw_back, fixed_back = torch.empty(n, device=DEVICE), torch.empty(n, device=DEVICE)
    _bf16_casts[(1,)](x, raw, fixed, raw_back, fixed_back, N=n, INTERPRET=INTERPRETED)
    want = x.bfloat16()
    assert torch.equal(_bits(fixed), _bits(want))
    assert torch.equal(_bits(fixed_back), _bits(want.float()))
    raw_ok = torch.equal(_bits(raw), _bits(want)) and torch.equal(_bits(raw_back), _bits(want.float()))
    assert raw_ok != INTERPRETED, ("the interpreter's bf16 casts now round and keep subnormals: drop the "
                                   "INTERPRET branches of mla._to / mla._f32" if INTERPRETED else
                                   "the GPU's bf16 casts differ from torch's")


def test_e4m3_nan_codes():
    """Every e4m3 byte -> fp32: torch's value (NaN for 0x7F / 0xFF) through _e4m3_to_f32 everywhere;
    the raw cast the same on a GPU, in the interpreter +-480 for the NaN codes."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    x = codes.view(torch.float8_e4m3fn).to(DEVICE)
    raw, fixed = torch.empty(256, device=DEVICE), torch.empty(256, device=DEVICE)
    _e4m3_casts[(1,)](x, raw, fixed, N=256, INTERPRET=INTERPRETED)
    want = x.float()
    torch.testing.assert_close(fixed, want, rtol=0, atol=0, equal_nan=True)
    if INTERPRETED:
        assert raw[0x7F] == 480 and raw[0xFF] == -480, "the interpreter now decodes e4m3 NaN: drop _e4m3_to_f32's fix"
    else:
        torch.testing.assert_close(raw, want, rtol=0, atol=0, equal_nan=True)
