"""The benchmark's arithmetic (`make bench` itself takes 20 minutes and is not part of the
suite): percentiles, the round-by-round count against systemd-socket-proxyd, the report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import bench  # noqa: E402


def test_percentile_ends_and_middle():
    values = [float(v) for v in range(1, 101)]  # 1..100, sorted
    assert bench.percentile(values, 0.5) == 51
    assert bench.percentile(values, 0.99) == 100
    assert bench.percentile(values, 1.0) == 100  # never past the end
    assert bench.percentile([7.0], 0.99) == 7


def rounds():
    rival = [{"round": 1, "conn_per_s": 100, "p99_us": 200},
             {"round": 2, "conn_per_s": 100, "p99_us": 200},
             {"round": 3, "conn_per_s": 100, "p99_us": 200}]
    # flyproxy lost round 2; round 3 is a tie (not ahead)
    ours = [{"round": 1, "conn_per_s": 150, "p99_us": 250},
            {"round": 3, "conn_per_s": 100, "p99_us": 150}]
    return {bench.RIVAL: rival, "flyproxy": ours}


def test_rounds_ahead_pairs_rounds_and_knows_which_way_is_better():
    r = rounds()
    assert bench.rounds_ahead(r, "flyproxy", "conn_per_s", higher=True) == (1, 2)
    assert bench.rounds_ahead(r, "flyproxy", "p99_us", higher=False) == (1, 2)


def test_rounds_ahead_skips_rounds_the_rival_lost():
    r = rounds()
    del r[bench.RIVAL][0]
    assert bench.rounds_ahead(r, "flyproxy", "conn_per_s", higher=True) == (0, 1)


@pytest.mark.parametrize("with_rival", [True, False])
def test_report_has_the_round_by_round_table_only_with_the_rival(with_rival):
    r = rounds()
    if not with_rival:
        del r[bench.RIVAL]
    summary = {name: {"conn_per_s": 100.0} for name in r}
    summary["HAProxy"] = {"conn_per_s": 120.0}
    meta = {"date": "today", "cpus": 2, "kernel": "k", "rounds": 3, "seconds": 4,
            "idle_connections": 10, "duration_s": 1, "failed": []}
    text = bench.report(summary, meta, r)
    assert ("| new connections/s (wrk, Connection: close) | 1 of 2 |" in text) == with_rival
    assert "| new connections/s (wrk, Connection: close) |" in text  # the main table


def test_the_scale_phase_alone_replaces_only_the_scale_figures(tmp_path, monkeypatch):
    """BENCH_ONLY=scale: the rounds' figures stay, the scale phase's (and its failures)
    are replaced, and the report shows both."""
    import json
    meta = {"date": "today", "cpus": 2, "kernel": "k", "rounds": 3, "seconds": 4,
            "idle_connections": 10, "duration_s": 1,
            "failed": ["HAProxy, round 2: x", "flyproxy, scale phase: old failure"]}
    summary = {"HAProxy": {"conn_per_s": 120.0}, "flyproxy": {"conn_per_s": 100.0}}
    (tmp_path / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "rounds": rounds(), "scale": {"flyproxy": {}}}))
    monkeypatch.setattr(bench, "OUT", tmp_path)
    figures = {"connections": 10, "opened": 10, "open_errors": {}, "held": 10,
               "open_per_s": 70.0, "cpu_us_per_conn": 140.0, "rss_kib_per_conn": 1.5,
               "kernel_kib_per_conn": 15.0, "reload_s": 0.3, "failed_on_reload": 0,
               "stop_s": 6.0, "start_s": 1.0, "outlived_restart": 0,
               "during_restart": {"tried": 5, "ok": 5, "errors": {}}, "reopened": 10,
               "reopen_errors": {}, "reopen_per_s": 70.0, "upgrade_s": 2.0,
               "held_at_upgrade": 10, "outlived_upgrade": 9,
               "during_upgrade": {"tried": 50, "ok": 49, "errors": {"ECONNRESET": 1}},
               "old_gone_s": 1.0}
    text = bench.merge_scale({"flyproxy BPF": figures}, ["HAProxy, scale phase: new"], 42)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == summary and saved["rounds"] == rounds()
    assert saved["scale"] == {"flyproxy BPF": figures}
    assert saved["meta"]["failed"] == ["HAProxy, round 2: x", "HAProxy, scale phase: new"]
    assert saved["meta"]["scale_run"]["duration_s"] == 42
    assert (tmp_path / "results.md").read_text() == text
    assert "| new connections/s (wrk, Connection: close) |" in text  # the rounds' table
    assert "| held connections that outlived the upgrade | 9 of 10 |" in text
    assert "| new connections during the upgrade (failed) | 50 (1 ECONNRESET) |" in text
    assert "ran on its own" in text


def test_the_access_log_phase_alone_adds_its_table_with_ratios_to_the_log_off(tmp_path,
                                                                              monkeypatch):
    """BENCH_ONLY=access-log: its figures are added, the rounds' and the scale phase's stay,
    and the table gives each variant's rate and CPU as ratios to the access log off."""
    import json
    meta = {"date": "today", "cpus": 2, "kernel": "k", "rounds": 3, "seconds": 4,
            "idle_connections": 10, "duration_s": 1,
            "failed": ["flyproxy, access log phase: old", "flyproxy, scale phase: kept"]}
    summary = {"HAProxy": {"conn_per_s": 120.0}, "flyproxy": {"conn_per_s": 100.0}}
    (tmp_path / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "rounds": rounds(), "scale": {}}))
    monkeypatch.setattr(bench, "OUT", tmp_path)
    figures = {"conn_per_s_on": 800.0, "cpu_us_per_conn_on": 150.0, "lines_per_conn_on": 1.0,
               "conn_per_s_sampled": 950.0, "cpu_us_per_conn_sampled": 110.0,
               "lines_per_conn_sampled": 0.1, "conn_per_s_off": 1000.0,
               "cpu_us_per_conn_off": 100.0, "lines_per_conn_off": 0.0}
    text = bench.merge_phase("access-log", figures, [], 99)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["access_log"] == figures and saved["summary"] == summary
    assert saved["meta"]["failed"] == ["flyproxy, scale phase: kept"]
    assert "| on (the default: a line per connection) | 800 (0.80x) | 150 (1.50x) | 1.00 |" \
        in text
    assert "| sampled (--conn-log-sample 10) | 950 (0.95x) | 110 (1.10x) | 0.10 |" in text
    assert "| off (--conn-log-level off) | 1,000 (1.00x) | 100 (1.00x) | 0.00 |" in text
    assert "ran on its own" in text and "in 99 s" in text
    assert "| new connections/s (wrk, Connection: close) |" in text  # the rounds' table
    assert "Access log" not in bench.report(summary, meta, rounds())  # (no figures: none)


