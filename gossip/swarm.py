"""Swarm identity: which peers may average their adapters together.

Averaging LoRA factors coordinate-wise only means something between peers that share the base
model (its weights and its tokenizer: the caller's fingerprint), the LoRA shape, the
initialisation seed and the wire protocol. The swarm id hashes all four, names the pubsub topic
and prefixes every wire envelope, so that peers of different swarms never even decode each
other's messages.

What the id leaves out is as deliberate as what it hashes. The device, the base's dtype,
gradient accumulation and checkpointing are each peer's own business: LoRA factors, optimizer
state, merges and the wire are float32 on every device, and the initial factors are drawn in
float32 on the CPU, so a bf16 GPU peer and a float32 CPU peer start from the same adapter and
average each other's (the validator still refuses any other dtype). A 4-bit or 8-bit base is
not: it is another function of the weights, so the peer passes a model fingerprint that names
the quantization (measured in the README's "Design decisions").
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

# 4: announcements carry telemetry and the privacy ε; 5: so do transfer headers, signed.
PROTOCOL_VERSION: int = 5
SWARM_ID_BYTES = 16
TRANSFER_PROTOCOL = "/loraswarm/adapter/4"

# Domain separation: a swarm id can never equal the hash of some other loraswarm structure.
_DOMAIN = b"loraswarm/swarm-id\0"


def swarm_id(
    model_fingerprint: str,
    lora: Mapping[str, object],
    init_seed: int,
    protocol_version: int = PROTOCOL_VERSION,
) -> bytes:
    """Derive the 16-byte id of the swarm that a peer with these settings belongs to.

    The four inputs are encoded as canonical JSON (sorted keys, no whitespace) and hashed with
    SHA-256, truncated to 16 bytes. The order of dict keys does not matter, and a float with an
    integral value hashes like the integer (`alpha = 16` in a TOML file and `alpha = 16.0` from a
    default must not split a swarm in two).

    Args:
        model_fingerprint: a stable fingerprint of the base model's weights and config.
        lora: the LoRA settings, as a mapping of JSON-like values (str, int, float, bool, None,
            lists/tuples and nested mappings with string keys).
        init_seed: the seed every peer initialises its LoRA factors from.
        protocol_version: the wire protocol version.

    Returns:
        16 raw bytes.

    Raises:
        ValueError: an input is empty, of the wrong type, or not representable canonically.
    """
    if not isinstance(model_fingerprint, str) or not model_fingerprint:
        raise ValueError("the model fingerprint must be a non-empty string")
    if not isinstance(lora, Mapping):
        raise ValueError(f"the LoRA settings must be a mapping, got {type(lora).__name__}")
    if type(init_seed) is not int:
        raise ValueError(f"the init seed must be an int, got {type(init_seed).__name__}")
    if type(protocol_version) is not int or protocol_version < 1:
        raise ValueError(f"the protocol version must be a positive int, got {protocol_version!r}")
    document = {
        "model": model_fingerprint,
        "lora": _canonical(lora, "lora"),
        "seed": init_seed,
        "protocol": protocol_version,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(_DOMAIN + text.encode("ascii")).digest()[:SWARM_ID_BYTES]


def _canonical(value: object, where: str) -> object:
    """Turn `value` into plain JSON data with one spelling per meaning, or raise ValueError."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} has no canonical form")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            # JSON would silently turn 1 into "1"; two spellings of one key must not collide.
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _canonical(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where}: {type(value).__name__} values have no canonical form")


def swarm_hex(sid: bytes) -> str:
    """The swarm id as 32 lowercase hex characters (for topics, folders and logs).

    Raises:
        ValueError: `sid` is not 16 bytes.
    """
    if not isinstance(sid, bytes) or len(sid) != SWARM_ID_BYTES:
        raise ValueError(f"a swarm id is {SWARM_ID_BYTES} bytes, got {sid!r}")
    return sid.hex()


def topic_name(sid: bytes) -> str:
    """The gossipsub topic on which the swarm's announcements are published."""
    return f"/loraswarm/{swarm_hex(sid)}/adapters/1"
