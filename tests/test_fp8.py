"""FP8 block-scaled family: every backend against the fp32 reference.

Quantizers must agree with the reference bit for bit (same scale, same e4m3 bytes); GEMMs are
compared tightly against the reference on the *same* quantized inputs, and loosely (DeepGEMM's
calc_diff) against the unquantized fp32 product.
"""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import _native
from dsv3_kernels.reference import fp8 as ref
from helpers import native_only, poison_allocator

FP8 = torch.float8_e4m3fn
GPU_ACCUM_TOL = 2e-3  # Hopper's fp8 MMA accumulates each 128-K block with ~14 mantissa bits


def randn(*shape, device, dtype=torch.float32, spread=True):
    """Random values whose magnitude varies by row and column (so blocks get different scales)."""
    x = torch.randn(*shape, device=device)
    if spread and x.dim() >= 2:
        x = x * torch.exp(torch.randn(*shape[:-1], 1, device=device)) * torch.exp(0.5 * torch.randn(shape[-1], device=device))
    return x.to(dtype)


def assert_same_quant(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=0, atol=0)
    mismatch = (q.cpu().view(torch.uint8) != q_ref.cpu().view(torch.uint8))
    assert not mismatch.any(), f"{mismatch.sum().item()} of {q.numel()} e4m3 values differ from the reference"


def quantized_operands(m, n, k, device):
    x = randn(m, k, device=device)
    w = randn(n, k, device=device) / k**0.5
    a, a_s = ref.act_quant(x)
    b, b_s = ref.weight_quant(w)
    return x, w, a, a_s, b, b_s


# ---------------------------------------------------------------- act_quant

@pytest.mark.ops("act_quant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block_size", [((1, 128), 128), ((3, 7168), 128), ((67, 300), 128),
                                              ((2, 5, 200), 64), ((33, 96), 32), ((4, 1000), 256)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_matches_reference(device, backend, dtype, shape, block_size, ue8m0):
    x = randn(*shape, device=device, dtype=dtype)
    x.view(-1, shape[-1])[0, :block_size // 2] = 0  # a (partly) zero block exercises the amax clamp
    if shape[-1] > block_size:
        x.view(-1, shape[-1])[-1, :block_size] = 0  # a fully zero block
    poison_allocator(device)
    got = dk.act_quant(x, block_size, "ue8m0" if ue8m0 else None, backend=backend)
    assert_same_quant(got, ref.act_quant(x.cpu(), block_size, ue8m0))


@pytest.mark.ops("act_quant")
def test_act_quant_extremes(device, backend):
    """Large and tiny magnitudes in one row: saturation must not produce NaN, tiny blocks keep sign."""
    x = torch.tensor([[3e4, -3e4, 1.0, 1e-30] * 32 + [1e-6, -2e-7] * 64], device=device)
    got = dk.act_quant(x, backend=backend)
    assert not got[0].float().isnan().any()
    assert_same_quant(got, ref.act_quant(x.cpu()))


def assert_same_nonfinite_quant(got, want):
    """Quantized (q, scale) against the reference's where blocks hold NaN / inf: scales NaN / inf
    exactly where the reference's are (never the -0.0 of a ue8m0 rounding wrapped around), the same
    codes elsewhere; NaN codes match up to their sign (the sign of x / NaN is not specified)."""
    (q, s), (q_ref, s_ref) = (t.cpu() for t in got), want
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)
    bits, bits_ref = q.view(torch.uint8), q_ref.view(torch.uint8)
    nan_code = (bits_ref & 0x7F) == 0x7F
    assert torch.equal((bits & 0x7F) == 0x7F, nan_code)
    assert torch.equal(bits[~nan_code], bits_ref[~nan_code])


@pytest.mark.ops("act_quant")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN / inf math
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scale", "ue8m0"])
def test_act_quant_nan_makes_its_block_scale_nan(device, backend, ue8m0):
    """A NaN (or inf) activation shows in its block's scale, as torch.amax gives, in both scale
    formats: the block's codes are NaN (an inf block: the inf's code NaN, the others +-0); the
    other blocks of its row are untouched."""
    x = torch.randn(3, 384, device=device)
    x[1, 130], x[2, 300], x[2, 301] = float("nan"), float("inf"), float("-inf")
    q, s = dk.act_quant(x, scale_fmt="ue8m0" if ue8m0 else None, backend=backend)
    assert s[1, 1].isnan() and s[2, 2] == float("inf")
    want = ref.act_quant(x.cpu(), ue8m0=ue8m0)
    assert want[0].view(torch.uint8)[1, 128:256].bitwise_and(0x7F).eq(0x7F).all()
    assert_same_nonfinite_quant((q, s), want)


@pytest.mark.ops("weight_quant")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_weight_quant_nonfinite_blocks(device, backend):
    """weight_quant's blocks follow act_quant's rule: a NaN makes its 128 x 128 block's scale NaN,
    an inf makes it inf."""
    w = randn(300, 260, device="cpu")
    w[5, 200], w[140, 3] = float("nan"), float("-inf")
    got = dk.weight_quant(w.to(device), backend=backend)
    want = ref.weight_quant(w)
    assert want[1][0, 1].isnan() and want[1][1, 0] == float("inf")
    assert_same_nonfinite_quant(got, want)


@pytest.mark.ops("act_quant")
def test_act_quant_empty(device, backend):
    q, s = dk.act_quant(torch.empty(0, 256, device=device), backend=backend)
    assert q.shape == (0, 256) and s.shape == (0, 2)


def test_act_quant_ue8m0_scales_are_powers_of_two():
    _, s = ref.act_quant(randn(8, 512, device="cpu"), ue8m0=True)
    mantissa = s.view(torch.int32) & 0x7FFFFF
    assert (mantissa == 0).all()
    _, s_plain = ref.act_quant(randn(8, 512, device="cpu"), ue8m0=False)
    assert (s_plain.view(torch.int32) & 0x7FFFFF).any()


def test_reference_act_quant_roundtrip():
    """The reference itself: dequantized values within half an e4m3 ulp (2^-4 relative) of x."""
    x = randn(16, 640, device="cpu")
    q, s = ref.act_quant(x)
    deq = (q.float().view(16, 5, 128) * s[..., None]).view(16, 640)
    assert ((deq - x).abs() <= x.abs() * 2**-4 + s.repeat_interleave(128, 1) * 2**-9).all()
    assert q.float().abs().amax(-1).max() == 448  # each row's largest block maps to 448


# ---------------------------------------------------------------- weight quant / dequant

@pytest.mark.ops("weight_quant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block_size", [((128, 128), 128), ((2112 + 5, 300), 128),
                                              ((129, 1000), 128), ((100, 70), 64), ((1, 33), 16)])
def test_weight_quant_matches_reference(device, backend, dtype, shape, block_size):
    w = randn(*shape, device=device, dtype=dtype)
    poison_allocator(device)
    assert_same_quant(dk.weight_quant(w, block_size, backend=backend), ref.weight_quant(w.cpu(), block_size))


@pytest.mark.ops("weight_dequant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block_size", [((256, 384), 128), ((2112 + 5, 300), 128), ((7, 1000), 128),
                                              ((100, 70), 64)])
def test_weight_dequant_matches_reference(device, backend, dtype, shape, block_size):
    w, s = ref.weight_quant(randn(*shape, device="cpu"), block_size)
    s = s * torch.exp(torch.randn_like(s))  # independent per-block scales, as in checkpoints
    poison_allocator(device)
    got = dk.weight_dequant(w.to(device), s.to(device), dtype, block_size, backend=backend)
    want = ref.weight_dequant(w, s, block_size, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def with_nan_codes(q, where):
    """e4m3 q with the NaN codes 0x7F / 0xFF (alternately) at the (row, col) pairs `where`."""
    bits = q.view(torch.uint8).clone()
    for i, (r, c) in enumerate(where):
        bits[r, c] = 0x7F if i % 2 == 0 else 0xFF
    return bits.view(FP8)


@pytest.mark.ops("weight_dequant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_dequant_nan_codes(device, backend, dtype):
    """NaN bytes (0x7F, 0xFF) in a weight dequantize to NaN, as torch's conversion gives; on the CPU
    with the very bits of the reference (every ISA level, tails of 16- and 8-wide steps included)."""
    w, s = ref.weight_quant(randn(131, 300, device="cpu"))
    w = with_nan_codes(w, [(0, 0), (5, 7), (64, 130), (130, 299), (100, 290)])
    got = dk.weight_dequant(w.to(device), s.to(device), dtype, backend=backend).cpu()
    want = ref.weight_dequant(w, s, 128, dtype)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 5
    if backend == "cpu":
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- fp8_gemm

GEMM_SHAPES = [  # (M, N, K): odd M, N not a multiple of 128, K from 128 to 7168
    (1, 129, 128), (3, 200, 384), (67, 256, 1536), (1000, 129, 512), native_only(16, 2112 + 5, 7168), (64, 77, 2048),
    (5, 133, 7168),  # K = 7168 at a size Triton's interpreter runs in seconds
]


def _gemm_tol(device):
    return 2e-5 if torch.device(device).type == "cpu" else GPU_ACCUM_TOL


@pytest.mark.ops("fp8_gemm")
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_fp8_gemm_fp32_matches_reference(device, backend, m, n, k):
    _, _, a, a_s, b, b_s = quantized_operands(m, n, k, "cpu")
    want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    poison_allocator(device)
    got = dk.fp8_gemm(a.to(device), a_s.to(device), b.to(device), b_s.to(device), torch.float32, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    err = (got.cpu() - want).abs().max() / want.abs().max()
    assert err < _gemm_tol(device), f"max error {err:.2e} relative to max |out|"


# Edges of the CPU kernels' blocking: 1..17 rows (tiles of 1 x 8, 2 x 4, 4 x 2 B rows, groups of
# up to 4 rows, the few-rows / panel switch above 16 rows), N past a multiple of every tile width,
# odd multiples of 128 in K, and K split into chunks (4 rows: 8192, 16 rows: 2048 per chunk).
TILE_EDGE_SHAPES = [(1, 7, 128), (1, 259, 640), (2, 131, 384), (3, 133, 1152), (5, 67, 256), (8, 258, 512),
                    (9, 129, 384), native_only(4, 130, 8320), native_only(16, 259, 2304), (17, 70, 384)]


@pytest.mark.ops("fp8_gemm")
@pytest.mark.parametrize("m,n,k", TILE_EDGE_SHAPES)
def test_fp8_gemm_tile_edges(device, backend, m, n, k):
    _, _, a, a_s, b, b_s = quantized_operands(m, n, k, "cpu")
    want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    got = dk.fp8_gemm(a.to(device), a_s.to(device), b.to(device), b_s.to(device), torch.float32, backend=backend)
    err = (got.cpu() - want).abs().max() / want.abs().max()
    assert err < _gemm_tol(device), f"max error {err:.2e} relative to max |out|"


@pytest.mark.ops("fp8_gemm")
def test_fp8_gemm_avx512_bf16_many_rows_both_paths():
    """Above its few-rows path (48 rows) the avx512_bf16 level multiplies with vdpbf16ps or in fp32,
    by the host's rule (fp32 on Intel cores: csrc/common/cpu_isa.h). Both against the reference on
    any host that has the level, and they are different arithmetic (the switch switches)."""
    if "avx512_bf16" not in _native.host_cpu_isa_levels():
        pytest.skip("the host has no avx512_bf16 level")
    before = _native.cpu_isa()
    _native.set_cpu_isa("avx512_bf16")
    try:
        for m, n, k in [(49, 131, 384), (67, 256, 1536), (300, 129, 512)]:
            _, _, a, a_s, b, b_s = quantized_operands(m, n, k, "cpu")
            want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
            got = {}
            for bf16 in (True, False):
                assert _native.set_cpu_bf16_gemm(bf16) == bf16
                got[bf16] = dk.fp8_gemm(a, a_s, b, b_s, torch.float32, backend="cpu")
                err = (got[bf16] - want).abs().max() / want.abs().max()
                assert err < _gemm_tol("cpu"), f"{m}x{n}x{k} vdpbf16ps={bf16}: max error {err:.2e}"
            assert not torch.equal(got[True], got[False])
    finally:
        _native.set_cpu_bf16_gemm(None)
        _native.set_cpu_isa(before)


@pytest.mark.ops("fp8_gemm")
@pytest.mark.parametrize("m,k", [(1, 384), (1, 640), (2, 384), (5, 384), (20, 384)])
def test_fp8_gemm_nan_codes(device, backend, m, k):
    """NaN codes (0x7F / 0xFF) in a make their rows of out NaN, in b their columns (reference/fp8.py),
    on every backend and CPU level: the few-rows loops (m <= 16, whose fast decode reads NaN codes
    as +-480; at the avx2 level columns 3 and 77 lie in a span of tiles whose B rows are pages
    apart, 130 and 199 in tiles of consecutive rows) and the panel path (m = 20). Every other
    output matches the reference."""
    n = 200
    _, _, a, a_s, b, b_s = quantized_operands(m, n, k, "cpu")
    where_b = [(3, 5), (77, 130), (130, 200), (199, 383)]
    b = with_nan_codes(b, where_b)
    bad_rows = [m - 1] if m > 1 else []  # with m = 1 a NaN row would hide b's columns
    a = with_nan_codes(a, [(r, 250) for r in bad_rows])
    poison_allocator(device)
    got = dk.fp8_gemm(a.to(device), a_s.to(device), b.to(device), b_s.to(device), torch.float32,
                      backend=backend).cpu()
    want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    nan = torch.zeros(m, n, dtype=torch.bool)
    nan[:, [r for r, _ in where_b]] = True
    nan[bad_rows] = True
    assert torch.equal(want.isnan(), nan) and torch.equal(got.isnan(), nan)
    scale = want[~nan].abs().max()
    assert (got[~nan] - want[~nan]).abs().max() / scale < _gemm_tol(device)


@pytest.mark.ops("fp8_gemm")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN / inf math
@pytest.mark.parametrize("m", [3, 20])
def test_fp8_gemm_nonfinite_scales(device, backend, m):
    """The scales multiply each K block's partial sum (reference/fp8.py): a NaN a_scale makes its
    row NaN, an inf b_scale_inv makes its 128 columns +-inf (the sign of the partial sum), and an
    inf meeting a zero partial sum (a zero row of a) gives NaN, not the inf * 0 of a kernel that
    scales the values first."""
    n, k = 300, 384
    _, _, a, a_s, b, b_s = quantized_operands(m, n, k, "cpu")
    a_s[0, 1] = float("nan")
    b_s[1, 2] = float("inf")  # columns 128..255, K block 2
    a.view(torch.uint8)[2, 256:] = 0  # row 2's partial sum of K block 2 is 0: inf * 0
    got = dk.fp8_gemm(a.to(device), a_s.to(device), b.to(device), b_s.to(device), torch.float32,
                      backend=backend).cpu()
    want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert want[0].isnan().all() and want[2, 128:256].isnan().all()
    assert want[1, 128:256].isinf().all() and want[3:, 128:256].isinf().all()
    assert torch.equal(got.isnan(), want.isnan())
    inf = want.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], want[inf])
    fin = want.isfinite()
    assert (got[fin] - want[fin]).abs().max() / want[fin].abs().max() < _gemm_tol(device)


@pytest.mark.ops("fp8_gemm")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(3, 200, 384), native_only(67, 2112 + 5, 1024), native_only(128, 256, 7168),
                                   (67, 261, 1024), (20, 256, 3072)])
def test_fp8_gemm_half_outputs(device, backend, out_dtype, m, n, k):
    _, _, a, a_s, b, b_s = quantized_operands(m, n, k, "cpu")
    want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    poison_allocator(device)
    got = dk.fp8_gemm(a.to(device), a_s.to(device), b.to(device), b_s.to(device), out_dtype, backend=backend)
    assert got.dtype == out_dtype
    scale = want.abs().max()
    # within one rounding of the output dtype, plus the fp32 accumulation tolerance
    torch.testing.assert_close(got.cpu().float(), want, rtol=2 * torch.finfo(out_dtype).eps,
                               atol=_gemm_tol(device) * scale)


@pytest.mark.ops("fp8_gemm")
def test_fp8_gemm_empty_m(device, backend):
    _, _, a, a_s, b, b_s = quantized_operands(0, 130, 256, device)
    out = dk.fp8_gemm(a, a_s, b, b_s, backend=backend)
    assert out.shape == (0, 130) and out.dtype == torch.bfloat16


@pytest.mark.ops("act_quant", "fp8_gemm")
@pytest.mark.parametrize("shape,n,k", [native_only((1, 7168), 2112, 7168), ((1, 7168), 264, 7168), ((2, 5, 512), 300, 512),
                                       ((67, 1536), 129, 1536)])
def test_fp8_linear_quantization_error(device, backend, shape, n, k):
    """Against the unquantized fp32 product: the FP8 recipe's error, DeepGEMM's check."""
    x = randn(*shape, device=device)
    w = torch.randn(n, k, device=device) / k**0.5
    b = torch.randn(n, device=device)
    wq, ws = ref.weight_quant(w.cpu())
    y = dk.fp8_linear(x, wq.to(device), ws.to(device), bias=b, out_dtype=torch.float32, backend=backend)
    assert y.shape == (*shape[:-1], n)
    assert ref.calc_diff(y.cpu(), (x @ w.T + b).cpu()) < 1e-3


@pytest.mark.ops("act_quant", "fp8_gemm")
def test_fp8_linear_matches_reference_and_accepts_strided_x(device, backend):
    x = randn(6, 512, device=device, dtype=torch.bfloat16)[::2]  # non-contiguous input
    wq, ws = ref.weight_quant(randn(300, 512, device="cpu"))
    got = dk.fp8_linear(x, wq.to(device), ws.to(device), backend=backend)
    want = dk.fp8_linear(x.cpu(), wq, ws, backend="torch")
    assert got.dtype == torch.bfloat16 and got.shape == (3, 300)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2**-7, atol=_gemm_tol(device) * want.abs().max().item())


