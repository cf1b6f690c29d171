"""The process around the data plane: server (one process), supervisor and workers,
the control socket, systemd (sd_notify, LISTEN_FDS), launch (from serve's arguments).
"""
