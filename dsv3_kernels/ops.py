"""The public ops. Each checks its arguments (errors name the argument), picks a backend by the
one rule in dispatch.py, and calls that backend's kernel. Every op takes `backend=` to choose
"cuda", "triton", "cpu" or "torch" explicitly.

FP8 here is float8_e4m3fn with DeepSeek-V3's block scales: activations per token per 128
channels (1x128), weights per 128x128 block, fp32 scales, dequantized = fp8 * scale.
"""

import torch

from . import dispatch
from .reference import fp8 as _ref_fp8

FP8_DTYPE = torch.float8_e4m3fn
GEMM_BLOCK = 128  # the fp8_gemm scale format: 1x128 activation blocks, 128x128 weight blocks
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

dispatch.register_op("act_quant", _ref_fp8.act_quant, "dsv3_kernels.triton.fp8")
dispatch.register_op("weight_quant", _ref_fp8.weight_quant, "dsv3_kernels.triton.fp8")
dispatch.register_op("weight_dequant", _ref_fp8.weight_dequant, "dsv3_kernels.triton.fp8")
dispatch.register_op("fp8_gemm", _ref_fp8.fp8_gemm, "dsv3_kernels.triton.fp8")
dispatch.register_op("fp8_linear", None, parts=("act_quant", "fp8_gemm"))

available_backends = dispatch.available_backends


def _cdiv(a, b):
    return -(-a // b)


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


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_block_size(block_size):
    if not isinstance(block_size, int) or block_size < 16 or block_size > 1024 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 1024], got {block_size!r}")


def _check_scale_shape(name, scale, expected):
    if tuple(scale.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(scale.shape)}")


def _run(op, device, backend, *args):
    return dispatch.implementation(op, dispatch.resolve(op, device, backend))(*args)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt=None, *, backend=None):
    """Quantize activations to FP8 per token and per `block_size` channels.

    x: [..., K] float32/bfloat16/float16, contiguous; K need not be a multiple of block_size.
    scale_fmt: None (scale = amax / 448, amax clamped to >= 1e-4) or "ue8m0" (that scale
    rounded up to a power of two, DeepSeek-V3.1's format).
    Returns (x_fp8 float8_e4m3fn [..., K], scale float32 [..., ceil(K / block_size)]),
    with x ~= x_fp8 * scale per block.
    """
    _check_tensor("x", x, _FLOAT_DTYPES, min_ndim=1)
    _check_block_size(block_size)
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    return _run("act_quant", x.device, backend, x, block_size, scale_fmt == "ue8m0")


def weight_quant(w: torch.Tensor, block_size: int = 128, *, backend=None):
    """Quantize a weight to FP8 with one scale per block_size x block_size block (checkpoint format).

    w: [N, K] float32/bfloat16/float16, contiguous; partial edge blocks are allowed.
    Returns (w_fp8 float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N/bs), ceil(K/bs)]),
    with w ~= w_fp8 * weight_scale_inv per block.
    """
    _check_tensor("w", w, _FLOAT_DTYPES, ndim=2)
    _check_block_size(block_size)
    return _run("weight_quant", w.device, backend, w, block_size)


def weight_dequant(w: torch.Tensor, weight_scale_inv: torch.Tensor, dtype=torch.bfloat16,
                   block_size: int = 128, *, backend=None):
    """Dequantize an FP8 checkpoint weight: w_fp8 * weight_scale_inv per block.

    w: [N, K] float8_e4m3fn; weight_scale_inv: [ceil(N/bs), ceil(K/bs)] float32.
    Returns [N, K] of `dtype` (float32/bfloat16/float16).
    """
    _check_tensor("w", w, (FP8_DTYPE,), ndim=2)
    _check_tensor("weight_scale_inv", weight_scale_inv, (torch.float32,), ndim=2)
    _check_block_size(block_size)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    _check_same_device(w=w, weight_scale_inv=weight_scale_inv)
    n, k = w.shape
    _check_scale_shape("weight_scale_inv", weight_scale_inv, (_cdiv(n, block_size), _cdiv(k, block_size)))
    return _run("weight_dequant", w.device, backend, w, weight_scale_inv, block_size, dtype)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype=torch.bfloat16, *, backend=None):
    """a @ b.T on FP8 inputs with DeepSeek-V3's block scales, fp32 accumulation.

    a: [M, K] float8_e4m3fn, a_scale: [M, K/128] float32 (1x128 blocks, from act_quant);
    b: [N, K] float8_e4m3fn, b_scale_inv: [ceil(N/128), K/128] float32 (128x128 blocks);
    K must be a multiple of 128; M >= 0 and N >= 1 are free.
    The partial products of each 128-wide K block are scaled by a_scale * b_scale_inv and
    summed in fp32. Returns [M, N] of out_dtype (bfloat16/float16/float32).
    """
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
    _check_scale_shape("b_scale_inv", b_scale_inv, (_cdiv(n, GEMM_BLOCK), k // GEMM_BLOCK))
    return _run("fp8_gemm", a.device, backend, a, a_scale, b, b_scale_inv, out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias=None, out_dtype=None, scale_fmt=None, *, backend=None):
    """y = x @ dequant(weight).T + bias with x quantized on the fly (act_quant + fp8_gemm).

    x: [..., K] float32/bfloat16/float16 (any strides); weight: [N, K] float8_e4m3fn;
    weight_scale_inv: [ceil(N/128), K/128] float32; bias: [N] or None.
    Returns [..., N] of out_dtype (default: x.dtype).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x's last dim must equal weight.shape[1] = {weight.shape[-1]}, "
                         f"got x of shape {tuple(x.shape)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        _check_same_device(x=x, bias=bias)
    backend = dispatch.resolve("fp8_linear", x.device, backend)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    x_fp8, x_scale = act_quant(x2, GEMM_BLOCK, scale_fmt, backend=backend)
    y = fp8_gemm(x_fp8, x_scale, weight, weight_scale_inv, out_dtype, backend=backend)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])