@pytest.mark.ops("act_quant", "fp8_gemm")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_fp8_linear_nonfinite_rows(device, backend):
    """A NaN or inf in a row of x makes that row of y NaN (act_quant's NaN / inf scale, then
    fp8_gemm's rule); the other rows are the reference's."""
    x = randn(2, 5, 384, device="cpu")
    x[0, 1, 7], x[1, 3, 300] = float("nan"), float("inf")
    wq, ws = ref.weight_quant(randn(130, 384, device="cpu"))
    got = dk.fp8_linear(x.to(device), wq.to(device), ws.to(device), out_dtype=torch.float32, backend=backend).cpu()
    want = dk.fp8_linear(x, wq, ws, out_dtype=torch.float32, backend="torch")
    bad = torch.zeros(2, 5, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    assert want[bad].isnan().all() and got[bad].isnan().all() and not got[~bad].isnan().any()
    assert (got[~bad] - want[~bad]).abs().max() / want[~bad].abs().max() < _gemm_tol(device)


# ---------------------------------------------------------------- the reference itself

def test_reference_gemm_equals_blockwise_promotion():
    """The reference (dequantize, then fp32 matmul) equals the literal per-K-block formula."""
    _, _, a, a_s, b, b_s = quantized_operands(5, 130, 384, "cpu")
    out = torch.zeros(5, 130, dtype=torch.float64)
    for kb in range(3):
        blk = slice(kb * 128, (kb + 1) * 128)
        partial = a[:, blk].double() @ b[:, blk].double().T
        out += partial * a_s[:, kb, None].double() * b_s[:, kb].double().repeat_interleave(128)[None, :130]
    torch.testing.assert_close(ref.fp8_gemm(a, a_s, b, b_s, torch.float32).double(), out, rtol=1e-5, atol=1e-5)


def test_reference_weight_quant_format():
    """weight_scale_inv has the checkpoints' shape and dequantizing is a multiply."""
    w = randn(300, 200, device="cpu")
    q, s = ref.weight_quant(w)
    assert s.shape == (3, 2)
    assert ref.calc_diff(ref.weight_dequant(q, s, dtype=torch.float32), w) < 1e-3
    assert s[0, 0] == w[:128, :128].abs().max() / 448
