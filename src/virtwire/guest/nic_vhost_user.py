"""NIC kind ``vhost-user``: the guest's virtio-net-pci served by a vhost-user back end.

``--net vhost-user,socket=PATH[,queues=N][,serve=BACKEND-SPEC][,server=on|off][,...]``

- ``socket``: the back end's UNIX socket (default: in the VM's tmpdir).
- ``queues``: queue pairs (``mq=on`` and, without TCG, enough MSI-X vectors).
- ``server=on`` (default): the *back end* listens and QEMU connects with ``reconnect=1`` (so a
  restarted back end is picked up again); ``server=off``: QEMU listens.
- ``serve=tap:IFNAME`` / ``serve=switch:NAME`` / ``serve=null``: start ``virtwire serve`` as a
  sidecar for this NIC before QEMU and stop it after QEMU exits. Without ``serve=`` a back end
  must already be running on ``socket``.
- Feature switches passed to the device, QEMU style: ``mrg_rxbuf``, ``packed``, ``csum``,
  ``guest_csum``, ``host_tso4``, ``guest_tso4``... (``=on``/``=off``).

Under TCG the device gets ``vectors=0``: QEMU 7.2 crashes using MSI-X with vhost-user there.
Guest RAM is already a shared memfd (the launcher's ``memory-backend-memfd,share=on``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from virtwire.errors import CliError
from virtwire.guest.nics import NicContext, NicPlan, NicSpec, register_nic_kind
from virtwire.keyvals import escape_value, parse_on_off
from virtwire.net.options import SWITCHES

_KEYS = {"socket", "queues", "serve", "server", *SWITCHES}
_FLAG = "--net vhost-user,"


def _sidecar_argv(sock: str, serve: str, spec: NicSpec, ctx: NicContext, queues: int,
                  server: bool) -> list[str]:
    kind, _, arg = serve.partition(":")
    port = (f"vhost-user,path={escape_value(sock)},server={'on' if server else 'off'},"
            f"queues={queues},mac={ctx.mac},name={ctx.id}")
    if kind == "tap":
        if not arg:
            raise CliError("--net vhost-user,serve=tap:IFNAME needs an interface name")
        port += f",backend=tap,ifname={arg}"
    elif kind == "switch":
        port += f",backend=switch,switch={arg or 'sw0'}"
    elif kind == "null":
        port += ",backend=null"
    else:
        raise CliError(f"--net vhost-user,serve={serve}: expected tap:IFNAME, switch:NAME or null")
    for k in SWITCHES:
        if k in spec.options:
            port += f",{k}={spec.options[k]}"
    return [sys.executable, "-m", "virtwire", "serve", "--quiet", "--port", port]


def build_vhost_user(spec: NicSpec, ctx: NicContext) -> NicPlan:
    opts = spec.options
    sock = opts.get("socket") or str(ctx.tmpdir / f"{ctx.id}.vhost.sock")
    try:
        queues = int(opts.get("queues", "1"))
    except ValueError:
        raise CliError(f"--net vhost-user,queues={opts['queues']}: not a number") from None
    if not 1 <= queues <= 64:
        raise CliError(f"--net vhost-user,queues={queues}: expected 1..64")
    server = parse_on_off(_FLAG, "server", opts.get("server", "on"))  # the back end's role
    cid, nid = f"{ctx.id}c", ctx.id
    chardev = (f"socket,id={cid},path={sock},reconnect=1" if server
               else f"socket,id={cid},path={sock},server=on")
    dev = f"virtio-net-pci,netdev={nid},mac={ctx.mac}"
    if queues > 1:
        dev += ",mq=on"
    for k in SWITCHES:
        if k in opts and k != "mq":
            dev += f",{k}={'on' if parse_on_off(_FLAG, k, opts[k]) else 'off'}"
    if ctx.accel == "tcg":
        dev += ",vectors=0"
    elif queues > 1:
        dev += f",vectors={2 * queues + 2}"
    plan = NicPlan(qemu_args=["-chardev", chardev,
                              "-netdev", f"vhost-user,id={nid},chardev={cid},queues={queues}",
                              "-device", dev])
    if "serve" in opts:
        argv = _sidecar_argv(sock, opts["serve"], spec, ctx, queues, server)
        if ctx.netns:
            argv = ["ip", "netns", "exec", ctx.netns, *argv]
        state: dict[str, subprocess.Popen[bytes]] = {}
        log_path = ctx.tmpdir / f"{ctx.id}.serve.log"

        def start() -> None:
            r, w = os.pipe()
            env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
            with open(log_path, "wb") as log:
                state["p"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=log, pass_fds=(w,), env=env,
                                              start_new_session=True)
            os.close(w)
            try:
                ok = _wait_ready(r, state["p"], 20.0)
            finally:
                os.close(r)
            if not ok:
                stop()
                tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-3:]
                raise CliError("virtwire serve sidecar did not start: " + " | ".join(tail))

        def stop() -> None:
            p = state.pop("p", None)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

        plan.start, plan.stop = start, stop
    return plan


def _wait_ready(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            return os.read(fd, 1) == b"1"
        if proc.poll() is not None:
            return False
    return False


register_nic_kind("vhost-user", build_vhost_user, keys=_KEYS,
                  help="virtwire's virtio-net device over vhost-user (socket=, queues=, "
                       "serve=tap:IF|switch:NAME|null, mrg_rxbuf=, packed=...)")
