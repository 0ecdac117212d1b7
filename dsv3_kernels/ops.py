"""The public ops. Each checks its arguments (errors name the argument), picks a backend by the
one rule in dispatch.py, and calls that backend's kernel. Every op takes `backend=` to choose
"cuda", "triton", "cpu" or "torch" explicitly.

The `check_<op>` functions take (some of) an op's schema arguments (csrc/registration.cpp) and
raise what its kernels cannot take (dtypes, ranks, shapes, contiguity, devices, block sizes): the public op
calls one before it dispatches, and the Triton op dsv3_kernels::<op>_triton calls the same one, so
a direct torch.ops call cannot run a kernel out of bounds either (the C++ ops check in C++).

FP8 here is float8_e4m3fn with DeepSeek-V3's block scales: activations per token per 128
channels (1x128), weights per 128x128 block, fp32 scales, dequantized = fp8 * scale.
"""

import torch

from . import dispatch
from .reference import fp8 as _ref_fp8
from .reference import mla as _ref_mla
from .reference import moe as _ref_moe
from .reference import norm as _ref_norm
from .utils import GEMM_BLOCK, cdiv

FP8_DTYPE = torch.float8_e4m3fn
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

dispatch.register_op("act_quant", _ref_fp8.act_quant, "dsv3_kernels.triton.fp8")
dispatch.register_op("weight_quant", _ref_fp8.weight_quant, "dsv3_kernels.triton.fp8")
dispatch.register_op("weight_dequant", _ref_fp8.weight_dequant, "dsv3_kernels.triton.fp8")
dispatch.register_op("fp8_gemm", _ref_fp8.fp8_gemm, "dsv3_kernels.triton.fp8")
dispatch.register_op("fp8_linear", None, parts=("act_quant", "fp8_gemm"))
def _mla_decode_cuda_takes(q, kv_cache, *_):
    """The CUDA kernel: bfloat16/float16 q (bfloat16 with the FP8 cache), block_size % 64 == 0."""
    dtypes = (torch.bfloat16,) if kv_cache.dtype == torch.uint8 else (torch.bfloat16, torch.float16)
    return q.dtype in dtypes and kv_cache.shape[1] % 64 == 0


dispatch.register_op("mla_decode", _ref_mla.mla_decode, "dsv3_kernels.triton.mla", cuda_takes=_mla_decode_cuda_takes)
dispatch.register_op("mla_cache_write", _ref_mla.mla_cache_write, "dsv3_kernels.triton.mla")
dispatch.register_op("moe_route", _ref_moe.moe_route, "dsv3_kernels.triton.moe_route")
dispatch.register_op("moe_permute", _ref_moe.moe_permute, "dsv3_kernels.triton.moe_permute")
dispatch.register_op("silu_mul", _ref_moe.silu_mul, "dsv3_kernels.triton.silu_mul")
dispatch.register_op("moe_unpermute", _ref_moe.moe_unpermute, "dsv3_kernels.triton.moe_unpermute")
dispatch.register_op("grouped_gemm", _ref_moe.grouped_gemm, "dsv3_kernels.triton.grouped_gemm")
dispatch.register_op("fused_moe", _ref_moe.fused_moe, "dsv3_kernels.triton.fused_moe",
                     cuda_takes=lambda hidden, *_: hidden.dtype == torch.bfloat16)  # the CUDA kernel: bf16 only
dispatch.register_op("ep_dispatch", _ref_moe.ep_dispatch, "dsv3_kernels.triton.ep_dispatch")
dispatch.register_op("ep_combine", None, parts=("moe_unpermute",))
dispatch.register_op("rms_norm", _ref_norm.rms_norm, "dsv3_kernels.triton.norm")

available_backends = dispatch.available_backends


def _check_tensor(name, t, dtypes, ndim=None, min_ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dim(s), got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                         "call .contiguous() first")


# Value checks of CPU tensors up to this many entries read them as Python numbers: one .tolist()
# costs less than the reductions and .item() calls of the tensor version (decode-sized metadata).
_SMALL = 1024


def _check_same_device(**tensors):
    others = iter(tensors.values())
    first = next(others).device
    for t in others:  # a plain loop: the cheapest way to compare a few devices
        if t.device == first:
            continue
        listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_block_size(block_size):
    if not isinstance(block_size, int) or block_size < 16 or block_size > 1024 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 1024], got {block_size!r}")


def _check_scale_shape(name, scale, expected):
    if tuple(scale.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(scale.shape)}")


_run = dispatch.run


def _check_scale_fmt(scale_fmt):
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")


def check_act_quant(x, block_size):
    _check_tensor("x", x, _FLOAT_DTYPES, min_ndim=1)
    _check_block_size(block_size)


def act_quant(x: torch.Tensor, block_size: int = GEMM_BLOCK, scale_fmt=None, *, backend=None):
    """Quantize activations to FP8 per token and per `block_size` channels.

    x: [..., K] float32/bfloat16/float16, contiguous; K need not be a multiple of block_size.
    scale_fmt: None (scale = amax / 448, amax clamped to >= 1e-4) or "ue8m0" (that scale
    rounded up to a power of two, DeepSeek-V3.1's format).
    Returns (x_fp8 float8_e4m3fn [..., K], scale float32 [..., ceil(K / block_size)]),
    with x ~= x_fp8 * scale per block.
    A NaN in a block makes its scale NaN and its codes NaN; an inf makes the scale inf (the inf's
    code NaN, the others 0); in either format (reference/fp8.py).
    """
    check_act_quant(x, block_size)
    _check_scale_fmt(scale_fmt)
    return _run("act_quant", x.device, backend, x, block_size, scale_fmt == "ue8m0")


def check_weight_quant(w, block_size):
    _check_tensor("w", w, _FLOAT_DTYPES, ndim=2)
    _check_block_size(block_size)


