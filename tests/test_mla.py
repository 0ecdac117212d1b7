"""mla_decode and mla_cache_write on every backend against the fp32 reference.

Caches are built the way a serving engine leaves them: shuffled block tables, unused slots and
padding blocks full of NaN (a read past a sequence's end shows), unused block-table entries set
to a huge index (reading one would fault or show).
"""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import mla as ref

from builders import (ROW_BLOCK_SIZE, ROW_SEQLENS, SCALE, cache_write_cases, cache_write_results, make_cache,
                      row_count_cases, row_dtype)
from builders import make_cache_write_case as _write_case
from helpers import native_only, poison_allocator

def _skip_unsupported(backend, block_size, dtype):
    if backend == "cuda" and block_size % 64:
        pytest.skip("the CUDA kernel needs block_size a multiple of 64 (documented)")
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes bfloat16/float16 (float32 goes to triton)")


def _run(backend, args, causal, num_splits=0):
    impl = dispatch.implementation("mla_decode", backend)
    return impl(*args, SCALE, causal, num_splits)


def check_against_reference(out, lse, args, causal):
    q, kv_cache, block_table, seqlens = args
    want_out, want_lse = ref.mla_decode(q.cpu().float(), kv_cache.cpu().float(), block_table.cpu(),
                                        seqlens.cpu(), SCALE, causal)
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == q.dtype and tuple(out.shape) == (*q.shape[:3], ref.KV_LORA_RANK)
    assert lse.dtype == torch.float32 and tuple(lse.shape) == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any() and not lse.isnan().any()
    err = (out.float() - want_out).abs().max().item() if out.numel() else 0.0
    if q.dtype == torch.float32:
        assert err <= 2e-5 * max(1.0, want_out.abs().max().item()), err
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)
    else:
        # Within the rounding of a plain low-precision PyTorch decode on the same inputs.
        naive, _ = ref.naive_absorbed_decode(*(t.cpu() for t in args), SCALE, causal)
        err_naive = (naive.float() - want_out).abs().max().item()
        half_ulp = 2.0 ** -9 * want_out.abs().max().item()
        assert err <= max(2 * err_naive, half_ulp), (err, err_naive)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-3)
    # Queries that see no key: exactly 0 and -inf.
    empty = want_lse == float("-inf")  # [B, H, s_q]
    assert (lse[empty] == float("-inf")).all()
    assert (out.float().permute(0, 2, 1, 3)[empty] == 0).all()


CASES = [
    # seqlens, block_size, s_q, H
    ([1, 63, 65, 130], 64, 1, 16),
    ([0, 1, 64, 4100], 64, 1, 16),
    native_only(([200, 1000], 64, 2, 128)),
    ([40, 97], 64, 2, 128),  # 128 heads (two 64-row query tiles per token) at a size the interpreter runs
    ([7, 129, 0], 64, 4, 1),
    ([300, 17, 64], 128, 3, 16),
    ([15, 17, 100], 16, 2, 16),
    ([33, 1, 0], 32, 1, 5),
]


@pytest.mark.ops("mla_decode")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"len{c[0]}-bs{c[1]}-sq{c[2]}-h{c[3]}")
def test_mla_decode(device, backend, case, dtype, causal):
    seqlens, block_size, s_q, h = case
    _skip_unsupported(backend, block_size, dtype)
    args = make_cache(seqlens, block_size, dtype, device, s_q=s_q, h=h)
    poison_allocator(device)
    out, lse = _run(backend, args, causal)
    check_against_reference(out, lse, args, causal)


@row_count_cases
def test_mla_decode_row_counts(device, backend, s_q, h, causal):
    """Every row count against the reference, on tiny and odd lengths with NaN in every unused
    slot; causal cases also split the keys."""
    dtype = row_dtype(s_q, h)
    _skip_unsupported(backend, ROW_BLOCK_SIZE, dtype)
    args = make_cache(ROW_SEQLENS, ROW_BLOCK_SIZE, dtype, device, s_q=s_q, h=h)
    poison_allocator(device)
    out, lse = _run(backend, args, causal, 2 if causal else 0)
    check_against_reference(out, lse, args, causal)


@pytest.mark.ops("mla_decode")
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_mla_decode_num_splits(device, backend, num_splits):
    """The split-KV partition and its combine give the reference whatever the split count
    (more splits than blocks leaves some empty)."""
    args = make_cache([1100, 3, 0, 640], 64, torch.bfloat16, device, s_q=2, h=16)
    poison_allocator(device)
    out, lse = _run(backend, args, True, num_splits)
    check_against_reference(out, lse, args, True)


