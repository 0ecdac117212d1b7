"""Shared test machinery: pytest's hooks and fixtures only (helpers that test modules import are in
tests/helpers.py).

- Tests that verify ops carry `@pytest.mark.ops("name", ...)` and take the `device` and
  `backend` fixtures; they are parametrized over every device here and every backend that can
  run those ops on it (dsv3_kernels.available_backends), minus the reference itself. A test that
  also takes `op` runs once per op of its marker, each on that op's own backends.
- The cpu backend's cases run once per instruction-set level the host has (scalar, avx2, avx512,
  avx512_bf16: csrc/common/cpu_isa.h): "cpu-cpu" at the host's best, "cpu-cpu-avx2" etc. forced
  below it (in process, through dsv3_kernels._native.set_cpu_isa), against the same reference.
- A parametrize value wrapped in `helpers.native_only(...)` (the `native_only` marker) is too large
  for Triton's interpreter: it runs on the native backends (cpu, cuda, and triton on a GPU) and is
  deselected here for triton on the CPU (the interpreter) and for the scalar CPU level (minutes per
  case), where a smaller case of the same kind stands in. The run's summary counts them.
- `--record-verified PATH` writes, for a run on a GPU, which (op, backend, arch) passed every
  one of its tests; `python -m dsv3_kernels.verified record PATH` merges it into the package.
"""

import datetime
import json
import os
import platform

import pytest
import torch

import dsv3_kernels
from dsv3_kernels import dispatch


def pytest_addoption(parser):
    parser.addoption("--record-verified", metavar="PATH", default=None,
                     help="write per-(op, backend, arch) GPU results to PATH (see dsv3_kernels/verified.py)")


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kernel_backends(op_names, device):
    sets = [set(dsv3_kernels.available_backends(op, device)) for op in op_names]
    return [b for b in dispatch.BACKENDS if b != "torch" and all(b in s for s in sets)]


def pytest_report_header(config):
    lines = [f"dsv3_kernels: {dsv3_kernels._native.status()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
             f"  CPU levels forced below the host's best: {_lower_cpu_levels() or 'none'}"]
    for device in _devices():
        lines.append(f"  kernel backends tested on {device}: {_kernel_backends(dispatch.ops(), device)}")
    return lines


def _lower_cpu_levels():
    """The ISA levels below the host's best, highest first (the best runs as plain "cpu-cpu")."""
    return list(reversed(dsv3_kernels._native.host_cpu_isa_levels()[:-1]))


def _combos(op_names, devices):
    """(device, backend, cpu_isa) for every backend that runs all of op_names, each CPU level."""
    combos = [(d, b, None) for d in devices for b in _kernel_backends(op_names, d)]
    return combos + [("cpu", "cpu", level) for level in _lower_cpu_levels() if ("cpu", "cpu", None) in combos]


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("ops")
    if marker is None or "backend" not in metafunc.fixturenames:
        return
    devices = [d for d in _devices() if d == "cuda" or not metafunc.definition.get_closest_marker("gpu")]
    if "op" in metafunc.fixturenames:  # one case per op of the marker, on that op's own backends
        combos = [(op, *c) for op in marker.args for c in _combos((op,), devices)]
        metafunc.parametrize(("op", "device", "backend", "cpu_isa"), combos, indirect=["cpu_isa"],
                             ids=[f"{op}-{d}-{b}" + (f"-{level}" if level else "") for op, d, b, level in combos])
        return
    combos = _combos(marker.args, devices)
    metafunc.parametrize(("device", "backend", "cpu_isa"), combos, indirect=["cpu_isa"],
                         ids=[f"{d}-{b}" + (f"-{level}" if level else "") for d, b, level in combos])


@pytest.fixture(autouse=True)
def cpu_isa(request):
    """The CPU kernels' ISA level for this test (None: the host's best), restored afterwards."""
    level = getattr(request, "param", None)
    if level is None:
        yield None
        return
    before = dsv3_kernels._native.cpu_isa()
    dsv3_kernels._native.set_cpu_isa(level)
    try:
        yield level
    finally:
        dsv3_kernels._native.set_cpu_isa(before)


def _slow_backend(item):
    """Triton's interpreter, or the scalar CPU level: where native_only cases are deselected."""
    params = getattr(item, "callspec", None) and item.callspec.params
    return bool(params) and params.get("device") == "cpu" and (
        params.get("backend") == "triton" or params.get("cpu_isa") == "scalar")


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("native_only") and _slow_backend(item) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        config._native_only_dropped = len(dropped)


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_native_only_dropped", 0)
    if n:
        terminalreporter.write_line(f"{n} large cases ran on the native backends only, not in Triton's interpreter "
                                    "or the scalar CPU level (native_only in tests/helpers.py; smaller cases "
                                    "of the same kind stand in)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- recording which kernels passed on a GPU ----

_RESULTS = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    marker = item.get_closest_marker("ops")
    if callspec is None or marker is None or callspec.params.get("device") != "cuda":
        return
    if report.when == "call" or (report.when == "setup" and report.failed):
        if report.skipped:
            return
        arch = dispatch.arch(torch.device("cuda"))
        for op in (callspec.params["op"],) if "op" in callspec.params else marker.args:
            r = _RESULTS.setdefault((op, callspec.params["backend"], arch), {"passed": 0, "failed": 0})
            r["passed" if report.passed else "failed"] += 1


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--record-verified")
    if not path or not _RESULTS:
        return
    doc = {
        # an interrupted run (e.g. a timeout) may have skipped some of an op's tests
        "complete": exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED),
        "hardware": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "python": platform.python_version(),
        "results": [{"op": op, "backend": b, "arch": a, **r} for (op, b, a), r in sorted(_RESULTS.items())],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
