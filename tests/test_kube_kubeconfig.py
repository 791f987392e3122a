"""The operator's client logs in with what kopf read from a kubeconfig: its ``*-data`` fields are
base64 text (a service account's files are PEM); both must give a working TLS configuration."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from visionr1_operator.kube import Kube, config_from_connection


def ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_kubeconfig_base64_and_pem_ca_data_both_load() -> None:
    pem = ca_pem()
    for ca_data in (base64.b64encode(pem).decode(), pem):  # kubeconfig text, PEM bytes
        info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", ca_data=ca_data, token="t")
        config = config_from_connection(info)
        cluster = config.get().cluster
        assert base64.b64decode(cluster.certificate_auth_data) == pem
        asyncio.run(build(config))


async def build(config: object) -> None:
    kube = Kube(config)  # type: ignore[arg-type]  # builds the TLS context: fails on bad data
    await kube.close()
