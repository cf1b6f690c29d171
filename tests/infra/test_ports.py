"""Every configured port answers through the proxy (steered by BPF to the one socket)."""

import pytest

from conftest import configured_ports, echo_through


@pytest.mark.parametrize("port", configured_ports())
def test_port_echoes_through_the_proxy(host, port):
    assert echo_through(host, port, f"hello {port}\\n") == f"hello {port}"
