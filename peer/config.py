"""The peer's configuration: one frozen dataclass per concern, composed into `PeerConfig`.

Every config class it composes lives in a module that imports neither torch nor libp2p, so that
`loraswarm --help` and a bad flag's one-line error come at once (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gossip.config import NodeConfig
from merge.config import MergeConfig
from peer.device_config import DeviceConfig
from peer.http import http_listen
from peer.lora_config import LoraSettings
from peer.privacy_config import PrivacyConfig
from topology.config import TopologyConfig

LR_SCHEDULES = ("constant", "linear", "cosine")
ATTACKS = ("scale", "noise", "signflip")  # `--attack`: poisoned adapters (`peer.attacks`)


@dataclass(frozen=True)
class TrainConfig:
    """Local training: what one round of a peer does before it talks to anyone."""

    steps_per_round: int = field(default=4, metadata={"help": "optimizer steps per round"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    seq_len: int = field(default=64, metadata={"help": "tokens per example (longer are cut)"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the LoRA factors"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "constant, or linear or cosine: decay --lr towards 0 over the run's --rounds x "
        "--steps-per-round steps (needs --rounds; a restart resumes the curve)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    data_seed: int = field(default=0, metadata={"help": "seed of this peer's batch order"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    frozen_a: bool = field(default=False, metadata={"help": "FFA-LoRA: train only B"})
    grad_accum: int = field(default=1, metadata={
        "help": "split each step's batch into this many micro-batches (it must divide "
        "--batch-size): the same update in less memory"})

    @property
    def micro_batch(self) -> int:
        """Rows a step computes at once: `--batch-size` split into `--grad-accum` parts."""
        return self.batch_size // self.grad_accum

    def __post_init__(self) -> None:
        if self.steps_per_round < 1:
            raise ValueError("steps_per_round must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 8 <= self.seq_len <= 8192:
            raise ValueError("seq_len must be in 8..8192")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum must be at least 1 and divide batch_size "
                             f"({self.batch_size}), got {self.grad_accum}")


@dataclass(frozen=True)
class DataConfig:
    """How this peer's files become training strings: its own business, like its data."""

    text_field: str = field(default="text", metadata={
        "help": "column (or JSON field) that holds plain training text"})
    instruction_fields: tuple[str, ...] = field(
        default=("instruction", "input", "output"), metadata={
            "help": "columns of instruction records: instruction,output or "
            "instruction,input,output"})
    pack: bool = field(default=False, metadata={
        "help": "pack several short examples into each --seq-len row (separated by EOS): "
        "fewer padding tokens per step"})

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ValueError("text_field must name a column, e.g. text")
        if len(self.instruction_fields) not in (2, 3) or len(set(self.instruction_fields)) != len(
                self.instruction_fields):
            raise ValueError("instruction_fields must name 2 or 3 distinct columns: "
                             "instruction,output or instruction,input,output")


@dataclass(frozen=True)
class PeerConfig:
    """Everything one `loraswarm peer` daemon needs."""

    data_dir: Path = field(metadata={"help": "identity, checkpoints, metrics, status, export"})
    train_path: Path = field(metadata={
        "help": "private training data: .jsonl, .txt, .csv, .parquet, .arrow, a folder of "
        "them, or a hub dataset name when online"})
    eval_path: Path | None = field(
        default=None, metadata={"help": "held-out data; eval loss is logged each round"}
    )
    model: str | None = field(
        default=None, metadata={"help": "local HF model folder, hub name, builtin, builtin-small"}
    )
    init_seed: int = field(default=0, metadata={"help": "swarm-wide LoRA init seed"})
    rounds: int = field(default=0, metadata={"help": "stop after this many rounds (0: never)"})
    settle_rounds: int = field(default=0, metadata={
        "help": "after --rounds, this many more rounds that exchange and merge without "
        "training, so that the swarm ends close to one adapter (needs --rounds)"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every N rounds"})
    eval_batch_size: int = field(default=8, metadata={
        "help": "held-out examples per forward pass, whatever --batch-size is: in bfloat16 the "
        "same examples' loss moves by up to 0.009 with the batch's shape, so peers (and "
        "simulate.py's modes) that train on different batches still compare on one"})
    round_pause_s: float = field(default=0.0, metadata={"help": "idle time between rounds"})
    linger_s: float = field(default=0.0, metadata={
        "help": "after the last of --rounds (and --settle-rounds), keep serving the final "
        "adapter this long, so that slower neighbours' last rounds can still fetch it; "
        "SIGINT or SIGTERM ends it early"})
    wait_peers: int = field(default=0, metadata={
        "help": "before the first round, wait until this many other peers are live "
        "(0: start at once)"})
    wait_timeout_s: float = field(default=300.0, metadata={
        "help": "start anyway after waiting this long for --wait-peers"})
    attack: str = field(default="", metadata={
        "help": "for robustness experiments only: serve a poisoned adapter "
        "(scale, noise or signflip) while training honestly"})
    attack_scale: float = field(default=50.0, metadata={"help": "strength of --attack"})
    log_format: str = field(default="text", metadata={
        "help": "log lines as text, or json: one object per line with ts, level, logger, "
        "message, and peer_id and round once known"})
    http: str = field(default="", metadata={
        "help": "serve a dashboard, /status.json and Prometheus /metrics on [HOST:]PORT: a "
        "bare port listens on 127.0.0.1 only, port 0 on any free one (logged and put in "
        "status.json); another HOST, e.g. 0.0.0.0, opens it to other machines"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    network: NodeConfig = field(default_factory=NodeConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def total_rounds(self) -> int:
        """Training rounds plus settling rounds; 0 runs until stopped."""
        return self.rounds + self.settle_rounds

    @property
    def planned_steps(self) -> int:
        """The training steps of `rounds` (0: no end): what DP's σ and the rate's decay span."""
        return self.rounds * self.train.steps_per_round

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0 (0 runs until stopped)")
        if self.settle_rounds < 0 or (self.settle_rounds and not self.rounds):
            raise ValueError("settle_rounds must be >= 0 and needs rounds > 0 (settling "
                             "follows the training rounds)")
        if self.train.lr_schedule != "constant" and not self.rounds:
            raise ValueError(f"lr_schedule {self.train.lr_schedule} needs rounds > 0 (the "
                             "steps it decays over); give --rounds or --lr-schedule constant")
        if self.eval_every < 1:
            raise ValueError("eval_every must be at least 1")
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be at least 1")
        if self.round_pause_s < 0 or self.linger_s < 0:
            raise ValueError("round_pause_s and linger_s must be >= 0")
        if self.wait_peers < 0 or self.wait_timeout_s < 0:
            raise ValueError("wait_peers and wait_timeout must be >= 0")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if self.http:
            http_listen(self.http)  # raises ValueError naming the fix
        if self.attack and self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; known: {', '.join(ATTACKS)}")
        if self.privacy.enabled and (self.device.grad_checkpointing or self.device.quantize):
            # torch.func's per-example gradients fail under activation checkpointing (it
            # calls requires_grad_ inside the transform); through 4-bit layers: untested.
            raise ValueError("dp_epsilon does not work with grad_checkpointing or quantize yet; "
                             "turn them off for DP-SGD")
