"""Creating and attaching links: the segment, its doorbells, and the hand-over to a child.

Side A (the host) creates everything and hands side B (the worker) three file descriptors:
the segment and both doorbells, inherited through ``subprocess.Popen(pass_fds=...)``. B
never needs the segment's name, so A unlinks it as soon as B has been spawned (or B's first
frame arrives, whichever comes first): from then on a SIGKILL of either process leaves
nothing in ``/dev/shm``. The name exists only for that short window and carries A's pid, so
``rapace cleanup`` (or the next pool's sweep) can remove it if A died inside it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from rapace.shm._cleanup import process_start_time
from rapace.shm._doorbell import Doorbell
from rapace.shm._layout import (
    DEFAULT_CLASSES,
    DEFAULT_RING_CAPACITY,
    LinkLayout,
    read_header,
    write_header,
)
from rapace.shm._segment import Segment
from rapace.shm._slots import SizeClass
from rapace.shm._transport import DEFAULT_SPIN, ShmTransport, SpinPolicy

__all__ = ("LinkOffer", "LinkOptions", "attach_link", "create_link", "shm_pair")

_OFFER_VERSION = "rapace-shm-1"


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """Sizes and waiting policy of a link.

    ``ring_capacity`` descriptors per direction; ``classes`` the slot sizes and counts of
    each side's area; ``spin`` the longest a receiver spins before parking, in seconds
    (0 never spins).
    """

    ring_capacity: int = DEFAULT_RING_CAPACITY
    classes: Sequence[SizeClass] = field(default=DEFAULT_CLASSES)
    spin: float = DEFAULT_SPIN

    def layout(self) -> LinkLayout:
        return LinkLayout.compute(self.ring_capacity, self.classes)

    def spin_policy(self) -> SpinPolicy:
        return SpinPolicy(max_budget=self.spin)


@dataclass(frozen=True, slots=True)
class LinkOffer:
    """What side B needs to attach: three inheritable fds and, for cleanup only, the name."""

    segment_fd: int
    doorbell_a_fd: int  # A sleeps on it, B rings it
    doorbell_b_fd: int  # B sleeps on it, A rings it
    name: str

    @property
    def pass_fds(self) -> tuple[int, int, int]:
        return (self.segment_fd, self.doorbell_a_fd, self.doorbell_b_fd)

    def encode(self) -> str:
        """A one-line form for a command line or an environment variable."""
        return (
            f"{_OFFER_VERSION}:{self.segment_fd}:{self.doorbell_a_fd}:{self.doorbell_b_fd}:"
            f"{self.name}"
        )

    @classmethod
    def decode(cls, text: str) -> LinkOffer:
        parts = text.split(":")
        if len(parts) != 5 or parts[0] != _OFFER_VERSION:
            raise ValueError(f"not a rapace shared-memory link offer: {text!r}")
        try:
            segment_fd, doorbell_a, doorbell_b = (int(p) for p in parts[1:4])
        except ValueError:
            raise ValueError(f"link offer has a non-numeric fd: {text!r}") from None
        return cls(segment_fd, doorbell_a, doorbell_b, parts[4])


def create_link(
    options: LinkOptions | None = None, *, peer_liveness_fd: int | None = None
) -> tuple[ShmTransport, LinkOffer]:
    """Create a link segment and its doorbells: side A's transport and the offer for B.

    Raises:
        rapace.shm.SegmentSpaceError: ``/dev/shm`` cannot hold the segment.
    """
    options = options or LinkOptions()
    layout = options.layout()
    segment = Segment.create(layout.total_size)
    doorbells: list[Doorbell] = []
    try:
        token = secrets.token_hex(4)
        write_header(
            segment.buffer,
            layout,
            creator_pid=os.getpid(),
            creator_start=process_start_time(os.getpid()) or 0,
            token=token,
        )
        doorbells = [Doorbell.create(), Doorbell.create()]
        own, peer = doorbells
        transport = ShmTransport(
            segment,
            layout,
            "a",
            token=token,
            own_doorbell=own,
            peer_doorbell=peer,
            peer_liveness_fd=peer_liveness_fd,
            spin=options.spin_policy(),
        )
    except BaseException:
        for doorbell in doorbells:
            doorbell.close()
        segment.unlink()
        segment.close()
        raise
    assert segment.name is not None
    offer = LinkOffer(segment.fileno(), own.fd, peer.fd, segment.name)
    return transport, offer


def attach_link(
    offer: LinkOffer | str,
    *,
    peer_liveness_fd: int | None = None,
    spin: float = DEFAULT_SPIN,
) -> ShmTransport:
    """Attach side B to a link from inherited fds, which it owns from then on (a failed
    attach closes them).

    Raises:
        ValueError: the fds do not hold a valid rapace link segment.
    """
    if isinstance(offer, str):
        offer = LinkOffer.decode(offer)
    try:
        segment = Segment.from_fd(offer.segment_fd)
    except BaseException:
        for fd in (offer.doorbell_a_fd, offer.doorbell_b_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    try:
        header = read_header(segment.buffer)
        return ShmTransport(
            segment,
            header.layout,
            "b",
            token=header.token,
            own_doorbell=Doorbell(offer.doorbell_b_fd),
            peer_doorbell=Doorbell(offer.doorbell_a_fd),
            peer_liveness_fd=peer_liveness_fd,
            spin=SpinPolicy(max_budget=spin),
        )
    except BaseException:
        segment.close()
        for fd in (offer.doorbell_a_fd, offer.doorbell_b_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def shm_pair(options: LinkOptions | None = None) -> tuple[ShmTransport, ShmTransport]:
    """Both sides of a link in this process, over two separate mappings of one segment.

    For tests and in-process use: the bytes still go through shared memory and eventfds.
    """
    a, offer = create_link(options)
    try:
        dup_offer = LinkOffer(
            os.dup(offer.segment_fd),
            os.dup(offer.doorbell_a_fd),
            os.dup(offer.doorbell_b_fd),
            offer.name,
        )
    except BaseException:
        a.unlink_name()
        raise
    try:
        b = attach_link(dup_offer, spin=options.spin if options else DEFAULT_SPIN)
    finally:
        a.unlink_name()
    return a, b
