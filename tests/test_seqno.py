"""Gossipsub sequence numbers: increasing across restarts, even when the clock steps back."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from libp2p import new_host
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

from gossip.errors import GossipError
from gossip.seqno import SeqnoCounter, install_seqno_counter

NOW = 1_800_000_000.0


def test_numbers_increase_and_start_above_the_clock() -> None:
    counter = SeqnoCounter(None, clock=lambda: NOW)
    numbers = [counter.next() for _ in range(5)]
    assert numbers == list(range(int(NOW) + 1, int(NOW) + 6))


def test_a_restart_after_the_clock_stepped_back_continues_upwards(tmp_path: Path) -> None:
    path = tmp_path / "seqno"
    first = SeqnoCounter(path, block=16, clock=lambda: NOW)
    # 40 publishes in one second: more than the clock advanced, as a busy peer does.
    earlier = [first.next() for _ in range(40)]
    assert int(path.read_text()) >= max(earlier), "reserved before handed out"
    restarted = SeqnoCounter(path, block=16, clock=lambda: NOW - 3600)
    later = [restarted.next() for _ in range(40)]
    assert min(later) > max(earlier)
    assert later == sorted(set(later))


def test_a_crash_mid_block_never_reuses_a_number(tmp_path: Path) -> None:
    path = tmp_path / "seqno"
    first = SeqnoCounter(path, block=1024, clock=lambda: NOW)
    used = [first.next() for _ in range(3)]  # then the process dies without a word
    assert SeqnoCounter(path, clock=lambda: NOW).next() > max(used)


def test_the_disk_is_written_once_per_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    real = os.replace

    def replace(src: Path, dst: Path) -> None:
        writes.append(str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    counter = SeqnoCounter(tmp_path / "seqno", block=100, clock=lambda: NOW)
    for _ in range(250):
        counter.next()
    assert len(writes) == 3


def test_the_clock_wins_when_it_is_ahead_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "seqno"
    path.write_text("5\n")
    assert SeqnoCounter(path, clock=lambda: NOW).next() == int(NOW) + 1


@pytest.mark.parametrize("text", ["garbage", "-3", str(1 << 64)])
def test_a_damaged_file_is_a_one_line_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "seqno"
    path.write_text(text)
    with pytest.raises(GossipError, match=f"{path} holds no sequence number.*delete it"):
        SeqnoCounter(path)


def test_a_full_disk_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(GossipError, match="cannot write .*seqno: No space left on device"):
        SeqnoCounter(tmp_path / "seqno")
    assert list(tmp_path.iterdir()) == [], "no temporary file is left"


async def test_pubsub_publishes_with_the_counters_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "seqno"
    path.write_text(f"{int(NOW) + 10**6}\n")  # an earlier run's reservation, far ahead
    host = new_host()
    pubsub = Pubsub(host, GossipSub(protocols=[], degree=1, degree_low=1, degree_high=1),
                    strict_signing=True)
    install_seqno_counter(pubsub, path)
    sent: list[rpc_pb2.Message] = []

    async def capture(origin: object, msg: rpc_pb2.Message) -> None:
        sent.append(msg)

    monkeypatch.setattr(pubsub, "push_msg", capture)  # the publish stops here: no network
    await pubsub.publish("topic", b"one")
    await pubsub.publish("topic", b"two")
    seqnos = [int.from_bytes(msg.seqno, "big") for msg in sent]
    assert seqnos == [int(NOW) + 10**6 + 1, int(NOW) + 10**6 + 2]
    assert int(path.read_text()) >= seqnos[-1]
