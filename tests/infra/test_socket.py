"""The one listener systemd holds."""


def test_listener_is_dual_stack_on_8999(host):
    assert host.socket("tcp://:::8999").is_listening


def test_only_systemd_and_the_proxy_hold_it(host):
    props = host.service("flyproxy.socket").systemd_properties
    assert props["Listen"].startswith("[::]:8999")
    assert props["BindIPv6Only"] == "both"
