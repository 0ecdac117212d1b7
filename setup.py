"""Builds dsv3_kernels._C.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA
build, nvcc is found and DSV3_KERNELS_BUILD_CUDA is not "0"; no GPU is needed at build time.

Environment:
  DSV3_KERNELS_BUILD_CUDA   "0" forces a CPU-only build, "1" makes a missing CUDA toolchain an error
  DSV3_KERNELS_CUDA_ARCHS   TORCH_CUDA_ARCH_LIST for the CUDA kernels (default "9.0a")
  DSV3_KERNELS_CUTLASS_DIR  a CUTLASS checkout/copy (default: the `nvidia-cutlass` wheel's headers)
  MAX_JOBS                  parallel compile jobs (default: what fits in memory, ~6 GB per nvcc)
  DSV3_KERNELS_NO_EXT       "1" installs the packages without building _C (scripts/install.sh builds it
                            in place first, incrementally)
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[dsv3_kernels build] {msg}", file=sys.stderr, flush=True)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _site_dir(package, *subdirs):
    """Folder of an installed (possibly namespace) package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = os.path.join(base, *subdirs)
        if os.path.isdir(path):
            return path
    return None


def _cutlass_include_dirs():
    root = os.environ.get("DSV3_KERNELS_CUTLASS_DIR") or _site_dir("cutlass_library", "source")
    if root is None:
        return None
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    return dirs if os.path.isfile(os.path.join(dirs[0], "cutlass", "cutlass.h")) else None


def _want_cuda(torch):
    flag = os.environ.get("DSV3_KERNELS_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False, "DSV3_KERNELS_BUILD_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        if not os.environ.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
            # The nvcc on PATH may be a wrapper that cpp_extension cannot resolve a toolkit from.
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None and os.environ.get("CUDA_HOME"):
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        home = cpp_extension.CUDA_HOME
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            if _cutlass_include_dirs() is not None:
                return True, f"nvcc in {home}"
            reason = ("CUTLASS headers not found: pip install --no-deps nvidia-cutlass==4.2.0.0 "
                      "or set DSV3_KERNELS_CUTLASS_DIR")
        else:
            reason = "nvcc not found (set CUDA_HOME)"
    if flag in ("1", "true", "yes", "on"):
        raise RuntimeError(f"DSV3_KERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


def _default_max_jobs():
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 16
    # The CUTLASS FP8 GEMM file peaks at ~7 GB in one nvcc process.
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 8))))


def _extensions():
    if os.environ.get("DSV3_KERNELS_NO_EXT") == "1":  # scripts/install.sh: _C was built in place already
        return []
    import torch
    from torch.utils import cpp_extension

    build_cuda, why = _want_cuda(torch)
    cpu_sources = [s for s in _sources("csrc/**/*.cpp") if not s.endswith("_cuda.cpp")]
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-DDSV3_KERNELS_CPU_ONLY" if not build_cuda else "-DDSV3_KERNELS_WITH_CUDA"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())

    if not build_cuda:
        _log(f"building the C++ CPU kernels only ({why})")
        return [cpp_extension.CppExtension(
            "dsv3_kernels._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])]

    archs = os.environ.get("DSV3_KERNELS_CUDA_ARCHS") or "9.0a"
    # cpp_extension reads the arch list from here; no nvcc flag may contain "arch" or it is ignored.
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cuda_sources = _sources("csrc/**/*_cuda.cpp") + _sources("csrc/**/*.cu")
    include_dirs += _cutlass_include_dirs()
    cu13 = _site_dir("nvidia", "cu13", "include")  # ATen/cuda headers want the wheel's CUDA headers
    if cu13:
        include_dirs.append(cu13)
    nvcc_flags = [
        # No -g0 here: nvcc rejects it, and it adds no debug info unless given -g/-G.
        "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1", "-Xptxas=-warn-spills",
    ]
    _log(f"building the C++ CPU kernels and the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} ({why}), "
         f"MAX_JOBS={os.environ['MAX_JOBS']}")
    return [cpp_extension.CUDAExtension(
        "dsv3_kernels._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=True)


setup(
    name="dsv3-kernels",
    version="0.1.0",
    description="Fast, verified kernels for DeepSeek-V3 inference: FP8 block-scaled GEMM, MLA decode, MoE",
    packages=find_packages(include=["dsv3_kernels", "dsv3_kernels.*", "dsv3", "dsv3.*"]),
    package_data={"dsv3_kernels": ["verified.json"], "dsv3": ["default_model/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors", "tokenizers", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy", "transformers>=5"]},
    entry_points={"console_scripts": ["dsv3-generate = dsv3.generate:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    zip_safe=False,
)
