"""TLS listeners: an `ssl:` endpoint serving a full certificate chain."""
from __future__ import annotations

import ssl

import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs import make_pki
from clients import nothing_arrives, recv
from questsig.listeners import endpoint_problem


def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))  # trusts the root only
    return ctx


async def test_wss_with_full_chain(serve, tmp_path) -> None:
    """A client that trusts only the root CA verifies the leaf via the served intermediate and
    exchanges hub messages over wss://."""
    pki = make_pki(tmp_path)
    server = serve(mounts=["/=hub"], endpoints=[pki.endpoint()])
    ctx = client_context(pki.ca)
    url = f"wss://localhost:{server.port()}"
    async with websockets.connect(url + "/?user=alice", ssl=ctx) as alice, \
            websockets.connect(url + "/?user=bob", ssl=ctx) as bob:
        msg = '{"protocol":"one-to-one","endpoint":"alice","data":"over tls"}'
        await bob.send(msg)
        assert await recv(alice) == msg
        await nothing_arrives(bob, 0.1)


async def test_tls_without_chain_is_not_trusted(serve, tmp_path) -> None:
    """Without extraCertChain the same client cannot verify the leaf: the chain is what makes
    the previous test pass."""
    pki = make_pki(tmp_path)
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}"
    server = serve(mounts=["/=hub"], endpoints=[endpoint])
    try:
        async with websockets.connect(f"wss://localhost:{server.port()}/?user=x",
                                      ssl=client_context(pki.ca)):
            raise AssertionError("connected without the intermediate")
    except ssl.SSLCertVerificationError:
        pass


async def test_full_chain_in_cert_file(serve, tmp_path) -> None:
    """A certKey file that holds the leaf followed by the intermediate (a "fullchain.pem")
    serves the whole chain without extraCertChain."""
    pki = make_pki(tmp_path)
    fullchain = tmp_path / "fullchain.pem"
    fullchain.write_bytes(pki.cert.read_bytes() + pki.chain.read_bytes())
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={fullchain}"
    server = serve(mounts=["/=hub"], endpoints=[endpoint])
    async with websockets.connect(f"wss://localhost:{server.port()}/?user=a",
                                  ssl=client_context(pki.ca)) as a:
        await a.send('{"protocol":"one-to-self","tls":"fullchain"}')
        assert await recv(a) == '{"protocol":"one-to-self","tls":"fullchain"}'


def test_tls_file_mistakes_are_named(tmp_path, monkeypatch) -> None:
    """Mistakes that show only when an ssl: endpoint's files are loaded are named in one line."""
    monkeypatch.chdir(tmp_path)
    make_pki(tmp_path)
    other = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    (tmp_path / "other.key").write_bytes(other.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "locked.key").write_bytes(other.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    assert endpoint_problem("ssl:0:privateKey=other.key:certKey=leaf.pem") == (
        "the key in other.key does not belong to the certificate in leaf.pem")
    assert endpoint_problem("ssl:0:privateKey=locked.key:certKey=leaf.pem") == (
        "the key in locked.key is encrypted (questsig needs it without a passphrase)")
    assert endpoint_problem("ssl:0:privateKey=leaf.key:certKey=leaf.pem:extraCertChain=gone.pem"
                            ) == "certificate chain file gone.pem not found"
    assert endpoint_problem("ssl:0:privateKey=leaf.key:certKey=leaf.pem:extraCertChain=leaf.key"
                            ) == "no certificate in leaf.key"
    assert endpoint_problem("ssl:0:privateKey=leaf.key:certKey=leaf.pem:extraCertChain=chain.pem"
                            ) is None
