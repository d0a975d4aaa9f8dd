"""Where a peer computes: the device, the frozen base's dtype, and an optional 4/8-bit base.

These are a device's own business. Only the LoRA factors travel, and they stay float32 on every
device (peft keeps adapter weights in float32 over a bf16 or fp16 base, and the trainer reads
them back as float32), so a bf16 GPU peer and a float32 CPU peer share one swarm id and average
each other's adapters. The swarm id therefore hashes none of the settings below but one: a
4-bit or 8-bit base is another function of the same weights, and adapters trained on it do not
average well with those of a bf16 base (README, "Design decisions, measured"), so `--quantize`
puts a peer in a swarm of its own kind.

Resolution is a pure function of the request and of what the machine offers (`Hardware`), so
every rule is testable on a CPU-only machine by describing a machine that has a GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.device_config import DTYPE_NAMES, DeviceConfig
from peer.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
ADAPTER_DTYPE = torch.float32  # the dtype of LoRA factors, optimizer state, merges and the wire
# CPU flags (Linux /proc/cpuinfo) of native bfloat16 matrix arithmetic: AVX-512 BF16, Intel AMX.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class Hardware:
    """What a machine offers, as far as placement is concerned."""

    cuda_devices: int = 0
    cuda_bf16: bool = False  # compute capability 8.0 or newer (Ampere)
    mps: bool = False
    bitsandbytes: bool = False
    cpu_bf16: bool = False  # the CPU multiplies bfloat16 natively (`CPU_BF16_FLAGS`)

    @classmethod
    def probe(cls) -> Hardware:
        """Ask torch what this machine has (cheap; does not initialise a CUDA context)."""
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(
            cuda_devices=cuda,
            cuda_bf16=bool(cuda) and torch.cuda.is_bf16_supported(),
            mps=bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
            bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
            cpu_bf16=bool(cpu_flags() & CPU_BF16_FLAGS),
        )


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of this machine's CPU, as Linux lists them; empty where it does not."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def fast_cpu_dtype(hardware: Hardware) -> str:
    """The `--dtype` a simulation of CPU peers runs fastest in without losing accuracy.

    A bf16 base trained 1.50 times faster than a float32 one on a CPU with AVX-512 BF16, at
    the same loss (README, "Training throughput"); where the CPU has no native bf16, or a
    GPU will take the peers (`auto` picks its dtype), this is `auto`.
    """
    if hardware.cpu_bf16 and not hardware.cuda_devices and not hardware.mps:
        return "bfloat16"
    return "auto"


@dataclass(frozen=True)
class Placement:
    """A resolved request: where the base lives, in which dtype, and how it is quantized.

    `dtype` is the base's dtype, or its compute dtype when `quantize` is set.
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    quantize: str = ""
    grad_checkpointing: bool = False
    attention: str = "auto"

    def describe(self) -> str:
        """One line for the start-up log, e.g. `cuda:0, bfloat16 base, 4bit`."""
        dtype = str(self.dtype).removeprefix("torch.")
        text = f"{self.device}, {dtype} base"
        text += f", {self.quantize}" if self.quantize else ""
        return text + (f", {self.attention} attention" if self.attention != "auto" else "")


CPU_FLOAT32 = Placement()


def resolve(config: DeviceConfig, hardware: Hardware | None = None) -> Placement:
    """Turn the requested device, dtype and quantization into a placement this machine has.

    Raises:
        ConfigError: one line naming the setting this machine cannot honour, and the fix.
    """
    hardware = hardware or Hardware.probe()
    device = resolve_device(config.device, hardware)
    dtype = resolve_dtype(config.dtype, device, hardware)
    if config.quantize:
        _check_quantize(config.quantize, device, hardware)
    return Placement(device, dtype, config.quantize, config.grad_checkpointing, config.attention)


def resolve_device(name: str, hardware: Hardware) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; a named device must exist.

    Raises:
        ConfigError: the named device is not on this machine.
    """
    if name == "auto":
        if hardware.cuda_devices:
            return torch.device("cuda", 0)
        return torch.device("mps") if hardware.mps else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not hardware.mps:
            raise ConfigError("--device mps: this machine has no Apple MPS device; "
                              "use --device cpu or auto")
        return torch.device("mps")
    index = int(name.partition(":")[2] or 0)
    if not hardware.cuda_devices:
        raise ConfigError(f"--device {name}: no CUDA device is visible (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                          "use --device cpu or auto")
    if index >= hardware.cuda_devices:
        raise ConfigError(f"--device {name}: this machine has {hardware.cuda_devices} CUDA "
                          f"device(s), numbered 0..{hardware.cuda_devices - 1}")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device, hardware: Hardware) -> torch.dtype:
    """`auto` is bf16 on CUDA that supports it, fp16 on other GPUs, float32 on the CPU.

    Raises:
        ConfigError: float16 on the CPU (slow and unstable there: use bfloat16), or bfloat16
            on a CUDA card older than Ampere.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if hardware.cuda_bf16 else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("--dtype float16 on the CPU: half-precision matmuls there are slow "
                          "and lose accuracy; use --dtype bfloat16 or float32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not hardware.cuda_bf16:
        raise ConfigError("--dtype bfloat16: this CUDA card does not support it (needs "
                          "compute capability 8.0+); use --dtype float16 or auto")
    return dtype


def _check_quantize(kind: str, device: torch.device, hardware: Hardware) -> None:
    if device.type != "cuda":
        raise ConfigError(f"--quantize {kind} needs a CUDA GPU and this peer runs on "
                          f"{device}: drop --quantize, and try --dtype bfloat16 (on a CPU, "
                          "bitsandbytes trained slower than bf16 and stops training after "
                          "its first evaluation)")
    if not hardware.bitsandbytes:
        raise ConfigError(f"--quantize {kind} needs bitsandbytes: "
                          "pip install 'loraswarm[gpu]'")
