"""Certificate lifecycle: ``tls renew`` re-issues the gateway's certificate from the same CA; ``status`` warns first."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import appliance.tls as tls
from appliance.cli import main
from appliance.errors import InputError
from appliance.telemetry.certificate import CertificatePart, CertificateSource
from appliance.telemetry.health import Problem, problems
from appliance.telemetry.parts import ConfigPart, GatewayPart, MemoryPart, SelftestPart, UnitsPart, VllmPart
from appliance.telemetry.sources import Snapshot, TelemetryOptions, live_sources
from appliance.tls import ensure_tls, read_certificate, renew_server

NAMES = ["dental-ai.clinic.lan", "dental-ai"]
IPS = ["192.168.1.20", "127.0.0.1"]
NOW = dt.datetime.now(dt.UTC)


def _issue(directory: Path, server_expires_in: dt.timedelta, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CA and a server certificate issued long enough ago that the server one expires ``server_expires_in`` from now.

    ``ensure_tls`` itself makes them, with its clock moved back: the certificates are exactly what an install made.
    """
    issued = NOW + server_expires_in - dt.timedelta(days=tls.SERVER_DAYS)
    with monkeypatch.context() as patch:
        patch.setattr(tls, "_now", lambda: issued)
        ensure_tls(directory, NAMES, IPS)
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_renew_keeps_the_ca_and_the_names_and_issues_a_new_key_and_validity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _issue(tmp_path / "tls", dt.timedelta(days=5), monkeypatch)
    ca_before = (d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes()
    old_cert, old_key = _cert(d / "server.crt"), (d / "server.key").read_bytes()

    files = renew_server(d)

    assert ((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes()) == ca_before
    ca = _cert(d / "ca.crt")
    assert files.ca_sha256 == tls.ca_fingerprint(ca)
    new = _cert(d / "server.crt")
    new.verify_directly_issued_by(ca)
    assert tls.certificate_names(new) == (NAMES, IPS) == (files.names, files.ips)
    assert (d / "server.key").read_bytes() != old_key
    key = serialization.load_pem_private_key((d / "server.key").read_bytes(), password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert new.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    assert new.serial_number != old_cert.serial_number
    assert new.not_valid_after_utc - NOW > dt.timedelta(days=tls.SERVER_DAYS - 1)
    assert files.replaced_not_after == old_cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (d / "server.key").stat().st_mode & 0o777 == 0o600
    assert (d / "server.crt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]  # no temp files
    # An install run afterwards keeps the renewed pair: it is valid, covers the names and comes from the CA.
    assert ensure_tls(d, NAMES, IPS).created == []


def test_renew_rescues_an_expired_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _issue(tmp_path / "tls", -dt.timedelta(days=3), monkeypatch)
    assert _cert(d / "server.crt").not_valid_after_utc < NOW
    renew_server(d)
    assert _cert(d / "server.crt").not_valid_after_utc > NOW + dt.timedelta(days=800)


def test_renew_without_a_server_certificate_says_to_run_ensure(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    ensure_tls(d, NAMES, IPS)
    (d / "server.crt").unlink()
    with pytest.raises(InputError) as err:
        renew_server(d)
    assert "server.crt does not exist" in err.value.message and "/etc/clinic-edge/tls" in err.value.remedy


def test_renew_refuses_a_ca_key_that_is_not_the_cas(tmp_path: Path) -> None:
    d, other = tmp_path / "tls", tmp_path / "other"
    ensure_tls(d, NAMES, IPS)
    ensure_tls(other, NAMES, IPS)
    (d / "ca.key").write_bytes((other / "ca.key").read_bytes())
    before = (d / "server.crt").read_bytes()
    with pytest.raises(InputError, match="is not the key of"):
        renew_server(d)
    assert (d / "server.crt").read_bytes() == before


def test_renew_refuses_an_expired_ca_and_says_the_workstations_must_import_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "tls"
    with monkeypatch.context() as patch:
        patch.setattr(tls, "_now", lambda: NOW - dt.timedelta(days=tls.CA_DAYS + 1))
        ensure_tls(d, NAMES, IPS)
    with pytest.raises(InputError) as err:
        renew_server(d)
    assert "expired" in err.value.message and "every workstation" in err.value.remedy


def test_tls_renew_json_says_to_restart_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _issue(tmp_path / "tls", dt.timedelta(days=10), monkeypatch)
    fingerprint = tls.ca_fingerprint(_cert(d / "ca.crt"))
    assert main(["tls", "renew", "--dir", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ca_sha256"] == fingerprint and doc["kept"] == ["ca.crt", "ca.key"]
    assert doc["names"] == NAMES and doc["ips"] == IPS
    assert doc["next"] == "sudo systemctl restart clinic-edge-gateway"
    assert main(["tls", "renew", "--dir", str(d)]) == 0
    text = capsys.readouterr().out
    assert "workstations need no change" in text and "sudo systemctl restart clinic-edge-gateway" in text


def test_tls_renew_help_teaches_when_and_what_follows(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tls", "renew", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "30 days" in out and "ca.key are only read" in out and "restart" in out and "tls ensure" in out


def _snapshot(certificate: CertificatePart) -> Snapshot:
    return Snapshot(
        taken_at=NOW,
        config=ConfigPart(),
        memory=MemoryPart(),
        vllm=VllmPart(),
        gateway=GatewayPart(),
        units=UnitsPart(),
        selftest=SelftestPart(),
        certificate=certificate,
    )


def _certificate_problems(directory: Path) -> list[Problem]:
    part = CertificateSource(directory / "server.crt").read()
    return [p for p in problems(_snapshot(part), NOW) if p.part == "certificate"]


def test_status_warns_when_the_certificate_expires_within_30_days(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _issue(tmp_path / "tls", dt.timedelta(days=12, hours=1), monkeypatch)
    [problem] = _certificate_problems(d)
    assert problem.severity == "warn"
    assert problem.text.startswith("the gateway's certificate expires in 12 d")
    assert f"sudo clinic-edge tls renew --dir {d}, then sudo systemctl restart clinic-edge-gateway" in problem.text


def test_status_is_unhealthy_when_the_certificate_has_expired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _issue(tmp_path / "tls", -dt.timedelta(days=2, hours=1), monkeypatch)
    [problem] = _certificate_problems(d)
    assert problem.severity == "bad"
    assert "expired 2 d" in problem.text and "workstations refuse to connect" in problem.text


def test_status_is_quiet_about_a_certificate_with_months_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _issue(tmp_path / "tls", dt.timedelta(days=31), monkeypatch)
    assert _certificate_problems(d) == []


def test_an_unreadable_certificate_is_a_warning_that_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("not a certificate")
    [problem] = _certificate_problems(tmp_path)
    assert problem.severity == "warn" and str(tmp_path / "server.crt") in problem.text


def test_no_certificate_to_watch_is_no_problem(tmp_path: Path) -> None:
    # A box without TLS yet, and the dashboard's recorded scenarios (no path): nothing to say.
    assert _certificate_problems(tmp_path) == []
    assert CertificateSource().read() == CertificatePart()


def test_live_status_reads_the_installed_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _issue(tmp_path / "tls", dt.timedelta(days=5), monkeypatch)
    part = live_sources(TelemetryOptions(etc_dir=tmp_path, gateway_url=None, vllm_urls=["http://127.0.0.1:9"]))
    read = part.certificate.read()
    assert read.path == str(tmp_path / "tls" / "server.crt")
    assert read.not_after == read_certificate(tmp_path / "tls" / "server.crt").not_valid_after_utc
    assert read.names == NAMES + IPS
    assert _snapshot(read).to_dict()["certificate"]["not_after"] == read.not_after.isoformat()  # type: ignore[union-attr]
