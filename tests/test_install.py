"""Installation and metadata: the single version, the torch-version check at import, the reasons
of available_backends(), and the skip reason of the tests that need the published checkpoints."""
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import medconv_ext
from medconv_ext import _ext, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _info(**kw):
    return types.SimpleNamespace(**kw)


def test_version_single_source():
    with open(os.path.join(ROOT, "medconv_ext", "_version.py")) as f:
        version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
    assert medconv_ext.__version__ == version
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z0-9.+-]*)?", version)
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    assert "version=VERSION" in setup_py and not re.search(r'version\s*=\s*"', setup_py)  # no second copy
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        assert re.search(r"^version: %s$" % re.escape(version), f.read(), re.M)


def test_same_release_is_accepted():
    assert _ext.torch_mismatch(None) is None  # no build record: nothing to check
    built = _info(VERSION="0.1.0", TORCH_VERSION="2.14.1+cu130", WITH_CUDA=False, TORCH_CUDA="13.0")
    assert _ext.torch_mismatch(built, running="2.14.1+cu130", running_cuda="13.0") is None
    assert _ext.torch_mismatch(built, running="2.14.1+cpu", running_cuda=None) is None  # no CUDA kernels in it


def test_other_torch_release_names_both_versions():
    built = _info(VERSION="0.1.0", TORCH_VERSION="2.14.1+cu130", WITH_CUDA=True, TORCH_CUDA="13.0")
    msg = _ext.torch_mismatch(built, running="2.13.0+cu128", running_cuda="12.8")
    assert msg is not None
    assert "2.14.1+cu130" in msg and "2.13.0+cu128" in msg and "torch==2.14.1" in msg
    assert "--no-build-isolation" in msg  # says how to rebuild


def test_cuda_build_with_cpu_only_torch():
    built = _info(VERSION="0.1.0", TORCH_VERSION="2.14.1+cu130", WITH_CUDA=True, TORCH_CUDA="13.0")
    msg = _ext.torch_mismatch(built, running="2.14.1+cpu", running_cuda=None)
    assert msg is not None and "CPU-only" in msg and "2.14.1+cpu" in msg


def test_import_with_other_torch_raises_one_clear_error():
    """A build record of another torch release: `import medconv_ext` raises ImportError naming both."""
    code = ("import sys, types; m = types.ModuleType('medconv_ext._build_info'); "
            "m.VERSION = '0.1.0'; m.TORCH_VERSION = '1.0.0'; m.WITH_CUDA = False; m.TORCH_CUDA = None; "
            "sys.modules['medconv_ext._build_info'] = m\n"
            "try:\n    import medconv_ext\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "IMPORTERROR" in p.stdout, p.stdout + p.stderr
    assert "torch 1.0.0" in p.stdout and torch.__version__ in p.stdout


def test_cuda_reason_without_cuda_kernels(monkeypatch):
    monkeypatch.setattr(_ext, "has_compiled_ops", lambda: True)
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(_ext, "BUILD_INFO", _info(CUDA_REASON="FORCE_CUDA=0"))
    monkeypatch.setattr(backends, "_STATUS_CACHE", {})
    ok, why = backends.available_backends()["cuda"]
    assert not ok and why == "medconv_ext._C was built without CUDA kernels (FORCE_CUDA=0 at build time)"
    monkeypatch.setattr(_ext, "BUILD_INFO", None)  # no record: all possible causes
    monkeypatch.setattr(backends, "_STATUS_CACHE", {})
    ok, why = backends.available_backends()["cuda"]
    assert not ok and "built without CUDA kernels" in why and "FORCE_CUDA=0" in why and "no nvcc" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is visible")
def test_cuda_reason_no_gpu(monkeypatch):
    monkeypatch.setattr(_ext, "has_compiled_ops", lambda: True)
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(backends, "_STATUS_CACHE", {})
    ok, why = backends.available_backends()["cuda"]
    assert not ok and "compiled in" in why and "no GPU is visible" in why


def test_checkpoint_skip_reason_names_the_setting(monkeypatch, tmp_path):
    import conftest
    monkeypatch.setattr(conftest, "DATA_DIR", "")
    assert "MEDCONV_DATA_DIR" in conftest.data_missing("segment.pth")
    assert conftest.data_file("segment.pth") is None
    monkeypatch.setattr(conftest, "DATA_DIR", str(tmp_path))
    why = conftest.data_missing("segment.pth", "recon.pth")
    assert "MEDCONV_DATA_DIR" in why and "segment.pth" in why and "recon.pth" in why
    (tmp_path / "segment.pth").write_bytes(b"")
    (tmp_path / "recon.pth").write_bytes(b"")
    assert conftest.data_missing("segment.pth", "recon.pth") is None


def test_no_path_outside_the_repository_in_user_docs():
    paths = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                                 if f.endswith(".md")]
    for path in paths:
        with open(path) as f:
            text = f.read()
        assert "../shared" not in text and "/work/" not in text, path
