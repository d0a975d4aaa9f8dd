"""Binding what a fetch delivers to what its server signed.

A transfer header carries the serving peer's signature over (swarm, peer, version, samples,
nbytes, digest, body_digest): a merge's age and weight come from the peer's signed word, never
from an unsigned field. `SignedOffers` checks each header before a byte of the body is read, and
remembers per peer the highest version it signed, so that it cannot roll back or sign two
adapters for one version (showing each client a different one).
"""

from __future__ import annotations

from typing import Any

from libp2p.peer.id import ID

from gossip.errors import TransferError
from gossip.wire import Announcement, FetchHeader

__all__ = ["SignedOffers"]


class SignedOffers:
    """Per peer, the highest version it signed in a transfer header and that adapter's digest.

    Bounded by the membership view: the node calls `forget` when a peer leaves it.
    """

    def __init__(self, host: Any) -> None:
        self._host = host
        self._signed: dict[str, tuple[int, bytes]] = {}

    def forget(self, peer: str) -> None:
        self._signed.pop(peer, None)

    def check(self, announcement: Announcement, header: FetchHeader,
              max_bytes: int | None) -> None:
        """Bind what a fetch delivers to what its server signed, before reading the body.

        1. The header is signed by the serving peer's own key: version (so the merge's age),
           samples, size and digest are its signed word, not an unsigned field.
        2. The body is no larger than an update of our swarm can be (`max_bytes`: a keyframe
           of our shapes plus framing; None: any up to the node's cap).
        3. It does not go back behind what the peer signed before (its announcement or an
           earlier header), nor sign two different adapters for one version (equivocation:
           showing each client another adapter).
        """
        peer = announcement.peer
        key = _public_key(self._host, peer)
        if key is None or not _verifies(key, header.signed_part(peer), header.signature):
            raise TransferError("bad_signature", f"{peer}'s transfer header is not signed by it")
        if max_bytes is not None and not 0 < header.nbytes <= max_bytes:
            raise TransferError("size_mismatch", f"{peer} offers {header.nbytes} bytes; an "
                                f"update of this swarm has at most {max_bytes}")
        signed = [(announcement.version, announcement.digest, announcement.samples)]
        if peer in self._signed:
            signed.append((*self._signed[peer], -1))
        for version, digest_, samples in signed:
            if header.version < version:
                raise TransferError("header_mismatch", f"{peer} serves version {header.version} "
                                    f"after signing version {version}")
            if header.version == version and header.digest != digest_:
                raise TransferError("equivocation", f"{peer} signed two adapters for version "
                                    f"{version}")
            if header.version == version and samples >= 0 and header.samples != samples:
                raise TransferError("header_mismatch", f"{peer} signed {samples} samples for "
                                    f"version {version} but its header says {header.samples}")
        self._signed[peer] = (header.version, header.digest)


def _public_key(host: Any, peer: str) -> Any:
    """The key `peer`'s id embeds (Ed25519 ids do), else the one its connection proved."""
    pid = ID.from_base58(peer)
    key = pid.extract_public_key()
    if key is not None:
        return key
    try:
        return host.get_peerstore().pubkey(pid)
    except Exception:  # PeerStoreError: no connection ever proved a key for it
        return None


def _verifies(key: Any, data: bytes, signature: bytes) -> bool:
    try:
        return bool(key.verify(data, signature))
    except Exception:  # a malformed signature raises inside the crypto library
        return False
