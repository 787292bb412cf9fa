"""Build script: compiles the `hypenet._C` CUDA extension when it can, else installs pure Python.

The extension is built when torch with CUDA support is importable at build time and nvcc is found
(or when HYPENET_FORCE_CUDA_BUILD=1, which turns "cannot build" into an error). Otherwise the
install is pure Python and the ops run on their Triton / reference backends. Either way
`hypenet/_build_info.json` records what was built, for `hypenet.ops.cuda_ext` to read:
    {"cuda_ops": [op names], "archs": ["90a", ...], "torch": "2.11.0+cu130" | null,
     "cuda": "13.0" | null, "skipped_reason": null | "why no extension was built"}

Environment knobs:
    HYPENET_SKIP_CUDA_BUILD=1   pure-Python install even where CUDA is present (fast CI / dev installs)
    HYPENET_FORCE_CUDA_BUILD=1  build or fail loudly, never fall back silently (release / GPU builds)
    HYPENET_CUDA_ARCHS="90a"    ';' or ',' separated SM targets; 90a enables Hopper-only instructions
    MAX_JOBS=N                  parallel nvcc jobs (read by torch's ninja build; default: all cores),
                                lower it where each job's GBs of host memory do not fit
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO_RELPATH = Path("hypenet") / "_build_info.json"

# Each CUDA op registered by csrc/binding.cpp and the glob of the kernel sources it needs.
CUDA_OPS = {
    "lightning_attn_step": "csrc/lightning/lightning_attn_step_*.cu",
    "lightning_chunk_scan": "csrc/lightning/lightning_chunk_scan_*.cu",
    "lightning_chunk_scan_packed": "csrc/lightning/lightning_chunk_scan_*.cu",  # the same kernel, packed walk
}
BINDING_SOURCE = "csrc/binding.cpp"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _cuda_archs() -> list[str]:
    raw = os.environ.get("HYPENET_CUDA_ARCHS", "90a")
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise ValueError(f"HYPENET_CUDA_ARCHS must list SM targets like '90a' or '80;90a', got {raw!r}")
    return archs


def _why_no_cuda_build() -> str | None:
    """Returns why the extension cannot be built here, or None when it can."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        return f"torch is not importable at build time ({exc}); build isolation hides it, use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    nvcc = Path(CUDA_HOME) / "bin" / "nvcc" if CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        return f"nvcc not found (CUDA_HOME={CUDA_HOME})"
    return None


def _cutlass_include() -> list[str]:
    """CUTLASS / CuTe headers from the nvidia-cutlass package, when it is installed."""
    try:
        import cutlass_library
    except ImportError:
        print("hypenet setup: nvidia-cutlass not installed; building without CUTLASS/CuTe headers")
        return []
    include = Path(cutlass_library.__file__).resolve().parent / "source" / "include"
    return [str(include)] if include.is_dir() else []


def _write_build_info(info: dict, *roots: Path) -> None:
    for root in roots:
        path = root / BUILD_INFO_RELPATH
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")


def _pure_python_setup(reason: str) -> None:
    print(f"hypenet setup: pure-Python install ({reason})")
    _write_build_info({"cuda_ops": [], "archs": [], "torch": None, "cuda": None, "skipped_reason": reason}, ROOT)
    setup()


def _cuda_setup() -> None:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = _cuda_archs()
    kernel_sources = {op: sorted(glob.glob(str(ROOT / pattern))) for op, pattern in CUDA_OPS.items()}
    missing = [op for op, files in kernel_sources.items() if not files]
    if missing:
        raise FileNotFoundError(f"no kernel sources for CUDA ops {missing}")
    sources = [str(ROOT / BINDING_SOURCE)] + sorted({f for files in kernel_sources.values() for f in files})
    build_info = {
        "cuda_ops": sorted(kernel_sources),
        "archs": archs,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "skipped_reason": None,
    }

    nvcc_flags = [
        "-O3",
        # Hopper-only instructions (wgmma, setmaxnreg) need the arch-specific 'a' targets; the
        # -gencode form also stops torch from adding its own arch list.
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs],
        # CuTe marks constexpr helpers __host__ only; device code calls them.
        "--expt-relaxed-constexpr",
        # Source lines in SASS for compute-sanitizer and ncu; no effect on the generated code.
        "-lineinfo",
        # Every register spill shows in the build log (spills are local-memory traffic).
        "-Xptxas=-warn-spills",
    ]

    class BuildExtensionWithInfo(BuildExtension):
        """Records what was built, beside the sources (editable installs) and in the wheel."""

        def run(self) -> None:
            super().run()
            _write_build_info(build_info, ROOT, Path(self.build_lib))

    extension = CUDAExtension(
        name="hypenet._C",
        sources=[os.path.relpath(s, ROOT) for s in sources],
        include_dirs=[str(ROOT / "csrc"), *_cutlass_include()],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    print(f"hypenet setup: building hypenet._C for sm_{', sm_'.join(archs)} with ops {build_info['cuda_ops']}")
    setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True)})


def main() -> None:
    if _env_flag("HYPENET_SKIP_CUDA_BUILD"):
        _pure_python_setup("HYPENET_SKIP_CUDA_BUILD is set")
        return
    reason = _why_no_cuda_build()
    if reason is not None:
        if _env_flag("HYPENET_FORCE_CUDA_BUILD"):
            raise RuntimeError(f"HYPENET_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built: {reason}")
        _pure_python_setup(reason)
        return
    _cuda_setup()


main()
