"""Every configured port answers through the proxy (steered by BPF to the one socket)."""

import pytest

from conftest import configured_ports


@pytest.mark.parametrize("port", configured_ports())
def test_port_echoes_through_the_proxy(host, port):
    assert host.check_output(f"printf 'hello {port}\\n' | nc -N -w 5 127.0.0.1 {port}") == f"hello {port}"
