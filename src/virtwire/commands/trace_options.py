"""The tracing options of the commands that run a device: ``--trace``, ``--trace-categories``,
``--trace-sample``, ``--pcap``, and the environment that passes them on to child processes.

The emitter (``virtwire.trace``) knows nothing of the command line or of frame formats; this
module starts it as the options ask, with ``virtwire.net.frame.decode`` to name frames.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os

from virtwire import trace
from virtwire.errors import CliError
from virtwire.net.frame import decode

__all__ = ["ENV_TRACE", "ENV_PCAP", "ENV_CATEGORIES", "ENV_SAMPLE", "add_trace_arguments",
           "configure_from_args", "configure_from_env", "child_files"]

log = logging.getLogger(__name__)

ENV_TRACE = "VIRTWIRE_TRACE"
ENV_PCAP = "VIRTWIRE_PCAP"
ENV_CATEGORIES = "VIRTWIRE_TRACE_CATEGORIES"
ENV_SAMPLE = "VIRTWIRE_TRACE_SAMPLE"


def _parse_categories(text: str | None) -> list[str] | None:
    if not text:
        return None
    cats = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(cats) - set(trace.CATEGORIES))
    if unknown:
        raise trace.TraceError(
            f"unknown trace categories: {', '.join(unknown)} (known: {','.join(trace.CATEGORIES)})"
        )
    return cats


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--trace``, ``--trace-categories``, ``--trace-sample`` and ``--pcap`` to a command."""
    g = parser.add_argument_group("tracing")
    g.add_argument("--trace", metavar="FILE", default=None,
                   help="write every guest/device step as JSON lines (see `virtwire explain`)")
    g.add_argument("--trace-categories", metavar="A,B", default=None,
                   help=f"only these categories (of {','.join(trace.CATEGORIES)})")
    g.add_argument("--trace-sample", metavar="N", type=int, default=1,
                   help="write 1 in N data-path events (kick,chain,used,irq,frame); default 1")
    g.add_argument("--pcap", metavar="FILE", default=None,
                   help="write every frame, both directions, to a pcapng file")


def configure_from_args(args: argparse.Namespace, export: bool = True) -> trace.Tracer | None:
    """Start tracing as the options of ``add_trace_arguments`` ask (no-op when none given).

    With ``export`` the settings also go into the environment (``VIRTWIRE_TRACE`` ...), so
    virtwire processes this one starts (a ``serve`` sidecar, a PCI proxy remote) trace too, each
    to ``FILE.<command>.<pid>`` beside ours (``configure_from_env``); ``virtwire explain FILE``
    merges those files. Raises ``virtwire.errors.CliError`` for a bad option value.
    """
    path = getattr(args, "trace", None)
    pcap = getattr(args, "pcap", None)
    if path is None and pcap is None:
        return configure_from_env(getattr(args, "command", None) or "virtwire")
    sample = getattr(args, "trace_sample", 1)
    sample = 1 if sample is None else sample
    cat_text = getattr(args, "trace_categories", None)
    try:
        cats = _parse_categories(cat_text)
        if sample < 1:
            raise trace.TraceError(f"--trace-sample must be >= 1, not {sample}")
        tr = trace.start(path, cats, sample, pcap=pcap, decode=decode)
    except trace.TraceError as e:
        raise CliError(str(e)) from None
    if export:
        trace.export_env({ENV_TRACE: os.fspath(path) if path else None,
                          ENV_PCAP: os.fspath(pcap) if pcap else None,
                          ENV_CATEGORIES: cat_text or None,
                          ENV_SAMPLE: str(sample) if sample != 1 else None})
    return tr


def configure_from_env(command: str = "virtwire") -> trace.Tracer | None:
    """In a child virtwire process: trace if a parent exported ``VIRTWIRE_TRACE``/``_PCAP``.

    The child writes ``<parent file>.<command>.<pid>`` (JSON lines / pcapng). A no-op when this
    process already traces or nothing was exported; a bad exported value is ignored (logged).
    """
    if trace.active():
        return trace.TRACE
    path, pcap = os.environ.get(ENV_TRACE), os.environ.get(ENV_PCAP)
    if not path and not pcap:
        return None
    suffix = f".{command}.{os.getpid()}"
    try:
        sample = int(os.environ.get(ENV_SAMPLE, "1") or 1)
        cats = _parse_categories(os.environ.get(ENV_CATEGORIES))
        return trace.start(path + suffix if path else None, cats, sample,
                           pcap=pcap + suffix if pcap else None, decode=decode)
    except (trace.TraceError, ValueError) as e:
        log.warning("inherited trace settings ignored: %s", e)
        return None


def child_files(path: str | os.PathLike[str]) -> list[str]:
    """Traces that child processes wrote beside ``path`` (``path.<command>.<pid>``), sorted."""
    p = os.fspath(path)
    return sorted(f for f in glob.glob(glob.escape(p) + ".*.*")
                  if f.rsplit(".", 1)[-1].isdigit())
