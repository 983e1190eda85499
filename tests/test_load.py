"""`import fastadv` never fails because the compiled library is missing or was built for another torch."""

import subprocess
import sys
import textwrap

import pytest

import fastadv.ops as ops


def run(code: str, **env):
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)


CHECK_REFERENCE_RUNS = """
    import torch, fastadv
    from fastadv import ops
    x = torch.rand(2, 3, 4, 4)
    d = ops.pgd_step(torch.zeros_like(x), torch.randn_like(x), x, eps=0.1, alpha=0.2)
    assert d.abs().max() <= 0.1 + 1e-7
    assert not ops.has_native("cpu")
    print("OK")
"""


def test_disabled_native_falls_back_with_one_warning():
    r = run(CHECK_REFERENCE_RUNS, FASTADV_DISABLE_NATIVE="1", PYTHONWARNINGS="always")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert r.stderr.count("compiled kernels unavailable") == 1
    assert "FASTADV_DISABLE_NATIVE" in r.stderr


def test_library_built_for_another_torch_is_not_loaded():
    code = textwrap.dedent("""
        import sys, types
        fake = types.ModuleType("fastadv._build_info")
        fake.torch_version = "1.0.0"
        sys.modules["fastadv._build_info"] = fake
    """) + textwrap.dedent(CHECK_REFERENCE_RUNS)
    r = run(code, PYTHONWARNINGS="always")
    assert r.returncode == 0, r.stderr
    assert "built for torch 1.0.0" in r.stderr and r.stderr.count("compiled kernels unavailable") == 1


@pytest.mark.skipif(not ops.has_native("cpu"), reason="compiled kernels are not loaded")
def test_native_import_is_silent():
    r = run("import fastadv; print(fastadv.ops.has_native('cpu'))", PYTHONWARNINGS="always")
    assert r.returncode == 0 and r.stdout.strip() == "True"
    assert "unavailable" not in r.stderr


def test_info_reports_build_and_devices():
    r = run("import runpy; runpy.run_module('fastadv.info', run_name='__main__')")
    assert r.returncode == 0, r.stderr
    for key in ("torch", "compiled_cuda", "compiled_cuda_archs", "native_devices", "native_loaded"):
        assert key in r.stdout
