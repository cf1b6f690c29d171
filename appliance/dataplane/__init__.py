"""The data plane: the long-running, unprivileged proxy (asyncio, one epoll set).

engine (the epoll set), loop (asyncio integration), listeners, relay and tunnel (a
connection), balancer (target order), resolver and cares (host names), proxy (routing,
reload). Never imports appliance.bpf.
"""
