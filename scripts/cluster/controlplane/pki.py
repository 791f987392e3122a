"""The control plane's certificates and keys, made with the maintained ``cryptography`` library.

One CA signs the API server's serving certificate (the host's end of the node link, 127.0.0.1,
localhost, the kubernetes Service names), the kubelet's serving certificate (the node's address)
and one client certificate per identity: the admin (system:masters, also what the API server
presents to the kubelet for logs and exec), the controller manager, the scheduler, kube-proxy
(system:kube-proxy, bound to system:node-proxier by the default policy) and the kubelet
(system:node:<name> in system:nodes, so the real Node authorizer and NodeRestriction apply). A separate RSA key signs
ServiceAccount tokens. Made once per state folder and reused by every later ``up``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 3650
SERVICE_IP = "10.96.0.1"  # the first address of the service range the API server is given

CLIENTS = {
    # file stem → (common name, organization)
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kube-proxy": ("system:kube-proxy", None),
}


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _load_key(path: Path):  # noqa: ANN202 - a private key of either kind
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _issue(
    ca_cert: x509.Certificate | None,
    ca_key,  # noqa: ANN001
    subject: x509.Name,
    key,  # noqa: ANN001
    *,
    is_ca: bool = False,
    server_names: tuple[list[str], list[str]] | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names:
        dns, ips = server_names
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure(pki: Path, node_name: str, host_ip: str, node_ip: str) -> None:
    """Create whatever is missing under ``pki`` (an existing set is kept as it is)."""
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    if not (pki / "ca.crt").exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _issue(None, ca_key, _name("visionr1-local-ca"), ca_key, is_ca=True)
        _write_key(pki / "ca.key", ca_key)
        _write_cert(pki / "ca.crt", ca)
    ca_key = _load_key(pki / "ca.key")
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    if not (pki / "sa.key").exists():
        _write_key(pki / "sa.key", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        sa_key = _load_key(pki / "sa.key")
        (pki / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    if not (pki / "apiserver.crt").exists():
        key = ec.generate_private_key(ec.SECP256R1())
        dns = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        cert = _issue(
            ca,
            ca_key,
            _name("kube-apiserver"),
            key,
            server_names=(dns, [host_ip, "127.0.0.1", SERVICE_IP]),
        )
        _write_key(pki / "apiserver.key", key)
        _write_cert(pki / "apiserver.crt", cert)
    if not (pki / "kubelet.crt").exists():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            ca,
            ca_key,
            _name(f"system:node:{node_name}"),
            key,
            server_names=([node_name], [node_ip]),
        )
        _write_key(pki / "kubelet.key", key)
        _write_cert(pki / "kubelet.crt", cert)
    clients = dict(CLIENTS)
    clients["node"] = (f"system:node:{node_name}", "system:nodes")
    for stem, (cn, org) in clients.items():
        if (pki / f"{stem}.crt").exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(pki / f"{stem}.key", key)
        _write_cert(pki / f"{stem}.crt", _issue(ca, ca_key, _name(cn, org), key, client=True))
