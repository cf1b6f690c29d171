"""The status page: ``GET /`` on the metrics address, what an operator opens first (as
HAProxy's stats page). One small HTML5 page, no JavaScript; the browser loads it again
every REFRESH_S (the ``Refresh`` header, sent with it by metrics_http.py).

:func:`render` is pure: the status dict ``flyproxy status --json`` prints (Server.status(),
Supervisor.status()) and the metrics counters (a ``metrics.Metrics``: a single process's
own, or summed over the workers) in, HTML bytes out. Every text that comes from the config,
the network or the proxy goes through ``html.escape``. :class:`StatusPage` is what the
endpoint calls: it asks for both, and keeps the samples the rates are computed from.

Rates are per second, between two samples of the counters kept in this process: each page
served adds one (at most one per MIN_GAP_S), and a rate spans from the newest sample at
least WINDOW_S old (or the oldest kept) to now; the page says over how many seconds. The
first view has no rates yet (a dash).
"""

from __future__ import annotations

import collections
import html
import inspect
import time
from typing import Awaitable, Callable, Union

from . import __version__

REFRESH_S = 5  # the Refresh header: the browser loads the page again this often
WINDOW_S = 60.0  # rates span about this much (more when the page is seldom served)
MIN_GAP_S = 1.0  # at most one sample per this: a burst of views keeps few samples

STYLE = """
body { font: 14px/1.4 sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em; } h2 { font-size: 1.1em; margin: 1.2em 0 .3em; }
p { margin: .2em 0; } .dim { color: #666; }
table { border-collapse: collapse; margin: .3em 0 1em; }
th, td { border: 1px solid #bbb; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #e4e8ee; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: bold; padding: 2px 0; }
.up { background: #cfeccf; } .down, .failed, .no-address { background: #f6c9c4; }
.ejected, .draining, .FAILING { background: #fbe3b4; } .unknown, .starting { background: #eee; }
"""

Fetch = Callable[[], Union[Awaitable, object]]  # a sync or async getter


class Rates:
    """Per-second rates of growing totals, from the samples kept here (module doc)."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, dict]] = collections.deque()

    def __repr__(self) -> str:
        return f"<Rates samples={len(self.samples)}>"

    def update(self, now: float, totals: dict) -> tuple[dict, float]:
        """Add a sample (``now``: time.monotonic()); the rates since the oldest sample in
        the window, and the window's seconds (0.0, with no rates, on the first view)."""
        if not self.samples or now - self.samples[-1][0] >= MIN_GAP_S:
            self.samples.append((now, totals))
        while len(self.samples) > 2 and now - self.samples[1][0] >= WINDOW_S:
            self.samples.popleft()
        then, old = self.samples[0]
        window = now - then
        if window < MIN_GAP_S:
            return {}, 0.0
        # a worker that exited took its counts with it: a total may go back (never below 0)
        return {k: max(0, v - old.get(k, 0)) / window for k, v in totals.items()}, window


def totals(counts) -> dict:
    """The totals the page shows rates of: per app, connections accepted and bytes each way."""
    out: dict = {}
    for app, n in list(counts.accepted_n.items()):
        out[(app, "accepted")] = n
    for (app, _target, direction), n in list(counts.bytes_n.items()):
        out[(app, direction)] = out.get((app, direction), 0) + n
    return out


class StatusPage:
    """What the endpoint calls for ``GET /``: ``status()`` (the status dict) and
    ``counts()`` (the counters) asked now, each sync or async; the rates kept here."""

    def __init__(self, status: Fetch, counts: Fetch) -> None:
        self.status = status
        self.counts = counts
        self.rates = Rates()

    def __repr__(self) -> str:
        return f"<StatusPage {self.rates!r}>"

    async def __call__(self) -> bytes:
        status, counts = await _get(self.status), await _get(self.counts)
        rates, window = self.rates.update(time.monotonic(), totals(counts))
        return render(status, counts, rates, window, time.time())


async def _get(fetch: Fetch):
    value = fetch()
    return await value if inspect.isawaitable(value) else value


# -- rendering (pure) ----------------------------------------------------------------------

