"""The metrics follow Prometheus' conventions: process_* for the service, *_timestamp_seconds
for Unix times, help text for every family, every app's series from the start, passive
ejection exported, the worker generation where it tells workers apart."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from helpers import (dead_port, free_ports, greet, sample, scrape, status_of as status, wait_until,
                     write_config)


def config(path, port: int, live: str, down_port: int, dead: str):
    """App "a" (a live target, health-checked) and app "down" (a dead target)."""
    path.write_text(json.dumps({"Apps": [
        {"Name": "a", "Ports": [port], "Targets": [live], "MaxConnections": 100,
         "HealthCheck": {"Interval": 60}},
        {"Name": "down", "Ports": [down_port], "Targets": [dead]}]}))
    return path


@pytest.fixture(params=[1, 2], ids=["single", "workers"])
def proxied(request, tmp_path, start_proxy, make_backend):
    """A proxy (one process, or a supervisor and 2 workers) with metrics; nothing connected
    yet: (proxy, metrics port, app port, live target, down port, dead target)."""
    live = make_backend("live")
    port, down_port, metrics_port = free_ports(3)
    dead = f"127.0.0.1:{dead_port()}"
    cfg = config(tmp_path / "config.json", port, live.address, down_port, dead)
    proxy = start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}", "--workers",
                        str(request.param), "--eject", "2")
    return proxy, metrics_port, port, live.address, down_port, dead


def families(text: str) -> dict[str, str]:
    """Every family's name -> its help text."""
    return dict(line[len("# HELP "):].split(" ", 1) for line in text.splitlines()
                if line.startswith("# HELP "))


def test_every_metric_has_a_help_text_that_says_what_it_counts(proxied):
    proxy, metrics_port, *_ = proxied
    helps = families(scrape(metrics_port))
    assert "flyproxy_dns_state" in helps and "process_cpu_seconds_total" in helps
    for name, text in helps.items():
        assert len(text.split()) >= 3 and "(1)" not in text, (name, text)


def test_unix_times_are_named_timestamp_seconds(proxied):
    proxy, metrics_port, port, live, *_ = proxied
    text = scrape(metrics_port)
    since = sample(text, "flyproxy_target_state_since_timestamp_seconds", app="a", target=live)
    assert abs(since - time.time()) < 3600  # a Unix time (the check started just now)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
        if 1e9 < value < 1e10 and not name.endswith("_bytes"):  # looks like a Unix time
            assert name.endswith("_timestamp_seconds") or name == "process_start_time_seconds", line


def test_every_apps_series_is_there_at_zero_before_its_first_connection(proxied):
    proxy, metrics_port, port, live, down_port, dead = proxied
    text = scrape(metrics_port)
    for app, target in (("a", live), ("down", dead)):
        for name in ("flyproxy_connections_accepted_total", "flyproxy_connections_active",
                     "flyproxy_retries_total", "flyproxy_all_targets_down_total"):
            assert sample(text, name, app=app) == 0
        assert sample(text, "flyproxy_connections_closed_total", app=app, end="closed") == 0
        for name in ("flyproxy_connect_attempts_total", "flyproxy_connect_seconds_count",
                     "flyproxy_target_ejected"):
            assert sample(text, name, app=app, target=target) == 0
        for direction in ("in", "out"):
            assert sample(text, "flyproxy_bytes_total", app=app, target=target,
                          direction=direction) == 0
    assert sample(text, "flyproxy_connections_rejected_total", app="a", reason="max_connections") == 0


def test_passive_ejection_is_exported_while_it_lasts(proxied):
    proxy, metrics_port, port, live, down_port, dead = proxied
    assert greet(down_port) == ""  # its only target refuses: ejected (--eject 2)
    text = scrape(metrics_port)
    assert sample(text, "flyproxy_target_ejected", app="down", target=dead) == 1
    assert sample(text, "flyproxy_target_ejected", app="a", target=live) == 0
    wait_until(lambda: sample(scrape(metrics_port), "flyproxy_target_ejected", app="down",
                              target=dead) == 0, "the ejection to end")


def test_process_metrics_describe_the_single_process(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address])})
    started = time.time()
    proxy = start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}")
    text = scrape(metrics_port)
    assert started - 2 <= sample(text, "process_start_time_seconds") <= time.time()
    assert sample(text, "process_cpu_seconds_total") > 0
    rss = sample(text, "process_resident_memory_bytes")
    assert 0.5 < rss / (proxy.rss_kib() * 1024) < 2
    assert sample(text, "process_max_fds") == sample(text, "flyproxy_max_fds")
    assert sample(text, "process_open_fds") > 0
    assert "flyproxy_worker_cpu_seconds_total" not in text  # no workers


def cpu_of(text: str, worker: int) -> float:
    return sample(text, "flyproxy_worker_cpu_seconds_total", worker=worker, generation=1)


def test_process_metrics_of_a_supervisor_add_its_workers_and_never_go_back(
        tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address])})
    control = str(tmp_path / "control.sock")
    proxy = start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}", "--workers", "2",
                        "--control", control)
    text = scrape(metrics_port)
    workers_rss = [sample(text, "flyproxy_worker_resident_memory_bytes", worker=i, generation=1)
                   for i in (0, 1)]
    assert sample(text, "process_resident_memory_bytes") > sum(workers_rss) > 0
    before = sample(text, "process_cpu_seconds_total")
    assert before >= cpu_of(text, 0) + cpu_of(text, 1) and cpu_of(text, 0) > 0
    os.kill(status(control)["workers"][0]["pid"], signal.SIGKILL)
    text = wait_until(lambda: (lambda t: sample(t, "flyproxy_worker_restarts_total") == 1
                               and sample(t, "flyproxy_workers") == 2 and t)(
                                   scrape(metrics_port)), "the killed worker replaced")
    # the killed worker's CPU stays counted: the total grew by at least its successor's
    after = sample(text, "process_cpu_seconds_total")
    assert after - before >= cpu_of(text, 0) > 0, (before, after)
