"""The one dispatch rule: explicit backend= > DSV3_KERNELS_BACKEND > automatic (verified table)."""

import json

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import _native, dispatch, verified

FP8_OPS = ["act_quant", "weight_quant", "weight_dequant", "fp8_gemm", "fp8_linear"]


def test_available_backends_lists_what_is_there():
    for op in FP8_OPS:
        backends = dk.available_backends(op)
        assert backends[-1] == "torch"
        assert ("cpu" in backends) == _native.has_kernel("fp8_gemm", "CPU")
        assert ("cuda" in backends) == _native.has_kernel("fp8_gemm", "CUDA")
        assert set(dk.available_backends(op, "cpu")) <= set(backends)
    assert "cuda" not in dk.available_backends("fp8_gemm", "cpu")
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        dk.available_backends("nope")


def test_cpu_kernels_are_built():
    """The C++ CPU kernels are built on every install; a missing _C is a broken build here."""
    assert _native.loaded(), _native.status()
    assert "cpu" in dk.available_backends("fp8_gemm", "cpu")
    assert dispatch.resolve("fp8_gemm", torch.device("cpu")) == "cpu"


def test_auto_picks_cpu_kernel_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(dk.ENV_VAR, raising=False)
    want = "cpu" if _native.has_kernel("fp8_gemm", "CPU") else "torch"
    assert dispatch.resolve("fp8_gemm", torch.device("cpu")) == want


def test_env_var_and_explicit_argument(monkeypatch):
    monkeypatch.setenv(dk.ENV_VAR, "torch")
    assert dispatch.resolve("fp8_gemm", torch.device("cpu")) == "torch"
    if "cpu" in dk.available_backends("fp8_gemm", "cpu"):
        assert dispatch.resolve("fp8_gemm", torch.device("cpu"), "cpu") == "cpu"  # argument wins
    monkeypatch.setenv(dk.ENV_VAR, "auto")
    assert dispatch.resolve("fp8_gemm", torch.device("cpu")) == ("cpu" if _native.loaded() else "torch")
    monkeypatch.setenv(dk.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=r"DSV3_KERNELS_BACKEND'tpu' is not a backend"):
        dispatch.resolve("fp8_gemm", torch.device("cpu"))


