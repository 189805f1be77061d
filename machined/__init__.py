"""machined: a system-container manager in the line of LXC and systemd-nspawn."""

__version__ = "0.1.0"
