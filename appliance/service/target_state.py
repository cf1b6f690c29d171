"""One state per target, from everything the proxy knows about it: what ``flyproxy status``,
the status page and the metrics say.

Precedence, first match wins:

- ``down``: the active checks hold it down (``down (checks: refused, 3 s)``);
- ``no address``: its host name has no address (``no address (NXDOMAIN)``), or has not
  answered yet (``no address (pending)``);
- ``ejected``: a connect to it failed a moment ago, so it is tried after the others until
  ``--eject`` passes (``ejected (connect refused, 4 s left)``);
- ``up``: a connection or a check reached it;
- ``unknown``: nothing has tried it yet (``unknown (never tried)``).
"""

from __future__ import annotations

import time

ORDER = ("down", "no address", "ejected", "up", "unknown")  # worst first


def state(*, check: dict | None, held_down: bool, name: dict | None,
          failure: tuple[float, str] | None, eject_s: float, seen: bool,
          now: float | None = None) -> dict:
    """{"state", "reason", "since" (Unix time or None), "text"} for one target.

    ``check``: its active check's row (checks.TargetCheck.row) or None; ``held_down``: a
    worker's view of the checks (it is told membership only); ``name``: its host name's
    row (resolver), None for an IP address; ``failure``: (monotonic time, reason) of its
    last failed connect; ``seen``: a connect to it ever succeeded."""
    now = time.monotonic() if now is None else now
    wall = time.time()
    if check is not None and check["state"] == "down":
        why = f"checks: {check['error'] or 'failed'}"
        return _row("down", why, check["since"], f"{why}, {wall - check['since']:.0f} s")
    if held_down:
        return _row("down", "checks", None, "checks")
    if name is not None and not name["addresses"]:
        why = name["error"] or name["state"]
        return _row("no address", why, None, why)
    if failure is not None and now - failure[0] < eject_s:
        why = f"connect {failure[1]}"
        left = eject_s - (now - failure[0])
        return _row("ejected", why, wall - (now - failure[0]), f"{why}, {left:.0f} s left")
    if seen or (check is not None and check["checks"]):
        return _row("up", "", check["since"] if check else None, "")
    return _row("unknown", "never tried", None, "never tried")


def _row(state: str, reason: str, since: float | None, details: str) -> dict:
    return {"state": state, "reason": reason, "since": since,
            "text": f"{state} ({details})" if details else state}


def merged(rows: dict[int, dict]) -> dict:
    """One target's state over the workers (each ejects on its own): the worst, naming
    the workers that see it when they disagree."""
    states = {r["state"] for r in rows.values()}
    if len(states) == 1:
        return next(iter(rows.values()))
    worst = min(rows.values(), key=lambda r: ORDER.index(r["state"]))
    who = sorted(i for i, r in rows.items() if r["state"] == worst["state"])
    workers = ", ".join(map(str, who))
    return {**worst, "text": f"{worst['text']} in worker{'s' if len(who) > 1 else ''} "
                             f"{workers}"}
