"""flyproxy(8), in troff: the commands and every option from the parser itself (so no
option can go undocumented), the rest written here. ``flyproxy manpage`` prints it; the
Debian package installs it (debian/rules)."""

from __future__ import annotations

import argparse
import datetime

from .. import __version__
from ..settings import ServeConfig


def _esc(text: str) -> str:
    """Plain text for troff: backslashes and hyphens escaped, no line starting with a dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + (
                action.metavar or ("{" + ",".join(action.choices) + "}" if action.choices
                                   else action.dest.upper()))
            names = ", ".join(f"\\fB{_esc(o)}\\fR" for o in action.option_strings)
            out += [".TP", f"{names}{_esc(metavar)}", _esc(action.help or "")]
        else:
            out += [".TP", f"\\fI{_esc(action.metavar or action.dest)}\\fR",
                    _esc(action.help or "")]
    return out


def _commands(parser: argparse.ArgumentParser, prefix: str = "flyproxy") -> list[str]:
    out = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {c.dest: c.help for c in action._choices_actions}
        for name, sub in action.choices.items():
            if name == "manpage":
                continue
            out += [".SS", f"{prefix} {name}", _esc(helps.get(name) or "")]
            if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                out += _commands(sub, f"{prefix} {name}")
                continue
            opts = _options(sub)
            if opts:
                out += [".RS", *opts, ".RE"]
    return out


CONFIG = r"""
The config file is JSON, the challenge's format:
.PP
.nf
{"Apps": [{"Name": "web", "Ports": [80, 8080],
           "Targets": ["10.0.0.2:8080", "backend.example:8080", "[fd00::2]:8080"]}]}
