"""The clinic's own certificate authority and the box's server certificate, made with ``cryptography``.

``ensure_tls(dir, names, ips)`` leaves in ``dir``::

    ca.crt       the clinic CA (workstations trust this one file)
    ca.key       its private key, 0600
    server.crt   the gateway's certificate, signed by the CA, for every DNS name and IP address given
    server.key   its private key, 0600

It is idempotent: files that exist and are valid are kept. The CA is kept as long as it is valid (so workstations
never need to re-import it); the server certificate is re-issued only when it is missing, expires within 30 days, is
not signed by this CA, or does not cover every name and address asked for.

``renew_server(dir)`` re-issues the server certificate on purpose (before it expires, or after a key leak): a new key
and a new validity for the same names and addresses, signed by the same CA, so the workstations' trust is untouched.
``read_certificate(path)`` is what ``clinic-edge status`` reads to warn before the certificate expires.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.atomic import atomic_write_text
from appliance.errors import InputError, UsageError

__all__ = [
    "RENEW_BEFORE",
    "TlsFiles",
    "ca_fingerprint",
    "certificate_names",
    "ensure_tls",
    "read_certificate",
    "renew_server",
]

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime browsers and OS trust stores accept for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)  # also when `clinic-edge status` starts warning
GATEWAY_RESTART = "sudo systemctl restart clinic-edge-gateway"  # the gateway reads its certificate only at start


@dataclass
class TlsFiles:
    """What :func:`ensure_tls` left behind and what it changed."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    ca_sha256: str
    names: list[str]
    ips: list[str]
    server_not_after: str
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    replaced_not_after: str | None = None  # renew only: when the certificate it replaced would have expired

    def to_dict(self) -> dict[str, object]:
        """The ``--json`` document."""
        extra: dict[str, object] = {}
        if self.replaced_not_after is not None:
            extra = {"replaced_not_after": self.replaced_not_after, "next": GATEWAY_RESTART}
        return extra | {
            "dir": str(self.dir),
            "ca_cert": str(self.ca_cert),
            "ca_key": str(self.ca_key),
            "server_cert": str(self.server_cert),
            "server_key": str(self.server_key),
            "ca_sha256": self.ca_sha256,
            "names": self.names,
            "ips": self.ips,
            "server_not_after": self.server_not_after,
            "created": self.created,
            "kept": self.kept,
        }


