"""mla_decode and mla_cache_write with NaN / inf in their inputs, on every backend: the rule of
reference/mla.py (a query that sees a key whose score is not finite gets out = lse = NaN, only that
query; keys a query does not see never reach it; the FP8 write keeps a tile's NaN / inf in its
scale), and bf16 subnormals stored as torch rounds them."""

import pytest
import torch

from dsv3_kernels import dispatch
from dsv3_kernels.reference import mla as ref

from test_mla import SCALE, make_cache
from test_mla_fp8_cache import make_fp8_cache

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the interpreter's
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]  # NaN math (numpy)

CACHES = ["bf16", "fp32", "fp8"]


def _case(kind, seqlens, device, s_q, h):
    """q, cache, block_table, seqlens of test_mla.py / test_mla_fp8_cache.py (unused slots NaN)."""
    if kind == "fp8":
        return make_fp8_cache(seqlens, 64, torch.bfloat16, device, s_q=s_q, h=h)[:4]
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    return make_cache(seqlens, 64, dtype, device, s_q=s_q, h=h)


def _decode(backend, args, num_splits):
    q, cache = args[:2]
    if backend == "cuda" and q.dtype == torch.float32:
        pytest.skip("the CUDA kernel takes bfloat16/float16 q (float32 goes to triton)")
    return dispatch.implementation("mla_decode", backend)(*args, SCALE, True, num_splits)


def check(got, args, nan):
    """got (out, lse) against the reference over the same inputs: NaN exactly at the queries `nan`
    ([B, s_q, H] bool), the rest close (the attention's own rounding)."""
    q, cache, block_table, seqlens = (t.cpu() for t in args)
    want_out, want_lse = ref.mla_decode(q.float(), cache, block_table, seqlens, SCALE, True)
    out, lse = got[0].cpu().float(), got[1].cpu()
    lse_nan = nan.permute(0, 2, 1)  # lse is [B, H, s_q]
    assert torch.equal(want_out.isnan().all(-1), nan) and torch.equal(want_lse.isnan(), lse_nan)
    assert torch.equal(out.isnan().all(-1), nan) and not out[~nan].isnan().any()
    assert torch.equal(lse.isnan(), lse_nan)
    tol = 1e-4 if q.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out[~nan], want_out[~nan].float(), rtol=0, atol=tol * want_out[~nan].abs().max())
    torch.testing.assert_close(lse[~lse_nan], want_lse[~lse_nan], rtol=0, atol=tol)


@pytest.mark.ops("mla_decode")
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kind", CACHES)
def test_mla_decode_nonfinite_query(device, backend, kind, num_splits):
    """A NaN or inf in one query head's q gives that head and token NaN out and lse (not 0 / -inf,
    which reads as "no key", nor a NaN out with a finite lse); the same head with no key to see
    gets 0 / -inf; every other query is the reference's."""
    args = _case(kind, [70, 0, 130], device, s_q=2, h=5)
    q = args[0]
    q[0, 1, 2, 7] = float("nan")
    q[2, 0, 4, 520] = float("inf")  # in q_pe
    q[1, 0, 0, 3] = float("nan")  # request 1 has no key
    out, lse = _decode(backend, args, num_splits)
    nan = torch.zeros(3, 2, 5, dtype=torch.bool)
    nan[0, 1, 2] = nan[2, 0, 4] = True
    assert (out[1].cpu() == 0).all() and (lse[1].cpu() == float("-inf")).all()
    check((out, lse), args, nan)


# Where a key is poisoned: (cache kinds, what is written into the token).
KEY_POISONS = {
    "c_kv-nan": (("bf16", "fp32"), lambda tok: tok.__setitem__(10, float("nan"))),
    "c_kv-inf": (("bf16", "fp32"), lambda tok: tok.__setitem__(300, float("inf"))),
    "k_pe-nan": (("bf16", "fp32"), lambda tok: tok.__setitem__(517, float("nan"))),
    "fp8-nan-code": (("fp8",), lambda tok: tok.__setitem__(10, 0xFF)),
    "fp8-nan-scale": (("fp8",), lambda tok: tok[512 + 4:512 + 8].copy_(torch.tensor([float("nan")]).view(torch.uint8))),
    "fp8-inf-scale": (("fp8",), lambda tok: tok[512 + 8:512 + 12].copy_(torch.tensor([float("inf")]).view(torch.uint8))),
    "fp8-k_pe-inf": (("fp8",), lambda tok: tok[528 + 10:528 + 12].copy_(
        torch.tensor([float("-inf")], dtype=torch.bfloat16).view(torch.uint8))),
}