def e(value) -> str:
    return html.escape(str(value), quote=True)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def clock(unix: float | None, now: float) -> str:
    if not unix:
        return "-"
    ago = max(0, int(now - unix))
    age = f"{ago // 3600} h" if ago >= 3600 else f"{ago // 60} min" if ago >= 60 else f"{ago} s"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(unix))} ({age} ago)"


def host_of(label: str) -> str:
    """``"db.internal:5432"`` -> ``"db.internal"``; ``"[::1]:80"`` -> ``"::1"``."""
    return label.rsplit(":", 1)[0].strip("[]").lower()


def target_state(t: dict, names: dict[str, dict], tried: int, now: float) -> tuple[str, str]:
    """(state, reason) of one target, from all the proxy knows: the names table (DNS),
    the active checks, passive ejection, and whether it was ever tried."""
    if "state" in t:  # a status that combines them already
        return str(t["state"]), str(t.get("reason", ""))
    check, health = t.get("check"), str(t.get("health", "ok"))
    name = names.get(host_of(t["target"]))
    if name is not None and not name.get("addresses"):
        if name.get("state") == "pending":
            return "unknown", "DNS: its first answer is still out"
        return "no address", f"DNS: {name.get('error') or name.get('state')}"
    if check and check.get("state") == "down":
        return "down", (f"checks: {check.get('error') or 'failing'}, since "
                        f"{clock(check.get('since'), now)}")
    if health.startswith("ejected: "):
        return "ejected", f"connect {health[len('ejected: '):]}; tried last for now"
    if "ejected" in health:  # workers disagree: each says its own
        return "ejected", f"{health}; tried last for now"
    if check:
        return "up", f"checks pass, since {clock(check.get('since'), now)}"
    if health != "ok":
        return "failed", f"last connect {health}"
    if tried:
        return "up", "last connect succeeded"
    return "unknown", "never tried (no active checks)"


