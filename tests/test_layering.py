"""The kernel package stands alone: nothing in dsv3_kernels imports the model package dsv3 built
on it (the model's demo is python -m dsv3.demo)."""

import ast
import pathlib
import subprocess
import sys

import dsv3_kernels

PACKAGE = pathlib.Path(dsv3_kernels.__file__).parent


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_no_module_of_the_kernel_package_imports_the_model():
    offenders = [f"{path.relative_to(PACKAGE.parent)}: import {name}"
                 for path in sorted(PACKAGE.rglob("*.py")) for name in _imported_modules(path)
                 if name == "dsv3" or name.startswith("dsv3.")]
    assert not offenders, offenders


def test_the_kernel_demo_runs_without_the_model_package():
    code = ("import sys, dsv3_kernels.demo; "
            "print(sorted(m for m in sys.modules if m == 'dsv3' or m.startswith('dsv3.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
