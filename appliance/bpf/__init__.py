"""The privileged control plane for sk_lookup steering (``flyproxy bpf ...``).

Only ``loader`` imports bcc; the long-running proxy imports nothing from here.
"""

from pathlib import Path

DEFAULT_PIN_DIR = "/sys/fs/bpf/flyproxy"
SOURCE = Path(__file__).resolve().parent / "steer.c"  # package data (bpf/steer.c in the tree)
