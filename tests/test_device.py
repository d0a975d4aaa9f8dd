"""Device, dtype and quantization resolution, on machines described rather than owned.

The rules for CUDA and MPS machines run here on a CPU: `Hardware` says what a machine offers,
and `resolve` is a pure function of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peer.cli import main
from peer.device import DeviceConfig, Hardware, Placement, cpu_flags, fast_cpu_dtype, resolve
from peer.errors import ConfigError

CPU_ONLY = Hardware()
AMPERE = Hardware(cuda_devices=2, cuda_bf16=True, bitsandbytes=True)
TURING = Hardware(cuda_devices=1, cuda_bf16=False, bitsandbytes=True)
APPLE = Hardware(mps=True)


@pytest.mark.parametrize(
    ("hardware", "device", "dtype"),
    [
        (CPU_ONLY, "cpu", torch.float32),
        (AMPERE, "cuda:0", torch.bfloat16),
        (TURING, "cuda:0", torch.float16),
        (APPLE, "mps", torch.float16),
        (Hardware(cuda_devices=1, cuda_bf16=True, mps=True), "cuda:0", torch.bfloat16),
    ],
)
def test_auto_prefers_cuda_then_mps_then_cpu(hardware: Hardware, device: str,
                                             dtype: torch.dtype) -> None:
    placement = resolve(DeviceConfig(), hardware)
    assert placement == Placement(torch.device(device), dtype)


@pytest.mark.parametrize(
    ("request_", "hardware", "device", "dtype"),
    [
        (DeviceConfig(device="cpu", dtype="bfloat16"), AMPERE, "cpu", torch.bfloat16),
        (DeviceConfig(device="cpu"), AMPERE, "cpu", torch.float32),
        (DeviceConfig(device="cuda:1"), AMPERE, "cuda:1", torch.bfloat16),
        (DeviceConfig(device="cuda", dtype="float32"), AMPERE, "cuda:0", torch.float32),
        (DeviceConfig(device="mps", dtype="float32"), APPLE, "mps", torch.float32),
    ],
)
def test_named_devices_and_dtypes(request_: DeviceConfig, hardware: Hardware, device: str,
                                  dtype: torch.dtype) -> None:
    placement = resolve(request_, hardware)
    assert (placement.device, placement.dtype) == (torch.device(device), dtype)


@pytest.mark.parametrize(
    ("request_", "hardware", "message"),
    [
        (DeviceConfig(device="cuda"), CPU_ONLY, "no CUDA device is visible"),
        (DeviceConfig(device="cuda:2"), AMPERE, r"2 CUDA device\(s\), numbered 0..1"),
        (DeviceConfig(device="mps"), CPU_ONLY, "no Apple MPS device"),
        (DeviceConfig(dtype="float16"), CPU_ONLY, "float16 on the CPU"),
        (DeviceConfig(dtype="bfloat16"), TURING, "does not support it"),
        (DeviceConfig(quantize="4bit"), CPU_ONLY, "--quantize 4bit needs a CUDA GPU"),
        (DeviceConfig(quantize="8bit", device="cpu"), AMPERE, "needs a CUDA GPU"),
        (DeviceConfig(quantize="4bit"), Hardware(cuda_devices=1, cuda_bf16=True),
         r"pip install 'loraswarm\[gpu\]'"),
    ],
)
def test_what_a_machine_lacks_is_a_one_line_error(request_: DeviceConfig, hardware: Hardware,
                                                  message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        resolve(request_, hardware)
    assert "\n" not in str(caught.value)


def test_quantization_keeps_the_compute_dtype_rules() -> None:
    qlora = resolve(DeviceConfig(quantize="4bit"), AMPERE)
    assert qlora == Placement(torch.device("cuda", 0), torch.bfloat16, "4bit")
    assert resolve(DeviceConfig(quantize="8bit"), TURING).dtype == torch.float16
    assert qlora.describe() == "cuda:0, bfloat16 base, 4bit"


def test_the_attention_kernel_is_part_of_the_placement() -> None:
    eager = resolve(DeviceConfig(device="cpu", attention="eager"), AMPERE)
    assert eager.attention == "eager" and eager.describe() == "cpu, float32 base, eager attention"
    assert eager != resolve(DeviceConfig(device="cpu"), AMPERE), "in-process peers must agree"


@pytest.mark.parametrize(
    ("field", "value"),
    [("device", "gpu"), ("device", "cuda:x"), ("dtype", "half"), ("quantize", "2bit"),
     ("attention", "flash")],
)
def test_unknown_names_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=value.replace(":", ".")):
        DeviceConfig(**{field: value})


def test_this_machine_is_probed_as_it_is() -> None:
    hardware = Hardware.probe()
    assert hardware.cuda_devices == torch.cuda.device_count()
    if not torch.cuda.is_available():
        assert resolve(DeviceConfig(), hardware).device == torch.device("cpu")


def test_the_cli_refuses_4bit_without_cuda_in_one_line(tmp_path: Path, capsys) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "hello"}\n')
    code = main(["peer", "--data-dir", str(tmp_path / "p"), "--train", str(train),
                 "--quantize", "4bit", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--quantize 4bit needs a CUDA GPU" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cpu_flags_come_from_cpuinfo_and_pick_the_simulations_dtype(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(cpuinfo)
    assert cpu_flags(tmp_path / "absent") == frozenset()  # not Linux: no flags, no error
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert "avx512_bf16" not in cpu_flags(cpuinfo)

    assert fast_cpu_dtype(Hardware(cpu_bf16=True)) == "bfloat16"
    assert fast_cpu_dtype(Hardware(cpu_bf16=False)) == "auto"  # emulated bf16 is slower
    assert fast_cpu_dtype(Hardware(cpu_bf16=True, cuda_devices=1)) == "auto"  # the GPU's own
    assert fast_cpu_dtype(Hardware(cpu_bf16=True, mps=True)) == "auto"
    # `auto` in the daemon itself still means float32 on any CPU.
    assert resolve(DeviceConfig(), Hardware(cpu_bf16=True)).dtype == torch.float32
