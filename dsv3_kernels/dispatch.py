"""The one rule that picks the backend of every dsv3_kernels op.

Backends: "cuda" (the CUDA kernels in _C), "triton", "cpu" (the C++ kernels in _C) and
"torch" (the fp32 reference). Order of choice:
  1. the explicit `backend=` argument of the op,
  2. the environment variable DSV3_KERNELS_BACKEND ("auto" or unset: no choice),
  3. automatic: CUDA tensors use the cuda kernel where it is built *and* listed in
     verified.json for the GPU's architecture and its arguments are ones that kernel takes
     (an op's `cuda_takes`, below), else triton (else torch); CPU tensors use the cpu kernel
     where it is built, else torch.
An explicit choice that cannot run raises BackendUnavailableError naming what can. The public ops
(ops.py) check their arguments and call `run`; nothing else decides a backend.
"""

import functools
import importlib
import os

import torch

from . import _native, verified

BACKENDS = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "DSV3_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these tensors."""


# The triton_module of an op that has no Triton kernel: declared, so that it is told apart from a
# forgotten one (tests/test_op_completeness.py).
NO_TRITON_KERNEL = "none"


class _Op:
    def __init__(self, name, reference, triton_module=None, native=True, parts=(), cuda_takes=None):
        self.name = name
        self.reference = reference
        self.triton_module = triton_module
        self.native = native
        self.parts = parts  # composite ops: available where all of their parts are
        self.cuda_takes = cuda_takes


_OPS: dict[str, _Op] = {}


def register_op(name, reference, triton_module=None, native=True, parts=(), cuda_takes=None):
    """Declare an op: its torch reference, the module that registers its Triton version as the
    custom op dsv3_kernels::<name>_triton (NO_TRITON_KERNEL: it has none), whether _C has CPU/CUDA
    kernels, or the ops it is composed of. cuda_takes(*args) -> bool, for an op whose CUDA kernel
    takes only some of what the op accepts (dtypes, block sizes): where it is False the automatic
    choice is made as if there were no cuda kernel."""
    _OPS[name] = _Op(name, reference, triton_module, native, tuple(parts), cuda_takes)


def ops():
    return sorted(_OPS)


@functools.lru_cache(maxsize=None)
def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting():
    return _getenv("TRITON_INTERPRET", "0") == "1"  # part of _decide's cache key


def _why_not(op: _Op, backend: str, device_type):
    """None if `backend` can run `op` on `device_type` tensors (None: on some device), else why not."""
    if op.parts:
        for part in op.parts:
            why = _why_not(_OPS[part], backend, device_type)
            if why:
                return why
        return None
    if backend == "torch":
        return None
    if backend in ("cuda", "cpu"):
        key = backend.upper()
        if not op.native or not _native.has_kernel(op.name, key):
            return (f"the {backend} kernels were not built ({_native.status()})"
                    if op.native else f"{op.name} has no {backend} kernel")
        if device_type is not None and device_type != backend:
            return f"the {backend} backend needs {backend.upper()} tensors, got {device_type} tensors"
        return None
    if backend == "triton":
        if op.triton_module in (None, NO_TRITON_KERNEL):
            return f"{op.name} has no triton kernel"
        if not _triton_importable():
            return "triton is not installed"
        if device_type == "cpu" and not _interpreting():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in (None, "cpu", "cuda"):
            return f"triton does not run on {device_type} tensors"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


def _get_op(name) -> _Op:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; ops are {ops()}") from None


def available_backends(op: str, device=None) -> list:
    """Backends that can run `op`, in dispatch order; with `device`, those that can run on it."""
    spec = _get_op(op)
    device_type = None if device is None else torch.device(device).type
    return [b for b in BACKENDS if _why_not(spec, b, device_type) is None]


def arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def resolve(op: str, device: torch.device, backend=None, args=()) -> str:
    """The backend that runs `op` on tensors of `device` (see the module docstring for the rule);
    args: the op's arguments, for its cuda_takes."""
    spec = _get_op(op)
    cuda_ok = device.type != "cuda" or spec.cuda_takes is None or not args or bool(spec.cuda_takes(*args))
    return _resolve(op, device.type, device.index, backend, cuda_ok)


