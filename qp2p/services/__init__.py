"""qp2p's services: protocols between peers carried as control frames (kind != 0), each
a plug-in on the narrow :class:`~qp2p.services.host.ServiceHost` interface. The endpoint
starts them at bind (:func:`start`) and routes each control frame to the service
registered for its kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import echo, race
from .echo import Echo
from .holepunch import HolePunch
from .host import ServiceHost
from .relay import Relay
from .rendezvous import Rendezvous

if TYPE_CHECKING:
    from ..relay import Relays

__all__ = ["ServiceHost", "Services", "echo", "race", "start"]


@dataclass(frozen=True, slots=True)
class Services:
    """The services an endpoint runs."""

    echo: Echo
    rendezvous: Rendezvous
    holepunch: HolePunch
    relay: Relay


def start(host: ServiceHost, relays: Relays) -> Services:
    """Create every service on ``host`` (each registers its control-frame kinds);
    ``relays``: the endpoint's relay data plane, which the relay service steers."""
    holepunch = HolePunch(host)
    return Services(echo=Echo(host), rendezvous=Rendezvous(host), holepunch=holepunch,
                    relay=Relay(host, relays, holepunch))
