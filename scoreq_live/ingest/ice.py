"""Which local addresses WebRTC sessions gather ICE host candidates on (``--ice-host``).

aiortc gathers through aioice, which offers every interface's address except
loopback and has no setting for it.  A monitor serving publishers on the same
machine (a browser tab on 127.0.0.1, the tests), or one that must offer only
the address a firewall opens, needs to choose.  aioice looks its host addresses
up through one module-level function; :func:`install` wraps it once so that,
inside :func:`gathering_on` (a context variable, so only the peer connection
being set up in that task sees it), the chosen addresses are used, and
everywhere else aioice behaves as it always does.  The test suite checks that
the chosen address is the one in the SDP answer, so a later aioice that looks
its addresses up differently fails there, not silently.

A publisher's candidates may name its address with an mDNS name
(``UUID.local``, as browsers do to keep local addresses private); aioice
would then ask the local network for it (multicast, and the answer waited
for), on every offer anyone posts.  :func:`without_mdns_candidates` drops
those from an offer before it is answered, and with them the offer's
``a=end-of-candidates``: a publisher that offers only such candidates still
connects, its address learnt from its own connectivity checks (a
peer-reflexive candidate), as long as it can reach one of ours.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
from collections.abc import Iterator, Sequence

import aioice.ice

from scoreq_live.errors import ScoreqLiveError

__all__ = ["IceError", "check_hosts", "gathering_on", "install", "without_mdns_candidates"]

_HOSTS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("scoreq_live_ice_hosts",
                                                                               default=None)


class IceError(ScoreqLiveError):
    """An ICE setting cannot be used (an address that is not an IP address)."""


def check_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """``--ice-host`` values as IP address strings; raises :class:`IceError` naming the bad one."""
    out = []
    for h in hosts:
        try:
            out.append(str(ipaddress.ip_address(h.strip().strip("[]"))))
        except ValueError:
            raise IceError(f"--ice-host {h!r}: give an IP address of this machine (e.g. 127.0.0.1 or "
                           "192.0.2.10), not a name") from None
    return tuple(out)


def install() -> None:
    """Wrap aioice's host-address lookup once (idempotent); outside :func:`gathering_on` nothing changes."""
    current = aioice.ice.get_host_addresses
    if getattr(current, "_scoreq_live", False):
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        hosts = _HOSTS.get()
        if hosts is None:
            return current(use_ipv4, use_ipv6)
        return [h for h in hosts if (":" in h and use_ipv6) or (":" not in h and use_ipv4)]

    get_host_addresses._scoreq_live = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = get_host_addresses


@contextlib.contextmanager
def gathering_on(hosts: Sequence[str] | None) -> Iterator[None]:
    """Within the block (and tasks it starts), ICE host candidates are gathered on ``hosts`` (None: all)."""
    if not hosts:
        yield
        return
    install()
    token = _HOSTS.set(tuple(hosts))
    try:
        yield
    finally:
        _HOSTS.reset(token)


def _mdns_name(address: str) -> bool:
    return address.rstrip(".").lower().endswith(".local")


def without_mdns_candidates(sdp: str) -> tuple[str, int]:
    """``sdp`` without its ``a=candidate`` lines whose address is an mDNS name (``*.local``); how many went.

    When any went, ``a=end-of-candidates`` goes too: the publisher's address is still to be learnt from
    its checks, and ICE must wait for them rather than fail on an empty candidate list.
    """
    lines = sdp.splitlines(keepends=True)
    # a=candidate:FOUNDATION COMPONENT TRANSPORT PRIORITY ADDRESS PORT typ TYPE ...
    mdns = [line.startswith("a=candidate:") and len(f := line.split()) > 4 and _mdns_name(f[4]) for line in lines]
    if not any(mdns):
        return sdp, 0
    kept = [line for line, drop in zip(lines, mdns) if not drop and line.rstrip() != "a=end-of-candidates"]
    return "".join(kept), sum(mdns)
