"""A test PKI made with `cryptography`: a root CA, an intermediate CA and a leaf for 127.0.0.1
and localhost. Files are written for an `ssl:` endpoint (key, leaf, chain)."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class TestPKI:
    ca: Path
    key: Path
    cert: Path
    chain: Path
    leaf_spki_sha256_b64: str

    def endpoint(self, port: int = 0) -> str:
        return (f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"
                f":extraCertChain={self.chain}")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, sans=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                        critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> TestPKI:
    import base64
    import hashlib

    pem = serialization.Encoding.PEM
    root_key = ec.generate_private_key(ec.SECP256R1())
    mid_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("questsig test root", root_key, "questsig test root", root_key, True)
    mid = _cert("questsig test intermediate", mid_key, "questsig test root", root_key, True)
    leaf = _cert("localhost", leaf_key, "questsig test intermediate", mid_key, False,
                 [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = TestPKI(ca=directory / "ca.pem", key=directory / "leaf.key",
                    cert=directory / "leaf.pem", chain=directory / "chain.pem",
                    leaf_spki_sha256_b64=base64.b64encode(hashlib.sha256(
                        leaf_key.public_key().public_bytes(
                            serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)).digest()).decode())
    paths.ca.write_bytes(root.public_bytes(pem))
    paths.chain.write_bytes(mid.public_bytes(pem))
    paths.cert.write_bytes(leaf.public_bytes(pem))
    paths.key.write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return paths
