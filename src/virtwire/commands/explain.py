"""``virtwire explain TRACE``: the story of a guest driving a virtwire device, from its trace."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from virtwire.errors import CliError
from virtwire.trace import TraceError

NAME = "explain"
HELP = "narrate a --trace file: phases, features, queues; optionally as an HTML page"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traces", nargs="*", metavar="TRACE",
                        help="trace file(s) written with --trace (several are merged by clock)")
    parser.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page")
    parser.add_argument("--json", action="store_true",
                        help="print the analysis as JSON instead of the narrative")
    parser.add_argument("--example", choices=("pci-proxy", "vhost-user"),
                        help="explain a built-in synthetic trace (shows the format)")
    parser.add_argument("--live", action="store_true",
                        help="trace virtwire's own PCI driver driving virtwire's virtio-net "
                             "device in process (enumeration to ping), then explain that")
    parser.add_argument("--schema", action="store_true",
                        help="print the trace event schema (what --trace writes) and exit")
    parser.add_argument("--save", metavar="TRACE",
                        help="with --live: keep the trace (and TRACE.pcapng) here")
    parser.add_argument("--width", type=int, default=100, help="text width (default 100)")
    parser.add_argument("--no-children", action="store_true",
                        help="do not merge traces child processes wrote beside TRACE "
                             "(TRACE.<command>.<pid>)")


def summary(a) -> dict:  # type: ignore[no-untyped-def]
    """The analysis as JSON-able data (``--json``)."""
    return {
        "sources": a.sources,
        "transport": a.transport,
        "duration": a.duration,
        "events": len(a.events),
        "in_order": a.in_order(),
        "missing": a.missing(),
        "phases": [{"id": p.id, "title": p.title, "start": p.start, "end": p.end,
                    "events": p.last - p.first, "facts": p.facts} for p in a.phases],
        "offered": a.offered,
        "negotiated": a.negotiated,
        "negotiated_hex": a.negotiated_hex,
        "status_path": a.status_path,
        "queues": {str(q): {"role": s.role, "size": s.size, "desc": s.desc, "avail": s.avail,
                            "used_ring": s.used_addr, "kicks": s.kicks, "chains": s.chains,
                            "descs": s.descs, "used": s.used, "irqs": s.irqs,
                            "suppressed": s.suppressed, "frames": s.frames, "bytes": s.bytes}
                   for q, s in sorted(a.queues.items())},
        "frames": {"tx": a.frames_tx, "rx": a.frames_rx, "bytes_tx": a.bytes_tx,
                   "bytes_rx": a.bytes_rx},
        "steady": a.steady,
        "counts": a.counts,
    }


def run(args: argparse.Namespace) -> int:
    from virtwire.explain import analyze, load, narrate
    from virtwire.explain.html import render_html

    if args.schema:
        from virtwire import trace

        doc = trace.__doc__ or ""
        start = doc.index("Event schema")
        sys.stdout.write(doc[start:].rstrip() + "\n")
        return 0
    paths = list(args.traces)
    tmp = None
    if args.live:
        from virtwire import trace
        from virtwire.explain.live import run_pci_session
        from virtwire.net.frame import decode

        if args.save:
            out = args.save
        else:
            fd, tmp = tempfile.mkstemp(prefix="virtwire-live-", suffix=".jsonl")
            os.close(fd)
            out = tmp
        try:
            trace.start(out, pcap=(out + ".pcapng") if args.save else None, decode=decode)
            run_pci_session()
        except trace.TraceError as e:
            raise CliError(str(e)) from None
        finally:
            trace.stop()
        paths = [out]
    elif args.example:
        from virtwire.explain.synthetic import write_example

        fd, tmp = tempfile.mkstemp(prefix="virtwire-example-", suffix=".jsonl")
        os.close(fd)
        write_example(tmp, args.example)
        paths = [tmp]
    if not paths:
        raise CliError("explain needs a TRACE file (or --live, or --example pci-proxy|vhost-user)")
    if not args.no_children and not args.example and not args.live:
        from virtwire.commands.trace_options import child_files

        paths += [c for p in list(paths) for c in child_files(p) if c not in paths]
    try:
        events, sources = load(paths)
    except TraceError as e:
        raise CliError(str(e)) from None
    finally:
        if tmp:
            os.unlink(tmp)
    if args.example:
        sources = [f"example:{args.example}"]
    elif args.live and not args.save:
        sources = ["live: virtwire's PCI driver <-> virtwire's virtio-net device, in process"]
    a = analyze(events, sources)
    if args.json:
        sys.stdout.write(json.dumps(summary(a), indent=1, default=str) + "\n")
    else:
        sys.stdout.write(narrate(a, width=max(60, args.width)))
    if args.html:
        title = "virtwire explain: " + ", ".join(os.path.basename(s) for s in sources)
        try:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(render_html(a, title=title))
        except OSError as e:
            raise CliError(f"cannot write {args.html}: {e.strerror}") from None
        if not args.json:
            sys.stdout.write(f"\n  HTML: {args.html}\n")
    return 0
