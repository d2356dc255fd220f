"""megavlm._C builds with nvcc, imports without a GPU, exposes every op, and
fails cleanly (RuntimeError / ValueError, never a crash) when no GPU is there.

The build goes into a temporary folder (one arch and no CUTLASS units, to keep it quick; set
MEGAVLM_TEST_CUDA_ARCHS to change) and every import happens in a subprocess. The Hopper GEMMs
(CUTLASS) are checked on the module `make install` built (test_installed_extension_has_the_hopper_gemms).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megavlm import _build

REPO = Path(__file__).resolve().parents[2]
OPS = ["patchify", "add_pos_bias", "merge_layernorm", "bias_gelu", "bias_gelu_backward", "scatter_rows"]


def test_parse_archs():
    assert _build.parse_archs("80;90") == ["80", "90"]
    assert _build.parse_archs("sm_90a, 8.0") == ["90a", "80"]
    assert _build.parse_archs(["90", "90"]) == ["90"]
    with pytest.raises(ValueError):
        _build.parse_archs("ninety")
    flags = _build._gencode_flags(["80", "90"])
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=[sm_90,compute_90]"]


def test_build_module_is_standalone():
    """setup.py loads _build.py by path: it must not import torch or megavlm."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("megavlm_build", {str(REPO / 'megavlm' / '_build.py')!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        assert "torch" not in sys.modules and "megavlm" not in sys.modules, sorted(sys.modules)
        assert callable(mod.build_extension) and mod.extension_filename().startswith("_C")
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_kernels_wanted_follows_megavlm_build_kernels(monkeypatch, capsys):
    """What `pip install .` (setup.py) and `python -m megavlm._build --auto` decide: =0 never builds, =1 needs nvcc
    (an error without it), unset builds when nvcc is found and says why it does not otherwise."""
    for nvcc, force, expected in [("/x/nvcc", "", True), (None, "", False), ("/x/nvcc", "0", False), (None, "0", False),
                                  ("/x/nvcc", "1", True)]:
        monkeypatch.setattr(_build, "find_nvcc", lambda nvcc=nvcc: nvcc)
        monkeypatch.setenv("MEGAVLM_BUILD_KERNELS", force)
        assert _build.kernels_wanted() is expected, (nvcc, force)
        if not expected:
            assert "reference ops" in capsys.readouterr().out  # says why, and what runs instead
    monkeypatch.setattr(_build, "find_nvcc", lambda: None)
    monkeypatch.setenv("MEGAVLM_BUILD_KERNELS", "1")
    with pytest.raises(RuntimeError, match="MEGAVLM_BUILD_KERNELS=1 but nvcc was not found"):
        _build.kernels_wanted()
    assert _build.main(["--auto"]) == 1


@pytest.fixture(scope="session")
def built_extension(tmp_path_factory):
    if _build.find_nvcc() is None:
        pytest.skip("nvcc not found; cannot build megavlm._C")
    pytest.importorskip("pybind11")
    out = tmp_path_factory.mktemp("megavlm_C")
    archs = os.environ.get("MEGAVLM_TEST_CUDA_ARCHS", "90")
    saved = os.environ.get("MEGAVLM_SM90_GEMM")
    os.environ["MEGAVLM_SM90_GEMM"] = "0"  # the three CUTLASS units take minutes on 2 cores; make install builds them
    try:
        path = _build.build_extension(out, archs=archs, verbose=False)
    finally:
        if saved is None:
            os.environ.pop("MEGAVLM_SM90_GEMM")
        else:
            os.environ["MEGAVLM_SM90_GEMM"] = saved
    assert Path(path).is_file() and Path(path).name == _build.extension_filename()
    return path


def _run_py(code: str, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=str(REPO))


