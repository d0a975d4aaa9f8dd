"""One table of options drives both the `loraswarm peer` flags and the `--config` TOML keys.

Every flag `--some-name` is also the TOML key `some_name`; a flag given on the command line wins
over the file. Help texts come from the config dataclasses' `metadata["help"]`, so a setting is
described in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossip.config import NodeConfig
from merge.config import MergeConfig
from peer.config import DataConfig, PeerConfig, TrainConfig
from peer.device_config import DeviceConfig
from peer.errors import ConfigError
from peer.http import http_listen
from peer.lora_config import LoraSettings
from peer.privacy_config import PrivacyConfig
from topology.config import TopologyConfig

_SECTIONS: dict[str | None, type] = {
    None: PeerConfig,
    "lora": LoraSettings,
    "train": TrainConfig,
    "data": DataConfig,
    "device": DeviceConfig,
    "network": NodeConfig,
    "topology": TopologyConfig,
    "merge": MergeConfig,
    "privacy": PrivacyConfig,
}


SWARM = "swarm"
AGREE = "agree"
_GROUPS = {
    SWARM: ("swarm settings (every peer of a swarm must use the same)",
            "The swarm id hashes these: a peer with another value is in another swarm, and "
            "its peers never exchange adapters with yours."),
    AGREE: ("training settings (should match across the swarm)",
            "Not enforced, but peers whose steps differ in size pull the average their way; "
            "agree on them like on the model."),
    "own": ("this peer's own settings",
            "Its device and data, and how it talks to the network: peers may differ freely. "
            "The adapter travels in float32 whatever --device or --dtype, so a GPU peer and a "
            "CPU peer share one swarm."),
}


@dataclass(frozen=True)
class Option:
    """A setting: its flag/TOML name, where it lands, and how a text value becomes its type."""

    name: str
    section: str | None
    field: str
    parse: Callable[[Any], Any]
    metavar: str = ""
    repeat: bool = False  # a flag given several times (or a TOML list) gives a tuple
    required: bool = False
    scope: str = "own"  # SWARM: hashed into the swarm id; AGREE: should match; own: per device

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def help(self) -> str:
        spec = next(f for f in dataclasses.fields(_SECTIONS[self.section]) if f.name == self.field)
        text = str(spec.metadata.get("help", ""))
        default = _default_of(spec)
        if default not in (None, (), "", dataclasses.MISSING) and not self.required:
            text += f" (default: {_show(default)})"
        return text


def _default_of(spec: dataclasses.Field[Any]) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return dataclasses.MISSING


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _names(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _swarm_key(value: Any) -> str:
    from gossip.keyfile import read_swarm_key

    return read_swarm_key(Path(value))


OPTIONS: tuple[Option, ...] = (
    Option("data_dir", None, "data_dir", Path, "DIR", required=True),
    Option("train", None, "train_path", Path, "FILE", required=True),
    Option("eval", None, "eval_path", Path, "FILE"),
    Option("model", None, "model", str, "PATH", scope=SWARM),
    Option("init_seed", None, "init_seed", int, "N", scope=SWARM),
    Option("rounds", None, "rounds", int, "N"),
    Option("settle_rounds", None, "settle_rounds", int, "N"),
    Option("eval_every", None, "eval_every", int, "N"),
    Option("eval_batch_size", None, "eval_batch_size", int, "N"),
    Option("round_pause", None, "round_pause_s", float, "SECONDS"),
    Option("linger", None, "linger_s", float, "SECONDS"),
    Option("wait_peers", None, "wait_peers", int, "N"),
    Option("wait_timeout", None, "wait_timeout_s", float, "SECONDS"),
    Option("http", None, "http", http_listen, "[HOST:]PORT"),
    Option("attack", None, "attack", str, "NAME"),
    Option("attack_scale", None, "attack_scale", float, "X"),
    Option("log_format", None, "log_format", str, "text|json"),
    Option("lora_rank", "lora", "rank", int, "R", scope=SWARM),
    Option("lora_alpha", "lora", "alpha", int, "A", scope=SWARM),
    Option("lora_targets", "lora", "target_modules", _names, "A,B", scope=SWARM),
    Option("steps_per_round", "train", "steps_per_round", int, "N", scope=AGREE),
    Option("batch_size", "train", "batch_size", int, "N", scope=AGREE),
    Option("seq_len", "train", "seq_len", int, "N", scope=AGREE),
    Option("lr", "train", "lr", float, "LR", scope=AGREE),
    Option("lr_schedule", "train", "lr_schedule", str, "constant|linear|cosine", scope=AGREE),
    Option("weight_decay", "train", "weight_decay", float, "WD", scope=AGREE),
    Option("data_seed", "train", "data_seed", int, "N"),
    Option("threads", "train", "threads", int, "N"),
    Option("frozen_a", "train", "frozen_a", _bool, "BOOL", scope=SWARM),
    Option("grad_accum", "train", "grad_accum", int, "N"),
    Option("text_field", "data", "text_field", str, "NAME"),
    Option("instruction_fields", "data", "instruction_fields", _names, "I,[IN,]OUT"),
    Option("pack", "data", "pack", _bool, "BOOL"),
    Option("device", "device", "device", str, "DEV"),
    Option("dtype", "device", "dtype", str, "DTYPE"),
    Option("quantize", "device", "quantize", str, "4bit|8bit", scope=SWARM),
    Option("grad_checkpointing", "device", "grad_checkpointing", _bool, "BOOL"),
    Option("attention", "device", "attention", str, "sdpa|eager"),
    Option("listen", "network", "listen", str, "MULTIADDR", repeat=True),
    Option("bootstrap", "network", "bootstrap", str, "MULTIADDR", repeat=True),
    Option("announce", "network", "announce", str, "MULTIADDR", repeat=True),
    Option("upnp", "network", "upnp", _bool, "BOOL"),
    Option("relay_rate", "network", "relay_rate", float, "BYTES_PER_S"),
    Option("reachability_interval", "network", "reachability_interval_s", float, "SECONDS"),
    Option("relay_service", "network", "relay_service", str, "auto|on|off"),
    Option("swarm_key", "network", "psk", _swarm_key, "FILE", scope=SWARM),
    Option("max_adapter_bytes", "network", "max_adapter_bytes", int, "N"),
    Option("fetch_timeout", "network", "fetch_timeout_s", float, "SECONDS"),
    Option("min_upload_rate", "network", "min_upload_rate", float, "BYTES_PER_S"),
    Option("allow_private_addrs", "network", "allow_private_addrs", _bool, "BOOL"),
    Option("health_check", "network", "health_check_s", float, "SECONDS"),
    Option("ping_timeout", "network", "ping_timeout_s", float, "SECONDS"),
    Option("max_fetch", "network", "max_fetch_s", float, "SECONDS"),
    Option("stall_timeout", "network", "stall_s", float, "SECONDS"),
    Option("min_fetch_rate", "network", "min_fetch_rate", float, "BYTES_PER_S"),
    Option("wire_codec", "network", "wire_codec", str, "CODEC"),
    Option("settle_codec", "network", "settle_codec", str, "CODEC"),
    Option("fanout", "topology", "fanout", int, "K"),
    Option("settle_fanout", "topology", "settle_fanout", int, "K"),
    Option("view_size", "topology", "view_size", int, "N"),
    Option("peer_timeout", "topology", "peer_timeout_s", float, "SECONDS"),
    Option("target_connections", "topology", "target_connections", int, "N"),
    Option("membership_tick", "topology", "tick_s", float, "SECONDS"),
    Option("merge_rule", "merge", "rule", str, "NAME", scope=AGREE),
    Option("merge_weights", "merge", "weights", str, "samples|equal", scope=AGREE),
    Option("staleness_discount", "merge", "staleness_discount", float, "X", scope=AGREE),
    Option("max_norm_ratio", "merge", "max_norm_ratio", float, "X", scope=AGREE),
    Option("trim", "merge", "trim", int, "N", scope=AGREE),
    Option("trim_fraction", "merge", "trim_fraction", float, "X", scope=AGREE),
    Option("clip_tau", "merge", "clip_tau", float, "X", scope=AGREE),
    Option("dp_epsilon", "privacy", "epsilon", float, "EPS"),
    Option("dp_delta", "privacy", "delta", float, "DELTA"),
    Option("dp_clip", "privacy", "clip", float, "C"),
    Option("dp_noise", "privacy", "noise", float, "SIGMA"),
    Option("dp_sample_rate", "privacy", "sample_rate", float, "Q"),
    Option("require_dp", "privacy", "require_dp", float, "EPS"),
    Option("dp_accountant", "privacy", "accountant", str, "NAME"),
)
_BY_NAME = {option.name: option for option in OPTIONS}


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and every option as a flag; unset flags stay absent from the namespace."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file with any of the settings below (flags win over it)")
    groups = {scope: parser.add_argument_group(title, text)
              for scope, (title, text) in _GROUPS.items()}
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.name, "metavar": option.metavar,
                                  "help": option.help(), "default": argparse.SUPPRESS}
        if option.repeat:
            kwargs["action"] = "append"
        elif option.parse is _bool:  # `--upnp` alone means true; `--upnp false` still parses
            kwargs.update(nargs="?", const="true")
        groups[option.scope].add_argument(option.flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> PeerConfig:
    """Build the peer config from parsed flags over the optional TOML file.

    Raises:
        ConfigError: one line that names the bad setting and how to fix it.
    """
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(read_toml(args.config))
    values.update({o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)})
    return build_config(values)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a flat TOML file of option names; unknown keys are an error, not a silent no-op."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    unknown = sorted(set(data) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}; keys are the flag names with underscores, "
            "see `loraswarm peer --help`"
        )
    return data


def build_config(values: Mapping[str, Any]) -> PeerConfig:
    """Parse each value with its option's type, group by section, and construct the config."""
    grouped: dict[str | None, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for name, raw in values.items():
        option = _BY_NAME[name]
        grouped[option.section][option.field] = _parse(option, raw)
    missing = [o.flag for o in OPTIONS if o.required and o.field not in grouped[None]]
    if missing:
        raise ConfigError(f"missing {missing[0]}: it is required (flag or TOML key)")
    try:
        sections = {name: cls(**grouped[name]) for name, cls in _SECTIONS.items() if name}
        return PeerConfig(**grouped[None], **sections)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad setting: {exc}") from exc


def _parse(option: Option, raw: Any) -> Any:
    try:
        if option.repeat:
            items = raw if isinstance(raw, list | tuple) else [raw]
            return tuple(option.parse(item) for item in items)
        if isinstance(raw, list) and option.parse is not _names:
            raise ValueError("expected a single value, got a list")
        return option.parse(raw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{option.flag}: {exc}") from exc
