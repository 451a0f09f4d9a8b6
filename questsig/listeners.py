"""Listeners: endpoint strings, TLS certificate chains and the services that bind them.

Every endpoint string is parsed once, before any service starts, so that a mistake fails the
start with one line in the user's terms (the parameter, the file, what is wrong with it) rather
than a traceback from deep inside Twisted's parsers.
"""
from __future__ import annotations

import inspect
import re
import resource as rlimit
import socket
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (IOpenSSLServerConnectionCreator,
                                         IStreamServerEndpointStringParser)
from twisted.plugin import getPlugins
from zope.interface import implementer

from questsig.config import Config
from questsig.settings import ConfigError

#: parameters Twisted's endpoint parsers pass through ``int()``
_NUMBERS = ("port", "backlog", "index")


def parse_endpoints(cfg: Config, reactor: Any = None) -> list[Any]:
    """Every listener's endpoint, parsed; raises :class:`ConfigError` naming the first bad one."""
    if reactor is None:
        from twisted.internet import reactor
    return [parse_endpoint(listener.endpoint, reactor) for listener in cfg.listeners]


def parse_endpoint(description: str, reactor: Any) -> Any:
    """One endpoint string as a server endpoint; a typo, an unusable TLS file or a ``systemd:``
    socket that was not passed (systemd 227+ sets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES)
    raises :class:`ConfigError`."""
    problem = endpoint_problem(description)
    if problem is None:
        try:
            return reloadable_tls(
                with_full_chain(endpoints.serverFromString(reactor, description), description),
                description, reactor)
        except IndexError:
            problem = "no such socket was passed by systemd (LISTEN_FDS)"
        except KeyError as e:
            problem = f"no socket named {e.args[0]!r} was passed by systemd (LISTEN_FDNAMES)"
        except Exception as e:  # whatever the checks above missed still gets one line
            problem = str(e) or type(e).__name__
    raise ConfigError(f"bad endpoint {description!r}: {problem}")


def endpoint_problem(description: str) -> str | None:
    """What is wrong with an endpoint string, in the user's terms, or None when nothing that
    can be checked before binding is."""
    try:
        args, kwargs = endpoints._parse(description)
    except Exception as e:  # the tokenizer's errors are plain text already
        return f"cannot read it ({e})"
    if not args or not args[0]:
        return "no endpoint type (e.g. tcp:8000)"
    kind, values = args[0], args[1:]
    parser = _parser(kind)
    if parser is None:
        return f"unknown endpoint type {kind!r} (e.g. tcp, ssl, unix, systemd)"
    given, problem = _bind(kind, parser, values, kwargs)
    if problem is None and kind == "ssl":
        problem = tls_files_problem(given)
    if problem is None and kind == "systemd" and given.get("domain") is not None:
        if not hasattr(socket, "AF_" + given["domain"]):
            problem = (f"domain {given['domain']!r} is not an address family "
                       "(e.g. INET, INET6, UNIX)")
    return problem


def _parser(kind: str) -> Callable[..., Any] | None:
    """The function that takes an endpoint type's parameters, as Twisted looks it up."""
    builtin = endpoints._serverParsers.get(kind)
    if builtin is not None:
        return builtin
    for plugin in getPlugins(IStreamServerEndpointStringParser):
        if plugin.prefix.lower() == kind.lower():
            # Twisted's own plugins take ``*args, **kwargs`` and hand them to ``_parseServer``
            return getattr(plugin, "_parseServer", plugin.parseStreamServer)
    return None


