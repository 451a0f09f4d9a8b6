"""The router's Autobahn connection and its service (docs/protocols/router.md). The
rules are :mod:`questsig.router.core`; the HTTP routes, which admit a ``/connect`` before its
upgrade, are :mod:`questsig.router.http`.

A connection is admitted (key checked, role chosen) before Autobahn sees it; the admission
arrives through the factory (``next_admission``), set while the upgrade builds the protocol.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from twisted.internet import defer
from twisted.logger import Logger

from questsig.app import Context, ModeService, Mount
from questsig.router.core import (
    REMOVED_REASON, SEND_BUFFER_OVERFLOW_REASON, KeyHashing, LocalRegistrations, Member, Members,
    Registration, Registrations, Router, RouterRules,
)
from questsig.router.cluster import RouterCluster
from questsig.router.http import RouterResource
from questsig.router.store import SqliteRegistrations, StoreError
from questsig.websocket import Connection, broadcast, limits, make_factory
from questsig.workers import Workers

log = Logger()


class RouterConnection(Connection):
    """One ``/connect`` socket: a member of the registration it was admitted to."""

    member: Member | None = None
    #: (registration, role) from the admission, until the handshake finishes
    admission: tuple[Registration, str] | None = None

    def connectionMade(self) -> None:
        self.admission = self.factory.next_admission
        super().connectionMade()

    def onConnect(self, request: Any) -> Any:
        origin = request.headers.get("origin")
        # no subprotocol; a successful answer echoes the Origin like every other route
        return (None, {"access-control-allow-origin": origin}) if origin else None

    def opened(self) -> None:
        if self.admission is None:
            self.close(1000, "")
            return
        registration, role = self.admission
        self.admission = None
        self.member = self.factory.router.join(registration, self, role)
        if self.member is None:
            self.close(1000, REMOVED_REASON)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.member is not None:
            self.factory.router.relay(self.member, payload, isBinary)

    def closed(self) -> None:
        shutting_down = self.factory.connections.shutting_down
        member, self.member = self.member, None
        admission, self.admission = self.admission, None
        if member is not None:
            self.factory.router.leave(member, shutting_down=shutting_down)
        elif admission is not None:
            self.factory.router.abandon(admission[0], shutting_down=shutting_down)

    def send_buffer_overflow(self) -> None:
        log.info("router: closing a receiver that let too much pile up unsent")
        self.close(1008, SEND_BUFFER_OVERFLOW_REASON)


class RouterService(ModeService):
    """Every router mount of the process. Mounts naming the same store file share one
    :class:`Router` (the same registrations on a plain and a TLS listener, say). With a
    cluster, ``store_path`` names a registration set shared with the other nodes through
    Redis (:mod:`questsig.router.cluster`), whatever ``store`` says."""

    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        self.routers: dict[str, tuple[Router, Registrations]] = {}
        #: the registration sets shared with other nodes (with ``redis`` set)
        self.shared: list[RouterCluster] = []
        reactor = context.reactor
        # Hashing is CPU-bound and scrypt releases the GIL: one thread per core, and its own
        # pool, so that a flood of /register calls cannot starve other users of the reactor's.
        threads = os.cpu_count() or 2
        self.key_threads = Workers(reactor, "router-keys", threads)
        # the queue is kept here, not in the pool's, so that a hash nobody waits for is skipped
        self.keys = KeyHashing(self.key_threads.run, concurrency=threads)

    def router_for(self, settings: Mapping[str, Any]) -> Router:
        path = Path(self.context.state_dir) / settings["store_path"]
        cluster = self.context.cluster
        # with a cluster, store_path names the registration set the nodes share, as the file
        # names it here
        where = (f"cluster:{settings['store_path']}" if cluster is not None
                 else f"{settings['store']}:{path.resolve()}")
        rules = RouterRules.from_settings(settings)
        if where in self.routers:
            router = self.routers[where][0]
            if router.rules != rules:
                log.warn("router: mounts sharing {store} differ in registration settings; "
                         "the first mount's apply", store=where)
            return router
        store: Registrations
        members: Members | None = None
        shared = None
        if cluster is not None:
            shared = RouterCluster(cluster, settings["store_path"], broadcast)
            store, members = shared.registrations, shared.members
        elif settings["store"] == "sqlite":
            store = SqliteRegistrations(path, self.context.reactor)
        else:
            store = LocalRegistrations()
        router = Router(rules, store, self.context.reactor, self.keys,
                        log_ids=self.context.log_requests, fanout=broadcast, members=members)
        if shared is not None:
            shared.attach(router)
            self.shared.append(shared)
        self.routers[where] = (router, store)
        return router

    def resource(self, mount: Mount) -> RouterResource:
        s = mount.settings
        router = self.router_for(s)
        factory = make_factory(
            RouterConnection, self.context.connections,
            **limits(s), router=router, next_admission=None)
        return RouterResource(router, mount, factory)

    def startService(self) -> None:
        # Before the listeners accept anything: an unreadable store fails the start here
        # (StoreError names the file and the reason).
        for router, store in self.routers.values():
            try:
                router.load(store.load())
            except StoreError as e:
                raise SystemExit(f"questsig: {e}") from None
        self.key_threads.start()
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield defer.maybeDeferred(super().stopService)
        for router, _ in self.routers.values():
            router.stop()
        yield defer.DeferredList([shared.close() for shared in self.shared])
        yield defer.DeferredList([store.close() for _, store in self.routers.values()])
        yield self.key_threads.stop()