# -- trace_latency.py's arithmetic (the trace itself needs bcc and root; run by hand) ------

def test_a_round_trip_is_split_by_the_cpus_its_events_ran_on():
    import trace_latency as tl
    us = 1000  # ns

    def ev(t_us: int, cpu: int) -> tl.Event:  # the proxy woken on ``cpu`` at ``t_us``
        return tl.Event(ts=t_us * us, cpu=cpu, who=1, tid=7, kind=-1, arg=cpu)

    marks = [(0, 60 * us), (100 * us, 250 * us), (300 * us, 340 * us)]
    events = [ev(10, 0), ev(50, 0),   # the first stays on CPU 0
              ev(90, 1),              # before the second starts: not its event
              ev(110, 0), ev(200, 1),  # the second crosses to CPU 1
              ev(400, 1)]             # after the third ends: the third has none
    kinds = tl.split_by_cpu(marks, events)
    assert kinds == {"one CPU": [60.0, 40.0], "crossed CPUs": [150.0]}
    text = tl.summary(marks, events, slow_us=100)
    assert "crossed CPUs: 1 (33 %)" in text and "over 100 us: 1" in text
    assert "one CPU: 2 (67 %)" in text
    shown = tl.timeline(marks[1], events)
    assert shown.splitlines()[0] == "round trip of 150 us (times in us from the client's send):"
    assert "CPU 1  proxy" in shown and "woken (to CPU 1)" in shown
    assert "400.0" not in shown  # events after the round trip are not its own
