"""The sk_lookup program: attached, pinned, with the config's ports and the listener."""

import json


def status(host) -> dict:
    return json.loads(host.check_output("flyproxy bpf status --json"))


def test_program_is_pinned_and_attached(host):
    for name in ("prog", "link", "flyproxy_ports", "flyproxy_listener", "flyproxy_counters",
                 "flyproxy_lanes"):
        assert host.file(f"/sys/fs/bpf/flyproxy/{name}").exists
    links = json.loads(host.check_output("bpftool --json link show"))
    ours = [l for l in links if l["id"] == status(host)["link"]["id"]]
    assert ours and ours[0]["attach_type"] == "sk_lookup"


def test_port_map_equals_the_config(host, deployed_config):
    want = {str(p): i for i, app in enumerate(deployed_config["Apps"]) for p in app["Ports"]}
    assert status(host)["ports"] == want


def test_listener_is_registered(host):
    assert status(host)["listener_cookie"] is not None


def test_every_lane_has_a_workers_group(host):
    """ExecStartPost's `register --spread`: each of the 16 lanes holds a member of a workers'
    group (with one worker too: a supervisor always runs), so each app has its own queue."""
    lanes = status(host)["lane_cookies"]
    assert len(lanes) == 16 and len(set(lanes)) == 16