def weight_quant(w: torch.Tensor, block_size: int = GEMM_BLOCK, *, backend=None):
    """Quantize a weight to FP8 with one scale per block_size x block_size block (checkpoint format).

    w: [N, K] float32/bfloat16/float16, contiguous; partial edge blocks are allowed.
    Returns (w_fp8 float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N/bs), ceil(K/bs)]),
    with w ~= w_fp8 * weight_scale_inv per block.
    """
    check_weight_quant(w, block_size)
    return _run("weight_quant", w.device, backend, w, block_size)


def check_weight_dequant(w, weight_scale_inv, block_size, dtype):
    _check_tensor("w", w, (FP8_DTYPE,), ndim=2)
    _check_tensor("weight_scale_inv", weight_scale_inv, (torch.float32,), ndim=2)
    _check_block_size(block_size)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    _check_same_device(w=w, weight_scale_inv=weight_scale_inv)
    n, k = w.shape
    _check_scale_shape("weight_scale_inv", weight_scale_inv, (cdiv(n, block_size), cdiv(k, block_size)))


def weight_dequant(w: torch.Tensor, weight_scale_inv: torch.Tensor, dtype=torch.bfloat16,
                   block_size: int = GEMM_BLOCK, *, backend=None):
    """Dequantize an FP8 checkpoint weight: w_fp8 * weight_scale_inv per block.

    w: [N, K] float8_e4m3fn; weight_scale_inv: [ceil(N/bs), ceil(K/bs)] float32.
    Returns [N, K] of `dtype` (float32/bfloat16/float16). The NaN codes 0x7F / 0xFF give NaN.
    """
    check_weight_dequant(w, weight_scale_inv, block_size, dtype)
    return _run("weight_dequant", w.device, backend, w, weight_scale_inv, block_size, dtype)