def all_resolve_to(ops: tuple, device: torch.device, backend, target: str) -> bool:
    """Whether the rule picks `target` for every op of `ops` on `device` tensors (ops without
    cuda_takes): what a fused path that calls those ops' kernels itself asks before each call
    (dsv3/cpu_decode.py), in one cached lookup per environment."""
    return _all_resolve_to(tuple(ops), device.type, device.index, backend, _getenv(ENV_VAR), target)


@functools.lru_cache(maxsize=None)
def _all_resolve_to(ops, device_type, device_index, backend, env, target):
    return all(_decide(op, device_type, device_index, backend, env, None, True) == target for op in ops)


def run(op: str, device: torch.device, backend, *args):
    """Run a non-composite `op` on `args` (its schema's arguments) with the backend the rule picks."""
    return implementation(op, resolve(op, device, backend, args))(*args)


# torch.compile evaluates the choice once, while tracing, and bakes the result into the graph.
@torch.compiler.assume_constant_result
def _resolve(op: str, device_type: str, device_index, backend, cuda_ok: bool) -> str:
    env = _getenv(ENV_VAR)
    # TRITON_INTERPRET matters only where triton is asked for (auto never picks it for CPU tensors)
    named = backend if backend is not None else env.strip().lower()
    interpret = _getenv("TRITON_INTERPRET", "0") if named == "triton" else None
    return _decide(op, device_type, device_index, backend, env, interpret, cuda_ok)


# os.environ.get encodes the key and decodes the value (~1 us, paid by every op call); CPython keeps
# the raw environment in os.environ._data (bytes on POSIX), which every os.environ change updates.
_RAW_ENV = os.environ._data if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict) else None


def _getenv(name: str, default: str = "") -> str:
    if _RAW_ENV is None:
        return os.environ.get(name, default)
    value = _RAW_ENV.get(name.encode())
    return default if value is None else os.fsdecode(value)


# Cached: deciding asks the dispatcher which kernels _C registered, which costs more than a
# decode-sized kernel on the CPU. The variables the choice reads are part of the key.
@functools.lru_cache(maxsize=None)
def _decide(op: str, device_type: str, device_index, backend, env: str, interpret: str, cuda_ok: bool) -> str:
    spec = _get_op(op)
    device = torch.device(device_type, device_index)
    source = "backend="
    if backend is None:
        backend, source = env.strip().lower(), ENV_VAR
        if backend in ("", "auto"):
            backend = None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{source}{backend!r} is not a backend; choose one of {BACKENDS} "
                             f"(or 'auto' in {ENV_VAR})")
        why = _why_not(spec, backend, device.type)
        if why:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} (from {source}) cannot run here: {why}. "
                f"Available for {device.type} tensors: {available_backends(op, device)}")
    elif device.type == "cuda":
        if cuda_ok and _why_not(spec, "cuda", "cuda") is None and _verified(spec, arch(device)):
            backend = "cuda"
        else:
            backend = "triton" if _why_not(spec, "triton", "cuda") is None else "torch"
    else:
        backend = "cpu" if _why_not(spec, "cpu", device.type) is None else "torch"
    if backend == "triton":
        # assume_constant_result runs this function for real even while tracing: import here, so
        # implementation() (which is traced) finds the op registered.
        for name in spec.parts or (op,):
            importlib.import_module(_OPS[name].triton_module)
    return backend


def clear_cache():
    """Forget the backends chosen so far (after verified.json or the registered kernels changed)."""
    _decide.cache_clear()
    _all_resolve_to.cache_clear()


def _verified(spec: _Op, arch_name: str) -> bool:
    names = spec.parts or (spec.name,)
    return all(verified.is_verified(n, "cuda", arch_name) for n in names)


def _load_triton(spec: _Op):
    """Import the module that registers dsv3_kernels::<op>_triton (imports triton: done lazily)."""
    if not torch.compiler.is_compiling():  # while tracing, _resolve already imported it
        importlib.import_module(spec.triton_module)


def implementation(op: str, backend: str):
    """The callable that runs a non-composite `op` with `backend` (same arguments as the schema)."""
    spec = _get_op(op)
    if backend in ("cuda", "cpu"):
        return getattr(torch.ops.dsv3_kernels, op)
    if backend == "triton":
        _load_triton(spec)
        return getattr(torch.ops.dsv3_kernels, f"{op}_triton")
    return spec.reference
