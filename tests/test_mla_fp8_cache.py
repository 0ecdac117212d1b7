"""The FP8 latent cache (FlashMLA's 656-byte token) on every backend against the reference.

Each backend's mla_cache_write must store the reference quantizer's bytes, and its mla_decode must
match the fp32 reference over the same quantized cache (the dequantization is exact, so only the
attention's own rounding differs); against the bf16 cache the result is only close (e4m3 loses
bits). Caches are poisoned as in test_mla.py: unused slots and blocks are 0xFF bytes (NaN as e4m3,
as a float32 scale and as bf16), unused block-table entries a huge index.
"""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import mla as ref

from helpers import poison_allocator
from builders import (ROW_BLOCK_SIZE, ROW_SEQLENS, SCALE, cache_write_cases, cache_write_results, make_fp8_cache,
                      row_count_cases, row_dtype)
from builders import make_fp8_cache_write_case as _write_case

FP8_BYTES = ref.FP8_TOKEN_BYTES


def calc_diff(x, y):
    """DeepGEMM's similarity check: 1 - 2 sum(xy) / sum(x^2 + y^2) (0 when equal)."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def _skip_unsupported(backend, block_size, dtype):
    if backend == "cuda" and block_size % 64:
        pytest.skip("the CUDA kernel needs block_size a multiple of 64 (documented)")
    if backend == "cuda" and dtype != torch.bfloat16:
        pytest.skip("the CUDA kernel takes bf16 q with the FP8 cache (others go to triton)")


def _decode(backend, args, causal, num_splits=0):
    return dispatch.implementation("mla_decode", backend)(*args, SCALE, causal, num_splits)


def check_against_reference(out, lse, args, causal):
    """Tight: the reference over the same quantized cache (within the bf16 tolerance of
    test_mla.py, whose yardstick here is the plain PyTorch decode over the dequantized cache)."""
    q, cache, block_table, seqlens = (t.cpu() for t in args)
    want_out, want_lse = ref.mla_decode(q.float(), cache, block_table, seqlens, SCALE, causal)
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == q.dtype and tuple(out.shape) == (*q.shape[:3], ref.KV_LORA_RANK)
    assert not out.isnan().any() and not lse.isnan().any()
    err = (out.float() - want_out).abs().max().item() if out.numel() else 0.0
    if q.dtype == torch.float32:
        assert err <= 2e-5 * max(1.0, want_out.abs().max().item()), err
        # scores up to ~4x test_mla.py's (token norms up to 4x): so is the tolerance
        torch.testing.assert_close(lse, want_lse, rtol=2e-6, atol=4e-5)
    else:
        deq = ref.dequantize_tokens(cache.nan_to_num()).to(q.dtype)
        deq = deq.masked_fill(cache[..., :1] == 0xFF, float("nan"))  # keep the poison visible
        naive, _ = ref.naive_absorbed_decode(q, deq, block_table, seqlens, SCALE, causal)
        err_naive = (naive.float() - want_out).abs().max().item()
        half_ulp = 2.0 ** -9 * want_out.abs().max().item()
        assert err <= max(2 * err_naive, half_ulp), (err, err_naive)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-3)
    empty = want_lse == float("-inf")
    assert (lse[empty] == float("-inf")).all()
    assert (out.float().permute(0, 2, 1, 3)[empty] == 0).all()


CASES = [
    # seqlens, block_size, s_q, H, q's dtype (each dtype on a few shapes, to keep the suite fast)
    ([1, 63, 65, 130], 64, 1, 16, torch.bfloat16),
    ([0, 1, 64, 300], 64, 2, 16, torch.bfloat16),
    ([7, 129, 0], 64, 4, 1, torch.float16),
    ([15, 17, 100], 16, 3, 16, torch.float32),
    ([33, 1, 0], 32, 1, 5, torch.float32),
    ([90, 2], 64, 2, 3, torch.float16),
]


@pytest.mark.ops("mla_decode")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"len{c[0]}-bs{c[1]}-sq{c[2]}-h{c[3]}-{c[4]}".replace("torch.", ""))
def test_fp8_decode(device, backend, case, causal):
    seqlens, block_size, s_q, h, dtype = case
    _skip_unsupported(backend, block_size, dtype)
    *args, _ = make_fp8_cache(seqlens, block_size, dtype, device, s_q=s_q, h=h)
    poison_allocator(device)
    out, lse = _decode(backend, args, causal)
    check_against_reference(out, lse, args, causal)


@row_count_cases
def test_fp8_decode_row_counts(device, backend, s_q, h, causal):
    """test_mla.py's row counts over the FP8 cache."""
    dtype = row_dtype(s_q, h)
    _skip_unsupported(backend, ROW_BLOCK_SIZE, dtype)
    *args, _ = make_fp8_cache(ROW_SEQLENS, ROW_BLOCK_SIZE, dtype, device, s_q=s_q, h=h)
    out, lse = _decode(backend, args, causal, 2 if causal else 0)
    check_against_reference(out, lse, args, causal)


