"""One small case of every CUDA op, for `compute-sanitizer --tool memcheck` (gpu_check.sh)."""

import torch

import dsv3_kernels as dk

x = torch.randn(67, 384, device="cuda", dtype=torch.bfloat16)
w = torch.randn(2112 + 5, 384, device="cuda")
for backend in dk.available_backends("fp8_gemm", "cuda"):
    if backend == "torch":
        continue
    a, a_s = dk.act_quant(x, backend=backend)
    b, b_s = dk.weight_quant(w, backend=backend)
    dk.weight_dequant(b, b_s, backend=backend)
    for m in (1, 67):
        dk.fp8_gemm(a[:m].contiguous(), a_s[:m].contiguous(), b, b_s, backend=backend)
    torch.cuda.synchronize()
    print(f"{backend}: ok")
