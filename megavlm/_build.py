"""Build the ``megavlm._C`` CUDA extension with nvcc + pybind11.

This is a plain pybind11 module compiled by ``nvcc`` (not a torch C++
extension): it does not link against torch, and tensors cross the boundary as
raw device addresses. The module links the CUDA runtime statically, so it
imports on machines without a GPU or driver; calling an op there raises
``RuntimeError`` with the CUDA error string.

`pip install .`, `pip install -e .` and `make install` build it through setup.py's build_ext, which loads this
file by path (it needs only the standard library and ``pybind11``, not megavlm or torch). By hand::

    python -m megavlm._build                 # writes megavlm/_C<EXT_SUFFIX> (`make kernels`: --auto)
    python -m megavlm._build --archs "90" --out-dir /tmp/x

or from Python::

    build_extension(out_dir, archs=None, verbose=True, jobs=None, extra_sm90_sources=()) -> path

``extra_sm90_sources`` are more CUTLASS units, compiled like the Hopper GEMMs below: benchmarks/sm90_tiles.py
generates its candidate tiles into a scratch folder and builds a tuning ``_C`` there with them.

Environment:
    MEGAVLM_CUDA_ARCHS  arch list, e.g. "80;90" (default) or "90a"; the last
                        arch also embeds PTX for forward compatibility.
    CUDA_HOME / CUDA_PATH  toolkit location (else nvcc on PATH, else
                        /usr/local/cuda).
    MEGAVLM_BUILD_JOBS  parallel nvcc processes (default: CPU count).
    MEGAVLM_SM90_GEMM   auto (default) | 0 | 1: the Hopper GEMMs (SM90_SOURCES: CUTLASS 3, compiled for
                        sm_90a). auto builds them when an arch 90/90a is listed and
                        CUTLASS's headers are found; 1 makes a missing CUTLASS an error; 0 leaves them out.
    CUTLASS_PATH        a CUTLASS checkout (its include/ is used); else the headers of the pip package
                        ``nvidia-cutlass`` (``cutlass_library/source/include``), which scripts/install.sh installs.
    MEGAVLM_BUILD_CACHE a folder of compiled CUDA units (.cu -> .o) reused by later builds. An object's key
                        hashes the nvcc version, its flags, the unit, every header under csrc/ and CUTLASS's
                        version.h, so any change that can reach the unit compiles it afresh. The .cu units
                        include no Python header, so objects built on one machine serve another with the same
                        nvcc (how benchmarks/gpu_check.sh skips minutes of CUTLASS compilation on a GPU machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_ARCHS",
    "SOURCES",
    "VERSION",
    "build_extension",
    "extension_filename",
    "find_nvcc",
    "kernels_wanted",
    "parse_archs",
]

VERSION = "0.1.0"
DEFAULT_ARCHS = "80;90"

# Relative to csrc/. Order is irrelevant; .cu files get the -gencode flags.
SOURCES = (
    "common/checks.cpp",
    "patch_embed/op.cpp",
    "patch_embed/kernel.cu",
    "projector/op.cpp",
    "projector/kernel.cu",
    "bindings.cpp",
)
# The Hopper GEMMs: CUTLASS 3 (TMA + WGMMA) instantiations, compiled only for sm_90a (see MEGAVLM_SM90_GEMM). One
# default per epilogue: the projector's three, and the patch embedding's (its bias + position table).
SM90_SOURCES = (
    "projector/gemm_sm90_bias.cu",
    "projector/gemm_sm90_gelu.cu",
    "projector/gemm_sm90_gelu_aux.cu",
    "patch_embed/gemm_sm90_table.cu",
)

_PKG_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PKG_DIR.parent
CSRC_DIR = _REPO_ROOT / "csrc"


def extension_filename() -> str:
    """``_C`` + this interpreter's extension suffix (e.g. ``_C.cpython-311-x86_64-linux-gnu.so``)."""
    return "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def find_nvcc() -> str | None:
    """Path to nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            cand = Path(root) / "bin" / "nvcc"
            if cand.is_file():
                return str(cand)
    which = shutil.which("nvcc")
    if which:
        return which
    cand = Path("/usr/local/cuda/bin/nvcc")
    return str(cand) if cand.is_file() else None


def parse_archs(archs: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Normalize "80;90", "8.0 9.0", "sm_90a", ["80", "90"] -> ["80", "90"] (order kept, deduplicated)."""
    if archs is None:
        archs = os.environ.get("MEGAVLM_CUDA_ARCHS") or DEFAULT_ARCHS
    if isinstance(archs, str):
        items = re.split(r"[;,\s]+", archs.strip())
    else:
        items = [str(a) for a in archs]
    out: list[str] = []
    for item in items:
        item = item.strip().lower()
        if not item:
            continue
        item = item.removesuffix("+ptx")
        for prefix in ("sm_", "compute_", "sm", "compute"):
            if item.startswith(prefix):
                item = item[len(prefix):]
                break
        item = item.replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", item):
            raise ValueError(f"invalid CUDA arch {item!r} in {archs!r}; expected e.g. '80;90' or '90a'")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"empty CUDA arch list: {archs!r}")
    return out


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for i, a in enumerate(archs):
        code = f"sm_{a}"
        if i == len(archs) - 1:
            code = f"[sm_{a},compute_{a}]"  # PTX of the newest arch for forward compatibility
        flags.append(f"-gencode=arch=compute_{a},code={code}")
    return flags


