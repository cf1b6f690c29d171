"""The config file on the host."""


def test_config_file_owner_and_mode(host):
    f = host.file("/etc/flyproxy/config.json")
    assert f.user == "root" and f.group == "root"
    assert f.mode == 0o644  # readable by the proxy's dynamic user; writable by root only


def test_config_file_is_valid(host):
    assert host.run("flyproxy check -c /etc/flyproxy/config.json").rc == 0
