"""The router across the nodes of a cluster (docs/cluster.md, router): two in-process nodes
sharing a real ``redis-server``, with `websockets` clients and raw HTTP on either node."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import websockets

from clients import (TIMEOUT, Response, closed_with, fetch, handshake, http, nothing_arrives,
                     recv)

TOKEN = "t0ken"


# -- helpers ---------------------------------------------------------------------------------------


def node(serve: Any, redis_server: Any, node_id: str, node_timeout: float | None = None,
         **settings: Any) -> Any:
    """One node with only the router mounted at the root, sharing ``redis_server``."""
    return serve(mounts=["/=router"], document={"router": {"stats_token": TOKEN, **settings}},
                 overrides={"": {"log-requests": True}}, redis=redis_server.url,
                 node_id=node_id, node_timeout=node_timeout)


async def get(server: Any, target: str) -> Response:
    return await fetch(server.port(), target)


async def register(server: Any, key: str = "k", host_key: str = "h",
                   reg_type: str = "hostclient", id_req: str | None = None) -> str:
    query = f"/register?key={key}&host_key={host_key}&reg_type={reg_type}"
    if id_req is not None:
        query += f"&id_req={id_req}"
    response = await get(server, query)
    assert response.status == 200, response
    return response.body.decode()


async def upgrade(server: Any, query: str) -> Response:
    """The answer to a /connect handshake (101 when it succeeds)."""
    return await http(server.port(), handshake(b"/connect?" + query.encode()))


def connect(server: Any, query: str) -> Any:
    return websockets.connect(server.url("/connect?" + query), open_timeout=TIMEOUT)


@contextlib.asynccontextmanager
async def sockets(*places: tuple[Any, str]) -> AsyncIterator[list[Any]]:
    """Sockets opened one after another on the given (server, query) places."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(server, q)) for server, q in places]


async def connections(server: Any) -> dict[str, int]:
    """/stats of ``server``: open sockets by registration id."""
    response = await get(server, f"/stats?token={TOKEN}")
    assert response.status == 200, response
    return {r["id"]: r["connections"] for r in json.loads(response.body)["registrations"]}


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> None:
    """Poll an async condition with a bounded number of tries."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def counted(server: Any, reg_id: str, n: int, timeout: float = TIMEOUT) -> None:
    """Wait until ``server``'s /stats counts ``n`` sockets of ``reg_id`` (0: or no record)."""
    async def reached() -> bool:
        return (await connections(server)).get(reg_id, 0) == n
    await until(reached, timeout)


async def gone(server: Any, reg_id: str, timeout: float = TIMEOUT) -> None:
    """Wait until ``server`` answers /connect to ``reg_id`` with 404."""
    async def not_found() -> bool:
        return (await upgrade(server, f"id={reg_id}&key=k")).status == 404
    await until(not_found, timeout)


def sends_to(server: Any, node_id: str) -> list[bytes]:
    """Record the router messages ``server``'s cluster sends to ``node_id`` from now on."""
    cluster = server.service.cluster
    sent: list[bytes] = []
    original = cluster.send

    def send(to: str, topic: str, payload: bytes) -> None:
        if to == node_id and topic.startswith("router:"):
            sent.append(payload)
        original(to, topic, payload)
    cluster.send = send
    return sent


# -- tests -----------------------------------------------------------------------------------------


async def test_host_and_client_on_two_nodes_talk_both_ways_in_order(redis_server, serve):
    """A host on node A and a client on node B exchange messages both ways, in order."""
    a = node(serve, redis_server, "a")
    b = node(serve, redis_server, "b")
    reg_id = await register(a)
    async with sockets((a, f"id={reg_id}&key=k&sock_type=host"),
                       (b, f"id={reg_id}&key=k&sock_type=client")) as (host, client):
        for i in range(30):
            await client.send(f"offer {i}")
        assert [await recv(host) for _ in range(30)] == [f"offer {i}" for i in range(30)]
        for i in range(30):
            await host.send(b"answer %d" % i)
        assert [await recv(client) for _ in range(30)] == [b"answer %d" % i for i in range(30)]
        await nothing_arrives(host)


async def test_lobby_message_goes_once_to_each_other_node(redis_server, serve):
    """A lobby message reaches every member on the other node through one send to that node,
    and never comes back to its sender."""
    a = node(serve, redis_server, "a")
    b = node(serve, redis_server, "b")
    reg_id = await register(b, reg_type="lobby")
    async with sockets((b, f"id={reg_id}&key=k"), (b, f"id={reg_id}&key=k"),
                       (a, f"id={reg_id}&key=k")) as (m1, m2, m3):
        await m3.send("hello from a")  # A learnt of B's members before its own joined
        assert (await recv(m1), await recv(m2)) == ("hello from a", "hello from a")
        sent = sends_to(a, "b")
        await m3.send("again")
        assert (await recv(m1), await recv(m2)) == ("again", "again")
        assert len(sent) == 1 and sent[0].endswith(b"again")
        await m1.send("from b")
        assert (await recv(m2), await recv(m3)) == ("from b", "from b")
        await nothing_arrives(m1)