@pytest.mark.ops("mla_decode")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_decode_every_code_and_extreme_scales(device, backend, dtype):
    """Every e4m3 code but the NaN ones (subnormals included) and tile scales from 2^-13 to 2^121,
    where 2^8 * scale overflows fp32 (the CPU vector paths dequantize by way of fp16 and take a
    scalar way there): dequantized exactly, so the result is the reference's. q is 0 on the
    2^121 tile, whose values would overflow the scores; they still are values of the output."""
    q, cache, block_table, seqlens, _ = make_fp8_cache([77, 130], 64, dtype, device, s_q=2, h=3)
    used = cache[..., 0] != 0xFF
    codes = torch.randint(0, 254, cache.shape[:2] + (512,), device=device, dtype=torch.uint8)
    codes += (codes >= 0x7F).to(torch.uint8)  # skips 0x7F; 0xFF is out of range
    exps = torch.randint(-13, 5, cache.shape[:2] + (4,), device=device)
    huge = torch.rand(cache.shape[:2], device=device) < 0.5
    exps[..., 0] = torch.where(huge, 121, exps[..., 0])
    # there |e4m3| < 2^-3 (exponent field <= 3), so that the output's fp32 sums stay finite
    codes[..., :128] = torch.where(huge[..., None], codes[..., :128] & 0x9F, codes[..., :128])
    scales = torch.ldexp(torch.ones_like(exps, dtype=torch.float32), exps)
    cache[..., :512] = torch.where(used[..., None], codes, cache[..., :512])
    cache[..., 512:528] = torch.where(used[..., None], scales.view(torch.uint8).view(*cache.shape[:2], 16),
                                      cache[..., 512:528])
    q[..., :128] = 0
    args = (q, cache, block_table, seqlens)
    out, lse = _decode(backend, args, True)
    check_against_reference(out, lse, args, True)


@pytest.mark.ops("mla_decode")
@pytest.mark.parametrize("num_splits", [1, 7])
def test_fp8_decode_num_splits(device, backend, num_splits):
    *args, _ = make_fp8_cache([300, 3, 0, 130], 64, torch.bfloat16, device, s_q=2, h=16)
    out, lse = _decode(backend, args, True, num_splits)
    check_against_reference(out, lse, args, True)


@pytest.mark.ops("mla_decode")
def test_fp8_decode_close_to_bf16_cache(device, backend):
    """Loose: the FP8 cache's result against the bf16 cache it quantizes (same backend). Random
    queries make peaked softmaxes here, which pass e4m3's ~3% errors of the scores on whole."""
    q, cache, block_table, seqlens, bf16 = make_fp8_cache([200, 77], 64, torch.bfloat16, device, s_q=2)
    got, _ = _decode(backend, (q, cache, block_table, seqlens), True)
    want, _ = _decode(backend, (q, bf16, block_table, seqlens), True)
    assert calc_diff(got.float(), want.float()) < 1e-2


@pytest.mark.ops("mla_decode")
def test_fp8_decode_invalid_metadata_gives_nan(device, backend):
    q, cache, block_table, seqlens, _ = make_fp8_cache([70, 5, 100], 64, torch.bfloat16, device)
    block_table[1, 0] = cache.shape[0]
    seqlens[2] = block_table.shape[1] * 64 + 1
    out, lse = _decode(backend, (q, cache, block_table, seqlens), False)
    assert out[1:].isnan().all() and lse[1:].isnan().all()
    check_against_reference(out[:1], lse[:1], (q[:1], cache, block_table[:1], seqlens[:1]), False)


@pytest.mark.ops("mla_decode")
def test_flashmla_fp8_cache_tensor(device, backend):
    """FlashMLA's float8_e4m3fn [num_blocks, block_size, 1, 656] cache is the same cache."""
    q, cache, block_table, seqlens, _ = make_fp8_cache([70, 5], 64, torch.bfloat16, device)
    got = dk.mla_decode(q, cache.view(torch.float8_e4m3fn).unsqueeze(2), block_table, seqlens, SCALE, backend=backend)
    want = dk.mla_decode(q, cache, block_table, seqlens, SCALE, backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---- mla_cache_write ----

def test_reference_layout_is_flashmla():
    """The bytes of one token, by hand: e4m3 codes, fp32 power-of-two scales, bf16 k_pe."""
    c_kv = torch.zeros(1, 512)
    c_kv[0, :128] = 448.0  # amax 448: scale 1, code 0x7E
    c_kv[0, 128] = -3.0  # amax 3: 3 / 448 rounds up to 2^-7; -3 * 2^7 = -384 = -1.5 * 2^8: code 0xFC
    c_kv[0, 384] = 1e-9  # amax below 448e-4: scale 1e-4 rounded up to 2^-13
    k_pe = torch.arange(64.0).view(1, 64)
    raw = ref.quantize_tokens(c_kv, k_pe)[0]
    assert raw.shape == (656,) and raw.dtype == torch.uint8
    assert (raw[:128] == 0x7E).all() and raw[128] == 0xFC and (raw[129:256] == 0).all()
    assert raw[512:528].view(torch.float32).tolist() == [1.0, 2.0 ** -7, 2.0 ** -13, 2.0 ** -13]
    assert torch.equal(raw[528:].view(torch.bfloat16), k_pe[0].bfloat16())
    assert torch.equal(ref.dequantize_tokens(raw)[:512], c_kv[0].to(torch.float8_e4m3fn).float().where(
        torch.arange(512) != 384, torch.tensor(0.0)))  # 1e-9 / 2^-13 rounds to e4m3 zero


@cache_write_cases
def test_fp8_cache_write(device, backend, t, dtype, fused):
    args = _write_case(t, dtype, device, fused)
    got, want = cache_write_results(backend, args)
    written = (want != 0xFF).any(-1)
    assert torch.equal(written, (got != 0xFF).any(-1))  # the same slots, nothing else
    if not fused:
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the reference's bytes
    else:
        # The fused norm's fp32 math may differ from torch's by an ulp (1 / sqrt vs rsqrt, fused
        # multiply-adds), which can move a value across an e4m3 rounding tie: one step, rarely.
        assert (got != want).sum() <= 4
        deq_got, deq_want = ref.dequantize_tokens(got[written]), ref.dequantize_tokens(want[written])
        torch.testing.assert_close(deq_got, deq_want, rtol=2 ** -3, atol=1e-3)


@pytest.mark.ops("mla_cache_write")
def test_fp8_cache_write_rounds_to_nearest_even(device, backend):
    """Every e4m3 value, the midpoints between neighbours (ties: to the even code) and points just
    off them, both signs, in tiles whose amax is 448 * 2^k (scale 2^k): the reference's bytes."""
    codes = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (codes[:-1] + codes[1:]) / 2
    vals = torch.cat([codes, mid, mid * (1 + 2 ** -20), mid * (1 - 2 ** -20)])
    vals = torch.cat([vals, -vals])
    vals = torch.cat([vals, torch.zeros(-vals.numel() % (4 * 127))]).view(-1, 127)
    tiles = torch.cat([vals, torch.full((vals.shape[0], 1), 448.0)], dim=1)  # amax 448 in every tile
    kv_c = tiles.reshape(-1, 512) * torch.randint(-10, 11, (tiles.numel() // 512, 1)).float().exp2()
    t = kv_c.shape[0]
    k_pe = torch.randn(t, 64)
    cache = torch.full((-(-t // 16), 16, FP8_BYTES), 0xFF, dtype=torch.uint8)
    slots = torch.randperm(cache.shape[0] * 16)[:t]
    want = cache.clone()
    ref.mla_cache_write(kv_c, k_pe, want, slots)
    args = [x.to(device) for x in (kv_c, k_pe, cache, slots)]
    dispatch.implementation("mla_cache_write", backend)(*args, None, 1e-6, None, None)
    torch.testing.assert_close(args[2].cpu(), want, rtol=0, atol=0)


@pytest.mark.ops("mla_cache_write", "mla_decode")
def test_fp8_write_then_decode(device, backend):
    """The public ops, FP8 against bf16 cache: the same prompt written (fused norm and RoPE) into
    both, decoded over both; close (calc_diff) but not equal."""
    t, block_size = 100, 64
    if backend == "cuda":
        pytest.skip("needs the cuda write and decode on a GPU; covered by the cases above")
    block_table = torch.tensor([[2, 0]], dtype=torch.int32, device=device)
    pos = torch.arange(t, device=device)
    slots = block_table[0, pos // block_size].long() * block_size + pos % block_size
    kv_c, k_pe = torch.randn(t, 512, device=device).bfloat16(), torch.randn(t, 64, device=device).bfloat16()
    weight = torch.rand(512, device=device).bfloat16() + 0.5
    angle = torch.rand(t, 32, device=device) * 6.3
    outs = []
    for cache in (torch.full((3, block_size, 576), float("nan"), dtype=torch.bfloat16, device=device),
                  torch.full((3, block_size, FP8_BYTES), 0xFF, dtype=torch.uint8, device=device)):
        dk.mla_cache_write(kv_c, k_pe, cache, slots, weight, 1e-6, angle.cos(), angle.sin(), backend=backend)
        q = torch.randn(1, 1, 16, 576, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
        outs.append(dk.mla_decode(q, cache, block_table, torch.tensor([t], dtype=torch.int32, device=device),
                                  SCALE, backend=backend)[0].float())
    assert 0 < calc_diff(*outs) < 2e-3


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :576].contiguous()), ValueError, r"must be \[num_blocks, block_size, 656\]"),
    (lambda a: a.update(kv_cache=a["kv_cache"].view(torch.int8)), TypeError, "kv_cache must have dtype"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :48].contiguous()), ValueError, "power of two"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :, :-1]), ValueError, "kv_cache must be contiguous|656"),
    (lambda a: a.update(q=a["q"].view(torch.uint8)), TypeError, "q must have dtype"),
    (lambda a: a["block_table"].__setitem__((0, 1), 999), ValueError, r"block_table\[0, 1\] = 999"),
])
def test_fp8_decode_errors(change, error, match):
    q, cache, block_table, seqlens, _ = make_fp8_cache([70, 5], 64, torch.bfloat16, "cpu")
    args = {"q": q, "kv_cache": cache, "block_table": block_table, "cache_seqlens": seqlens, "softmax_scale": SCALE}
    change(args)
    with pytest.raises(error, match=match):
        dk.mla_decode(**args)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(kv_cache=torch.zeros(2, 16, 576, dtype=torch.uint8)), ValueError, "656"),
    (lambda a: a.update(kv_cache=torch.zeros(2, 16, 656, dtype=torch.int16)), TypeError, "kv_cache must have dtype"),
    (lambda a: a["slot_mapping"].__setitem__(2, 32), ValueError, r"slot_mapping\[2\] = 32"),
])
def test_fp8_cache_write_errors(change, error, match):
    args = {"kv_c": torch.randn(3, 512), "k_pe": torch.randn(3, 64),
            "kv_cache": torch.zeros(2, 16, FP8_BYTES, dtype=torch.uint8), "slot_mapping": torch.tensor([0, 5, 31])}
    change(args)
    with pytest.raises(error, match=match):
        dk.mla_cache_write(**args)