def _bind(kind: str, parser: Callable[..., Any], values: list[str],
          kwargs: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """Name the given values as the parser would, and say what does not fit its signature."""
    try:
        params = list(inspect.signature(parser).parameters.values())[1:]  # factory or reactor
    except (TypeError, ValueError):
        return {}, None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}, None  # a parser that takes anything: let it judge
    names = [p.name for p in params]
    takes = f"{kind} takes {', '.join(names)}"
    if len(values) > len(names):
        return {}, f"too many values ({takes})"
    given = dict(zip(names, values))
    for name, value in kwargs.items():
        if name not in names:
            return {}, f"unknown parameter {name!r} ({takes})"
        if name in given:
            return {}, f"{name} given twice"
        given[name] = value
    for p in params:
        if p.default is p.empty and p.name not in given:
            return given, f"no {p.name} given ({takes})"
    for name in _NUMBERS:
        value = given.get(name)
        if value is None:
            continue
        try:
            number = int(value)  # as Twisted reads it (" 8000", "+8000" and "8_000" too)
        except ValueError:
            return given, f"{name} {value!r} is not a number"
        if name == "port" and not 0 <= number <= 65535:
            return given, f"port {value} is out of range (0-65535)"
    return given, None


# -- TLS files ------------------------------------------------------------------------------

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def tls_files_problem(given: dict[str, str]) -> str | None:
    """What is wrong with the files an ``ssl:`` endpoint names (``privateKey``, ``certKey``,
    ``extraCertChain``, ``dhParameters``), checked the way Twisted will load them: the first
    certificate of ``certKey`` (default: the key file) and the first private key of
    ``privateKey`` (default: ``server.pem``)."""
    key_file = given.get("privateKey")
    if key_file is None:
        key_file = "server.pem"
        if not Path(key_file).exists():
            return f"no privateKey= given and the default key file {key_file} is not found"
    cert_file = given.get("certKey") or key_file
    key_pem, problem = _read(key_file, "key file")
    if problem is not None:
        return problem
    cert_pem, problem = _read(cert_file, "certificate file")
    if problem is not None:
        return problem
    certificate = _PEM_CERTIFICATE.search(cert_pem)
    if certificate is None:
        if not _PEM_BLOCK.search(cert_pem):
            return f"{cert_file} is not a PEM certificate file"
        hint = " (give the certificate file as certKey=)" if "certKey" not in given else ""
        return f"no certificate in {cert_file}{hint}"
    try:
        cert = x509.load_pem_x509_certificate(certificate.group(0))
    except ValueError as e:
        return f"cannot read the certificate in {cert_file}: {e}"
    key_block = next((m for m in _PEM_BLOCK.finditer(key_pem)
                      if m.group(1).endswith(b"PRIVATE KEY")), None)
    if key_block is None:
        return f"{key_file} is not a PEM key"
    if (key_block.group(1) == b"ENCRYPTED PRIVATE KEY"
            or b"Proc-Type: 4,ENCRYPTED" in key_block.group(0)):
        return f"the key in {key_file} is encrypted (questsig needs it without a passphrase)"
    try:
        key = serialization.load_pem_private_key(key_block.group(0), password=None)
    except (ValueError, TypeError) as e:
        return f"cannot read the key in {key_file}: {e}"
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        return f"the key in {key_file} does not belong to the certificate in {cert_file}"
    chain_file = given.get("extraCertChain")
    if chain_file is not None:
        chain_pem, problem = _read(chain_file, "certificate chain file")
        if problem is not None:
            return problem
        if not _PEM_CERTIFICATE.search(chain_pem):
            return f"no certificate in {chain_file}"
    if given.get("dhParameters") is not None:
        return _read(given["dhParameters"], "dhParameters file")[1]
    return None


def _read(path: str, what: str) -> tuple[bytes, str | None]:
    try:
        return Path(path).read_bytes(), None
    except FileNotFoundError:
        return b"", f"{what} {path} not found"
    except OSError as e:
        return b"", f"cannot read {what} {path}: {e.strerror or e}"


