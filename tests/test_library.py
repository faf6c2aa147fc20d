"""Loading the compiled library, build_info, backend choice and the doctor command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import pyprotoclip
from pyprotoclip import _library
from pyprotoclip.cli import main
from pyprotoclip.ops import _backend


def test_mismatched_torch_falls_back_with_one_clear_warning(monkeypatch):
    monkeypatch.setattr(_library, "_recorded_build", lambda: {"torch_version": "0.0.1"})
    with pytest.warns(RuntimeWarning, match="Rebuild with"):
        module, reason = _library.load.__wrapped__()
    assert module is None and "0.0.1" in reason


def test_build_info_reports_what_was_compiled():
    info = pyprotoclip.build_info()
    for key in ("torch_version", "compiled", "auto_backend"):
        assert key in info
    assert info["auto_backend"]["cpu"] in ("compiled", "reference")
    if info["compiled"]:
        assert info["built_torch_version"] == torch.__version__
        assert isinstance(info["cuda_kernels"], bool)


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("PYPROTOCLIP_BACKEND", "reference")
    assert _backend.auto_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("PYPROTOCLIP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PYPROTOCLIP_BACKEND"):
        _backend.auto_backend(torch.device("cpu"))


def test_compiled_backend_missing_device_raises():
    if "cuda" in _library.compiled_devices() and torch.cuda.is_available():
        pytest.skip("CUDA kernels are available here")
    with pytest.raises(RuntimeError, match="backend='compiled'"):
        _backend.resolve("compiled", torch.device("meta"), "infonce_loss")


def test_doctor_cli():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["torch_version"] == torch.__version__


def test_cli_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("train", "eval", "data", "bench", "doctor"):
        assert name in result.output


def test_bench_rejects_unknown_op():
    result = CliRunner().invoke(main, ["bench", "nope"])
    assert result.exit_code != 0 and "nope" in result.output


def test_load_library_from_another_process():
    """Another project can use the kernels with torch.ops.load_library(path) and no pyprotoclip import."""
    import subprocess
    import sys

    path = pyprotoclip.library_path()
    if path is None:
        pytest.skip("pyprotoclip._C is not built")
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({path!r})\n"
        "assert 'pyprotoclip' not in sys.modules\n"
        "q = torch.eye(2); loss, lse = torch.ops.pyprotoclip.similarity_cross_entropy(q, q, torch.arange(2), torch.tensor(1.0))\n"
        "print(float(loss.sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import math

    assert abs(float(out.stdout.strip()) - 2 * (math.log(math.e + 1) - 1)) < 1e-6
