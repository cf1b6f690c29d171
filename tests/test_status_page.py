"""The status page (``GET /`` on the metrics address): what a running proxy shows there,
over HTTP and in a real browser (Debian's headless chromium: a screenshot, the DOM it
rendered, its console), single process and with workers; and the renderer alone, where
any text can be put in (escaping, every target state, rates).
"""

from __future__ import annotations

import http.client
import json
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from appliance import statuspage
from appliance.metrics import Metrics
from helpers import connect, dead_port, free_ports, read_line, wait_until

MODES = pytest.mark.parametrize("mode", [(), ("--workers", "2")], ids=["single", "workers"])
WINDOW = (1000, 800)  # the browser's window, and so the screenshot's size
BROWSER_TIMEOUT_S = 60
APPS = "per app (bytes in: from clients, out: to clients)"  # the apps table's caption
VOID = {"meta", "link", "br", "hr", "img", "input", "col", "wbr", "area", "base", "source"}


# -- reading a page ------------------------------------------------------------------------

class Page(HTMLParser):
    """A page's tables ({caption: [[cell text, ...], ...]}) and text; raises on a tag
    closed out of order, or left open (the page is written as well-formed HTML5)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: set[str] = set()
        self.text = ""
        self.doctype = ""
        self._open: list[str] = []
        self._caption = self._cell = None
        self._rows: list[list[str]] = []
        self.feed(html)
        self.close()
        assert not self._open, f"left open: {self._open}"

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.add(tag)
        if tag not in VOID:
            self._open.append(tag)
        if tag == "table":
            self._caption, self._rows = "", []
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag) -> None:
        assert self._open and self._open[-1] == tag, f"</{tag}> closes {self._open[-1:]}"
        self._open.pop()
        if tag in ("td", "th"):
            self._rows[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self.tables[self._caption] = self._rows

    def handle_data(self, data) -> None:
        self.text += data
        if self._cell is not None:
            self._cell += data
        elif self._open and self._open[-1] == "caption":
            self._caption += data

    def rows(self, caption: str) -> dict[str, dict[str, str]]:
        """A table's rows by their first cell, each {column header: text}."""
        head, *body = self.tables[caption]
        return {row[0]: dict(zip(head, row)) for row in body}


def fetch(port: int, path: str = "/") -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # (never a proxy)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


# -- a running proxy -----------------------------------------------------------------------

def serve(tmp_path: Path, start_proxy, make_backend, mode) -> dict:
    """A proxy with app "web" (a live target and a dead one, actively checked) and app
    "edge" (one dead target, not checked), after bytes through web and a connection
    edge's target refused; returns what the test looks for."""
    live = make_backend("live")
    web_port, web_port2, edge_port, metrics_port = free_ports(4)
    dead, dead_edge = f"127.0.0.1:{dead_port()}", f"127.0.0.1:{dead_port()}"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Apps": [
        {"Name": "web", "Ports": [web_port, web_port2], "Targets": [live.address, dead],
         "HealthCheck": {"Interval": 0.2, "Rise": 1, "Fall": 1}},
        {"Name": "edge", "Ports": [edge_port], "Targets": [dead_edge]}]}))
    proxy = start_proxy(config, "--metrics", f"127.0.0.1:{metrics_port}", *mode)
    wait_until(lambda: Page(fetch(metrics_port)[2]).rows("web: targets")[dead]["state"]
               == "down", "the checks hold web's dead target down")
    with connect(web_port) as s:  # (the checks hold the dead one down: live is tried first)
        assert read_line(s) == b"live"
        s.sendall(b"ping\n")
        assert read_line(s) == b"ping"
    with connect(edge_port) as s:
        assert s.recv(100) == b""  # its only target refused: closed
    return {"proxy": proxy, "config": config, "port": metrics_port, "live": live.address,
            "dead": dead, "dead_edge": dead_edge, "ports": f"{web_port} {web_port2}"}


def shown(port: int) -> Page:
    """The page, once it counts the connection through web (counted when it closes) and
    shows edge's target ejected."""
    def ready():
        page = Page(fetch(port)[2])
        web = page.rows(APPS)["web"]
        return page if "ejected" in page.text and web["bytes in"] == "5 B" else None
    return wait_until(ready, "the page shows web's bytes and edge's target ejected")


