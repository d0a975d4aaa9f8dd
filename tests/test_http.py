"""`--http`: a peer's dashboard, status and Prometheus metrics, and what hostile clients get.

Two real peers run in one trio process over real libp2p on 127.0.0.1, with the model-free
trainer of `tests.fakes` (the HTTP side never touches the model); clients are urllib (a real
HTTP client, in a thread) and raw TCP streams for what no polite client sends.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gossip.node import NodeConfig
from peer import web
from peer.cli import main
from peer.config import PeerConfig
from peer.daemon import Peer
from peer.errors import ConfigError
from peer.http import HttpLimits, http_listen
from peer.metrics_export import exposition, peer_registry
from peer.options import config_from_args
from peer.privacy import Ledger, PrivacyConfig
from tests.fakes import fake_runtime
from topology.config import TopologyConfig


def http_peer(tmp_path: Path, name: str, *, rounds: int, bootstrap: tuple[str, ...] = (),
          http: str = "127.0.0.1:0") -> Peer:
    """A peer with the model-free trainer and a real libp2p node, serving --http."""
    config = PeerConfig(
        data_dir=tmp_path / name, train_path=tmp_path / "unused.jsonl", rounds=rounds,
        linger_s=600, round_pause_s=0.05, http=http,
        network=NodeConfig(bootstrap=bootstrap, fetch_timeout_s=20),
        topology=TopologyConfig(fanout=1, peer_timeout_s=60),
    )
    peer = Peer(config)
    # An eval "batch" makes the fake trainer report an eval loss each round.
    peer.runtime = replace(fake_runtime(config.data_dir, train_s=0.05, seed=len(name)),
                           eval_batches=[{}])
    return peer


@asynccontextmanager
async def _swarm(tmp_path: Path, *, rounds: int) -> AsyncIterator[list[Peer]]:
    """Two real peers, the second bootstrapped from the first, both serving --http."""
    async with trio.open_nursery() as nursery:
        first = http_peer(tmp_path, "p0", rounds=rounds)
        node = await nursery.start(first.run)
        second = http_peer(tmp_path, "p1", rounds=rounds, bootstrap=(node.listen_addrs[0],))
        await nursery.start(second.run)
        yield [first, second]
        nursery.cancel_scope.cancel()


async def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    def fetch() -> tuple[int, bytes]:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    return await trio.to_thread.run_sync(fetch)


async def _raw(url: str, data: bytes) -> bytes:
    """Send `data` as it is and return everything the server answers before it closes."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        return await _read_to_close(stream)