def ca_fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint as people compare it: ``AB:CD:...`` (what Windows and openssl show)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def _utc_text(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def read_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate in ``path``; :class:`InputError` saying what is wrong when it cannot be read."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as err:
        raise InputError(
            f"{path} does not exist.", "Check --dir; the installer keeps them in /etc/clinic-edge/tls."
        ) from err
    except PermissionError as err:
        raise InputError(f"{path} is not readable by this user.", "Run it with sudo.") from err
    except ValueError as err:
        raise InputError(
            f"{path} is not a PEM certificate: {err}.", "Restore it, or run clinic-edge tls ensure."
        ) from err


def certificate_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a certificate is valid for (its subjectAltName), in their order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return list(san.get_values_for_type(x509.DNSName)), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and key if both exist, parse, match and the certificate is still valid."""
    if not (cert_path.is_file() and key_path.is_file()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return None
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return None
    return cert, key


def _make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clinic-edge"),
            x509.NameAttribute(NameOID.COMMON_NAME, "clinic-edge local CA"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
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
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str], ips: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else ips[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _covers(cert: x509.Certificate, ca_cert: x509.Certificate, names: list[str], ips: list[str]) -> bool:
    """Is ``cert`` issued by ``ca_cert`` and valid for every name and address?"""
    try:
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # any failure here means: issue a new one
        return False
    have_names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return {n.lower() for n in names} <= have_names and {str(ipaddress.ip_address(i)) for i in ips} <= have_ips


def _check_inputs(names: list[str], ips: list[str]) -> list[str]:
    if not names and not ips:
        raise UsageError(
            "No name or address for the server certificate.",
            "Give the box's DNS names and LAN addresses, e.g. --name dental-ai.clinic.lan --ip 192.168.1.20.",
        )
    out = []
    for ip in ips:
        try:
            out.append(str(ipaddress.ip_address(ip)))
        except ValueError as err:
            raise UsageError(f"'{ip}' is not an IP address.", "Pass addresses like --ip 192.168.1.20.") from err
    for n in names:
        if not n or any(c.isspace() for c in n) or "/" in n or len(n) > 253:
            raise UsageError(f"'{n}' is not a DNS name.", "Pass names like --name dental-ai.clinic.lan.")
    return out


def ensure_tls(directory: Path, names: list[str], ips: list[str]) -> TlsFiles:
    """Create what is missing or no longer valid in ``directory``; keep the rest (see the module docstring)."""
    ips = _check_inputs(names, ips)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"Cannot create {directory}: {err.strerror}.", "Run as root, or pick another --dir.") from err
    paths = {n: directory / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")}
    created: list[str] = []
    kept: list[str] = []

    ca = _load_pair(paths["ca.crt"], paths["ca.key"])
    if ca is None:
        ca = _make_ca()
        _write_private(paths["ca.key"], _key_pem(ca[1]))
        paths["ca.crt"].write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
        created += ["ca.crt", "ca.key"]
    else:
        kept += ["ca.crt", "ca.key"]
    ca_cert, ca_key = ca

    server = _load_pair(paths["server.crt"], paths["server.key"])
    if server is None or not _covers(server[0], ca_cert, names, ips):
        server = _make_server(ca_cert, ca_key, names, ips)
        _write_private(paths["server.key"], _key_pem(server[1]))
        paths["server.crt"].write_bytes(server[0].public_bytes(serialization.Encoding.PEM))
        created += ["server.crt", "server.key"]
    else:
        kept += ["server.crt", "server.key"]
    for private in ("ca.key", "server.key"):
        os.chmod(paths[private], 0o600)
    for public in ("ca.crt", "server.crt"):
        os.chmod(paths[public], 0o644)

    return TlsFiles(
        dir=directory,
        ca_cert=paths["ca.crt"],
        ca_key=paths["ca.key"],
        server_cert=paths["server.crt"],
        server_key=paths["server.key"],
        ca_sha256=ca_fingerprint(ca_cert),
        names=names,
        ips=ips,
        server_not_after=_utc_text(server[0].not_valid_after_utc),
        created=created,
        kept=kept,
    )


def _read_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA pair in ``directory``, or an error saying why a renewal cannot use it."""
    ca_cert = read_certificate(directory / "ca.crt")
    key_path = directory / "ca.key"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as err:
        raise InputError(
            f"{key_path} does not exist, so no certificate can be signed by this CA.",
            "Restore ca.key from a backup; without it only a new CA (clinic-edge tls ensure after moving ca.crt away) "
            "works, and every workstation must then import the new ca.crt.",
        ) from err
    except PermissionError as err:
        raise InputError(f"{key_path} is readable by root only.", "Run it with sudo.") from err
    except (ValueError, TypeError) as err:
        raise InputError(
            f"{key_path} is not an unencrypted PEM private key: {err}.", "Restore it from a backup."
        ) from err
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if not isinstance(key, ec.EllipticCurvePrivateKey) or ca_cert.public_key().public_bytes(
        *spki
    ) != key.public_key().public_bytes(*spki):
        raise InputError(f"{key_path} is not the key of {directory / 'ca.crt'}.", "Restore the matching pair.")
    if ca_cert.not_valid_after_utc <= _now():
        raise InputError(
            f"the CA {directory / 'ca.crt'} expired on {_utc_text(ca_cert.not_valid_after_utc)}; a certificate it "
            "signs would not be trusted.",
            "Move ca.crt and ca.key away, run clinic-edge tls ensure (a new CA), and import the new ca.crt on every "
            "workstation.",
        )
    return ca_cert, key


def renew_server(directory: Path) -> TlsFiles:
    """Re-issue ``server.crt``/``server.key`` in ``directory``: same names and addresses, new key, new validity.

    ``ca.crt`` and ``ca.key`` are only read, so workstations keep trusting the gateway. Each new file is written
    beside the old one and renamed over it (owner and mode kept: the gateway's user must still read the key), so a
    reader never sees half a file. The running gateway keeps the old certificate until it restarts.
    """
    ca_cert, ca_key = _read_ca(directory)
    old = read_certificate(directory / "server.crt")
    names, ips = certificate_names(old)
    if not names and not ips:
        raise InputError(
            f"{directory / 'server.crt'} names no DNS name or IP address, so there is nothing to renew it for.",
            "Run clinic-edge tls ensure --dir DIR --name NAME --ip ADDRESS instead.",
        )
    cert, key = _make_server(ca_cert, ca_key, names, ips)
    # Key first: until the certificate follows, `tls ensure` and the gateway's start see a mismatched pair and
    # say so, rather than a new certificate whose key is missing.
    atomic_write_text(directory / "server.key", _key_pem(key).decode(), mode=0o600, keep_owner=True)
    atomic_write_text(
        directory / "server.crt", cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644, keep_owner=True
    )
    return TlsFiles(
        dir=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        ca_sha256=ca_fingerprint(ca_cert),
        names=names,
        ips=ips,
        server_not_after=_utc_text(cert.not_valid_after_utc),
        created=["server.crt", "server.key"],
        kept=["ca.crt", "ca.key"],
        replaced_not_after=_utc_text(old.not_valid_after_utc),
    )