.fi
.PP
\fBName\fR: letters, digits, ".", "_", "\-". \fBPorts\fR: whole numbers 1\-65535, each used
once in the whole file. \fBTargets\fR: \fIhost\fR:\fIport\fR, \fIip\fR:\fIport\fR or
[\fIipv6\fR]:\fIport\fR. A file is at most 1 MiB. Optional keys per app:
.TP
\fBMaxConnections\fR \fIn\fR
at most \fIn\fR open connections for the app, counted over every worker of the host; more
are closed at once (a reset, before any backend connect).
.TP
\fBMaxConnectionsPerClient\fR \fIn\fR
at most \fIn\fR open connections to the app from one client address.
.TP
\fBMaxConnectionRatePerClient\fR \fIr\fR
at most \fIr\fR new connections per second to the app from one client address (a token
bucket: bursts of about \fIr\fR).
.TP
\fBMaxConnectionRate\fR \fIr\fR
at most \fIr\fR new connections per second to the app from all clients together; over it
the app's own port (or BPF lane) stops accepting until one is due, so the excess waits in
the kernel's backlog.
.TP
\fBBytesPerSecond\fR \fIn\fR
each connection's bandwidth, each direction: the proxy reads no faster, so TCP holds the
sender back (nothing is buffered beyond one read).
.TP
\fBDrainTimeout\fR \fIs\fR
connections left on a port or to a target that a reload removed, or to a target the health
checks took down, are closed \fIs\fR seconds later, each with a log line (absent: they are
left to finish).
.TP
\fBProxyProtocol\fR "v1" | "v2"
a PROXY protocol header first on every backend connection (the client's address and the
address and port it dialled); health checks send a LOCAL (v2) or UNKNOWN (v1) header.
.TP
\fBBalance\fR "random" | "least\-connections"
how the first target is chosen (then the others, on failure).
.TP
\fBHealthCheck\fR {"Interval": \fIs\fR, "Timeout": \fIs\fR, "Rise": \fIn\fR, "Fall": \fIn\fR}
a TCP connect to every target each Interval (default 2 s; the host checks at most 500 targets
a second, none more often than every 0.1 s); Fall failures in a row take a target down, Rise
successes bring it back; a down target is tried only when no other is up.
"""

TEXT = r"""
.SH DESCRIPTION
\fBflyproxy\fR forwards raw TCP for many apps. A connection to any port of an app goes to one
of its targets, picked at random; if the connect fails (refused, timed out, a name that does
not resolve) the others are tried, so the client does not notice a dead target.
.PP
Per\-port mode (\fBflyproxy serve \-c\fR \fIFILE\fR) binds every configured port. Appliance
mode: systemd's \fBflyproxy.socket\fR owns one listening socket, an sk_lookup BPF program
(\fBflyproxy bpf load\fR) steers every configured port to it, and the socket\-activated
proxy routes each connection by the port the client dialled.
.PP
A supervisor (\fB\-\-workers\fR \fIN\fR, or \fB\-\-supervisor yes\fR as the unit runs it)
starts worker processes sharing the listeners. \fBflyproxy reload\fR applies the config file
to every worker at once; when the installed code changed (a package upgrade) it starts a new
generation of workers on it and lets the old one finish its connections
(\fB\-\-drain\-time\fR): no connection is dropped.
.SH COMMANDS
{commands}
.SH SERVE OPTIONS
The options of \fBflyproxy serve\fR (environment variables in parentheses give defaults):
.RS
{serve}
.RE
.SH CONFIGURATION
{config}
.SH SIGNALS
.TP
\fBSIGHUP\fR
reload the config file, as \fBflyproxy reload\fR does (an invalid file is logged and the
config in force keeps serving).
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
stop accepting, let open connections finish for \fB\-\-grace\-period\fR seconds, then close
the rest; a second signal closes them at once. A supervisor passes them to its workers.
.SH FILES
.TP
\fI/etc/flyproxy/config.json\fR
the config the unit serves.
.TP
\fI/run/flyproxy/control.sock\fR
the control socket (as root; see \fBFLYPROXY_CONTROL\fR).
.TP
\fI/sys/fs/bpf/flyproxy\fR
the pinned BPF program, link and maps (\fBflyproxy bpf status\fR).
.TP
\fI/lib/systemd/system/flyproxy.service\fR, \fIflyproxy.socket\fR
the units.
.SH ENVIRONMENT
.TP
\fBFLYPROXY_CONFIG\fR
the config file (default \fI/etc/flyproxy/config.json\fR).
.TP
\fBFLYPROXY_CONTROL\fR
the control socket \fBserve\fR opens and every client uses (else
\fI/run/flyproxy/control.sock\fR as root, \fI$XDG_RUNTIME_DIR/flyproxy.sock\fR otherwise).
.TP
\fBFLYPROXY_METRICS\fR
\fIhost\fR:\fIport\fR of the Prometheus metrics and the status page (\fBserve \-\-metrics\fR).
.TP
\fBFLYPROXY_LOG_LEVEL\fR
the log level (\fB\-\-log\-level\fR).
{environment}
.SH EXIT STATUS
0: success. 1: an error (a bad config, a proxy that is not running, a reload that failed:
the config in force keeps serving). 2: a command line that is wrong, or \fBreload \-c\fR
naming a file the proxy does not serve.
.SH EXAMPLES
.nf
flyproxy check /etc/flyproxy/config.json
flyproxy serve \-c config.json \-\-host 127.0.0.1 \-\-workers 2
systemctl reload flyproxy          # flyproxy reload: validate, apply, sync the BPF map
flyproxy status                    # apps, ports, each target's state, workers
flyproxy reload \-\-new\-workers     # a new generation of workers; the old one drains
flyproxy bpf status
.fi
.SH SEE ALSO
\fBsystemctl\fR(1), \fBsystemd.socket\fR(5), \fBbpftool\fR(8);
/usr/share/doc/flyproxy/README.md and NOTES.md.
"""


def _environment(written: str) -> list[str]:
    """The variables of the serve options not described above: each the default of its
    option (settings.py)."""
    out = []
    for f in ServeConfig.options("serve", "global"):
        env = f.metadata["env"]
        if env and f"\\fB{env}\\fR\n" not in written:
            out += [".TP", f"\\fB{_esc(env)}\\fR",
                    f"the default of \\fB{_esc(f.metadata['flag'])}\\fR."]
    return out


def render(parser: argparse.ArgumentParser) -> str:
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                 ).choices["serve"]
    date = datetime.date.today().strftime("%Y-%m-%d")
    head = [f'.TH FLYPROXY 8 "{date}" "flyproxy {__version__}" "System Administration"',
            ".SH NAME", "flyproxy \\- L4 TCP proxy appliance with sk_lookup BPF steering",
            ".SH SYNOPSIS", "\\fBflyproxy\\fR [\\fB\\-\\-log\\-level\\fR \\fIlevel\\fR] "
            "\\fIcommand\\fR [\\fIoptions\\fR]", ".PP", "Global options:", ".RS",
            *_options(parser), ".RE"]
    body = (TEXT.replace("{commands}", "\n".join(_commands(parser)))
            .replace("{environment}", "\n".join(_environment(TEXT)))
            .replace("{serve}", "\n".join(_options(serve)))
            .replace("{config}", CONFIG.strip()))
    return "\n".join(head) + body