@MODES
def test_the_page_shows_every_app_its_targets_states_counts_and_the_last_reload(
        tmp_path, start_proxy, make_backend, mode):
    p = serve(tmp_path, start_proxy, make_backend, mode)
    status, headers, body = fetch(p["port"])
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Refresh"] == str(statuspage.REFRESH_S)
    assert "default-src 'none'" in headers["Content-Security-Policy"]  # no script runs
    page = shown(p["port"])
    assert page.doctype.lower() == "doctype html" and "script" not in page.tags
    apps = page.rows(APPS)
    assert set(apps) == {"web", "edge"}
    assert apps["web"]["ports"] == p["ports"]
    assert int(apps["web"]["accepted"]) == 1 and apps["web"]["bytes in"] == "5 B"
    assert int(apps["edge"]["no target up"]) == 1
    web = page.rows("web: targets")
    assert web[p["live"]]["state"] == "up"  # (status.target_state: up needs no reason)
    assert web[p["dead"]]["state"] == "down" and "refused" in web[p["dead"]]["reason"]
    assert int(web[p["live"]]["connects"]) == 1
    edge = page.rows("edge: targets")
    assert edge[p["dead_edge"]]["state"] == "ejected"
    assert "refused" in edge[p["dead_edge"]]["reason"]
    assert "generation 1" in page.text and "none since the proxy started" in page.text
    if mode:
        workers = page.rows("workers (0 restarts)")
        assert [w["state"] for w in workers.values()] == ["ready", "ready"]
        assert page.rows("worker generations")["1"]["state"] == "serving"
    else:
        assert f"pid {p['proxy'].pid}" in page.text

    p["proxy"].reload()  # the same file: a new generation
    text = Page(fetch(p["port"])[2]).text
    assert "generation 2" in text and "last reload: ok at" in text
    p["config"].write_text("{not json")
    p["proxy"].reload()
    text = Page(fetch(p["port"])[2]).text
    assert "last reload: FAILED at" in text and str(p["config"]) in text
    assert "generation 2" in text  # still serving it


# -- a real browser ------------------------------------------------------------------------

def browse(url: str, tmp_path: Path) -> tuple[bytes, str, list[str]]:
    """Headless chromium loads ``url``: (its screenshot as PNG, the DOM it rendered, its
    console lines)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs it)")
    shot = tmp_path / "page.png"
    out = subprocess.run(
        [chromium, "--headless",
         # Chromium's sandbox refuses to start as root (the tests run as root); tests only,
         # and the only page it loads is ours, from loopback or the test's own file
         "--no-sandbox",
         "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync",
         # no name resolves: nothing it might want to fetch can leave loopback
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--enable-logging=stderr", f"--screenshot={shot}",
         f"--window-size={WINDOW[0]},{WINDOW[1]}", "--dump-dom", url],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return shot.read_bytes(), out.stdout, console


def pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB or RGBA PNG
    (what chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", png[pos + 8:pos + 8 + n])
        elif kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and not interlace, header
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride if kind else 0):  # undo the row's filter (PNG spec, 9)
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    if bpp == 4:  # RGBA: the alpha dropped
        rows = [bytes(b for i, b in enumerate(r) if i % 4 != 3) for r in rows]
    return width, height, rows


def colours(rows: list[bytes]) -> dict[tuple[int, int, int], int]:
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows:
        for i in range(0, len(row), 3):
            rgb = (row[i], row[i + 1], row[i + 2])
            counts[rgb] = counts.get(rgb, 0) + 1
    return counts


def near(counts: dict, rgb: tuple[int, int, int]) -> int:
    """Pixels within 3 of ``rgb`` in every channel."""
    return sum(n for c, n in counts.items() if all(abs(x - y) <= 3 for x, y in zip(c, rgb)))


@MODES
def test_a_browser_renders_the_page_without_console_errors(
        tmp_path, start_proxy, make_backend, mode):
    p = serve(tmp_path, start_proxy, make_backend, mode)
    shown(p["port"])
    png, dom, console = browse(f"http://127.0.0.1:{p['port']}/", tmp_path)
    assert console == []
    for name in ("web", "edge", p["live"], p["dead"], p["dead_edge"]):
        assert name in dom
    width, height, rows = pixels(png)
    assert (width, height) == WINDOW
    counts = colours(rows)
    assert max(counts.values()) < 0.98 * width * height  # not blank
    assert near(counts, (0, 0, 0)) + near(counts, (0x22, 0x22, 0x22)) > 200  # text
    # the style applied: a state cell each of up (green), down (red), ejected (amber)
    for rgb in ((0xcf, 0xec, 0xcf), (0xf6, 0xc9, 0xc4), (0xfb, 0xe3, 0xb4)):
        assert near(counts, rgb) > 100, rgb


def test_the_browser_check_sees_a_console_error(tmp_path):
    """The harness can fail: a page whose script throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>x</title>"
                   "</head><body>x<script>no_such_function()</script></body></html>")
    _, _, console = browse(bad.as_uri(), tmp_path)
    assert any("Uncaught ReferenceError" in line for line in console), console


# -- the renderer alone ----------------------------------------------------------------------

def status(**over) -> dict:
    """A single process's status dict, as Server.status() gives it."""
    return {"config": "/etc/flyproxy/config.json", "digest": "ab" * 32, "generation": 3,
            "mode": "per-port", "pid": 1234, "active": 2, "accepting": True,
            "apps": [{"name": "web", "ports": [80, 8080], "active": 2, "held_down": 0,
                      "max_connections": None, "balance": "random", "proxy_protocol": False,
                      "targets": [{"target": "10.0.0.1:80", "health": "ok"}]}],
            "names": [], "fds": {"open": 12, "limit": 1024}, "last_reload": None, **over}