async def test_any_node_answers_register_connect_and_remove(redis_server, serve):
    """An id registered on A is taken on B, B checks its keys, and /remove on B closes the
    sockets on A with the /remove Close; the id is then free on both."""
    a = node(serve, redis_server, "a")
    b = node(serve, redis_server, "b")
    reg_id = await register(a, id_req="shared01")
    assert reg_id == "shared01"
    assert await register(b, key="x", host_key="y", id_req="shared01") != "shared01"
    assert await register(b, id_req="shared01") == "shared01"  # same keys: idempotent
    wrong = await upgrade(b, f"id={reg_id}&key=nope")
    assert (wrong.status, wrong.body) == (500, b"Unhandled rejection: IncorrectKey")
    assert (await get(b, f"/remove?id={reg_id}&key=k&host_key=nope")).status == 500
    async with sockets((a, f"id={reg_id}&key=k&sock_type=host"),
                       (a, f"id={reg_id}&key=k&sock_type=client"),
                       (b, f"id={reg_id}&key=k&sock_type=client")) as (host, client_a, client_b):
        removed = await get(b, f"/remove?id={reg_id}&key=k&host_key=h")
        assert (removed.status, removed.body) == (200, b"")
        for ws in (host, client_a, client_b):
            assert await closed_with(ws) == (1000, "registration removed")
    for server in (a, b):
        assert (await upgrade(server, f"id={reg_id}&key=k")).status == 404
    assert await register(a, key="x", host_key="y", id_req="shared01") == "shared01"


async def test_an_id_requested_on_two_nodes_at_once_goes_to_one(redis_server, serve):
    """Two /register calls for one id_req on two nodes at once: exactly one gets the id, and the
    other's registration never overwrites it."""
    a = node(serve, redis_server, "a", reject_invalid_id_req=True)
    b = node(serve, redis_server, "b", reject_invalid_id_req=True)
    for n in range(5):
        wanted = f"raced{n:03d}"
        answers = await asyncio.gather(
            get(a, f"/register?key=ka&host_key=h&reg_type=lobby&id_req={wanted}"),
            get(b, f"/register?key=kb&host_key=h&reg_type=lobby&id_req={wanted}"))
        assert sorted((r.status, r.body) for r in answers) == [
            (200, wanted.encode()), (500, b"Unhandled rejection: InUseID")]
        winner = "ka" if answers[0].status == 200 else "kb"
        loser = "kb" if winner == "ka" else "ka"
        for server in (a, b):
            assert (await upgrade(server, f"id={wanted}&key={loser}")).status == 500
            assert (await upgrade(server, f"id={wanted}&key={winner}")).status == 101


async def test_stats_and_socket_limit_count_the_cluster(redis_server, serve):
    """/stats on either node counts the sockets of both, and the socket limit is cluster-wide."""
    a = node(serve, redis_server, "a", max_sockets_per_registration=2)
    b = node(serve, redis_server, "b", max_sockets_per_registration=2)
    reg_id = await register(a)
    other = await register(b, reg_type="lobby")
    async with sockets((a, f"id={reg_id}&key=k&sock_type=host"),
                       (b, f"id={reg_id}&key=k&sock_type=client"),
                       (b, f"id={other}&key=k")):
        for server in (a, b):
            await counted(server, reg_id, 2)
            assert await connections(server) == {reg_id: 2, other: 1}
        full = await upgrade(a, f"id={reg_id}&key=k&sock_type=client")
        assert (full.status, full.body) == (503, b"Unhandled rejection: TooManyConnections")


async def test_auto_removal_waits_for_the_last_socket_on_any_node(redis_server, serve):
    """A registration is auto-removed only once its last socket, on whichever node, is gone."""
    a = node(serve, redis_server, "a", auto_remove_grace=0)
    b = node(serve, redis_server, "b", auto_remove_grace=0)
    reg_id = await register(a)
    async with sockets((b, f"id={reg_id}&key=k&sock_type=client")) as (client,):
        async with sockets((a, f"id={reg_id}&key=k&sock_type=host")):
            await counted(b, reg_id, 2)
        await counted(b, reg_id, 1)
        await asyncio.sleep(0.3)
        assert (await connections(a)) == {reg_id: 1}  # the client on B keeps it
        await client.send("still here")
    await gone(a, reg_id)
    await gone(b, reg_id)


async def test_unused_ttl_ends_a_registration_made_on_another_node(redis_server, serve):
    """A registration that never had a socket ends after its unused TTL, on every node."""
    a = node(serve, redis_server, "a", unused_ttl=1)
    b = node(serve, redis_server, "b", unused_ttl=1)
    reg_id = await register(a)
    assert (await upgrade(b, f"id={reg_id}&key=k")).status == 500  # B finds it: no sock_type
    await gone(b, reg_id, timeout=4)
    assert reg_id not in await connections(a)


