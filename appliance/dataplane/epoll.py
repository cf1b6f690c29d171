"""The epoll event bits and the size of one wait's batch: constants only, shared by the
engine, its loop adapter and the relay (a leaf: it imports nothing of ours)."""

from __future__ import annotations

import select

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR, EPOLLHUP, EPOLLRDHUP = select.EPOLLERR, select.EPOLLHUP, select.EPOLLRDHUP
MAX_EVENTS = 512  # per wait; the rest come in the next one (the epoll fd stays readable)
