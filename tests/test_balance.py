"""Balancing per app: "random" (the default) and "least-connections" (power of two
random choices by open connections), and the order health gives the candidates."""

from __future__ import annotations

import json
import random

from appliance.config import Target
from appliance.dataplane import balancer
from helpers import connect, free_ports, read_line

A, B, C, D = (Target("127.0.0.1", p) for p in (1001, 1002, 1003, 1004))


def spread_with_uneven_lifetimes(least_connections: bool, seed: int) -> float:
    """One connection a step for 3,000 steps over 4 targets; one in ten lives 1,000 steps,
    the rest 1 to 5. The mean gap between the busiest and the idlest target over the last
    2,000 steps (once the long-lived ones have piled up)."""
    rng = random.Random(seed)
    random.seed(seed)  # the balancer's own draws
    health = balancer.Health()
    targets = [A, B, C, D]
    load = {t: 0 for t in targets}
    ends: dict[int, list[Target]] = {}
    gaps = []
    for step in range(3000):
        for t in ends.pop(step, []):
            load[t] -= 1
        chosen = health.order(targets, None, load.get if least_connections else None)[0]
        load[chosen] += 1
        life = 1000 if rng.random() < 0.1 else rng.randint(1, 5)
        ends.setdefault(step + life, []).append(chosen)
        if step >= 1000:
            gaps.append(max(load.values()) - min(load.values()))
    return sum(gaps) / len(gaps)


def test_least_connections_spreads_uneven_lifetimes_where_random_does_not():
    for seed in range(3):
        random_gap = spread_with_uneven_lifetimes(False, seed)
        least_gap = spread_with_uneven_lifetimes(True, seed)
        assert least_gap <= 3, (seed, least_gap)
        assert random_gap >= 3 * least_gap, (seed, random_gap, least_gap)


def test_the_first_pick_is_the_less_loaded_of_two_and_every_target_is_tried_once():
    load = {A: 5, B: 0, C: 5, D: 5}.get
    for _ in range(200):
        order = balancer.least_loaded_order([A, B, C, D], load)
        assert sorted(order) == [A, B, C, D]
        # B (idle) is first whenever it was one of the two drawn: never second to a busy one
        if B in order[:2]:
            assert order[0] == B


def test_checked_down_targets_go_last_and_are_still_tried_when_all_are_down():
    health = balancer.Health()
    for _ in range(50):
        order = health.order([A, B, C], frozenset({A, C}))
        assert order[0] == B and sorted(order[1:]) == [A, C]
    order = health.order([A, B, C], frozenset({A, B, C}))
    assert sorted(order) == [A, B, C]  # availability before opinion
    health.failure(B, "refused")  # passive: a failed connect counts too
    assert health.order([A, B, C], frozenset({A})) == [C, B, A]


def test_least_connections_through_the_proxy_evens_out_long_lived_connections(
        tmp_path, start_proxy, make_backend):
    """Two targets; ten connections held, then the five on one target close, then ten more
    open: least-connections fills the emptied target first (random would not look)."""
    a, b = make_backend("a"), make_backend("b")
    port = free_ports(1)[0]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Apps": [{"Name": "app", "Ports": [port], "Targets": [
        a.address, b.address], "Balance": "least-connections"}]}))
    start_proxy(config)
    held: dict[str, list] = {"a": [], "b": []}

    def open_one():
        s = connect(port)
        held[read_line(s).decode()].append(s)

    for _ in range(10):
        open_one()
    assert (len(held["a"]), len(held["b"])) == (5, 5)
    for s in held.pop("a"):
        s.close()
    held["a"] = []
    for _ in range(10):
        open_one()  # a has 0 (once the proxy has seen the closes), b has 5
    assert abs(len(held["a"]) - len(held["b"])) <= 1, {k: len(v) for k, v in held.items()}
    for sockets in held.values():
        for s in sockets:
            s.close()
