"""Programmatic dependent launch: where it is on, and the switch benchmarks use to turn it off."""

from __future__ import annotations

import torch

from folovllm.triton_utils import pdl


def test_pdl_is_off_on_cpu_and_without_pdl_restores_what_was_before(monkeypatch):
    monkeypatch.setattr(pdl, "_supported", lambda device: device.type == "cuda")
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert pdl.pdl_supported(gpu) and not pdl.pdl_supported(cpu)
    with pdl.without_pdl():
        assert not pdl.pdl_supported(gpu)
        with pdl.without_pdl():
            assert not pdl.pdl_supported(gpu)
        assert not pdl.pdl_supported(gpu)
    assert pdl.pdl_supported(gpu)


def test_norm_lets_the_next_kernel_start_only_when_asked():
    """The RMSNorm kernel compiled for an H200 on this CPU: ``launch_dependents`` is its first instruction under
    ``PDL`` and absent without."""
    from folovllm.model_executor.layers.ops.rms_norm import _rms_norm_kernel
    from folovllm.triton_utils.offline_compile import compile_for_gpu

    types = {"X": "*bf16", "Residual": "*bf16", "Weight": "*bf16", "Out": "*bf16", "stride_x": "i32",
             "stride_r": "i32", "stride_o": "i32", "eps": "fp32"}  # fmt: skip
    for flag in (True, False):
        consts = dict(HIDDEN=4096, BLOCK=4096, HAS_RESIDUAL=True, PDL=flag)
        ptx = compile_for_gpu(_rms_norm_kernel, types, consts, num_warps=8)["ptx"]
        assert ("griddepcontrol.launch_dependents" in ptx) == flag
        if flag:
            assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("ld.global")
