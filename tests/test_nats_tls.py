"""TLS to NATS through NatsConfig: a server that requires TLS (and one that verifies clients) is
reached with the CA (and this side's certificate) and refused without."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from autellix.services.embedded_nats import EmbeddedNats
from autellix.services.nats_config import NatsConfig
from autellix.services.nats_conn import connect


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("autellix-test-ca", ca_key, None, ca_key, ca=True)
    out: dict[str, str] = {}
    out["ca"], _ = _write(d / "ca", ca_key, ca)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        out[f"{name}_cert"], out[f"{name}_key"] = _write(d / name, key, _cert(name, key, ca.subject, ca_key, ca=False))
    return out


def _tls_block(pki: dict[str, str], verify: bool) -> str:
    return (
        f'tls {{\n  cert_file: "{pki["server_cert"]}"\n  key_file: "{pki["server_key"]}"\n'
        f'  ca_file: "{pki["ca"]}"\n  verify: {"true" if verify else "false"}\n}}\n'
    )


async def _round_trip(nats: NatsConfig) -> None:
    # refused: nats-py raises, or (a failed TLS handshake, by version) keeps retrying: either way no connection
    nc = await asyncio.wait_for(connect(nats, "tls-test", fail_fast=True), 5)
    try:
        sub = await nc.subscribe("tls.test")
        await nc.publish("tls.test", b"hi")
        assert (await sub.next_msg(timeout=5)).data == b"hi"
    finally:
        await nc.close()


async def test_tls_server_is_reached_with_the_ca_and_refused_without(pki: dict[str, str]) -> None:
    with EmbeddedNats(port=0, jetstream=False, config=_tls_block(pki, verify=False)) as server:
        await _round_trip(NatsConfig(urls=(server.url,), tls_ca=pki["ca"]))
        with pytest.raises(Exception):  # noqa: B017  (an ssl error, nats-py's own, or the timeout)
            await _round_trip(NatsConfig(urls=(server.url,)))


async def test_mutual_tls_needs_this_sides_certificate(pki: dict[str, str]) -> None:
    with EmbeddedNats(port=0, jetstream=False, config=_tls_block(pki, verify=True)) as server:
        mine = NatsConfig(urls=(server.url,), tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        await _round_trip(mine)
        with pytest.raises(Exception):  # noqa: B017
            await _round_trip(NatsConfig(urls=(server.url,), tls_ca=pki["ca"]))