async def _read_to_close(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(15):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


def _url(peer: Peer) -> str:
    url = peer.status()["http"]
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
    return url


async def test_metrics_match_status_json(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with _swarm(tmp_path, rounds=3) as peers:
            for peer in peers:
                await peer.wait_rounds(3)
            first = peers[0]
            url = _url(first)
            code, text = await _get(url + "metrics")
            _, body = await _get(url + "status.json")
    assert code == 200
    status = json.loads(body)
    written = json.loads((tmp_path / "p0" / "status.json").read_text())
    assert status.keys() == written.keys(), "the document the peer writes, as of now"
    for key in ("peer_id", "swarm_id", "round", "version", "samples", "merges", "eval_loss"):
        assert status[key] == written[key], key
    samples = {sample.name + str(sorted(sample.labels.items())): sample.value
               for family in text_string_to_metric_families(text.decode())
               for sample in family.samples}
    assert status["merges"] >= 1 and status["bytes_in"] > 0, "the peers exchanged adapters"
    for name, key in [("loraswarm_merges_total", "merges"),
                      ("loraswarm_adapters_received_total", "adapters_received"),
                      ("loraswarm_bytes_received_total", "bytes_in"),
                      ("loraswarm_bytes_sent_total", "bytes_out"),
                      ("loraswarm_samples_total", "samples"), ("loraswarm_round", "round"),
                      ("loraswarm_version", "version"), ("loraswarm_eval_loss", "eval_loss"),
                      ("loraswarm_peers_known", "peers_known")]:
        assert samples[name + "[]"] == pytest.approx(status[key]), name
    assert samples["loraswarm_round[]"] == 3
    assert samples["loraswarm_peers_live[]"] == len(status["live_peers"]) == 1
    last = json.loads((tmp_path / "p0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert samples["loraswarm_train_loss[]"] == pytest.approx(last["train_loss"]) == 1 / 3
    info = samples[f"loraswarm_peer_info{sorted(_info(status).items())}"]
    assert info == 1


def test_a_private_peers_ledger_is_in_its_metrics() -> None:
    ledger = Ledger(PrivacyConfig(epsilon=8.0, noise=1.0), noise=1.0, rate=0.05)
    ledger.record(30)
    text = exposition(peer_registry(lambda: {"privacy": ledger.record_dict()})).decode()
    samples = {sample.name: sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    assert samples["loraswarm_privacy_epsilon"] == pytest.approx(ledger.epsilon(), abs=1e-6)
    assert 0 < samples["loraswarm_privacy_epsilon"] < 8
    assert samples["loraswarm_privacy_epsilon_budget"] == 8.0
    assert samples["loraswarm_privacy_noise_multiplier"] == 1.0
    assert samples["loraswarm_privacy_steps_total"] == 30
    # A peer without --dp-epsilon has no ledger worth a metric (its ε would be "none").
    plain = {"privacy": Ledger(PrivacyConfig()).record_dict()}
    assert b"loraswarm_privacy" not in exposition(peer_registry(lambda: plain))


def _info(status: dict) -> dict[str, str]:
    return {"peer_id": status["peer_id"], "swarm_id": status["swarm_id"],
            "device": status["device"], "http": status["http"]}


async def test_rounds_and_dashboard_endpoints(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with _swarm(tmp_path, rounds=2) as peers:
            await peers[0].wait_rounds(2)
            url = _url(peers[0])
            _, rounds = await _get(url + "rounds.json")
            _, one = await _get(url + "rounds.json?last=1")
            _, page = await _get(url)
    lines = json.loads(rounds)["rounds"]
    assert [line["round"] for line in lines] == [0, 1, 2]  # round 0: the first evaluation
    assert "sketch" not in lines[-1] and lines[-1]["train_loss"] == 0.5
    assert json.loads(one)["rounds"] == lines[-1:]
    assert b"<script>" in page and b"no swarm telemetry yet" in page
    assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b""), "nothing external"


async def test_hostile_clients_leave_the_peer_running(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(web, "LIMITS", HttpLimits(timeout_s=1.0, max_connections=8))
    with trio.fail_after(120):
        async with _swarm(tmp_path, rounds=0) as peers:
            peer = peers[0]
            await peer.wait_rounds(1)
            url = _url(peer)
            long_line = await _raw(url, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n")
            long_head = await _raw(url, b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n")
            garbage = await _raw(url, b"\x00\xff\xfe nonsense\r\n\r\n")
            missing = await _get(url + "admin")
            posted = await _get(url + "metrics", method="POST")
            # Slow clients that send nothing hold every slot: the next one is turned away,
            # and each is dropped once its time is up.
            async with trio.open_nursery() as nursery:
                idle = [await trio.open_tcp_stream("127.0.0.1", int(url.split(":")[-1][:-1]))
                        for _ in range(8)]
                # Until the server has accepted all 8, a ninth client is still served.
                busy = b""
                while not busy.startswith(b"HTTP/1.1 503 "):
                    busy = await _raw(url, b"GET /metrics HTTP/1.1\r\n\r\n")
                for stream in idle:
                    nursery.start_soon(_read_to_close, stream)
            round_before = peer.completed
            code, text = await _get(url + "metrics")
            await peer.wait_rounds(round_before + 2)
    assert long_line.startswith(b"HTTP/1.1 414 ")
    assert long_head.startswith(b"HTTP/1.1 431 ")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert missing[0] == 404 and posted[0] == 405
    assert code == 200, "the server answers again once the slow clients are gone"
    dropped = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text.decode())
               if f.name == "loraswarm_http_dropped" for s in f.samples}
    assert dropped["timeout"] >= 8 and dropped["busy"] >= 1


@pytest.mark.parametrize(("value", "listen"), [
    ("8080", "127.0.0.1:8080"), ("localhost:0", "127.0.0.1:0"), ("[::1]:9000", "[::1]:9000"),
    ("0.0.0.0:8080", "0.0.0.0:8080"),  # another host only when spelled out
])
def test_http_values(value: str, listen: str) -> None:
    assert http_listen(value) == listen


@pytest.mark.parametrize("value", ["nonsense", "example.com:80", "127.0.0.1:70000", ":80", "-1"])
def test_bad_http_value_is_a_one_line_error(tmp_path: Path, capsys, value: str) -> None:
    from peer.cli import build_parser

    argv = ["peer", "--data-dir", str(tmp_path), "--train", "t.jsonl", "--http", value]
    with pytest.raises(ConfigError, match="--http"):
        config_from_args(build_parser().parse_args(argv))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraswarm: error: --http") and err.count("\n") == 1
    assert "--http 8080" in err or "0..65535" in err, "the message names the fix"
    assert "Traceback" not in err


async def test_a_taken_port_is_a_one_line_error(tmp_path: Path) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        peer = http_peer(tmp_path, "p0", rounds=1, http=f"127.0.0.1:{port}")
        with trio.fail_after(60), pytest.raises(BaseExceptionGroup) as caught:
            await peer.run()
    errors = caught.value.split(ConfigError)[0]
    assert errors is not None
    error = errors.exceptions[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert f"--http 127.0.0.1:{port}: cannot listen there" in str(error)
    assert "pick another port, or 0" in str(error) and "\n" not in str(error)
