"""Workstation keys, the local CA, admission control and the gateway's configuration checks."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from appliance.cli import main
from appliance.errors import UsageError
from appliance.gateway.admission import Admission
from appliance.gateway.audit import AuditLog
from appliance.gateway.config import GatewayConfig, check_config, load_config_file
from appliance.keys import KeyStore, add_key, hash_key, revoke_key
from appliance.tls import ensure_tls


def test_keys_cli_prints_key_once_stores_only_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    assert main(["keys", "add", "reception-1", "--keys-file", str(keys)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("ce_") and len(key) > 40
    text = keys.read_text()
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert main(["keys", "list", "--keys-file", str(keys), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["name"] for k in listed["keys"]] == ["reception-1"]
    assert main(["keys", "add", "reception-1", "--keys-file", str(keys)]) == 2  # duplicate name
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "revoke", "reception-1", "--keys-file", str(keys)]) == 0
    assert main(["keys", "revoke", "reception-1", "--keys-file", str(keys)]) == 1


def test_keystore_sees_revocation_without_restart(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    a, b = add_key(keys, "a"), add_key(keys, "b")
    store = KeyStore(keys)
    assert store.authenticate(a) == "a" and store.authenticate(b) == "b"
    assert store.authenticate(a + "x") is None and store.authenticate("") is None
    revoke_key(keys, "a")
    assert store.authenticate(a) is None and store.authenticate(b) == "b"
    keys.write_text("{broken")  # a broken file keeps the last good keys and says why
    assert store.authenticate(b) == "b" and store.last_error


def test_tls_ensure_is_idempotent_and_verifiable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "tls"
    assert main(["tls", "ensure", "--dir", str(d), "--name", "dental-ai.lan", "--ip", "127.0.0.1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert sorted(first["created"]) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    before = {n: (d / n).read_bytes() for n in ("ca.crt", "server.crt")}
    again = ensure_tls(d, ["dental-ai.lan"], ["127.0.0.1"])
    assert again.created == [] and again.ca_sha256 == first["ca_sha256"]
    assert {n: (d / n).read_bytes() for n in before} == before
    # A new address re-issues the server certificate only; the CA (what workstations trust) stays.
    third = ensure_tls(d, ["dental-ai.lan"], ["127.0.0.1", "192.168.1.20"])
    assert sorted(third.created) == ["server.crt", "server.key"] and third.ca_sha256 == first["ca_sha256"]
    cert = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    # Both contexts load what was made (the client one as a workstation would, trusting only ca.crt).
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(d / "server.crt", d / "server.key")
    ssl.create_default_context(cafile=str(d / "ca.crt"))
    out = capsys.readouterr()
    assert main(["tls", "ensure", "--dir", str(d), "--name", "dental-ai.lan"]) == 0
    assert first["ca_sha256"] in capsys.readouterr().out and out is not None


def test_tls_ensure_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        ensure_tls(tmp_path, [], [])
    with pytest.raises(UsageError):
        ensure_tls(tmp_path, [], ["not-an-ip"])


def _cfg(tmp_path: Path, **kw: object) -> GatewayConfig:
    base: dict[str, object] = {"upstreams": ["http://127.0.0.1:8000"], "keys_file": tmp_path / "k.json"}
    base.update(kw)
    return GatewayConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"upstreams": ["http://8.8.8.8:8000"]}, "not a loopback or private LAN address"),
        ({"upstreams": ["http://[2001:4860:4860::8888]:80"]}, "not a loopback or private LAN address"),
        ({"upstreams": ["http://169.254.169.254"]}, "not a loopback or private LAN address"),
        ({"upstreams": ["http://127.0.0.1:8000/v1"]}, "not a base URL"),
        ({"upstreams": []}, "No upstream"),
        ({"listen": "0.0.0.0:8443"}, "Refusing plain HTTP"),
        ({"listen": "192.168.1.20:8443"}, "Refusing plain HTTP"),
        ({"tls_cert": Path("/nonexistent.crt")}, "both --tls-cert and --tls-key"),
    ],
)
def test_config_refusals(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_config(_cfg(tmp_path, **kw))


def test_config_accepts_private_upstreams_and_loopback_http(tmp_path: Path) -> None:
    check_config(_cfg(tmp_path, upstreams=["http://127.0.0.1:8000", "http://10.0.0.5:8001", "http://[::1]:8002"]))


def test_gateway_cli_refuses_public_upstream(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["gateway", "--upstream", "http://1.1.1.1:8000", "--keys-file", str(tmp_path / "k.json")])
    assert code == 2
    assert "not a loopback or private LAN address" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path: Path) -> None:
    from appliance.cli import build_parser
    from appliance.commands.gateway import build_config

    conf = tmp_path / "gateway.yml"
    conf.write_text(
        "listen: 127.0.0.1:9443\nupstreams: [http://127.0.0.1:8000, http://127.0.0.1:8001]\n"
        f"keys_file: {tmp_path / 'k.json'}\nmax_tokens_cap: 512\nmax_per_key: 3\nqueue_timeout_s: 0.5\n"
    )
    args = build_parser().parse_args(["gateway", "--config", str(conf), "--max-per-key", "5"])
    cfg = build_config(args)
    assert cfg.upstreams == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    assert (cfg.port, cfg.max_tokens_cap, cfg.max_per_key, cfg.queue_timeout_s) == (9443, 512, 5, 0.5)
    conf.write_text("listn: 127.0.0.1:1\n")
    with pytest.raises(Exception, match="Unknown setting 'listn'"):
        load_config_file(conf)


def test_admission_caps_and_bounded_wait() -> None:
    async def scenario() -> None:
        adm = Admission(max_inflight=2, max_per_key=1, queue_timeout=0.2, max_queue=1)
        assert await adm.acquire("a") is None
        assert await adm.acquire("a") == "per_key_limit"  # waited 0.2 s, then refused
        assert await adm.acquire("b") is None
        waiter = asyncio.create_task(adm.acquire("c"))  # global cap reached: waits
        await asyncio.sleep(0.01)
        assert await adm.acquire("d") == "queue_full"  # one waiter already
        adm.release("a")
        assert await waiter is None
        assert adm.inflight == 2 and adm.per_key == {"b": 1, "c": 1}

    asyncio.run(scenario())


def test_keys_file_written_atomically_keeps_mode(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    add_key(keys, "one")
    os.chmod(keys, 0o600)
    add_key(keys, "two")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keys-")]


@pytest.mark.asyncio
async def test_audit_lines_of_one_loop_turn_are_written_together(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.write({"time": 1_700_000_000 + i, "request_id": f"r{i}", "route": "chat", "status": 200,
                   "prompt": "never written"})  # fmt: skip
    assert path.read_text() == ""  # queued until the end of this turn of the loop
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["request_id"], r["time"]) for r in lines] == [
        ("r0", "2023-11-14T22:13:20Z"), ("r1", "2023-11-14T22:13:21Z"), ("r2", "2023-11-14T22:13:22Z")
    ]  # fmt: skip
    assert "prompt" not in lines[0] and "never written" not in path.read_text()
    log.write({"request_id": "last", "route": "chat"})
    log.close()  # writes what is still queued
    assert json.loads(path.read_text().splitlines()[-1])["request_id"] == "last"