def find_cutlass_include() -> str | None:
    """CUTLASS's include folder: $CUTLASS_PATH/include, else the pip package nvidia-cutlass's copy; None if absent."""
    root = os.environ.get("CUTLASS_PATH")
    if root:
        cand = Path(root) / "include"
        return str(cand) if (cand / "cutlass" / "cutlass.h").is_file() else None
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / "source" / "include"
        if (cand / "cutlass" / "cutlass.h").is_file():
            return str(cand)
    return None


def _sm90_gemm_include(arch_list: list[str]) -> str | None:
    """CUTLASS include dir when the Hopper GEMMs are to be built, None when they are left out."""
    mode = os.environ.get("MEGAVLM_SM90_GEMM", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MEGAVLM_SM90_GEMM must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or not any(a.startswith("90") for a in arch_list):
        return None
    inc = find_cutlass_include()
    if inc is None and mode == "1":
        raise RuntimeError("MEGAVLM_SM90_GEMM=1 but CUTLASS was not found: pip install --no-deps nvidia-cutlass, "
                           "or set CUTLASS_PATH to a CUTLASS checkout")
    return inc


def _python_includes() -> list[str]:
    paths = sysconfig.get_paths()
    incs = []
    for key in ("include", "platinclude"):
        p = paths.get(key)
        if p and p not in incs:
            incs.append(p)
    return incs


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("building megavlm._C needs pybind11 (pip install pybind11)") from exc
    return pybind11.get_include()


def _cache_context(nvcc: str) -> bytes:
    """What every unit's cache key shares: nvcc's version and every header under csrc/ (units include headers only,
    never other units)."""
    h = hashlib.sha256(subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout.encode())
    for path in sorted(p for p in CSRC_DIR.rglob("*") if p.suffix in (".h", ".cuh", ".hpp")):
        h.update(b"\0" + str(path.relative_to(CSRC_DIR)).encode() + b"\0" + path.read_bytes())
    return h.digest()


def _cache_key(context: bytes, name: str, src: Path, flags: list[str], cutlass_inc: str | None) -> str:
    """Key of one CUDA unit's object: the shared context, the unit (its name and text), its flags (without folders),
    CUTLASS's version."""
    h = hashlib.sha256(context)
    h.update(name.encode() + b"\0" + src.read_bytes())
    for flag in flags:
        if not flag.startswith("-I"):
            h.update(b"\0" + flag.encode())
    if cutlass_inc is not None:
        h.update((Path(cutlass_inc) / "cutlass" / "version.h").read_bytes())
    return h.hexdigest()[:20]


def _compile(cmd: list[str], obj: Path, cached: Path | None, verbose: bool) -> bool:
    """Compile one unit, or copy its object from the cache; True when the cache served it."""
    if cached is not None and cached.is_file():
        shutil.copy2(cached, obj)
        if verbose:
            print(f"[megavlm._build] {Path(cmd[2]).name}: reused {cached}", flush=True)
        return True
    _run(cmd, verbose)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.copy2(obj, staged)
        os.replace(staged, cached)
    return False


def _write_build_info(build_dir: Path, archs: list[str], sm90_gemm: bool) -> None:
    text = (
        "// Generated by megavlm/_build.py\n"
        "#pragma once\n"
        f'#define MEGAVLM_C_VERSION "{VERSION}"\n'
        f'#define MEGAVLM_C_ARCHS "{";".join(archs)}"\n'
        f"#define MEGAVLM_HAS_SM90_GEMM {int(sm90_gemm)}\n"
    )
    (build_dir / "megavlm_build_info.h").write_text(text)


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print("[megavlm._build] " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"megavlm._C build failed (exit {proc.returncode}) running:\n  {' '.join(cmd)}\n{proc.stdout}"
        )
    if verbose and proc.stdout.strip():
        print(proc.stdout, end="", flush=True)


def build_extension(out_dir: str | os.PathLike | None = None, archs=None, verbose: bool = True, jobs: int | None = None,
                    extra_sm90_sources: Sequence[str | os.PathLike] = ()) -> str:
    """Compile csrc/ into ``<out_dir>/_C<EXT_SUFFIX>`` and return its path.

    out_dir: target folder (default: the megavlm package folder, so that
        ``import megavlm._C`` finds it).
    archs: "80;90"-style string or list; default $MEGAVLM_CUDA_ARCHS or "80;90".
    extra_sm90_sources: more CUTLASS units (any folder; they may include csrc/ headers), compiled and linked like
        the Hopper GEMMs; they need CUTLASS and an arch 90.
    Raises RuntimeError if nvcc/pybind11 are missing or compilation fails.
    """
    t0 = time.perf_counter()
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError(
            "megavlm._C build needs nvcc: set CUDA_HOME or put nvcc on PATH (no CUDA toolkit found)"
        )
    arch_list = parse_archs(archs)
    out_dir = Path(out_dir) if out_dir is not None else _PKG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / extension_filename()
    if jobs is None:
        jobs = int(os.environ.get("MEGAVLM_BUILD_JOBS", "0")) or (os.cpu_count() or 1)

    includes = [str(CSRC_DIR), _pybind11_include(), *_python_includes()]
    cutlass_inc = _sm90_gemm_include(arch_list)
    extra = [Path(p).resolve() for p in extra_sm90_sources]
    if extra and cutlass_inc is None:
        raise RuntimeError(f"{len(extra)} extra CUTLASS units need an arch 90 and CUTLASS's headers (archs "
                           f"{';'.join(arch_list)}; see MEGAVLM_SM90_GEMM and CUTLASS_PATH)")
    if verbose and cutlass_inc is None and any(a.startswith("90") for a in arch_list):
        print("[megavlm._build] Hopper GEMMs left out (MEGAVLM_SM90_GEMM=0 or no CUTLASS headers)", flush=True)
    with tempfile.TemporaryDirectory(prefix="megavlm_build_") as tmp:
        build_dir = Path(tmp)
        _write_build_info(build_dir, arch_list, cutlass_inc is not None)
        common = [
            "-O3",
            "-std=c++17",
            "-DNDEBUG",
            "-Xcompiler",
            "-fPIC",
            "-Xcompiler",
            "-fvisibility=hidden",
            f"-I{build_dir}",
            *[f"-I{p}" for p in includes],
        ]
        cu_flags = ["--expt-relaxed-constexpr", "-lineinfo", *_gencode_flags(arch_list)]
        cache_dir = os.environ.get("MEGAVLM_BUILD_CACHE", "").strip()
        cache_context = _cache_context(nvcc) if cache_dir else b""
        commands = []
        objects = []
        sm90_flags = [f"-I{cutlass_inc}", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"]
        # (name, path, CUTLASS unit): csrc/'s units by their path under csrc/, the extra ones by their file name
        sources = [(rel, CSRC_DIR / rel, False) for rel in SOURCES]
        if cutlass_inc:
            sources += [(rel, CSRC_DIR / rel, True) for rel in SM90_SOURCES]
            sources += [(f"extra/{src.name}", src, True) for src in extra]
        # The heavy CUTLASS units first, so that the light ones fill the other jobs while they compile.
        sources.sort(key=lambda item: not item[2])
        for i, (name, src, sm90) in enumerate(sources):
            if not src.is_file():
                raise RuntimeError(f"megavlm._C source missing: {src}")
            obj = build_dir / f"{i:02d}_{src.stem}.o"
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *common]
            if sm90:
                cmd += sm90_flags
            elif src.suffix == ".cu":
                cmd += cu_flags
            cached = None
            if cache_dir and src.suffix == ".cu":
                key = _cache_key(cache_context, name, src, cmd[5:], cutlass_inc if sm90 else None)
                cached = Path(cache_dir) / f"{src.stem}-{key}.o"
            commands.append((cmd, obj, cached))
            objects.append(str(obj))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            reused = sum(f.result() for f in [pool.submit(_compile, *c, verbose) for c in commands])
        if verbose and cache_dir:
            print(f"[megavlm._build] {reused} of {len(commands)} units from the cache {cache_dir}", flush=True)
        tmp_target = build_dir / target.name
        link = [nvcc, "--shared", "-o", str(tmp_target), *objects, "-cudart", "static", "-Xcompiler", "-fPIC"]
        _run(link, verbose)
        # Atomic replace: never leave a half-written module behind.
        staged = out_dir / (target.name + f".tmp{os.getpid()}")
        shutil.copy2(tmp_target, staged)
        os.replace(staged, target)
    if verbose:
        print(
            f"[megavlm._build] wrote {target} (archs {';'.join(arch_list)}) in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    return str(target)


def kernels_wanted() -> bool:
    """Whether an install builds megavlm._C (`pip install .`, `make install`, `python -m megavlm._build --auto`):
    MEGAVLM_BUILD_KERNELS=0 never, =1 always (RuntimeError when nvcc is missing), unset when nvcc is found. Says why
    when it does not build."""
    force = os.environ.get("MEGAVLM_BUILD_KERNELS", "").strip()
    if force == "0":
        print("[megavlm._build] MEGAVLM_BUILD_KERNELS=0: not building megavlm._C (reference ops only)")
        return False
    if find_nvcc() is None:
        if force == "1":
            raise RuntimeError("MEGAVLM_BUILD_KERNELS=1 but nvcc was not found (set CUDA_HOME or PATH)")
        print("[megavlm._build] nvcc not found: megavlm._C not built; the reference ops will be used")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megavlm._build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="target folder (default: the megavlm package folder)")
    parser.add_argument("--archs", default=None, help='CUDA archs, e.g. "80;90" (default $MEGAVLM_CUDA_ARCHS or 80;90)')
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--auto", action="store_true",
                        help="what `make kernels` runs (and `pip install .` decides alike): build when nvcc is found "
                             "(MEGAVLM_BUILD_KERNELS=0 skips, =1 makes a missing nvcc an error); without nvcc, say so "
                             "and succeed")
    args = parser.parse_args(argv)
    try:
        if args.auto and not kernels_wanted():
            return 0
        path = build_extension(args.out_dir, archs=args.archs, verbose=not args.quiet, jobs=args.jobs)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