def test_every_text_from_the_config_or_the_network_is_escaped():
    evil = "<script>alert(1)</script>"
    page = statuspage.render(status(
        config=f"/tmp/{evil}.json",
        apps=[{"name": "web", "ports": [80], "active": 0, "targets": [
            {"target": f"{evil}:80", "health": f"ejected: {evil} 1s ago"}]}],
        names=[{"name": evil, "state": "down", "addresses": [], "age_s": None,
                "ttl_s": 30, "source": "dns", "error": f"<img src=x onerror={evil}>"}],
        last_reload={"ok": False, "at": 1.7e9, "message": f"{evil} & \"quotes\""}),
        Metrics()).decode()
    assert "<script" not in page and "<img" not in page
    parsed = Page(page)
    assert parsed.tags.isdisjoint({"script", "img", "iframe", "object"})
    assert f"{evil}:80" in parsed.rows("web: targets")  # shown as text, whole
    assert f"{evil} & \"quotes\"" in parsed.text


def test_the_page_is_well_formed_html5():
    page = Page(statuspage.render(status(), Metrics()).decode())
    assert page.doctype.lower() == "doctype html"
    assert {"html", "head", "meta", "title", "body", "table"} <= page.tags


@pytest.mark.parametrize("target, tried, state, reason", [
    ({"target": "10.0.0.1:80", "health": "ok"}, 0, "unknown", "never tried"),
    ({"target": "10.0.0.1:80", "health": "ok"}, 4, "up", "last connect succeeded"),
    ({"target": "10.0.0.1:80", "health": "ejected: refused 2s ago"}, 1, "ejected",
     "connect refused 2s ago"),
    ({"target": "10.0.0.1:80", "health": "worker 0: ok; worker 1: ejected: timeout 1s ago"},
     1, "ejected", "worker 1: ejected: timeout"),
    ({"target": "10.0.0.1:80", "health": "failed: refused 30s ago"}, 1, "failed",
     "last connect failed: refused 30s ago"),
    ({"target": "10.0.0.1:80", "health": "ok",
      "check": {"state": "down", "since": 1.7e9, "error": "refused", "checks": 5}}, 0, "down",
     "checks: refused"),
    ({"target": "10.0.0.1:80", "health": "ok",
      "check": {"state": "up", "since": 1.7e9, "error": "", "checks": 5}}, 0, "up",
     "checks pass"),
    ({"target": "db.example:5432", "health": "ok"}, 0, "no address", "DNS: NXDOMAIN"),
    ({"target": "new.example:5432", "health": "ok"}, 0, "unknown", "first answer"),
    ({"target": "10.0.0.1:80", "health": "ok", "state": "drained", "reason": "told so"}, 0,
     "drained", "told so"),
])
def test_a_targets_state_and_reason(target, tried, state, reason):
    names = {"db.example": {"name": "db.example", "state": "down", "addresses": [],
                            "error": "NXDOMAIN"},
             "new.example": {"name": "new.example", "state": "pending", "addresses": [],
                             "error": ""}}
    got_state, got_reason = statuspage.target_state(target, names, tried, 1.7e9 + 5)
    assert got_state == state and reason in got_reason


def test_rates_come_from_two_samples_kept_in_the_process():
    rates = statuspage.Rates()
    assert rates.update(100.0, {("web", "accepted"): 10}) == ({}, 0.0)  # first view: none
    assert rates.update(100.5, {("web", "accepted"): 11}) == ({}, 0.0)  # too soon after
    got, window = rates.update(104.0, {("web", "accepted"): 30, ("web", "in"): 800})
    assert window == 4.0 and got == {("web", "accepted"): 5.0, ("web", "in"): 200.0}
    got, _ = rates.update(106.0, {("web", "accepted"): 2})  # a worker gone with its counts
    assert got[("web", "accepted")] == 0
    for t in range(107, 300):  # a page viewed every second for minutes keeps a minute
        rates.update(float(t), {})
    assert len(rates.samples) <= statuspage.WINDOW_S / statuspage.MIN_GAP_S + 2


def test_sizes():
    assert [statuspage.size(n) for n in (0, 1023, 1536, 5 << 30, 3 << 40)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 GiB", "3.0 TiB"]


def test_the_apps_table_shows_counts_and_rates():
    counts = Metrics()
    counts.accepted_n["web"] = 42
    counts.bytes_n[("web", "10.0.0.1:80", "in")] = 3 * 1024 * 1024
    counts.all_down_n["web"] = 7
    page = Page(statuspage.render(status(), counts, {("web", "accepted"): 1.5}, 12.0).decode())
    row = page.rows(APPS)["web"]
    assert row["accepted"] == "42" and row["accepted/s"] == "1.50/s"
    assert row["bytes in"] == "3.0 MiB" and row["no target up"] == "7"
    assert row["out/s"] == "0 B/s" and "per second over the last 12 s" in page.text
    first = Page(statuspage.render(status(), counts).decode())  # no rates yet
    assert first.rows(APPS)["web"]["accepted/s"] == "-" and "from the next view" in first.text
    assert "version " + statuspage.__version__ in page.text
