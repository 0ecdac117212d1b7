"""pytest-benchmark harness shared by the benchmark suites.

`bench(...)` times one call of an op (rotating through copies of its inputs so caches do not
flatter memory-bound cases), stores time, TFLOP/s, bytes moved, GB/s, the fraction of the
measured copy bandwidth and the roofline fraction in the result's extra_info, and at the end of the session the results are written to
benchmarks/results/<hardware>-<date>-<suite>.{json,csv} (or --results-dir) and printed as a table.
On CUDA each timed round is a batch of launches followed by one synchronize; times are per call.
"""

import csv
import datetime
import itertools
import json
import os
import platform
import re

import pytest
import torch

import roofline
from dsv3_kernels import _native

_ROWS = []
_CPU_CAPS = ("DSV3_KERNELS_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# Callables returning a markdown summary of the rows, printed after the table (bench_llama_cpp.py).
SUMMARIES = []


def record(row):
    """Adds a row measured without `bench` (another program's timings) to the results table."""
    _ROWS.append(row)


def pytest_addoption(parser):
    parser.addoption("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"),
                     help="where to write the results table (json + csv)")
    parser.addoption("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")


def device_of(config):
    return config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device(request):
    return device_of(request.config)


def _read_all(obj):
    """Reads every byte of obj's tensors once. Making the copies left their last lines dirty in the
    last-level cache; reading copies that add up to twice that cache, in the order they were made,
    writes those lines back now instead of during the timed calls."""
    if isinstance(obj, torch.Tensor):
        obj.reshape(-1).view(torch.uint8).max()
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _read_all(o)


def _nbytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


@pytest.fixture
def bench(benchmark, device):
    def run(fn, make_args, *, op, shape, provider, flops, nbytes, precision="fp8", baseline=None, rotate_bytes=None):
        """fn(*make_args()) is timed. `baseline` names the provider this one is compared with.
        Calls rotate through copies of the arguments: up to 16 copies of 256 MB (CUDA) / 128 MB (CPU)
        in all, or, with rotate_bytes, as many copies as that many bytes take (an op that must read
        its inputs from DRAM on a host with a last-level cache larger than 128 MB)."""
        args = make_args()
        size = max(1, _nbytes(args))
        if rotate_bytes is None:
            extra = min(15, ((256 << 20) if device == "cuda" else (128 << 20)) // size)
        else:
            extra = -(-rotate_bytes // size) - 1
        copies = [args] + [make_args() for _ in range(extra)]
        if rotate_bytes is not None and device == "cpu":
            _read_all(copies)
        cycle = itertools.cycle(copies)
        if device == "cuda":
            calls = 20

            def target():
                for _ in range(calls):
                    fn(*next(cycle))
                torch.cuda.synchronize()

            benchmark.pedantic(target, rounds=10, warmup_rounds=2)
        else:
            calls = 1
            benchmark.pedantic(lambda: fn(*next(cycle)), rounds=10, warmup_rounds=2)
        seconds = benchmark.stats.stats.median / calls
        row = {
            "op": op, "shape": shape, "provider": provider, "device": device, "us": seconds * 1e6,
            "tflops": flops / seconds / 1e12, "mbytes": nbytes / 1e6, "gbps": nbytes / seconds / 1e9,
            "copy_fraction": nbytes / seconds / 1e9 / roofline.hardware(device)["peak_gbps"],
            "roofline": roofline.roofline_fraction(seconds, flops, nbytes, device, precision),
            "baseline": baseline,
        }
        benchmark.extra_info.update(row)
        _ROWS.append(row)
        return row

    return run


def _ratios(rows):
    """time(baseline) / time(provider) for rows that name a baseline measured in the same run."""
    times = {(r["op"], r["shape"], r["provider"]): r["us"] for r in rows}
    for r in rows:
        base = times.get((r["op"], r["shape"], r["baseline"])) if r["baseline"] else None
        r["speedup_vs_baseline"] = base / r["us"] if base else None


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    _ratios(_ROWS)
    device = _ROWS[0]["device"]
    hw = roofline.hardware(device)
    meta = {"hardware": hw, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_isa": _native.cpu_isa(),
            # what caps the CPU code torch's own peers run (an "avx2 path" run caps them as well)
            "cpu_caps": {k: os.environ[k] for k in _CPU_CAPS if k in os.environ}}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out_dir = session.config.getoption("--results-dir")
    os.makedirs(out_dir, exist_ok=True)
    # One file per suite, so running bench_mla.py does not overwrite bench_fp8.py's results.
    suites = "+".join(sorted({item.module.__name__.removeprefix("bench_") for item in session.items}))
    # The CPU kernels' ISA level too: a run forced to avx2 must not overwrite the host's native one.
    isa = f"-{meta['cpu_isa']}" if device == "cpu" and meta["cpu_isa"] else ""
    stem = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9]+', '-', hw['name']).strip('-')}{isa}-{meta['date']}-{suites}")
    with open(stem + ".json", "w") as f:
        json.dump({**meta, "results": _ROWS}, f, indent=2)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in _ROWS for k in r)))
        writer.writeheader()
        writer.writerows(_ROWS)
    _print_table(meta, stem)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _print_table(meta, stem):
    hw = meta["hardware"]
    lines = [f"\n{hw['name']}, torch {meta['torch']}, {meta['date']}, {meta['threads']} threads, CPU kernels "
             f"{meta['cpu_isa']}{''.join(f' {k}={v}' for k, v in meta['cpu_caps'].items())}; "
             f"ceilings: {hw['peak_gbps']:.0f} GB/s, {hw['ceilings']}",
             f"{'op':15s} {'shape':28s} {'provider':14s} {'time us':>10s} {'TFLOP/s':>8s} {'MB':>8s} {'GB/s':>8s} "
             f"{'of copy':>8s} {'roofline':>8s} {'vs baseline':>14s}"]
    for r in _ROWS:
        vs = f"{r['speedup_vs_baseline']:.2f}x {r['baseline']}" if r["speedup_vs_baseline"] else "-"
        lines.append(f"{r['op']:15s} {r['shape']:28s} {r['provider']:14s} {r['us']:10.1f} {r['tflops']:8.2f} "
                     f"{r['mbytes']:8.2f} {r['gbps']:8.1f} {r['copy_fraction']:8.1%} {_fmt(r['roofline'], '8.1%')} "
                     f"{vs:>14s}")
    lines.append(f"written to {stem}.json and .csv")
    lines += [summary(_ROWS) for summary in SUMMARIES]
    print("\n".join(lines))
