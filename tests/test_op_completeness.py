"""Every op has all of its pieces (docs/adding_an_op.md lists them in order).

For each schema dsv3_kernels::<op> of csrc/registration.cpp (the Triton ops, <op>_triton, are not
schemas of their own): the public op in dsv3_kernels with a docstring (ops.py), a fake kernel
(fake.py), its dispatch.register_op with the torch reference (ops.py), the Triton op
dsv3_kernels::<op>_triton that its Triton module registers (or triton_module=NO_TRITON_KERNEL),
the C++ CPU kernel (and the CUDA kernel where _C was built with CUDA kernels), and opcheck
samples (tests/op_samples.py). The other way round: every non-composite op dispatch knows has a
schema, every composite op a public op, and every opcheck sample an op.
"""

import importlib
import inspect

import pytest
import torch
from torch._library import simple_registry

import dsv3_kernels
from dsv3_kernels import dispatch
from op_samples import SAMPLES

NAMESPACE = "dsv3_kernels::"


def _schema_ops():
    names = {name.removeprefix(NAMESPACE).split(".")[0] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith(NAMESPACE)}
    return sorted(name for name in names if not name.endswith("_triton"))


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(NAMESPACE + op, key)


def _built_with_cuda():
    return any(_has_kernel(op, "CUDA") for op in _schema_ops())


def _public_op_missing(op):
    fn = getattr(dsv3_kernels, op, None)
    if not callable(fn) or op not in dsv3_kernels.__all__:
        return ["its public op dsv3_kernels." + op + " (ops.py, exported in __init__.py's __all__)"]
    return [] if inspect.getdoc(fn) else [f"a docstring of dsv3_kernels.{op} (ops.py)"]


def _triton_missing(op, spec):
    if spec.triton_module == dispatch.NO_TRITON_KERNEL:
        return []
    if spec.triton_module is None:
        return ["a Triton module in its dispatch.register_op (or triton_module=dispatch.NO_TRITON_KERNEL)"]
    if not dispatch._triton_importable():
        return []
    try:
        importlib.import_module(spec.triton_module)
    except ImportError as e:
        return [f"its Triton module {spec.triton_module} ({e})"]
    if NAMESPACE + op + "_triton" not in torch._C._dispatch_get_all_op_names():
        return [f"the Triton op {NAMESPACE}{op}_triton, which importing {spec.triton_module} should register"]
    return []


def missing_pieces(op):
    """What the schema op dsv3_kernels::<op> lacks, each named with the file it belongs in."""
    missing = _public_op_missing(op)
    if simple_registry.singleton.find(NAMESPACE + op).fake_impl.kernel is None:
        missing.append("a fake kernel (fake.py: torch.library.register_fake)")
    if op not in dispatch.ops():
        missing.append("its dispatch.register_op (ops.py)")
    else:
        spec = dispatch._get_op(op)
        if spec.parts or not callable(spec.reference):
            missing.append("a torch reference in its dispatch.register_op (reference/)")
        missing += _triton_missing(op, spec)
    if not _has_kernel(op, "CPU"):
        missing.append("a CPU kernel (csrc/: TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) in an <op>_cpu.cpp)")
    if _built_with_cuda() and not _has_kernel(op, "CUDA"):
        missing.append("a CUDA kernel (csrc/: TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) in an <op>_cuda.cpp)")
    if op not in SAMPLES or not SAMPLES[op]("cpu", "torch"):
        missing.append("opcheck samples (tests/op_samples.py)")
    return missing


def test_there_are_schemas():
    assert dsv3_kernels._native.loaded(), dsv3_kernels._native.status()
    assert "moe_permute" in _schema_ops() and "moe_permute_triton" not in _schema_ops()


@pytest.mark.parametrize("op", _schema_ops())
def test_op_has_every_piece(op):
    missing = missing_pieces(op)
    assert not missing, f"dsv3_kernels::{op} lacks " + "; ".join(missing)


def test_every_dispatch_op_has_a_schema_or_is_composite():
    schemas = set(_schema_ops())
    problems = []
    for op in dispatch.ops():
        parts = dispatch._get_op(op).parts
        if parts:  # a composite op (fp8_linear, ep_combine): its parts and its public op
            problems += [f"{op}: its part {p} is not a registered op" for p in parts if p not in dispatch.ops()]
            problems += [f"{op} lacks {piece}" for piece in _public_op_missing(op)]
        elif op not in schemas:
            problems.append(f"{op}: registered in dispatch (ops.py) but has no schema (csrc/registration.cpp)")
    assert not problems, problems


def test_every_opcheck_sample_is_an_op():
    stale = sorted(set(SAMPLES) - set(_schema_ops()))
    assert not stale, f"tests/op_samples.py has samples of ops without a schema: {stale}"


def test_a_missing_piece_is_named(monkeypatch):
    """The check itself: an op without its samples and without its Triton module is reported."""
    monkeypatch.delitem(SAMPLES, "silu_mul")
    monkeypatch.setattr(dispatch._get_op("silu_mul"), "triton_module", None)
    assert missing_pieces("silu_mul") == [
        "a Triton module in its dispatch.register_op (or triton_module=dispatch.NO_TRITON_KERNEL)",
        "opcheck samples (tests/op_samples.py)"]
    monkeypatch.setattr(dispatch._get_op("silu_mul"), "triton_module", dispatch.NO_TRITON_KERNEL)
    assert missing_pieces("silu_mul") == ["opcheck samples (tests/op_samples.py)"]