def with_full_chain(endpoint: Any, description: str) -> Any:
    """Let an ``ssl:`` certKey file hold the whole chain, leaf first (a "fullchain.pem" as ACME
    clients write it). Twisted serves only that file's first certificate unless
    ``extraCertChain`` names a chain file; without one, the rest of the file is the chain."""
    from twisted.internet.ssl import Certificate

    try:
        args, kwargs = endpoints._parse(description)
    except Exception:
        return endpoint
    options = getattr(endpoint, "_sslContextFactory", None)
    if not args or args[0] != "ssl" or "extraCertChain" in kwargs or options is None:
        return endpoint
    cert_file = kwargs.get("certKey") or kwargs.get("privateKey") or "server.pem"
    try:
        with open(cert_file, "rb") as f:
            pems = _PEM_CERTIFICATE.findall(f.read())
    except OSError:
        return endpoint
    if len(pems) > 1 and not options.extraCertChain:
        options.extraCertChain = [Certificate.loadPEM(pem).original for pem in pems[1:]]
    return endpoint



@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """The TLS settings of one ``ssl:`` listener, replaceable while it listens: each new
    handshake asks for the current ones, and connections already open keep theirs."""

    def __init__(self, options: Any, description: str, reactor: Any):
        self.options = options
        self.description = description
        self.reactor = reactor

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.options.serverConnectionForTLS(protocol)

    def getContext(self) -> Any:
        return self.options.getContext()

    def reload(self) -> str | None:
        """Read the endpoint's files again; None when the new ones are in use, otherwise what is
        wrong with them (the current ones stay)."""
        problem = endpoint_problem(self.description)
        if problem is not None:
            return problem
        try:
            fresh = with_full_chain(endpoints.serverFromString(self.reactor, self.description),
                                    self.description)
            options = fresh._sslContextFactory
            options.getContext()  # loads and checks everything now, not at the next handshake
        except Exception as e:  # whatever OpenSSL refuses is reported, never raised
            return str(e) or type(e).__name__
        self.options = options
        return None


def reloadable_tls(endpoint: Any, description: str, reactor: Any) -> Any:
    """An ``ssl:`` endpoint whose certificate files :meth:`ListenerService.reload_tls` can read
    again; other endpoints as they are."""
    options = getattr(endpoint, "_sslContextFactory", None)
    if options is not None and not isinstance(options, ReloadableTLS):
        endpoint._sslContextFactory = ReloadableTLS(options, description, reactor)
    return endpoint


# -- services -------------------------------------------------------------------------------

class ListenerService(StreamServerEndpointService):
    """One endpoint serving one Site. Like ``strports.service``, a port that cannot be bound
    fails the start instead of leaving a process that listens on nothing."""

    _raiseSynchronously = True

    def __init__(self, endpoint_string: str, endpoint: Any, factory: Any):
        super().__init__(endpoint, factory)
        self.endpoint_string = endpoint_string
        self.port: Any = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # one clear line and a non-zero exit, rather than a traceback
            raise SystemExit(f"questsig: cannot listen on {self.endpoint_string}: "
                             f"{e.socketError}") from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        return port

    def reload_tls(self) -> str | None:
        """Read this listener's certificate files again (``ssl:`` listeners only): None when the
        new files serve from the next handshake on, otherwise why the current ones stay."""
        tls = getattr(self.endpoint, "_sslContextFactory", None)
        if not isinstance(tls, ReloadableTLS):
            return None
        return tls.reload()

    @property
    def reloads_tls(self) -> bool:
        return isinstance(getattr(self.endpoint, "_sslContextFactory", None), ReloadableTLS)


def describe_port(port: Any) -> str:
    """`` (port N)`` for a bound port, so that ``tcp:0`` logs the port it got."""
    try:
        return f" (port {port.getHost().port})"
    except Exception:
        return ""


def raise_open_file_limit(wanted: int = 0) -> None:
    """Long-lived signaling servers hold one descriptor per client: use what the system allows."""
    try:
        soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
        target = hard if wanted == 0 else min(wanted, hard) if hard != rlimit.RLIM_INFINITY else wanted
        if target == rlimit.RLIM_INFINITY:
            target = 1 << 20
        if target > soft:
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass
