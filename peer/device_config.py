"""What a peer asks to compute with (`--device`, `--dtype`, `--quantize`, `--attention`).

Names only, without torch, so that the command line can describe and check them at once;
`peer.device` resolves them against the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes of the frozen base
QUANTIZE = ("4bit", "8bit")
# Attention kernels of the base (transformers' attn_implementation); auto: transformers' choice
# (SDPA where the model supports it, else eager).
ATTENTION = ("auto", "sdpa", "eager")


@dataclass(frozen=True)
class DeviceConfig:
    """What this machine computes with; none of it has to match the other peers'."""

    device: str = field(default="auto", metadata={
        "help": "auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={
        "help": "dtype of the frozen base: auto (bfloat16 on CUDA that supports it, else "
        "float16 on a GPU, float32 on CPU), float32, bfloat16 or float16; LoRA factors and "
        "the wire stay float32"})
    quantize: str = field(default="", metadata={
        "help": "load the base in 4bit (QLoRA: nf4, double quantization) or 8bit through "
        "bitsandbytes; needs CUDA and `pip install 'loraswarm[gpu]'`. A quantized peer only "
        "joins peers with the same --quantize (it is part of the swarm id)"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "keep fewer activations and recompute them in the backward pass: less "
        "memory for one more forward pass per step"})
    attention: str = field(default="auto", metadata={
        "help": "attention kernel of the base: auto (transformers' choice: sdpa where the model "
        "supports it), sdpa (PyTorch's fused kernels) or eager (plain matmuls). With "
        "--dp-epsilon on a CPU and batches of 32 or more, eager made a DP step "
        "25-34 percent faster (vmap cannot batch the CPU's fused kernel); on a GPU it was "
        "slower. Its memory grows with --seq-len squared"})

    def __post_init__(self) -> None:
        if not _is_device_name(self.device):
            raise ValueError(f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use auto, "
                             f"{', '.join(DTYPE_NAMES)}")
        if self.quantize and self.quantize not in QUANTIZE:
            raise ValueError(f"unknown quantization {self.quantize!r}; use 4bit or 8bit")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}; use auto, sdpa or eager")


def _is_device_name(name: str) -> bool:
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    kind, _, index = name.partition(":")
    return kind == "cuda" and index.isdigit()