def test_extension_imports_and_fails_cleanly_without_gpu(built_extension):
    code = f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("megavlm._C", {built_extension!r})
        C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)
        print("version", C.__version__, C.compiled_archs)
        for name in {OPS!r} + ["cuda_available", "device_count", "cuda_status", "set_debug_sync"]:
            assert callable(getattr(C, name)), name
        assert isinstance(C.__version__, str) and C.__version__
        # argument checks run before any CUDA call -> ValueError
        def expect(exc, fn, *args, match=""):
            try:
                fn(*args)
            except exc as e:
                assert match in str(e), (match, str(e))
                return
            raise AssertionError(f"{{fn.__name__}} did not raise {{exc.__name__}}")
        expect(ValueError, C.patchify, 0, 0, 1, 256, 2, 28, 27, 3, 14, 1, 592, [1.0] * 3, [0.0] * 3, "bfloat16",
               match="divisible")
        expect(ValueError, C.patchify, 0, 0, 1, 256, 2, 28, 28, 3, 14, 1, 590, [1.0] * 3, [0.0] * 3, "bfloat16",
               match="k_pad")
        expect(ValueError, C.bias_gelu, 0, 0, 256, 0, 512, 4, 8, "float64", match="dtype")
        expect(ValueError, C.scatter_rows, 0, 0, 0, 10, 256, 4, 512, 64, match="null")
        expect(ValueError, C.merge_layernorm, 0, 0, 256, 512, 2, 12, 8, True, 4, 0, 0, 1e-5, "bfloat16",
               match="even grid")
        expect(ValueError, C.add_pos_bias, 0, 0, 256, 10, 3, 8, 0, 0, 0, 0, 1, "float32", match="multiple of tokens")
        if C.cuda_available():
            print("GPU present: skipping the no-GPU checks")
        else:
            assert C.device_count() == 0
            status = C.cuda_status()
            assert status != "ok"
            # valid-looking arguments (fake, never dereferenced): RuntimeError with the CUDA error text
            calls = [
                (C.patchify, (0, 0, 256, 512, 2, 28, 28, 3, 14, 1, 592, [1.0] * 3, [0.0] * 3, "bfloat16")),
                (C.add_pos_bias, (0, 0, 512, 10, 5, 8, 1024, 5, 0, 0, 0, "bfloat16")),
                (C.merge_layernorm, (0, 0, 256, 512, 2, 16, 8, True, 4, 1024, 0, 1e-5, "bfloat16")),
                (C.bias_gelu, (0, 0, 256, 0, 512, 4, 8, "bfloat16")),
                (C.bias_gelu_backward, (0, 0, 256, 512, 0, 768, 4, 8, "bfloat16")),
                (C.scatter_rows, (0, 0, 256, 10, 512, 4, 768, 64)),
            ]
            for fn, args in calls:
                try:
                    fn(*args)
                except RuntimeError as e:
                    assert "CUDA" in str(e), str(e)
                else:
                    raise AssertionError(f"{{fn.__name__}} did not raise RuntimeError without a GPU")
            print("no-GPU status:", status)
        print("OK")
    """
    res = _run_py(code)
    assert res.returncode == 0, f"subprocess failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert "OK" in res.stdout


def test_installed_extension_has_the_hopper_gemms():
    """`make install` builds megavlm._C for 80;90 with CUTLASS's headers (scripts/install.sh installs the pip package
    nvidia-cutlass), so the Hopper projector GEMMs are in it; without a GPU they fail cleanly."""
    path = REPO / "megavlm" / _build.extension_filename()
    if not path.is_file():
        pytest.skip("megavlm._C was not built by make install here (no nvcc)")
    code = f"""
        import importlib.util
        from megavlm import _build
        spec = importlib.util.spec_from_file_location("megavlm._C", {str(path)!r})
        C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)
        archs = C.compiled_archs.split(";")
        expected = any(a.startswith("90") for a in archs) and _build.find_cutlass_include() is not None
        assert C.linear_sm90_compiled() == expected, (archs, _build.find_cutlass_include())
        print("sm90 gemms", C.linear_sm90_compiled())
        assert C.linear_sm90_workspace(4, 576, 4096, 4096, 4096, 2048 * 4096, False, False, False) >= 0
        try:  # k = 12: not a multiple of 8 -> ValueError before any CUDA call
            C.linear_sm90(0, 0, 256, 256, 0, 256, 0, 0, 0, 0, 1, 16, 12, 16, 16, 256, True)
        except ValueError as e:
            assert "multiples of 8" in str(e), str(e)
        else:
            raise AssertionError("linear_sm90 accepted k = 12")
        names = C.linear_sm90_gemms()
        if expected:  # the default of each epilogue is built, and an unknown one is refused with the list
            assert {{n.split("/")[0] for n in names}} >= {{"bias", "gelu", "gelu_aux", "table"}}, names
            # each epilogue has its default (the shape alone decides the workspace; the pick happens first)
            for gelu, aux, table in [(False, False, False), (True, False, False), (True, True, False),
                                     (False, False, True)]:
                assert C.linear_sm90_workspace(1, 576, 1024, 4096, 4096, 576 * 4096, gelu, aux, table) >= 0
            try:
                C.linear_sm90(0, 0, 256, 256, 0, 256, 0, 0, 0, 0, 1, 16, 16, 16, 16, 256, True, "pp8x8x8_c1x1")
            except ValueError as e:
                assert "no gelu/pp8x8x8_c1x1 GEMM" in str(e) and names[0] in str(e), str(e)
            else:
                raise AssertionError("linear_sm90 accepted unknown tiles")
        else:
            assert names == [], names
        if not C.cuda_available():
            try:
                C.linear_sm90(0, 0, 256, 256, 0, 256, 0, 0, 0, 0, 1, 16, 16, 16, 16, 256, True)
            except (RuntimeError, ValueError) as e:
                # RuntimeError (no device) when built with them; ValueError (not built) otherwise
                assert ("CUDA" in str(e)) if expected else ("without the Hopper GEMMs" in str(e)), str(e)
            else:
                raise AssertionError("linear_sm90 ran without a GPU")
        print("OK")
    """
    res = _run_py(code)
    assert res.returncode == 0, f"subprocess failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert "OK" in res.stdout


def test_dispatch_with_built_extension(built_extension):
    """megavlm.ops finds the extension via MEGAVLM_EXT_PATH; without CUDA 'fused' still raises clearly."""
    code = """
        import torch
        from megavlm.ops import _ext, dispatch
        C = _ext.load()
        assert C is not None, _ext.error()
        for name in %r:
            assert hasattr(C, name), name
        if not torch.cuda.is_available():
            try:
                dispatch.resolve_kernels("fused")
            except RuntimeError as e:
                assert "cuda" in str(e).lower(), str(e)
            else:
                raise AssertionError("fused must raise without CUDA")
            assert dispatch.resolve_kernels("auto") == "reference"
        print("OK")
    """ % (OPS,)
    res = _run_py(code, {"MEGAVLM_EXT_PATH": built_extension})
    assert res.returncode == 0, f"subprocess failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert "OK" in res.stdout


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    """build_extension on a copy of csrc/ with a fake nvcc 13.0 that "compiles" a unit by writing its name and flags
    into the object; returns (csrc, nvcc, commands) where commands lists each compile command of the last build."""
    import shutil

    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    monkeypatch.setattr(_build, "CSRC_DIR", csrc)
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("MEGAVLM_BUILD_CACHE", str(tmp_path / "cache"))
    commands: list[list[str]] = []

    def fake_run(cmd, verbose):  # "compiles" by writing the unit's name and flags into the -o file
        out = Path(cmd[cmd.index("-o") + 1])
        out.write_text(" ".join(c for c in cmd if not c.startswith(("-I", "/"))))
        if "-c" in cmd:
            commands.append(cmd)

    monkeypatch.setattr(_build, "_run", fake_run)
    return csrc, nvcc, commands


def test_build_cache_reuses_cuda_objects_until_anything_changes(tmp_path, monkeypatch, fake_nvcc):
    """MEGAVLM_BUILD_CACHE: the .cu objects of a second build come from the cache (its temporary folders differ, so
    -I paths are not part of the key); a changed header, another arch or another nvcc compile afresh; .cpp units
    (they include Python's headers) are always compiled."""
    csrc, nvcc, commands = fake_nvcc
    monkeypatch.setenv("MEGAVLM_SM90_GEMM", "0")

    def build(archs="90"):
        commands.clear()
        _build.build_extension(tmp_path / "out", archs=archs, verbose=False, jobs=2)
        return sorted(Path(cmd[2]).name for cmd in commands)

    cpp = sorted(Path(s).name for s in _build.SOURCES if s.endswith(".cpp"))
    cu = sorted(Path(s).name for s in _build.SOURCES if s.endswith(".cu"))
    assert build() == sorted(cpp + cu)
    assert len(list((tmp_path / "cache").glob("*.o"))) == len(cu)
    assert build() == cpp  # every .cu object reused
    assert build("80;90") == sorted(cpp + cu)  # other gencode flags
    assert build() == cpp
    with open(csrc / "common" / "device_utils.cuh", "a") as f:
        f.write("\n// changed\n")
    assert build() == sorted(cpp + cu)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.1, V13.1.1'\n")
    assert build() == sorted(cpp + cu)
    assert build() == cpp


def test_extra_sm90_sources_build_like_the_hopper_gemms(tmp_path, monkeypatch, fake_nvcc):
    """build_extension(extra_sm90_sources=...) (benchmarks/sm90_tiles.py --build): units from any folder compile with
    the Hopper GEMMs' CUTLASS flags (sm_90a) next to the package's four, their objects are cached by their text, and
    without CUTLASS they are an error rather than left out."""
    _, _, commands = fake_nvcc
    cutlass = tmp_path / "cutlass"
    (cutlass / "include" / "cutlass").mkdir(parents=True)
    (cutlass / "include" / "cutlass" / "cutlass.h").write_text("// fake\n")
    (cutlass / "include" / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4\n")
    monkeypatch.setenv("CUTLASS_PATH", str(cutlass))
    monkeypatch.setenv("MEGAVLM_SM90_GEMM", "1")
    unit = tmp_path / "scratch" / "gelu_pp64x64x64_c1x1.cu"
    unit.parent.mkdir()
    unit.write_text('#include "projector/gemm_sm90.cuh"\n')

    def build():
        commands.clear()
        _build.build_extension(tmp_path / "out", archs="80;90", verbose=False, jobs=2, extra_sm90_sources=[unit])
        return {Path(cmd[2]).name: cmd for cmd in commands}

    compiled = build()
    sm90 = {Path(rel).name for rel in _build.SM90_SOURCES} | {unit.name}
    assert sm90 <= set(compiled), sorted(compiled)
    for name in sm90:
        cmd = compiled[name]
        assert "-gencode=arch=compute_90a,code=sm_90a" in cmd and f"-I{cutlass / 'include'}" in cmd, cmd
        assert not any(flag.startswith("-gencode=arch=compute_80") for flag in cmd), cmd
    assert unit.name not in build()  # cached
    unit.write_text('#include "projector/gemm_sm90.cuh"\n// another candidate\n')
    assert unit.name in build()  # a changed unit compiles afresh
    monkeypatch.setenv("MEGAVLM_SM90_GEMM", "0")
    with pytest.raises(RuntimeError, match="extra CUTLASS units"):
        build()


def test_gelu_poly_is_as_exact_as_torch_float32_gelu(built_extension):
    """csrc/common/gelu.h's gelu_poly (the GELU of the '_pgelu' Hopper GEMM candidates), built for the host by the
    same header: against float64 GELU it is at least as accurate as torch's float32 GELU (absolute and relative
    error), NaN propagates, infinities stay sane, and bad buffers raise ValueError."""
    code = f"""
        import importlib.util
        import numpy as np, torch
        import torch.nn.functional as F
        spec = importlib.util.spec_from_file_location("megavlm._C", {built_extension!r})
        C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)
        g = torch.Generator().manual_seed(0)
        x = torch.cat([torch.linspace(-9, 9, 400001), torch.randn(200000, generator=g) * 3,
                       torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.99, 6.0, 6.01, -6.0, 30.0, -30.0, 3e38, -3e38])])
        y = x.numpy().copy()
        C.gelu_poly_cpu(y)
        ref = F.gelu(x.double())
        def errors(v):
            err = (torch.as_tensor(v).double() - ref).abs()
            big = ref.abs() > 1e-3
            return err.max().item(), (err[big] / ref[big].abs()).max().item()
        (abs_ours, rel_ours), (abs_torch, rel_torch) = errors(y), errors(F.gelu(x))
        print(f"gelu_poly: max abs {{abs_ours:.3e}}, max rel {{rel_ours:.3e}}; torch float32: {{abs_torch:.3e}}, "
              f"{{rel_torch:.3e}}")
        assert abs_ours <= abs_torch, (abs_ours, abs_torch)
        assert rel_ours <= min(rel_torch, 1e-5), (rel_ours, rel_torch)
        # 2-D works in place (contiguous); special values
        m = np.array([[np.nan, np.inf], [-np.inf, 0.0]], dtype=np.float32)
        C.gelu_poly_cpu(m)
        assert np.isnan(m[0, 0]) and m[0, 1] == np.inf and -1e-8 < m[1, 0] <= 0 and m[1, 1] == 0, m
        for bad, match in [(np.zeros(4, dtype=np.float64), "float32"),
                           (np.zeros((4, 4), dtype=np.float32)[:, ::2], "contiguous")]:
            try:
                C.gelu_poly_cpu(bad)
            except ValueError as e:
                assert match in str(e), str(e)
            else:
                raise AssertionError(f"gelu_poly_cpu accepted {{bad.dtype}} {{bad.strides}}")
        print("OK")
    """
    res = _run_py(code)
    assert res.returncode == 0, f"subprocess failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert "OK" in res.stdout
