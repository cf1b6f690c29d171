"""flyproxy: a small L4 (raw TCP) proxy appliance with sk_lookup BPF steering."""

__version__ = "0.3.0"