def test_unavailable_backend_names_what_is(monkeypatch):
    monkeypatch.delenv(dk.ENV_VAR, raising=False)
    x = torch.randn(2, 128)
    with pytest.raises(dk.BackendUnavailableError, match=r"backend 'cuda' \(from backend=\) cannot run here: .*"
                       r"Available for cpu tensors: \[.*'torch'\]"):
        dk.act_quant(x, backend="cuda")
    monkeypatch.setenv(dk.ENV_VAR, "cuda")
    with pytest.raises(dk.BackendUnavailableError, match=r"from DSV3_KERNELS_BACKEND"):
        dk.act_quant(x)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in dk.available_backends("fp8_gemm", "cpu")
    with pytest.raises(dk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("fp8_gemm", torch.device("cpu"), "triton")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of arch sm_90 whose CUDA kernels are built, without needing a GPU."""
    monkeypatch.delenv(dk.ENV_VAR, raising=False)
    real = _native.has_kernel
    monkeypatch.setattr(_native, "has_kernel", lambda op, key: True if key == "CUDA" else real(op, key))
    monkeypatch.setattr(dispatch, "arch", lambda device: "sm_90")
    dispatch.clear_cache()  # choices made before the fakes, and after them for later tests
    yield
    dispatch.clear_cache()


# Where the CUDA kernel is not chosen: triton, or torch where triton is not installed (a CPU-only
# torch), since resolving to triton imports the Triton kernels.
FALLBACK = "triton" if dispatch._triton_importable() else "torch"


def test_auto_uses_unverified_cuda_kernel_only_by_name(fake_gpu, monkeypatch):
    monkeypatch.setattr(verified, "is_verified", lambda op, backend, arch: False)
    assert dispatch.resolve("fp8_gemm", torch.device("cuda")) == FALLBACK
    assert dispatch.resolve("fp8_gemm", torch.device("cuda"), "cuda") == "cuda"


def test_auto_uses_verified_cuda_kernel(fake_gpu, monkeypatch):
    passed = {("fp8_gemm", "cuda", "sm_90"), ("act_quant", "cuda", "sm_90")}
    monkeypatch.setattr(verified, "is_verified", lambda op, backend, arch: (op, backend, arch) in passed)
    assert dispatch.resolve("fp8_gemm", torch.device("cuda")) == "cuda"
    assert dispatch.resolve("fp8_linear", torch.device("cuda")) == "cuda"  # all of its parts passed
    assert dispatch.resolve("weight_quant", torch.device("cuda")) == FALLBACK


def test_verified_record_merges_gpu_results(tmp_path):
    table = tmp_path / "verified.json"
    table.write_text(json.dumps({"entries": [
        {"op": "act_quant", "backend": "cuda", "arch": "sm_90", "hardware": "old", "date": "2026-01-01",
         "torch": "2.11", "tests": 3}]}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"complete": True, "hardware": "NVIDIA H200", "date": "2026-11-28", "torch": "2.11.0", "results": [
        {"op": "fp8_gemm", "backend": "cuda", "arch": "sm_90", "passed": 12, "failed": 0},
        {"op": "act_quant", "backend": "cuda", "arch": "sm_90", "passed": 10, "failed": 1},
        {"op": "weight_quant", "backend": "triton", "arch": "sm_90", "passed": 0, "failed": 0},
    ]}))
    entries = verified.record(str(run), str(table))
    assert [(e["op"], e["backend"], e["hardware"]) for e in entries] == [("fp8_gemm", "cuda", "NVIDIA H200")]
    interrupted = tmp_path / "interrupted.json"
    interrupted.write_text(json.dumps({**json.loads(run.read_text()), "complete": False}))
    with pytest.raises(ValueError, match="interrupted"):
        verified.record(str(interrupted), str(table))


def test_shipped_verified_table_is_well_formed():
    for e in verified.entries():
        assert e["op"] in dispatch.ops() and e["backend"] in dispatch.BACKENDS
        assert e["arch"].startswith("sm_") and e["hardware"] and e["date"] and e["tests"] > 0


def test_auto_skips_a_cuda_kernel_that_does_not_take_the_arguments(fake_gpu, monkeypatch):
    """An op's cuda_takes (declared with the op) decides, in dispatch.py: mla_decode's CUDA kernel takes
    bf16/fp16 q and block sizes that are multiples of 64; fused_moe's takes bf16 only."""
    monkeypatch.setattr(verified, "is_verified", lambda op, backend, arch: True)
    meta = dict(device="meta")
    q16, q32 = torch.empty(1, 1, 4, 576, dtype=torch.bfloat16, **meta), torch.empty(1, 1, 4, 576, **meta)
    cache64 = torch.empty(2, 64, 576, dtype=torch.bfloat16, **meta)
    cache16 = torch.empty(2, 16, 576, dtype=torch.bfloat16, **meta)
    cuda = torch.device("cuda")
    assert dispatch.resolve("mla_decode", cuda, None, (q16, cache64)) == "cuda"
    assert dispatch.resolve("mla_decode", cuda, None, (q32, cache64)) == FALLBACK
    assert dispatch.resolve("mla_decode", cuda, None, (q16, cache16)) == FALLBACK
    assert dispatch.resolve("mla_decode", cuda, "cuda", (q16, cache16)) == "cuda"  # an explicit choice stands
    assert dispatch.resolve("fused_moe", cuda, None, (torch.empty(2, 8, **meta),)) == FALLBACK
    assert dispatch.resolve("fused_moe", cuda, None, (torch.empty(2, 8, dtype=torch.bfloat16, **meta),)) == "cuda"
