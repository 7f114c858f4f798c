"""The CPU compatibility layer, each case in a fresh interpreter (it changes process state)."""

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_inactive_when_cuda_is_available():
    result = run_python(
        """
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.cuda.current_device
        from megatron_ext.compat import cpu_support_active, enable_cpu_support
        assert enable_cpu_support() is False
        assert cpu_support_active() is False
        assert torch.cuda.current_device is original
        from torch.overrides import _get_current_function_mode_stack
        assert not _get_current_function_mode_stack()
        print("inactive")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "inactive" in result.stdout


def test_refuses_other_megatron_core_versions():
    result = run_python(
        """
        from megatron.core import package_info
        package_info.__version__ = "0.15.0"
        from megatron_ext.compat import enable_cpu_support
        enable_cpu_support()
        """
    )
    assert result.returncode != 0
    assert "written for megatron-core 0.16.1" in result.stderr
    assert "megatron-core 0.15.0 is installed" in result.stderr


def test_cuda_requests_land_on_cpu_and_cuda_rng_is_the_cpu_generator():
    result = run_python(
        """
        import torch
        from megatron_ext.compat import enable_cpu_support
        assert enable_cpu_support() is True
        assert enable_cpu_support() is True  # idempotent
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(3, device=torch.device("cuda", 0)).device.type == "cpu"
        t = torch.ones(3)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        assert torch.tensor([1], device="cuda", pin_memory=True).device.type == "cpu"
        torch.cuda.manual_seed(7); a = torch.rand(5)
        torch.manual_seed(7); b = torch.rand(5)
        assert torch.equal(a, b)
        state = torch.cuda.get_rng_state(); x = torch.rand(3)
        torch.cuda.set_rng_state(state); assert torch.equal(x, torch.rand(3))
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.current_stream())
        s.record_event().synchronize()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