@pytest.mark.ops("mla_decode")
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("poison", list(KEY_POISONS))
def test_mla_decode_nonfinite_key(device, backend, poison, num_splits):
    """A key whose c_kv / k_pe / FP8 code / tile scale is NaN or inf makes NaN the queries that see
    it: request 0's last key is seen by its second new token only (causal), so its first token's
    heads stay the reference's (the key's NaN value must not reach them as 0 * NaN); request 1's
    key 40 is seen by all of its queries."""
    kinds, write = KEY_POISONS[poison]
    for kind in kinds:
        args = _case(kind, [70, 130], "cpu", s_q=2, h=3)
        cache, block_table = args[1], args[2]
        for req, pos in ((0, 69), (1, 40)):
            write(cache[block_table[req, pos // 64], pos % 64])
        args = [t.to(device) for t in args]
        out, lse = _decode(backend, args, num_splits)
        nan = torch.zeros(2, 2, 3, dtype=torch.bool)
        nan[0, 1] = nan[1] = True
        check((out, lse), args, nan)


@pytest.mark.ops("mla_cache_write")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_cache_write_nonfinite(device, backend, dtype):
    """A NaN in a 128-value tile of c_kv makes its scale NaN and its codes NaN; an inf makes the
    scale inf, the inf's code NaN and the others +-0 (reference/mla.py; not the -0.0 scale of a
    rounding wrapped around, which zeroed the tile); k_pe's NaN is stored as NaN. The other tiles
    hold the reference's bytes."""
    t = 5
    kv_c, k_pe = torch.randn(t, 512) * 3, torch.randn(t, 64)
    kv_c[1, 200] = float("nan")
    kv_c[3, 5], kv_c[3, 400] = float("inf"), float("-inf")
    k_pe[2, 7] = float("nan")
    kv_c, k_pe = kv_c.to(dtype), k_pe.to(dtype)
    cache = torch.full((2, 16, ref.FP8_TOKEN_BYTES), 0xFF, dtype=torch.uint8)
    slots = torch.randperm(32)[:t]
    want = cache.clone()
    ref.mla_cache_write(kv_c, k_pe, want, slots)
    args = [x.to(device) for x in (kv_c, k_pe, cache, slots)]
    dispatch.implementation("mla_cache_write", backend)(*args, None, 1e-6, None, None)
    got, want = args[2].cpu().view(-1, ref.FP8_TOKEN_BYTES)[slots], want.view(-1, ref.FP8_TOKEN_BYTES)[slots]

    scales, want_scales = got[:, 512:528].view(torch.float32), want[:, 512:528].view(torch.float32)
    assert want_scales[1, 1].isnan() and want_scales[3, 0] == float("inf") and want_scales[3, 3] == float("inf")
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0, equal_nan=True)
    codes, want_codes = got[:, :512], want[:, :512]
    nan_code = (want_codes & 0x7F) == 0x7F  # NaN codes: equal up to the sign
    assert nan_code[1, 128:256].all() and nan_code[3, 5] and nan_code[3, 400] and nan_code.sum() == 130
    assert torch.equal((codes & 0x7F) == 0x7F, nan_code) and torch.equal(codes[~nan_code], want_codes[~nan_code])
    pe, want_pe = got[:, 528:].view(torch.bfloat16), want[:, 528:].view(torch.bfloat16)
    assert want_pe[2, 7].isnan()
    torch.testing.assert_close(pe, want_pe, rtol=0, atol=0, equal_nan=True)


@pytest.mark.ops("mla_cache_write")
def test_cache_write_keeps_bf16_subnormals(device, backend):
    """bf16 subnormals (below 2^-126) are stored as torch rounds them, not flushed or mangled: a
    bf16 kv_c's bits unchanged, fp32 values rounded to nearest even. (Triton's interpreter mangles
    them in its own casts, test_triton_interpreter.py; the kernel converts on the bits there.)"""
    t = 6
    tiny = torch.randn(t, 576) * torch.randint(-140, -120, (t, 576)).float().exp2()
    for kv_dtype in (torch.bfloat16, torch.float32):
        x = tiny.to(kv_dtype)
        assert (x.bfloat16().float().abs() < 2.0 ** -126).float().mean() > 0.3
        cache = torch.full((1, 16, 576), float("nan"), dtype=torch.bfloat16)
        slots = torch.randperm(16)[:t]
        want = cache.clone()
        ref.mla_cache_write(x[:, :512], x[:, 512:], want, slots)
        args = [a.to(device) for a in (x[:, :512].contiguous(), x[:, 512:].contiguous(), cache, slots)]
        dispatch.implementation("mla_cache_write", backend)(*args, None, 1e-6, None, None)
        assert torch.equal(args[2].cpu().view(torch.int16), want.view(torch.int16))
