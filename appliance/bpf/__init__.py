"""The privileged control plane for sk_lookup steering (``flyproxy bpf ...``).

Only ``loader`` imports bcc; the long-running proxy imports nothing from here.
"""