def _check_fp8_weight(name, w, scale_name, scale):
    """An fp8_gemm B operand: w [N, K] e4m3 (N >= 1, K a positive multiple of 128) with its
    scale [ceil(N/128), K/128] float32; returns (N, K)."""
    _check_tensor(name, w, (FP8_DTYPE,), ndim=2)
    _check_tensor(scale_name, scale, (torch.float32,), ndim=2)
    n, k = w.shape
    if k == 0 or k % GEMM_BLOCK or n == 0:
        raise ValueError(f"{name} [N, K] needs N >= 1 and K a positive multiple of {GEMM_BLOCK}, "
                         f"got {tuple(w.shape)}")
    _check_scale_shape(scale_name, scale, (cdiv(n, GEMM_BLOCK), k // GEMM_BLOCK))
    return n, k


def check_fp8_gemm(a, a_scale, b, b_scale_inv, out_dtype):
    _check_tensor("a", a, (FP8_DTYPE,), ndim=2)
    _check_tensor("b", b, (FP8_DTYPE,), ndim=2)
    _check_tensor("a_scale", a_scale, (torch.float32,), ndim=2)
    _check_tensor("b_scale_inv", b_scale_inv, (torch.float32,), ndim=2)
    _check_same_device(a=a, a_scale=a_scale, b=b, b_scale_inv=b_scale_inv)
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_FLOAT_DTYPES}, got {out_dtype}")
    m, k = a.shape
    n, kb = b.shape
    if kb != k:
        raise ValueError(f"a and b must have the same K (a.shape[1] = {k}, b.shape[1] = {kb})")
    if k == 0 or k % GEMM_BLOCK:
        raise ValueError(f"K (a.shape[1]) must be a positive multiple of {GEMM_BLOCK}, got {k}")
    if n == 0:
        raise ValueError("N (b.shape[0]) must be >= 1")
    _check_scale_shape("a_scale", a_scale, (m, k // GEMM_BLOCK))
    _check_scale_shape("b_scale_inv", b_scale_inv, (cdiv(n, GEMM_BLOCK), k // GEMM_BLOCK))


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype=torch.bfloat16, *, backend=None):
    """a @ b.T on FP8 inputs with DeepSeek-V3's block scales, fp32 accumulation.

    a: [M, K] float8_e4m3fn, a_scale: [M, K/128] float32 (1x128 blocks, from act_quant);
    b: [N, K] float8_e4m3fn, b_scale_inv: [ceil(N/128), K/128] float32 (128x128 blocks);
    K must be a multiple of 128; M >= 0 and N >= 1 are free.
    The partial products of each 128-wide K block are scaled by a_scale * b_scale_inv and
    summed in fp32. Returns [M, N] of out_dtype (bfloat16/float16/float32).
    NaN and inf follow that formula in IEEE arithmetic (reference/fp8.py): a NaN code (0x7F /
    0xFF) in row i of a makes out[i, :] NaN, one in row j of b out[:, j]; a NaN scale makes the
    outputs it scales NaN, an inf one +-inf (NaN where its block's partial sum is 0).
    """
    check_fp8_gemm(a, a_scale, b, b_scale_inv, out_dtype)
    return _run("fp8_gemm", a.device, backend, a, a_scale, b, b_scale_inv, out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias=None, out_dtype=None, scale_fmt=None, *, backend=None):
    """y = x @ dequant(weight).T + bias with x quantized on the fly (act_quant + fp8_gemm).

    x: [..., K] float32/bfloat16/float16 (any strides); weight: [N, K] float8_e4m3fn;
    weight_scale_inv: [ceil(N/128), K/128] float32; bias: [N] or None.
    Returns [..., N] of out_dtype (default: x.dtype). NaN / inf: act_quant's and fp8_gemm's rules
    (a NaN or inf in a row of x makes that row of y NaN).
    """
    n, k = _check_fp8_weight("weight", weight, "weight_scale_inv", weight_scale_inv)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must have dtype {' or '.join(map(str, _FLOAT_DTYPES))}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x's last dim must equal weight.shape[1] = {k}, got x of shape {tuple(x.shape)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_FLOAT_DTYPES}, got {out_dtype}")
    _check_scale_fmt(scale_fmt)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be a tensor of shape ({n},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        _check_same_device(x=x, bias=bias)
    _check_same_device(x=x, weight=weight, weight_scale_inv=weight_scale_inv)
    # Everything is checked once here, so the parts run without their wrappers' checks (which cost
    # more than a decode-sized GEMM on the CPU).
    backend = dispatch.resolve("fp8_linear", x.device, backend)
    x2 = x.reshape(-1, k).contiguous()
    x_fp8, x_scale = dispatch.implementation("act_quant", backend)(x2, GEMM_BLOCK, scale_fmt == "ue8m0")
    y = dispatch.implementation("fp8_gemm", backend)(x_fp8, x_scale, weight, weight_scale_inv, out_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


# ---- MLA absorbed-attention decode ----

MLA_HEAD_DIM = _ref_mla.HEAD_DIM  # 576 = c_kv 512 | k_pe 64
MLA_LORA_RANK = _ref_mla.KV_LORA_RANK
MLA_ROPE_DIM = _ref_mla.ROPE_DIM


MLA_FP8_TOKEN_BYTES = _ref_mla.FP8_TOKEN_BYTES  # 656: the FP8 cache's token (reference/mla.py)
_CACHE_DTYPES = _FLOAT_DTYPES + (torch.uint8,)  # the kernels' (the public ops also take float8_e4m3fn)


def _as_3d_cache(kv_cache):
    """FlashMLA's [num_blocks, block_size, 1, D] cache is accepted as the 3-D one, and its FP8 cache
    (float8_e4m3fn [.., 656]) as the uint8 bytes the kernels take (a view: writes land in it)."""
    if isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 4 and kv_cache.shape[2] == 1:
        kv_cache = kv_cache.squeeze(2)
    if isinstance(kv_cache, torch.Tensor) and kv_cache.dtype == FP8_DTYPE:
        kv_cache = kv_cache.view(torch.uint8)
    return kv_cache


def _check_cache(kv_cache):
    _check_tensor("kv_cache", kv_cache, _CACHE_DTYPES, ndim=3)
    width = MLA_FP8_TOKEN_BYTES if kv_cache.dtype == torch.uint8 else MLA_HEAD_DIM
    if kv_cache.shape[2] != width:
        layout = ("656 bytes: c_kv e4m3 512 | 4 fp32 scales | k_pe bf16 64" if kv_cache.dtype == torch.uint8
                  else f"c_kv {MLA_LORA_RANK} | k_pe {MLA_ROPE_DIM}")
        raise ValueError(f"kv_cache must be [num_blocks, block_size, {width}] for dtype {kv_cache.dtype} "
                         f"({layout}), got {tuple(kv_cache.shape)}")
    bs = kv_cache.shape[1]
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"kv_cache's block_size (dim 1) must be a power of two, got {bs}")


def _check_decode_metadata(block_table, cache_seqlens, num_blocks, block_size):
    """Value checks of the paging metadata; only where it is on the CPU (free, no device sync)."""
    limit = block_table.shape[1] * block_size
    if block_table.numel() <= _SMALL:
        lens, table = cache_seqlens.tolist(), block_table.tolist()
        if all(0 <= n <= limit for n in lens) and all(0 <= x < num_blocks for row in table for x in row):
            return
    else:
        lo, hi = torch.aminmax(cache_seqlens)
        blo, bhi = torch.aminmax(block_table)
        if 0 <= lo and hi <= limit and 0 <= blo and bhi < num_blocks:
            return  # the common case in two reductions; the detailed search below names the bad entry
    lens = cache_seqlens.long()
    bad = ((lens < 0) | (lens > limit)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"cache_seqlens[{i}] = {int(lens[i])} is outside [0, {limit}] "
                         f"(block_table has {block_table.shape[1]} blocks of {block_size} tokens per request)")
    needed = torch.arange(block_table.shape[1])[None, :] < (-(-lens // block_size))[:, None]
    used = block_table[needed]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        rows, cols = (needed & ((block_table < 0) | (block_table >= num_blocks))).nonzero()[0].tolist()
        raise ValueError(f"block_table[{rows}, {cols}] = {int(block_table[rows, cols])} is outside the cache's "
                         f"{num_blocks} blocks (and request {rows} reads it)")


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               softmax_scale: float, causal: bool = False, num_splits: int = 0, *, backend=None):
    """Absorbed Multi-head Latent Attention decode over a paged latent KV cache (FlashMLA's formats).

    q: [B, s_q, H, 576] bfloat16/float16/float32: the absorbed query (q_nope @ W_UK: 512 | q_pe: 64).
    kv_cache: [num_blocks, block_size, 576] (or FlashMLA's [num_blocks, block_size, 1, 576]) of q's
      dtype: per token the normalized latent c_kv (512, also the value) | the RoPE'd k_pe (64).
      Or the FP8 cache, uint8 (or float8_e4m3fn) [num_blocks, block_size, 656] (or [.., 1, 656]),
      FlashMLA's 656-byte token: bytes [0, 512) c_kv in e4m3, [512, 528) 4 float32 scales (one per
      128 values, c_kv = e4m3 * scale), [528, 656) k_pe in bf16; q may then be any float dtype.
      The kernels dequantize it as they read it; the attention math (fp32 accumulation) is the same.
    block_table: int32 [B, max_blocks]: the cache blocks of each request, in order.
    cache_seqlens: int32 [B]: each request's length, counting its s_q new tokens (the last s_q).
    softmax_scale: always explicit (DeepSeek-V3: 192**-0.5 * mscale**2, not 576**-0.5).
    causal: new token i sees keys 0 .. seqlen - s_q + i (multi-token-prediction drafts).
    num_splits: how many parts each sequence's keys are split into (0: the backend's choice; the
      result is the same up to rounding).
    Returns (out [B, s_q, H, 512] of q's dtype, lse float32 [B, H, s_q], natural log). A request of
    length 0 gets out = 0 and lse = -inf.

    NaN / inf (reference/mla.py): a query (head and new token) that sees a key whose score is not
    finite (a NaN / inf in its q row, in the key, in an FP8 tile scale, an e4m3 NaN code) gets out
    = NaN and lse = NaN; the other queries are untouched, also those that do not see that key
    under the causal mask (a key nobody sees is never read). A query that sees no key gets 0 and
    -inf whatever q holds.

    Metadata values are checked here when they are on the CPU. On a GPU they are not (that would
    cost a device sync per call): a request with an out-of-range length or block index is never
    read out of bounds and gets out = lse = NaN instead.
    The CUDA kernel takes bfloat16/float16 (bfloat16 only with the FP8 cache) and block_size a
    multiple of 64; anything else on a GPU goes to triton unless backend= says otherwise.
    """
    kv_cache = _as_3d_cache(kv_cache)
    check_mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, num_splits)
    if block_table.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_decode_metadata(block_table, cache_seqlens, kv_cache.shape[0], kv_cache.shape[1])
    return _run("mla_decode", q.device, backend, q, kv_cache, block_table, cache_seqlens, float(softmax_scale),
                bool(causal), num_splits)


def check_mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, num_splits):
    _check_tensor("q", q, _FLOAT_DTYPES, ndim=4)
    if q.shape[3] != MLA_HEAD_DIM:
        raise ValueError(f"q must be [B, s_q, H, {MLA_HEAD_DIM}] (absorbed q_nope {MLA_LORA_RANK} | q_pe "
                         f"{MLA_ROPE_DIM}), got {tuple(q.shape)}")
    _check_cache(kv_cache)
    fp8_cache = kv_cache.dtype == torch.uint8
    if kv_cache.dtype != q.dtype and not fp8_cache:
        raise TypeError(f"kv_cache must have q's dtype {q.dtype} (or be the uint8 FP8 cache), got {kv_cache.dtype}")
    _check_tensor("block_table", block_table, (torch.int32,), ndim=2)
    _check_tensor("cache_seqlens", cache_seqlens, (torch.int32,), ndim=1)
    _check_same_device(q=q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens)
    b, s_q, h, _ = q.shape
    if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
        raise ValueError(f"block_table [B, max_blocks] and cache_seqlens [B] must have q's batch size B = {b}, "
                         f"got {tuple(block_table.shape)} and {tuple(cache_seqlens.shape)}")
    if s_q < 1 or h < 1:
        raise ValueError(f"q must have s_q >= 1 and H >= 1, got shape {tuple(q.shape)}")
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or \
            not 0 < softmax_scale < float("inf"):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")


def mla_cache_write(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_norm_weight=None, eps: float = 1e-6, rope_cos=None, rope_sin=None, *, backend=None):
    """Write new tokens into the paged latent cache, in place, optionally fusing kv_a_layernorm and RoPE.

    kv_c: [T, 512], k_pe: [T, 64] (bfloat16/float16/float32, one dtype); kv_cache: [num_blocks,
    block_size, 576] (or [.., 1, 576]) of any float dtype, or the FP8 cache uint8/float8_e4m3fn
    [num_blocks, block_size, 656] (layout in mla_decode's docstring), quantized here as FlashMLA
    does: per 128 values scale = amax / 448 (>= 1e-4) rounded up to a power of two, c_kv / scale
    rounded to nearest e4m3; k_pe stored in bf16; slot_mapping: int64 [T], slot = block *
    block_size + offset, a negative slot skips that token (padding).
    kv_norm_weight: [512] or None: store RMSNorm(kv_c) * kv_norm_weight (Hugging Face's
      DeepseekV3RMSNorm with `eps`) instead of kv_c.
    rope_cos, rope_sin: float32 [T, 32] or None: store k_pe rotated in interleaved pairs
      (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), DeepSeek-V3's RoPE.
    eps: a number >= 0 (the norm's).
    NaN / inf are stored as they are; into the FP8 cache a NaN in a 128-value tile makes its scale
    NaN (an inf: inf), so the tile decodes to NaN: the corruption shows in mla_decode.
    Slots past the cache raise an error where slot_mapping is on the CPU; on a GPU they are skipped.
    """
    kv_cache = _as_3d_cache(kv_cache)
    check_mla_cache_write(kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight, eps, rope_cos, rope_sin)
    t = kv_c.shape[0]
    if slot_mapping.device.type == "cpu" and t and not torch.compiler.is_compiling():
        capacity = kv_cache.shape[0] * kv_cache.shape[1]
        if (max(slot_mapping.tolist()) if t <= _SMALL else int(slot_mapping.max())) >= capacity:
            i = int(slot_mapping.argmax())
            raise ValueError(f"slot_mapping[{i}] = {int(slot_mapping[i])} is past the cache's {capacity} slots")
    _run("mla_cache_write", kv_c.device, backend, kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight, float(eps),
         rope_cos, rope_sin)


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def check_mla_cache_write(kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight, eps, rope_cos, rope_sin):
    _check_tensor("kv_c", kv_c, _FLOAT_DTYPES, ndim=2)
    _check_tensor("k_pe", k_pe, (kv_c.dtype,), ndim=2)
    _check_cache(kv_cache)
    _check_tensor("slot_mapping", slot_mapping, (torch.int64,), ndim=1)
    t = kv_c.shape[0]
    if kv_c.shape[1] != MLA_LORA_RANK or tuple(k_pe.shape) != (t, MLA_ROPE_DIM) or slot_mapping.shape[0] != t:
        raise ValueError(f"expected kv_c [T, {MLA_LORA_RANK}], k_pe [T, {MLA_ROPE_DIM}], slot_mapping [T]; got "
                         f"{tuple(kv_c.shape)}, {tuple(k_pe.shape)}, {tuple(slot_mapping.shape)}")
    tensors = {"kv_c": kv_c, "k_pe": k_pe, "kv_cache": kv_cache, "slot_mapping": slot_mapping}
    if kv_norm_weight is not None:
        _check_tensor("kv_norm_weight", kv_norm_weight, _FLOAT_DTYPES, ndim=1)
        if kv_norm_weight.shape[0] != MLA_LORA_RANK:
            raise ValueError(f"kv_norm_weight must be [{MLA_LORA_RANK}], got {tuple(kv_norm_weight.shape)}")
        tensors["kv_norm_weight"] = kv_norm_weight
    _check_eps(eps)
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together")
    if rope_cos is not None:
        for name, r in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            _check_tensor(name, r, (torch.float32,), ndim=2)
            if tuple(r.shape) != (t, MLA_ROPE_DIM // 2):
                raise ValueError(f"{name} must be [T, {MLA_ROPE_DIM // 2}] = [{t}, {MLA_ROPE_DIM // 2}], "
                                 f"got {tuple(r.shape)}")
            tensors[name] = r
    _check_same_device(**tensors)


# ---- DeepSeekMoE ----

def moe_route(router_logits: torch.Tensor, e_score_correction_bias=None, n_group: int = 1, topk_group: int = 1,
              topk: int = 8, routed_scaling_factor: float = 1.0, score_func: str = "sigmoid",
              renormalize: bool = True, *, backend=None):
    """DeepSeek-V3's group-limited expert choice, fused (see dsv3_kernels/reference/moe.py).

    router_logits: [T, E] float32 (bfloat16/float16 are upcast); e_score_correction_bias: float32
    [E] or None (steers the choice only). The E experts form n_group groups; the topk_group groups
    with the best top-2 biased score sum stay eligible; the topk best biased experts among them are
    chosen; their unbiased scores (sigmoid or softmax) are renormalized if `renormalize` and scaled
    by routed_scaling_factor. Ties go to the lower index.
    Returns (topk_weights float32 [T, topk], topk_ids int32 [T, topk]), best first.
    NaN / inf (reference/moe.py): NaN ranks above every number, so the ids are always topk distinct
    experts in [0, E); a NaN score (a NaN logit; with softmax a NaN, +inf or all -inf row makes
    every score NaN) is chosen first and makes the token's renormalized weights NaN.
    DeepSeek-V3: n_group=8, topk_group=4, topk=8, routed_scaling_factor=2.5, sigmoid.
    """
    check_moe_route(router_logits, e_score_correction_bias, n_group, topk_group, topk, score_func)
    return _run("moe_route", router_logits.device, backend, router_logits, e_score_correction_bias, n_group,
                topk_group, topk, float(routed_scaling_factor), score_func, bool(renormalize))


def check_moe_route(router_logits, e_score_correction_bias, n_group, topk_group, topk, score_func):
    _check_tensor("router_logits", router_logits, _FLOAT_DTYPES, ndim=2)
    e = router_logits.shape[1]
    for name, v in (("n_group", n_group), ("topk_group", topk_group), ("topk", topk)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if e == 0 or e % n_group:
        raise ValueError(f"n_experts (router_logits.shape[1] = {e}) must be a positive multiple of n_group = {n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
    if topk > topk_group * (e // n_group):
        raise ValueError(f"topk ({topk}) is more than the experts of the eligible groups "
                         f"(topk_group {topk_group} x {e // n_group} experts per group)")
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    if e_score_correction_bias is not None:
        _check_tensor("e_score_correction_bias", e_score_correction_bias, (torch.float32,), ndim=1)
        if e_score_correction_bias.shape[0] != e:
            raise ValueError(f"e_score_correction_bias must be [{e}], got {tuple(e_score_correction_bias.shape)}")
        _check_same_device(router_logits=router_logits, e_score_correction_bias=e_score_correction_bias)
        if n_group > 1 and e // n_group < 2:
            raise ValueError("with a bias, each group needs at least 2 experts (a group scores its top-2 sum)")


def _check_topk(name, t, dtype, num_tokens=None):
    _check_tensor(name, t, (dtype,), ndim=2)
    if num_tokens is not None and t.shape[0] != num_tokens:
        raise ValueError(f"{name} must have one row per token ({num_tokens}), got shape {tuple(t.shape)}")


NO_EXPERT = -1  # a topk id that names no expert: skipped, costs nothing (expert parallelism's "not mine")


def _check_ids_in_range(topk_ids, num_experts):
    """Where the ids are on the CPU (free to read): every id in [0, E) or NO_EXPERT. On a GPU a bad
    id is not routed and its token's output is NaN instead (a check would cost a device sync)."""
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        if topk_ids.numel() <= _SMALL:
            if all(NO_EXPERT <= i < num_experts for row in topk_ids.tolist() for i in row):
                return
        else:
            lo, hi = torch.aminmax(topk_ids)
            if NO_EXPERT <= lo and hi < num_experts:
                return
        bad = ((topk_ids < NO_EXPERT) | (topk_ids >= num_experts)).nonzero()
        if bad.numel():
            t, j = bad[0].tolist()
            raise ValueError(f"topk_ids[{t}, {j}] = {int(topk_ids[t, j])} is outside [0, {num_experts}) "
                             f"(num_experts = {num_experts}) and is not {NO_EXPERT} (no expert)")


def _check_num_experts(num_experts):
    # int32 ids and offsets: a larger E could not be named by an id; refused before any allocation.
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or not 1 <= num_experts < 2 ** 31:
        raise ValueError(f"num_experts must be an int in [1, 2**31 - 1] (int32 ids), got {num_experts!r}")


def check_moe_permute(hidden, topk_ids, num_experts, align, quant):
    _check_tensor("hidden", hidden, _FLOAT_DTYPES, ndim=2)
    _check_topk("topk_ids", topk_ids, torch.int32, hidden.shape[0])
    _check_same_device(hidden=hidden, topk_ids=topk_ids)
    _check_num_experts(num_experts)
    if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1024:
        raise ValueError(f"align must be an int in [1, 1024], got {align!r}")
    if quant and hidden.shape[1] % GEMM_BLOCK:
        raise ValueError(f"quant=True needs D (hidden.shape[1]) to be a multiple of {GEMM_BLOCK}, "
                         f"got {hidden.shape[1]}")


def moe_permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int = 1,
                quant: bool = False, *, backend=None):
    """Group the (token, choice) pairs by expert into the contiguous layout the grouped GEMM takes.

    hidden: [T, D] float32/bfloat16/float16; topk_ids: int32 [T, topk] (from moe_route).
    align: pad each expert's segment to a multiple of `align` rows (1: no padding; 128 gives
      DeepGEMM's contiguous layout). quant: also quantize the rows to FP8 (act_quant, 1x128
      blocks; D % 128 == 0).
    Returns (permuted [P, D] of hidden's dtype (float8_e4m3fn with quant), scale float32
    [P, D/128] with quant else None, expert_offsets int32 [E+1], inverse int32 [T, topk]).
    Expert e's rows are [expert_offsets[e], expert_offsets[e] + count_e), in token order; the
    padded segment ends at expert_offsets[e+1]. A choice with the id NO_EXPERT (-1) gets no row
    and inverse -1 (another bad id, on a GPU where ids are not checked: inverse -2). P = T*topk + min(T*topk, E) * (align - 1) (align
    > 1) is fixed by the shapes (CUDA graphs); padding rows are zero. inverse[t, j] is the row of
    token t's j-th choice.
    """
    check_moe_permute(hidden, topk_ids, num_experts, align, quant)
    _check_ids_in_range(topk_ids, num_experts)
    permuted, scale, offsets, inverse = _run("moe_permute", hidden.device, backend, hidden, topk_ids,
                                             num_experts, align, bool(quant))
    return permuted, (scale if quant else None), offsets, inverse


def check_silu_mul(x, quant):
    _check_tensor("x", x, _FLOAT_DTYPES, ndim=2)
    if x.shape[1] % 2:
        raise ValueError(f"x must be [M, 2I] (gate | up), got an odd width {x.shape[1]}")
    if quant and (x.shape[1] // 2) % GEMM_BLOCK:
        raise ValueError(f"quant=True needs I = x.shape[1] / 2 to be a multiple of {GEMM_BLOCK}, got {x.shape[1] // 2}")


def silu_mul(x: torch.Tensor, quant: bool = False, *, backend=None):
    """SwiGLU's activation: silu(gate) * up, computed in fp32.

    x: [M, 2I] float32/bfloat16/float16, gate columns then up columns.
    Returns [M, I] of x's dtype; with quant, (float8_e4m3fn [M, I], scale float32 [M, I/128])
    quantized like act_quant (I % 128 == 0). NaN / inf follow the formula in IEEE arithmetic
    (silu(-inf) is NaN), quantized act_quant's rule.
    """
    check_silu_mul(x, quant)
    y, scale = _run("silu_mul", x.device, backend, x, bool(quant))
    return (y, scale) if quant else y


def check_moe_unpermute(expert_out, topk_weights, inverse, rows_name="expert_out"):
    """rows_name: what the caller calls expert_out (ep_combine: returned)."""
    _check_tensor(rows_name, expert_out, _FLOAT_DTYPES, ndim=2)
    _check_topk("topk_weights", topk_weights, torch.float32)
    _check_tensor("inverse", inverse, (torch.int32,), ndim=2)
    if inverse.shape != topk_weights.shape:
        raise ValueError(f"inverse and topk_weights must both be [T, topk], got {tuple(inverse.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    _check_same_device(**{rows_name: expert_out, "topk_weights": topk_weights, "inverse": inverse})


def _check_inverse_rows(inverse, rows, rows_name):
    """Where inverse is on the CPU: every entry -1 or a row of the rows_name tensor's `rows`."""
    if inverse.device.type == "cpu" and inverse.numel() and not torch.compiler.is_compiling():
        bad = ((inverse < -1) | (inverse >= rows)).nonzero()
        if bad.numel():
            t, j = bad[0].tolist()
            raise ValueError(f"inverse[{t}, {j}] = {int(inverse[t, j])} is outside {rows_name}'s {rows} rows")


def moe_unpermute(expert_out: torch.Tensor, topk_weights: torch.Tensor, inverse: torch.Tensor, *, backend=None):
    """Weighted combine of the experts' rows back to token order (moe_permute's inverse).

    expert_out: [P, D] float32/bfloat16/float16 (the grouped GEMM's output rows);
    topk_weights: float32 [T, topk]; inverse: int32 [T, topk] (from moe_permute).
    Returns [T, D] of expert_out's dtype: sum_j topk_weights[t, j] * expert_out[inverse[t, j]],
    accumulated in fp32; an entry -1 (no row: a NO_EXPERT choice) adds nothing, even with a NaN or
    inf weight (other NaN / inf follow the sum). A token with
    another inverse entry outside [0, P) raises where inverse is on the CPU and gets NaN on a GPU.
    """
    check_moe_unpermute(expert_out, topk_weights, inverse)
    _check_inverse_rows(inverse, expert_out.shape[0], "expert_out")
    return _run("moe_unpermute", expert_out.device, backend, expert_out, topk_weights, inverse)


def _check_expert_weight(name, w, scale_name, scale, dtype):
    """w [E, N, K] of `dtype` (bf16) or e4m3 with scale [E, ceil(N/128), K/128]; True for FP8."""
    _check_tensor(name, w, (dtype, FP8_DTYPE), ndim=3)
    fp8 = w.dtype == FP8_DTYPE
    if fp8 != (scale is not None):
        raise ValueError(f"{scale_name} must be given exactly when {name} is float8_e4m3fn "
                         f"({name} is {w.dtype}, {scale_name} is {'None' if scale is None else 'given'})")
    e, n, k = w.shape
    if fp8:
        _check_tensor(scale_name, scale, (torch.float32,), ndim=3)
        if k % GEMM_BLOCK:
            raise ValueError(f"FP8 {name} needs K ({name}.shape[2]) to be a multiple of {GEMM_BLOCK}, got {k}")
        _check_scale_shape(scale_name, scale, (e, cdiv(n, GEMM_BLOCK), k // GEMM_BLOCK))
    if n % 8 or k % 8:
        raise ValueError(f"{name} [E, N, K] needs N and K to be multiples of 8 (16-byte rows), got {tuple(w.shape)}")
    return fp8


def check_grouped_gemm(a, b, expert_offsets, a_scale, b_scale_inv):
    _check_tensor("a", a, (torch.bfloat16, FP8_DTYPE), ndim=2)
    fp8 = _check_expert_weight("b", b, "b_scale_inv", b_scale_inv, torch.bfloat16)
    if (a.dtype == FP8_DTYPE) != fp8:
        raise TypeError(f"a and b must both be bfloat16 or both float8_e4m3fn, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    e = b.shape[0]
    if b.shape[2] != k:
        raise ValueError(f"a [M, K] and b [E, N, K] must have the same K, got {k} and {b.shape[2]}")
    if (a_scale is not None) != fp8:
        raise ValueError("a_scale must be given exactly when a is float8_e4m3fn")
    tensors = {"a": a, "b": b, "expert_offsets": expert_offsets}
    if fp8:
        _check_tensor("a_scale", a_scale, (torch.float32,), ndim=2)
        _check_scale_shape("a_scale", a_scale, (m, k // GEMM_BLOCK))
        tensors.update(a_scale=a_scale, b_scale_inv=b_scale_inv)
    _check_tensor("expert_offsets", expert_offsets, (torch.int32,), ndim=1)
    if expert_offsets.shape[0] != e + 1:
        raise ValueError(f"expert_offsets must be [E+1] = [{e + 1}] for b's {e} experts, got {tuple(expert_offsets.shape)}")
    _check_same_device(**tensors)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor, a_scale=None, b_scale_inv=None,
                 *, backend=None):
    """One GEMM per expert over the contiguous layout of moe_permute: experts with no rows cost nothing.

    a: [M, K] bfloat16 with b bfloat16, or float8_e4m3fn with a_scale float32 [M, K/128] (1x128
    blocks) and b float8_e4m3fn with b_scale_inv float32 [E, ceil(N/128), K/128] (128x128 blocks).
    b: [E, N, K] (each expert's weight as nn.Linear stores it); N and K multiples of 8 (K of 128
    for FP8). expert_offsets: int32 [E+1], non-decreasing, expert_offsets[0] = 0, last <= M.
    Returns bfloat16 [M, N]: rows [expert_offsets[e], expert_offsets[e+1]) are a @ b[e].T with fp32
    accumulation; rows past expert_offsets[E] are 0. Unchecked offsets (on a GPU) are clamped to
    [0, M] and a segment with hi <= lo is empty (reference/moe.py).
    """
    check_grouped_gemm(a, b, expert_offsets, a_scale, b_scale_inv)
    m, e = a.shape[0], b.shape[0]
    if expert_offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        if e < _SMALL:
            offs = expert_offsets.tolist()
            bad = offs[0] != 0 or offs[-1] > m or any(b < a for a, b in zip(offs, offs[1:]))
        else:
            offs = expert_offsets.long()
            bad = int(offs[0]) != 0 or int(offs[-1]) > m or bool((offs[1:] < offs[:-1]).any())
            offs = offs.tolist()
        if bad:
            raise ValueError(f"expert_offsets must start at 0, never decrease and end <= M = {m}, "
                             f"got {offs if e < 16 else 'first ' + str(offs[:16])}")
    return _run("grouped_gemm", a.device, backend, a, b, expert_offsets, a_scale, b_scale_inv)


def check_fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv):
    _check_tensor("hidden", hidden, (torch.bfloat16, torch.float32), ndim=2)
    fp8 = _check_expert_weight("w13", w13, "w13_scale_inv", w13_scale_inv, hidden.dtype)
    fp8_2 = _check_expert_weight("w2", w2, "w2_scale_inv", w2_scale_inv, hidden.dtype)
    if fp8 != fp8_2:
        raise TypeError(f"w13 and w2 must both be {str(hidden.dtype)[6:]} or both float8_e4m3fn, got {w13.dtype} and {w2.dtype}")
    t, d = hidden.shape
    e, two_i, _ = w13.shape
    if w13.shape[2] != d or two_i % 2 or tuple(w2.shape) != (e, d, two_i // 2):
        raise ValueError(f"expected w13 [E, 2I, D] and w2 [E, D, I] with D = hidden.shape[1] = {d}, got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    if fp8 and (two_i // 2) % GEMM_BLOCK:
        raise ValueError(f"FP8 experts need I = w2.shape[2] to be a multiple of {GEMM_BLOCK}, got {two_i // 2}")
    _check_topk("topk_weights", topk_weights, torch.float32, t)
    _check_topk("topk_ids", topk_ids, torch.int32, t)
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids and topk_weights must have one shape [T, topk], got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    tensors = {"hidden": hidden, "w13": w13, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids}
    if fp8:
        tensors.update(w13_scale_inv=w13_scale_inv, w2_scale_inv=w2_scale_inv)
    _check_same_device(**tensors)
    if hidden.dtype == torch.float32 and fp8:
        raise TypeError("float32 hidden needs float32 experts (FP8 experts take bfloat16 hidden)")


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale_inv=None, w2_scale_inv=None, *, backend=None):
    """The routed experts of a DeepSeekMoE layer: each token through its topk experts' SwiGLU MLPs,
    weighted by topk_weights and summed (the shared expert is not included).

    hidden: bfloat16 [T, D]; w13: [E, 2I, D] (each expert's gate_proj rows, then up_proj rows);
    w2: [E, D, I] (down_proj); both bfloat16, or float8_e4m3fn with w13_scale_inv float32
    [E, 2I/128, D/128] and w2_scale_inv [E, D/128, I/128] (the checkpoints' weight_scale_inv;
    D and I multiples of 128). topk_weights float32 / topk_ids int32 [T, topk] from moe_route;
    a choice with the id NO_EXPERT (-1) is skipped (no rows, no GEMM work, adds nothing).
    Returns bfloat16 [T, D]. Rounding points: dsv3_kernels/reference/moe.py (FP8 weights quantize
    the activations to 1x128 blocks before each GEMM).
    float32 hidden with float32 experts is the unrounded reference precision of a whole model (dsv3's
    fp32 path): the cpu, triton and torch backends take it (on a GPU it goes to triton).
    """
    check_fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv)
    _check_ids_in_range(topk_ids, w13.shape[0])
    return _run("fused_moe", hidden.device, backend, hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv,
                w2_scale_inv)


# ---- expert parallelism: tokens to the ranks that own their experts, and back ----

def check_ep_dispatch(hidden, topk_ids, topk_weights, num_experts, world_size, quant):
    _check_tensor("hidden", hidden, _FLOAT_DTYPES, ndim=2)
    _check_topk("topk_ids", topk_ids, torch.int32, hidden.shape[0])
    _check_topk("topk_weights", topk_weights, torch.float32, hidden.shape[0])
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids and topk_weights must have one shape [T, topk], got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    if topk_ids.shape[1] < 1:
        raise ValueError("topk_ids must have at least one choice per token (topk >= 1)")
    _check_same_device(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights)
    _check_num_experts(num_experts)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if num_experts % world_size:
        raise ValueError(f"num_experts = {num_experts} does not split evenly over world_size = {world_size} ranks")
    if quant and hidden.shape[1] % GEMM_BLOCK:
        raise ValueError(f"quant=True needs D (hidden.shape[1]) to be a multiple of {GEMM_BLOCK}, "
                         f"got {hidden.shape[1]}")


def ep_dispatch(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                world_size: int, quant: bool = False, *, backend=None):
    """Pack the tokens by destination rank for expert parallelism's all-to-all: each token once per
    rank that owns one of its chosen experts (rank r owns experts [r * E/W, (r+1) * E/W)).

    hidden: [T, D] float32/bfloat16/float16; topk_ids int32 / topk_weights float32 [T, topk] (from
    moe_route; ids in [0, E) or NO_EXPERT). quant: the rows in FP8 (act_quant's e4m3 + 1x128
    scales, D % 128 == 0), quantized as they are packed.
    Returns (send [P, D] of hidden's dtype (float8_e4m3fn with quant), send_scale float32
    [P, D/128] with quant else None, send_ids int32 [P, topk], send_weights float32 [P, topk],
    rank_offsets int32 [W+1], inverse int32 [T, S]), S = min(topk, W), P = T * S:
    - rank r's rows are [rank_offsets[r], rank_offsets[r+1]), in token order; a token's S slots
      list its destination ranks in order of its first choice of each, and inverse[t, s] is the
      row of its s-th one (-1 past the last). Rows past rank_offsets[W] are zero (P is fixed by
      the shapes: no host sync; the all-to-all's split sizes are rank_offsets' differences).
    - send_ids / send_weights: the row's choices as its rank sees them: the ids of that rank's
      experts made local (id - r * E/W) with their weights, NO_EXPERT and 0 for the others, so
      fused_moe on the receiving rank computes only its own choices.
    ep_combine(returned, inverse) sums the rows that come back per token.
    """
    check_ep_dispatch(hidden, topk_ids, topk_weights, num_experts, world_size, quant)
    _check_ids_in_range(topk_ids, num_experts)
    send, scale, ids, weights, offsets, inverse = _run("ep_dispatch", hidden.device, backend, hidden, topk_ids,
                                                       topk_weights, num_experts, world_size, bool(quant))
    return send, (scale if quant else None), ids, weights, offsets, inverse


def ep_combine(returned: torch.Tensor, inverse: torch.Tensor, *, backend=None):
    """The all-to-all's way back: returned [P, D] float32/bfloat16/float16 (row i: the result for
    ep_dispatch's send row i), inverse int32 [T, S] (ep_dispatch's) -> [T, D] of returned's dtype,
    each token's rows summed in fp32 in slot order (moe_unpermute with weights 1; -1 adds nothing).
    """
    _check_tensor("inverse", inverse, (torch.int32,), ndim=2)
    ones = torch.ones(inverse.shape, dtype=torch.float32, device=inverse.device)
    check_moe_unpermute(returned, ones, inverse, "returned")
    _check_inverse_rows(inverse, returned.shape[0], "returned")
    return _run("moe_unpermute", returned.device, backend, returned, ones, inverse)


# ---- normalization ----

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual=None, *, backend=None):
    """RMSNorm as Hugging Face's DeepseekV3RMSNorm, optionally fused with the residual add before it.

    x: [..., D] float32/bfloat16/float16 (D >= 1; any leading dims, 0 rows included); weight: [D]
    of x's dtype; residual: None or a tensor of x's shape and dtype; eps: a number >= 0.
    Returns (out, residual_out), both new tensors (nothing aliases an input):
    - h = x, or x + residual rounded to x's dtype;
    - out [..., D] of x's dtype = weight * normed, the product in fp32 rounded to x's dtype, where
      normed = h_fp32 * rsqrt(mean(h_fp32^2) + eps) rounded to x's dtype: what
      `weight * F.rms_norm(h.float(), (D,), eps=eps).to(x.dtype)` (dsv3.layers.RMSNorm) gives;
    - residual_out: h (the residual stream the next layer adds to) with a residual, else an empty
      [0] tensor of x's dtype.
    A decoder layer's pre-norm: `normed, residual = rms_norm(hidden, w, eps, residual)`.
    Non-finite values follow the reference exactly (IEEE arithmetic): a NaN in a row of h makes that
    row of out all NaN; an inf in a row (and no NaN) makes its mean square inf and its rsqrt 0, so
    out is NaN where h is +-inf and 0 elsewhere in that row (likewise 0 for finite values whose
    squares overflow fp32, |h| > ~1.8e19); NaN/inf in weight affect only their column.
    Accuracy against the reference: residual_out is exact; the sum of squares is added in another
    order than torch's, so float32 out is within a few ulps and a bfloat16/float16 element lying
    close to a rounding boundary may differ by an ulp (two roundings: up to 2 ulps of out).
    """
    check_rms_norm(x, weight, eps, residual)
    return _run("rms_norm", x.device, backend, x, weight, float(eps), residual)


def check_rms_norm(x, weight, eps, residual):
    _check_tensor("x", x, _FLOAT_DTYPES, min_ndim=1)
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"x must have a last dim D >= 1, got shape {tuple(x.shape)}")
    _check_tensor("weight", weight, (x.dtype,), ndim=1)
    if weight.shape[0] != d:
        raise ValueError(f"weight must be [D] = [{d}] (x.shape[-1]), got {tuple(weight.shape)}")
    if residual is not None:
        _check_tensor("residual", residual, (x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _check_same_device(x=x, weight=weight, residual=residual)
    else:
        _check_same_device(x=x, weight=weight)
    _check_eps(eps)
