"""Web Push for the hub (docs/protocols/hub.md), split by concern:

``checks``     which subscriptionData is stored: https only, no private or local hosts
``crypto``     the payload, its encryption for the subscription and the VAPID signature
``delivery``   one POST to the push service, bounded by push-timeout as a whole
``store``      the subscriptions' SQLite table
``service``    the hub's push sink: decides on the reactor, works on threads
``__main__``   ``python -m questsig.hub.push genkey [FILE]`` makes a VAPID key pair
"""
from __future__ import annotations

from questsig.hub.push.crypto import generate_key
from questsig.hub.push.service import PushService, PushSettings, make_push_service, validate

__all__ = ["PushService", "PushSettings", "generate_key", "make_push_service", "validate"]
