"""gatewayd: secure remote-access gateway daemon (HTTPS portal + reverse proxy, SSH tunnels)."""

__version__ = "0.1.0"