async def test_a_dead_node_releases_its_sockets_within_the_bound(redis_server, serve):
    """A node that stops abruptly has its sockets released by the survivor within the node
    timeout, and the registration it last held is then auto-removed."""
    a = node(serve, redis_server, "a", node_timeout=1, auto_remove_grace=0)
    b = node(serve, redis_server, "b", node_timeout=1, auto_remove_grace=0)
    reg_id = await register(a)
    held = await register(a, reg_type="lobby")
    async with sockets((a, f"id={held}&key=k"), (b, f"id={held}&key=k"),
                       (b, f"id={reg_id}&key=k&sock_type=client")):
        await counted(a, held, 2)
        await counted(a, reg_id, 1)
        started = time.monotonic()
        await b.wait(b.service.cluster.abandon())  # as if killed: no goodbye in Redis
        await counted(a, held, 1, timeout=6)
        await gone(a, reg_id, timeout=6)
        assert time.monotonic() - started < 1 + 5


async def test_redis_restart_local_traffic_goes_on_and_the_cluster_recovers(redis_server, serve):
    """With Redis stopped, sockets on one node keep relaying and /register answers 503; once it
    is back (empty), the nodes re-publish their registrations and sockets by themselves."""
    a = node(serve, redis_server, "a")
    b = node(serve, redis_server, "b")
    reg_id = await register(a)
    async with sockets((a, f"id={reg_id}&key=k&sock_type=host"),
                       (a, f"id={reg_id}&key=k&sock_type=client"),
                       (b, f"id={reg_id}&key=k&sock_type=client")) as (host, client_a, client_b):
        await counted(a, reg_id, 3)
        redis_server.stop()

        async def down() -> bool:
            return not a.service.cluster.up and not b.service.cluster.up
        await until(down)
        await client_a.send("local")
        assert await recv(host) == "local"
        refused = await get(a, "/register?key=k&host_key=h&reg_type=lobby")
        assert (refused.status, refused.body) == (503, b"Unhandled rejection: ClusterUnavailable")
        assert (await upgrade(b, f"id={reg_id}&key=k")).status == 503
        assert (await get(b, f"/remove?id={reg_id}&key=k&host_key=h")).status == 503
        assert (await get(a, f"/stats?token={TOKEN}")).status == 503

        redis_server.start()

        async def up() -> bool:
            return a.service.cluster.up and b.service.cluster.up
        await until(up, timeout=10)
        await counted(a, reg_id, 3)
        await counted(b, reg_id, 3)
        await client_b.send("across again")
        assert await recv(host) == "across again"
        await host.send("to all clients")
        assert (await recv(client_a), await recv(client_b)) == ("to all clients",) * 2
        async with sockets((b, f"id={reg_id}&key=k&sock_type=client")):
            await counted(a, reg_id, 4)


async def commands_run(server: Any) -> dict[str, int]:
    """Redis's count of every command run so far, by command (INFO itself left out)."""
    stats = await server.wait(server.cluster.call("INFO", "commandstats"))
    return {name: entry["calls"] for name, entry in stats.items() if name != "cmdstat_info"}


async def test_an_odd_id_works_across_nodes(redis_server, serve):
    """An id with a space, a colon, a percent sign, a slash and non-ASCII letters relays
    across nodes, is counted, and /remove on the other node closes its sockets."""
    a = node(serve, redis_server, "a")
    b = node(serve, redis_server, "b")
    odd = quote("a b:c%/\u00fc\u4e2d", safe="")
    reg_id = await register(a, id_req=odd)
    assert reg_id == "a b:c%/\u00fc\u4e2d"
    async with sockets((a, f"id={odd}&key=k&sock_type=host"),
                       (b, f"id={odd}&key=k&sock_type=client")) as (host, client):
        await client.send("offer")
        assert await recv(host) == "offer"
        await host.send(b"answer")
        assert await recv(client) == b"answer"
        await counted(a, reg_id, 2)
        removed = await get(b, f"/remove?id={odd}&key=k&host_key=h")
        assert (removed.status, removed.body) == (200, b"")
        for ws in (host, client):
            assert await closed_with(ws) == (1000, "registration removed")


async def test_sockets_on_one_node_relay_without_redis(redis_server, serve):
    """Frames between a host and a client on one node run no Redis command at all."""
    a = node(serve, redis_server, "a", node_timeout=60)
    reg_id = await register(a)
    async with sockets((a, f"id={reg_id}&key=k&sock_type=host"),
                       (a, f"id={reg_id}&key=k&sock_type=client")) as (host, client):
        await client.send("first")
        assert await recv(host) == "first"
        await asyncio.sleep(0.2)  # the sockets' own writes are done
        before = await commands_run(a)
        for i in range(100):
            await client.send(f"offer {i}")
            await host.send(b"answer %d" % i)
        assert [await recv(host) for _ in range(100)] == [f"offer {i}" for i in range(100)]
        assert [await recv(client) for _ in range(100)] == [b"answer %d" % i for i in range(100)]
        assert await commands_run(a) == before

