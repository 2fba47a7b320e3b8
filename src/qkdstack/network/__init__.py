"""The QKD network: topology, routing and trusted-node key relay between the sites' KMEs (docs/network.md)."""