def _row(cells, head: bool = False) -> str:
    tag = "th" if head else "td"
    out = []
    for cell in cells:
        if not isinstance(cell, tuple):  # (text, class); numbers align right
            cell = (cell, "n" if isinstance(cell, int) else "")
        text, cls = cell
        attr = f' class="{e(cls)}"' if cls else ""
        out.append(f"<{tag}{attr}>{e(text)}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def _table(head: list[str], rows: list[list], caption: str = "") -> str:
    cap = f"<caption>{e(caption)}</caption>" if caption else ""
    return (f"<table>{cap}<thead>{_row(head, True)}</thead><tbody>"
            + "".join(_row(r) for r in rows) + "</tbody></table>")


def _rate(rates: dict, window: float, key, bytes_: bool = False) -> str:
    if not window:
        return "-"
    rate = rates.get(key, 0)
    return f"{size(rate)}/s" if bytes_ else f"{rate:.2f}/s"


def _summary(status: dict, now: float) -> str:
    version = status.get("version") or __version__
    code = f", code {status['code']}" if status.get("code") else ""
    reload = status.get("last_reload")
    if reload:
        result = ("ok", "up") if reload.get("ok") else ("FAILED", "down")
        last = (f'<span class="{result[1]}">{result[0]}</span> at '
                f"{e(clock(reload.get('at'), now))}: {e(reload.get('message', ''))}")
    else:
        last = "none since the proxy started"
    return (f"<p>version {e(version)}{e(code)}, {e(status.get('mode', '?'))} mode, "
            f"{'accepting' if status.get('accepting', True) else 'NOT accepting'}, "
            f"{e(status.get('active', 0))} connections open</p>"
            f"<p>config {e(status.get('config', '?'))}: generation "
            f"{e(status.get('generation', '?'))}, digest "
            f"<code>{e(str(status.get('digest', '?'))[:16])}</code></p>"
            f"<p>last reload: {last}</p>")


def _workers(status: dict, now: float) -> str:
    if "workers" not in status:  # a single process
        fds = status.get("fds") or {}
        return (f"<p>one process, pid {e(status.get('pid', '?'))}, "
                f"{e(fds.get('open', '?'))} of {e(fds.get('limit', '?'))} fds</p>")
    rows = []
    for w in status["workers"]:
        state = "ready" if w.get("ready") else "FAILING" if w.get("failing") else "starting"
        fds = w.get("fds") or {}
        css = "up" if state == "ready" else state
        rows.append([w.get("index"), w.get("pid") or "-", (state, css), w.get("active", 0),
                     f"{fds.get('open', '?')} of {fds.get('limit', '?')}", w.get("failing") or ""])
    out = _table(["worker", "pid", "state", "open", "fds", "failing"], rows,
                 f"workers ({status.get('restarts', 0)} restarts)")
    gens = [[g["generation"], g.get("version", "?"), g.get("code", "?"),
             " ".join(map(str, g.get("pids", []))), g.get("active", 0),
             (f"draining since {clock(g['draining_since'], now)}", "draining")
             if g.get("draining_since") else ("serving", "up")]
            for g in status.get("generations", [])]
    if gens:
        out += _table(["generation", "version", "code", "pids", "open", "state"], gens,
                      "worker generations")
    return out


def _apps(status: dict, counts, rates: dict, window: float, now: float) -> str:
    head = ["app", "ports", "balance", "open", "accepted", "accepted/s", "bytes in", "in/s",
            "bytes out", "out/s", "rejected", "no target up"]
    rows = []
    for a in status.get("apps", []):
        name = a["name"]
        limit = f" of {a['max_connections']}" if a.get("max_connections") else ""
        bytes_in = sum(n for (app, _, d), n in counts.bytes_n.items() if app == name and d == "in")
        bytes_out = sum(n for (app, _, d), n in counts.bytes_n.items()
                        if app == name and d == "out")
        rejected = sum(n for (app, _), n in counts.rejected_n.items() if app == name)
        rows.append([name, " ".join(map(str, a.get("ports", []))), a.get("balance") or "random",
                     f"{a.get('active', 0)}{limit}", counts.accepted_n.get(name, 0),
                     _rate(rates, window, (name, "accepted")), size(bytes_in),
                     _rate(rates, window, (name, "in"), True), size(bytes_out),
                     _rate(rates, window, (name, "out"), True), rejected,
                     counts.all_down_n.get(name, 0)])
    out = _table(head, rows, "per app (bytes in: from clients, out: to clients)")
    out += (f'<p class="dim">rates: per second over the last {window:.0f} s</p>' if window else
            '<p class="dim">rates: shown from the next view on (they need two samples)</p>')
    names = {n["name"].lower(): n for n in status.get("names", [])}
    for a in status.get("apps", []):
        rows = []
        for t in a.get("targets", []):
            label = t["target"]
            tried = counts.attempts_n.get((a["name"], label), 0)
            state, reason = target_state(t, names, tried, now)
            failed = sum(n for (app, tg, _), n in counts.failures_n.items()
                         if app == a["name"] and tg == label)
            rows.append([label, (state, state.replace(" ", "-")), reason, tried, failed,
                         size(counts.bytes_n.get((a["name"], label, "in"), 0)),
                         size(counts.bytes_n.get((a["name"], label, "out"), 0))])
        out += _table(["target", "state", "reason", "connects", "failed", "bytes in",
                       "bytes out"], rows, f"{a['name']}: targets")
    return out


def _names(status: dict) -> str:
    rows = [[n["name"], (n["state"], "up" if n.get("addresses") else "down"),
             " ".join(n.get("addresses", [])) or "-",
             "-" if n.get("age_s") is None else f"{n['age_s']:g} s", n.get("error") or ""]
            for n in status.get("names", [])]
    return _table(["host name", "state", "addresses", "answered", "last error"], rows,
                  "host names") if rows else ""


def render(status: dict, counts, rates: dict | None = None, window: float = 0.0,
           now: float | None = None) -> bytes:
    """The page: ``status`` (as ``flyproxy status --json``), ``counts`` (a metrics.Metrics),
    ``rates`` ({(app, "accepted"|"in"|"out"): per second} over ``window`` seconds)."""
    now = time.time() if now is None else now
    body = (f"<h1>flyproxy</h1>{_summary(status, now)}"
            f"<h2>Apps</h2>{_apps(status, counts, rates or {}, window, now)}"
            f"<h2>Processes</h2>{_workers(status, now)}{_names(status)}"
            f'<p class="dim">{e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)))}; '
            f"this page reloads every {REFRESH_S} s; from what <code>flyproxy status "
            f'--json</code> and <a href="/metrics">/metrics</a> show</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>flyproxy status</title><link rel=\"icon\" href=\"data:,\">"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n").encode()
