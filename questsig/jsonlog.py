"""``log-format = "json"``: one JSON object per log line, for journald, Loki and the like.

Each line holds ``time`` (UTC, ISO 8601), ``level``, ``namespace``, ``text`` (the line twistd
would write) and the event's fields that its message names, so a line says no more than its
text does. Values of other fields (requests, protocols, payloads) never appear, nor do fields
whose names speak of keys, tokens, secrets or bodies (their values are blanked in the text
too). Without request logging, client addresses that Twisted's own messages may carry are
blanked.

twistd takes an application's :class:`twisted.logger.ILogObserver` component over its own
observer (only ``--logger`` wins over it); :func:`observer` builds one that writes where
twistd's text log would go (``--logfile``, else stdout with ``-n``, else ``twistd.log``).
"""
from __future__ import annotations

import json
import re
import string
import sys
from datetime import datetime, timezone
from typing import IO, Any, Mapping

from twisted.logger import FileLogObserver, formatEvent

#: field names that never reach a log line, whatever the message says
PRIVATE = re.compile(r"key|token|secret|password|body|payload|subscription", re.IGNORECASE)
#: what Twisted's address objects and "host:port" peers look like in text
ADDRESS = re.compile(r"IPv[46]Address\([^)]*\)|UNIXAddress\([^)]*\)")
_FORMATTER = string.Formatter()


def _named(fmt: str) -> list[str]:
    """The field names a format string uses (``{a.b!r:>3}`` -> ``a``)."""
    names = []
    try:
        for _, name, _, _ in _FORMATTER.parse(fmt):
            if name:
                names.append(re.split(r"[.\[]", name, 1)[0])
    except ValueError:
        pass
    return names


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def format_event(event: Mapping[str, Any], log_requests: bool = False) -> str | None:
    """One JSON line (with its newline) for a twisted.logger event."""
    fmt = event.get("log_format") or ""
    if not log_requests:
        event = {k: (ADDRESS.sub("-", v) if isinstance(v, str) else
                     "-" if type(v).__name__.endswith("Address") else v)
                 for k, v in event.items()}
    event = {k: "-" if PRIVATE.search(k) and not k.startswith("log_") else v
             for k, v in event.items()}
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text += "\n" + failure.getTraceback()
        except Exception:
            text += "\n(traceback unavailable)"
    if not log_requests:
        text = ADDRESS.sub("-", text)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc)
        .isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace") or "",
        "text": text,
    }
    for name in _named(fmt):
        if name in event and name not in record and not name.startswith("log_") \
                and not PRIVATE.search(name):
            value = _plain(event[name])
            if isinstance(value, str) and not log_requests:
                value = ADDRESS.sub("-", value)
            record[name] = value
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def json_observer(out: IO[str], log_requests: bool = False) -> FileLogObserver:
    return FileLogObserver(out, lambda event: format_event(event, log_requests))


def observer(twistd_options: Mapping[str, Any] | None, log_requests: bool) -> FileLogObserver | None:
    """The JSON observer for twistd's log destination, or None when twistd logs to syslog
    (which keeps its own format)."""
    options = twistd_options or {}
    if options.get("syslog"):
        return None
    logfile = options.get("logfile") or ""
    out: IO[str]
    if logfile == "-" or (not logfile and options.get("nodaemon", True)):
        out = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        out = LogFile.fromFullPath(logfile or "twistd.log")  # type: ignore[assignment]
    return json_observer(out, log_requests)
