"""The network layer: libp2p host, pubsub announcements, adapter transfer, wire format."""
