"""Receipts and published digests: keygen, receipt, and verify on a receipt, a bundle's --digest.

The signature is checked with an Ed25519 written from RFC 8032 (tests/ed25519_reference.py), not with the
library the product signs with, over the signed bytes rebuilt here from the receipt's claim; the root
digest is BLAKE3 of the manifest computed here. A flipped bit anywhere in the bundle, anywhere in the
receipt or in the signature fails verification; a receipt signed by another key fails with --pubkey. All on
a copy of the session's 3-step bundle (`synth_run`), with no replay (the forgery suite covers replay).
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
from pathlib import Path

import blake3
import pytest
from typer.testing import CliRunner

from mlx_k2.errors import K2Error
from mlx_k2.evidence.receipt import check_receipt
from mlx_k2_cli.main import app
from tests import ed25519_reference

ANCHORS = Path(__file__).resolve().parents[1] / "anchors"


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def signed(synth_dir, synth_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("receipt")
    bundle = root / "bundle"
    shutil.copytree(synth_run[0], bundle)
    key = root / "key"
    assert cli("keygen", "-o", str(key)).exit_code == 0
    receipt = root / "receipt.json"
    result = cli("receipt", str(bundle), "-o", str(receipt), "--key", str(key), "--model", str(synth_dir),
                 "--anchors", str(ANCHORS))
    assert result.exit_code == 0, result.output
    return {"bundle": bundle, "key": key, "pub": root / "key.pub", "receipt": receipt, "root": root,
            "model": synth_dir}


def pem_raw_public(path: Path) -> bytes:
    """The 32 key bytes at the end of a SubjectPublicKeyInfo DER (RFC 8410), read without `cryptography`."""
    body = "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))
    return base64.b64decode(body)[-32:]


def test_keygen(signed):
    assert stat.S_IMODE(signed["key"].stat().st_mode) == 0o600
    assert "PRIVATE KEY" in signed["key"].read_text() and "PUBLIC KEY" in signed["pub"].read_text()
    again = cli("keygen", "-o", str(signed["key"]))
    assert again.exit_code == 2 and again.output.strip().startswith("error:") and "already exists" in again.output
    assert len(again.output.strip().splitlines()) == 1


def test_receipt_is_signed_over_its_claim(signed):
    data = json.loads(signed["receipt"].read_text())
    assert set(data) == {"kind", "claim", "public_key", "signature"} and data["kind"] == "mlx-k2.receipt/1"
    claim = data["claim"]
    message = b"mlx-k2.receipt/1\n" + json.dumps(claim, sort_keys=True, separators=(",", ":"),
                                                 ensure_ascii=False).encode()
    public = bytes.fromhex(data["public_key"])
    assert public == pem_raw_public(signed["pub"])
    assert ed25519_reference.verify(public, message, bytes.fromhex(data["signature"]))
    assert not ed25519_reference.verify(public, message + b" ", bytes.fromhex(data["signature"]))
    # What it claims, against the files themselves.
    bundle = signed["bundle"]
    assert claim["digest"] == {"blake3": blake3.blake3((bundle / "manifest.json").read_bytes()).hexdigest(),
                               "of": "manifest.json"}
    lines = [json.loads(line) for line in (bundle / "ledger.jsonl").read_text().splitlines()]
    assert claim["tokens"] == [r["token_id"] for r in lines[1:-1]] and claim["steps"] == 3
    assert claim["prompt_ids"] == lines[0]["run"]["prompt_ids"] and claim["status"] == "complete"
    assert claim["checkpoint"]["config_blake3"] == blake3.blake3((signed["model"] / "config.json").read_bytes()).hexdigest()
    assert claim["verified"]["summary"].startswith("consistent, not re-executed: 3 steps (complete)")
    assert claim["verified"]["anchor"]["state"] == "matched" and claim["verified"]["replay"] is None


def test_receipt_verifies_with_its_bundle_and_key(signed):
    result = cli("verify", str(signed["receipt"]), "--bundle", str(signed["bundle"]), "--pubkey", str(signed["pub"]))
    assert result.exit_code == 0, result.output
    assert "receipt valid: signed by key" in result.output and "(pinned by --pubkey)" in result.output
    assert "the signer recorded: consistent, not re-executed" in result.output
    unpinned = cli("verify", str(signed["receipt"]), "--bundle", str(signed["bundle"]))
    assert unpinned.exit_code == 1 and "NOT PROVEN (signer not pinned" in unpinned.output
    assert cli("verify", str(signed["receipt"]), "--lenient").exit_code == 0


def test_receipt_of_another_key_fails_with_pubkey(signed):
    other = signed["root"] / "other"
    assert cli("keygen", "-o", str(other)).exit_code == 0
    report = check_receipt(signed["receipt"], signed["bundle"], signed["root"] / "other.pub")
    assert [c.name for c in report.checks if c.ok is False] == ["signer"]
    result = cli("verify", str(signed["receipt"]), "--bundle", str(signed["bundle"]), "--pubkey",
                 str(signed["root"] / "other.pub"))
    assert result.exit_code == 1 and "receipt verification FAILED: signer" in result.output


def _flip(path: Path, offset: int, bit: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return original


def test_flipped_bit_anywhere_in_the_bundle_fails(signed, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(signed["bundle"], bundle)
    assert check_receipt(signed["receipt"], bundle, signed["pub"]).summary()[0]
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    assert len(files) == 5   # ledger, manifest, 3 step files
    for path in files:
        size = path.stat().st_size
        for offset in (0, size // 2, size - 1):
            original = _flip(path, offset, offset % 8)
            report = check_receipt(signed["receipt"], bundle, signed["pub"])
            assert not report.ok and not report.summary()[0], (path.name, offset)
            path.write_bytes(original)


def test_flipped_bit_anywhere_in_the_receipt_fails(signed, tmp_path):
    receipt = tmp_path / "receipt.json"
    shutil.copyfile(signed["receipt"], receipt)
    size = receipt.stat().st_size
    assert check_receipt(receipt, None, signed["pub"]).summary()[0]
    for offset in range(size):
        for bit in ((offset * 3) % 8,):   # every byte, each bit position in turn (all 8 per byte: ~8x the time)
            original = _flip(receipt, offset, bit)
            try:
                passes = check_receipt(receipt, None, signed["pub"]).summary()[0]
            except K2Error:
                passes = False   # no longer a receipt at all (one line from the CLI, exit 2)
            assert not passes, (offset, bit, original[max(0, offset - 20):offset + 20])
            receipt.write_bytes(original)


def test_signing_refuses_a_failing_bundle(signed, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(signed["bundle"], bundle)
    _flip(bundle / "tensors" / "step-0001.safetensors", 200, 0)
    out = tmp_path / "r.json"
    result = cli("receipt", str(bundle), "-o", str(out), "--key", str(signed["key"]), "--model", str(signed["model"]),
                 "--anchors", str(ANCHORS))
    assert result.exit_code == 1 and "not signed, verify does not pass: verification FAILED" in result.output
    assert not out.exists()


def test_published_digest(signed):
    bundle = signed["bundle"]
    digest = blake3.blake3((bundle / "manifest.json").read_bytes()).hexdigest()
    ok = cli("verify", str(bundle), "--digest", digest.upper(), "--model", str(signed["model"]), "--anchors", str(ANCHORS))
    assert ok.exit_code == 0, ok.output
    wrong = cli("verify", str(bundle), "--digest", "0" * 64, "--model", str(signed["model"]), "--anchors", str(ANCHORS))
    assert wrong.exit_code == 1 and "checks fail (digest)" in wrong.output


@pytest.mark.parametrize("args,message", [
    (["verify", "/nonexistent/b"], "/nonexistent/b: no such file or directory"),
    (["verify", "{receipt}", "--replay"], "a receipt; --replay and --digest apply to a bundle or ledger"),
    (["verify", "{bundle}", "--pubkey", "{pub}"], "--bundle and --pubkey go with a receipt"),
    (["verify", "{bundle}", "--steps", "0"], "--steps, --sample and --device go with --replay"),
    (["verify", "{bundle}", "--digest", "abc"], "--digest: 'abc' is not a BLAKE3 digest (64 hex digits)"),
    (["verify", "{bundle}", "--replay", "--steps", "7"], "--steps: step 7 is not in the ledger (it holds steps 0..2)"),
    (["receipt", "{bundle}", "-o", "{root}/r2.json", "--key", "{root}/missing"], "{root}/missing: cannot read the key"),
    (["receipt", "{bundle}", "-o", "{root}/r2.json", "--key", "{pub}"], "not an unencrypted PEM private key"),
])
def test_user_errors_are_one_line(signed, args, message):
    fill = {k: str(signed[k]) for k in ("receipt", "bundle", "pub", "root")}
    result = cli(*[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message.format(**fill) in lines[0]


def test_explorer_shows_the_receipt(signed):
    from mlx_k2.explorer.page import build_explorer

    page = build_explorer(signed["bundle"], ANCHORS, None,
                          receipt=check_receipt(signed["receipt"], signed["bundle"], signed["pub"]))
    section = page[page.index('<div id="receipt"'):]
    assert section.startswith('<div id="receipt" class="receipt" data-ok="pass">')
    assert "receipt valid: signed by key" in section and 'data-check="signature"' in section
