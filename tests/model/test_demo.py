"""python -m dsv3.demo: a random model decodes on every native backend close to the reference."""

import re
import subprocess
import sys

import dsv3_kernels as dk


def test_model_demo_prints_every_backend_close_to_the_reference():
    out = subprocess.run([sys.executable, "-m", "dsv3.demo", "--device", "cpu", "--steps", "3"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = {m[0]: (float(m[1]), int(m[2])) for m in re.findall(r"^\s*(\w+ \w+)\s+[\d.]+\s+([\d.e+-]+)\s+(\d+)/3$", out, re.M)}
    native = [b for b in dk.available_backends("fused_moe", "cpu") if b not in ("torch", "triton")]
    assert native, out
    for backend in native:
        for dtype, bound in (("float32", 1e-6), ("bfloat16", 5e-3), ("fp8", 5e-2)):
            diff, same = rows[f"{backend} {dtype}"]
            assert diff < bound and same >= 2, (backend, dtype, out)


def test_model_demo_rejects_a_bad_step_count():
    run = subprocess.run([sys.executable, "-m", "dsv3.demo", "--steps", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and "--steps must be >= 1" in run.stderr
