"""Which (op, backend, architecture) triples passed the GPU test suite on real hardware.

The automatic backend choice uses a CUDA kernel only on an architecture listed here, so a
kernel that compiles but was never run on a GPU is used only when asked for by name.
The table (verified.json beside this file) is written only from an actual GPU test run:

    pytest tests --record-verified results.json      # on the GPU machine (gpu_check.sh does this)
    python -m dsv3_kernels.verified record results.json
"""

import functools
import json
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verified.json")


@functools.lru_cache(maxsize=None)
def _table():
    with open(_PATH) as f:
        entries = json.load(f)["entries"]
    return {(e["op"], e["backend"], e["arch"]): e for e in entries}


def entries():
    """The verified entries: dicts with op, backend, arch, hardware, date, torch, tests."""
    return list(_table().values())


def is_verified(op: str, backend: str, arch: str) -> bool:
    return (op, backend, arch) in _table()


def record(results_path: str, path: str = _PATH):
    """Merge a GPU run's per-(op, backend, arch) results into verified.json.

    A triple is added only if the run completed and every one of its tests that ran passed; a
    triple with a failure is removed.
    """
    with open(results_path) as f:
        run = json.load(f)
    if not run.get("complete"):
        raise ValueError(f"{results_path} is from an interrupted test run; nothing recorded")
    with open(path) as f:
        doc = json.load(f)
    table = {(e["op"], e["backend"], e["arch"]): e for e in doc["entries"]}
    for r in run["results"]:
        key = (r["op"], r["backend"], r["arch"])
        if r["failed"] == 0 and r["passed"] > 0:
            table[key] = {"op": r["op"], "backend": r["backend"], "arch": r["arch"],
                          "hardware": run["hardware"], "date": run["date"], "torch": run["torch"],
                          "tests": r["passed"]}
        else:
            table.pop(key, None)
    doc["entries"] = sorted(table.values(), key=lambda e: (e["op"], e["backend"], e["arch"]))
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    _table.cache_clear()
    from . import dispatch  # imports this module: not at the top

    dispatch.clear_cache()
    return doc["entries"]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "record":
        sys.exit("usage: python -m dsv3_kernels.verified record RESULTS.json")
    for e in record(sys.argv[2]):
        print(f"{e['op']:16s} {e['backend']:7s} {e['arch']:7s} {e['hardware']} {e['date']}")
