"""The command line's ``KIND,key=val,...`` values (``--port``, ``--net``): one parser for them all.

QEMU's rule for a comma inside a value holds: write it twice (``path=/tmp/a,,b`` is ``/tmp/a,b``).
``split_options`` splits such a string; ``parse_key_values`` checks its ``key=val`` parts against
the keys a command knows; ``parse_on_off`` reads one on/off value. Bad input raises ``CliError``
with one line that names the flag and the key.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from virtwire.errors import CliError
from virtwire.net.options import on_off

__all__ = ["split_options", "escape_value", "parse_key_values", "parse_on_off"]


def split_options(text: str) -> list[str]:
    """Split at single commas; ``,,`` is a comma inside a part. Parts are stripped."""
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur).strip())
    return parts


def escape_value(value: str) -> str:
    """``value`` written for ``split_options`` (commas doubled)."""
    return value.replace(",", ",,")


def parse_key_values(flag: str, parts: Iterable[str], known: Collection[str]) -> dict[str, str]:
    """``key=val`` parts -> {key: val}; empty parts are skipped; an unknown key, a part without
    ``=`` or a key given twice raises ``CliError`` ("``flag``: unknown key 'x' (known: ...)")."""
    opts: dict[str, str] = {}
    for p in parts:
        if not p:
            continue
        if "=" not in p:
            raise CliError(f"{flag}: expected key=value, got {p!r}")
        k, v = p.split("=", 1)
        if k not in known:
            raise CliError(f"{flag}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        if k in opts:
            raise CliError(f"{flag}: key {k!r} given twice")
        opts[k] = v
    return opts


def parse_on_off(prefix: str, key: str, value: str) -> bool:
    """One on/off value of a flag; CliError "``prefix``key=value: expected on or off"."""
    try:
        return on_off(value)
    except ValueError:
        raise CliError(f"{prefix}{key}={value}: expected on or off") from None