@pytest.mark.ops("mla_decode")
def test_mla_decode_flashmla_cache_layout(device, backend):
    """FlashMLA's [num_blocks, block_size, 1, 576] cache is accepted by the public op."""
    q, kv_cache, block_table, seqlens = make_cache([70, 5], 64, torch.bfloat16, device)
    got = dk.mla_decode(q, kv_cache.unsqueeze(2), block_table, seqlens, SCALE, backend=backend)
    want = dk.mla_decode(q, kv_cache, block_table, seqlens, SCALE, backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.ops("mla_decode")
def test_mla_decode_invalid_metadata_gives_nan(device, backend):
    """Metadata the kernel cannot trust never leads to an out-of-bounds read: the request whose
    length is past its table or whose block index is outside the cache gets NaN; the others are
    untouched."""
    q, kv_cache, block_table, seqlens = make_cache([70, 5, 100, 40], 64, torch.bfloat16, device)
    seqlens[1] = block_table.shape[1] * 64 + 1  # longer than the table allows
    block_table[2, 1] = kv_cache.shape[0]  # one past the last block, and request 2 needs it
    block_table[3, 0] = -1
    out, lse = _run(backend, (q, kv_cache, block_table, seqlens), False)
    assert out[1:].isnan().all() and lse[1:].isnan().all()
    keep = [0]
    check_against_reference(out[keep], lse[keep], (q[keep], kv_cache, block_table[keep], seqlens[keep]), False)


@pytest.mark.ops("mla_decode")
def test_absorbed_equals_naive_mla(device, backend):
    """W_UV @ mla_decode(q_nope @ W_UK | q_pe) equals attention over per-head expanded keys and
    values computed from the same kv_b_proj weights (fp32)."""
    h, d_nope, d_v, s_q, seqlen = 4, 128, 128, 2, 150
    c_kv, k_pe = torch.randn(seqlen, 512), torch.randn(seqlen, 64)
    w_uk, w_uv = torch.randn(h, d_nope, 512) / 512 ** 0.5, torch.randn(h, d_v, 512) / 512 ** 0.5
    q_nope, q_pe = torch.randn(s_q, h, d_nope), torch.randn(s_q, h, 64)
    want = ref.naive_mla_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, SCALE, causal=True)

    kv_cache = torch.full((4, 64, 576), float("nan"))
    kv_cache.view(-1, 576)[:seqlen] = torch.cat([c_kv, k_pe], dim=-1)
    block_table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    kv_cache = kv_cache[[1, 2, 0, 3]]  # logical block i now lives at physical block_table[0, i]
    q_abs = torch.cat([torch.einsum("shn,hnc->shc", q_nope, w_uk), q_pe], dim=-1)[None]
    args = [t.to(device) for t in (q_abs, kv_cache, block_table, torch.tensor([seqlen], dtype=torch.int32))]
    if backend == "cuda":
        args[0], args[1] = args[0].bfloat16(), args[1].bfloat16()
    out_lat, _ = _run(backend, args, True)
    got = torch.einsum("shc,hvc->shv", out_lat[0].float().cpu(), w_uv)
    tol = 2e-2 if backend == "cuda" else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ---- mla_cache_write ----

@cache_write_cases
def test_mla_cache_write(device, backend, t, dtype, fused):
    args = _write_case(t, dtype, device, fused)
    got, want = cache_write_results(backend, args)
    if not fused:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:  # fp32 math may fuse multiply-adds differently: one rounding step of the cache dtype
        tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    assert got.isnan().sum() == want.isnan().sum()  # nothing else written


@pytest.mark.ops("mla_cache_write", "mla_decode")
def test_cache_write_then_decode(device, backend):
    """The public ops together: write a prompt into a fresh cache, decode over it."""
    if backend == "cuda":
        pytest.skip("covered by the GPU cases above; this one uses block_size 16")
    t, block_size = 40, 16
    kv_cache = torch.full((6, block_size, 576), float("nan"), device=device)
    block_table = torch.tensor([[4, 1, 5]], dtype=torch.int32, device=device)
    pos = torch.arange(t, device=device)
    slots = block_table[0, pos // block_size].long() * block_size + pos % block_size
    kv_c, k_pe = torch.randn(t, 512, device=device), torch.randn(t, 64, device=device)
    dk.mla_cache_write(kv_c, k_pe, kv_cache, slots, backend=backend)
    q = torch.randn(1, 1, 8, 576, device=device)
    out, lse = dk.mla_decode(q, kv_cache, block_table, torch.tensor([t], dtype=torch.int32, device=device),
                             SCALE, backend=backend)
    p = torch.softmax((q[0, 0] @ torch.cat([kv_c, k_pe], -1).T) * SCALE, dim=-1)
    torch.testing.assert_close(out[0, 0], p @ kv_c, rtol=1e-4, atol=1e-4)
