"""Signed receipts of a verified run: Ed25519 keys, signing, and checking a receipt (with its bundle).

A receipt is a small JSON file: a `claim` (the run's root digest from `derived.root_digest`, the
checkpoint's identity, the platform, prompt and tokens, and what the signer's verify established: its
summary line, its checks, the anchor, the replay), the signer's raw public key, and an Ed25519 signature
over RECEIPT_KIND + "\n" + the claim as canonical JSON (sorted keys, no spaces, UTF-8). Ed25519 is
`cryptography`'s, never our own. A valid signature proves the holder of that key made this claim about
the bytes the digest names; `--pubkey` pins which key that must be. Keys are PEM: the private key PKCS8
(written 0600), the public key SubjectPublicKeyInfo. Prints nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import K2Error, UsageError
from .derived import root_digest
from .files import write_atomically
from .ledger import read_ledger
from .platforms import PLATFORM
from .schema import MANIFEST_NAME, strict_loads
from .verify import Check, Report, verify
from .. import jsonio, limits

RECEIPT_KIND = "mlx-k2.receipt/1"
MAX_RECEIPT_BYTES = 1 << 20      # a receipt is a few kB; anything larger is not one
PUBLIC_SUFFIX = ".pub"
IDENTITY = ("model_type", "config_blake3", "index_blake3", "tokenizer_blake3")


class ReceiptError(K2Error):
    """A key or receipt file that cannot be read or written."""


class NotSigned(K2Error):
    """The run does not verify, so no receipt is made for it."""

    exit_code = 1


# ------------------------------------------------------------------------------------------------- keys

def keygen(path: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 private key at `path` (mode 0600) and its public key at `path`.pub."""
    public = path.with_name(path.name + PUBLIC_SUFFIX)
    for p in (path, public):
        if p.exists() and not overwrite:
            raise UsageError(f"{p}: already exists (choose another path or pass --overwrite)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        if overwrite:
            path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        public.write_bytes(public_pem)
    except OSError as e:
        raise ReceiptError(f"{path}: cannot write the key ({e.strerror})") from None
    return path, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return _load_key(path, lambda data: serialization.load_pem_private_key(data, password=None),
                     Ed25519PrivateKey, "key", "an unencrypted PEM private key")


def load_public_key(path: Path) -> Ed25519PublicKey:
    return _load_key(path, serialization.load_pem_public_key, Ed25519PublicKey, "public key", "a PEM public key")


def _load_key(path: Path, load, kind: type, what: str, pem: str):
    """The Ed25519 key of `kind` in the PEM file at `path`, or a one-line ReceiptError naming the file."""
    try:
        key = load(path.read_bytes())
    except OSError as e:
        raise ReceiptError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise ReceiptError(f"{path}: not {pem} ({e})") from None
    if not isinstance(key, kind):
        raise ReceiptError(f"{path}: not an Ed25519 {what} ({type(key).__name__})")
    return key


def raw_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


# ------------------------------------------------------------------------------------------- signing

def _signed_bytes(claim: dict[str, Any]) -> bytes:
    canonical = json.dumps(claim, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (RECEIPT_KIND + "\n" + canonical).encode()


def _claim(path: Path, report: Report, lenient: bool) -> dict[str, Any]:
    ledger = read_ledger(path)
    header = ledger.header or {}
    model, run = header.get("model") or {}, header.get("run") or {}
    passes, line = report.summary(lenient)
    replay = report.replay
    return {
        "digest": {"blake3": root_digest(path), "of": MANIFEST_NAME if ledger.bundle else "ledger"},
        "checkpoint": {k: model.get(k) for k in IDENTITY},
        "run": {k: run.get(k) for k in PLATFORM if k in run},
        "prompt_ids": run.get("prompt_ids"),
        "tokens": [s.get("token_id") for s in ledger.steps],
        "steps": len(ledger.steps),
        "status": ledger.status,
        "verified": {
            "summary": line,
            "checks": {c.name: {True: "pass", False: "fail", None: "skip"}[c.ok] for c in report.checks},
            "anchor": {"name": report.anchor_name, "state": report.anchor},
            "replay": None if replay is None else {
                "steps": [r.step for r in replay.results], "exact": replay.exact, "mode": replay.mode,
                "summary": replay.summary(), "ok": replay.ok},
        },
        "signed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def make_receipt(path: Path, report: Report, key: Ed25519PrivateKey, lenient: bool = False) -> dict[str, Any]:
    """A signed receipt of the run at `path`, which `report` (verify's, on the same path) must pass."""
    passes, line = report.summary(lenient)
    if not passes:
        raise NotSigned(f"{path}: not signed, verify does not pass: {line}")
    claim = _claim(Path(path), report, lenient)
    return {"kind": RECEIPT_KIND, "claim": claim, "public_key": raw_hex(key.public_key()),
            "signature": key.sign(_signed_bytes(claim)).hex()}


def write_receipt(receipt: dict[str, Any], out: Path) -> None:
    write_atomically(out, (json.dumps(receipt, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), ReceiptError)


def looks_like_receipt(path: Path) -> bool:
    """Whether `path` is a receipt (as opposed to a ledger or a bundle): one JSON object of kind RECEIPT_KIND,
    within a receipt's size. A ledger is several lines, or one header line; neither parses as that."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_RECEIPT_BYTES:
            return False
        data = jsonio.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == RECEIPT_KIND


# ------------------------------------------------------------------------------------------- checking

@dataclass
class ReceiptReport:
    path: Path
    checks: list[Check]
    claim: dict[str, Any] = field(default_factory=dict)
    public_key: str = ""
    pinned: bool = False
    bundle: Report | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks) and (self.bundle is None or self.bundle.ok)

    def summary(self, lenient: bool = False) -> tuple[bool, str]:
        if not self.ok:
            bad = [c.name for c in self.checks if c.ok is False]
            if self.bundle is not None and not self.bundle.ok:
                bad += [f"bundle {c.name}" for c in self.bundle.checks if c.ok is False]
            return False, f"receipt verification FAILED: {', '.join(bad)}"
        signer = f"key {self.public_key[:16]}…" + (" (pinned by --pubkey)" if self.pinned else "")
        verified = (self.claim.get("verified") or {}).get("summary", "?")
        what = ("the bundle matches its digest and verifies" if self.bundle is not None and self.bundle.bundle
                else "the ledger matches its digest and verifies" if self.bundle is not None
                else "run not checked (give --bundle DIR)")
        line = f"receipt valid: signed by {signer}; {what}; the signer recorded: {verified}"
        if not self.pinned and not lenient:
            return False, (f"NOT PROVEN (signer not pinned: --pubkey KEY.pub says whose key it must be; "
                           f"--lenient accepts): {line}")
        return True, line + ("" if self.pinned else " (lenient: signer not pinned)")


def read_receipt(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"{path}: {size:,} bytes, more than a receipt's {MAX_RECEIPT_BYTES:,}")
        data = strict_loads(jsonio.read_bytes(path, MAX_RECEIPT_BYTES))  # a regular file: a FIFO would block
    except OSError as e:
        raise ReceiptError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ReceiptError(f"{path}: not a receipt (not strict JSON: {e})") from None
    if not isinstance(data, dict) or data.get("kind") != RECEIPT_KIND:
        raise ReceiptError(f"{path}: not a receipt (kind is not {RECEIPT_KIND})")
    if isinstance(data.get("claim"), dict):
        _check_claim(path, data["claim"])
    return data


# The JSON type of each claim field that checking a receipt reads (a claim as `_claim` writes it). A signature
# over a claim of other types still says who signed it, but what it claims cannot be read: the receipt is
# refused with one line naming the field.
_OBJECT, _LIST, _INT, _STR = (dict, "an object"), (list, "a list"), (int, "an integer"), (str, "a string")
CLAIM_TYPES = {"digest": _OBJECT, "checkpoint": _OBJECT, "run": _OBJECT, "prompt_ids": ((list, type(None)), "a list"),
               "tokens": _LIST, "steps": _INT, "status": _STR, "verified": _OBJECT, "signed_at": _STR}
VERIFIED_TYPES = {"summary": _STR, "checks": _OBJECT, "anchor": _OBJECT,
                  "replay": ((dict, type(None)), "an object or null")}


def _check_claim(path: Path, claim: dict[str, Any]) -> None:
    """A ReceiptError naming the first claim field (present) of the wrong type, or a count beyond its limit."""
    verified = claim.get("verified")
    fields = [(f"claim.{k}", claim[k], t) for k, t in CLAIM_TYPES.items() if k in claim]
    if isinstance(verified, dict):
        fields += [(f"claim.verified.{k}", verified[k], t) for k, t in VERIFIED_TYPES.items() if k in verified]
    for name, value, (kind, what) in fields:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ReceiptError(f"{path}: {name} is {type(value).__name__} {limits.shown(value)}, not {what}")
    if "steps" in claim:
        limits.check_int(claim["steps"], 0, limits.MAX_POSITIONS, f"{path}: claim.steps", ReceiptError)


def check_receipt(path: Path, bundle: Path | None = None, pubkey: Path | None = None,
                  anchors_dir: Path | None = None, tokenizer=None) -> ReceiptReport:
    """The signature (against `pubkey` where given) and, given the run, that it is the one signed for. Every
    failing row's detail says which key or field failed and why."""
    report = _check_receipt(path, bundle, pubkey, anchors_dir, tokenizer)
    for check in report.checks:
        check.finish()
    return report


KEYS = ("kind", "claim", "public_key", "signature")


def _form_problems(data: dict[str, Any]) -> list[str]:
    """What makes `data` no well-formed receipt, key by key (lowercase hex only: one spelling per key and
    signature, so no flipped bit leaves a receipt valid)."""
    problems = []
    missing, extra = [k for k in KEYS if k not in data], sorted(set(data) - set(KEYS))
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected key {', '.join(map(repr, extra))} (a receipt has exactly {', '.join(KEYS)})")
    if "claim" in data and not isinstance(data["claim"], dict):
        problems.append(f"claim: a {type(data['claim']).__name__}, not an object")
    for key, digits in (("public_key", 64), ("signature", 128)):
        value = data.get(key, "")
        if key in data and not (isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{digits}}}", value)):
            problems.append(f"{key}: " + (f"a {type(value).__name__}, not a string" if not isinstance(value, str)
                                          else f"{len(value)} characters, not {digits} hex digits"
                                          if len(value) != digits else "not lowercase hex digits only"))
    return problems


def _check_receipt(path: Path, bundle: Path | None, pubkey: Path | None, anchors_dir: Path | None,
                   tokenizer) -> ReceiptReport:
    data = read_receipt(path)
    form, signature = Check("receipt"), Check("signature")
    claim, public, sig = data.get("claim"), data.get("public_key"), data.get("signature")
    report = ReceiptReport(path, [form, signature])
    problems = _form_problems(data)
    if problems:
        form.fail("; ".join(problems))
        signature.ok, signature.detail = None, "not checked (malformed receipt)"
        return report
    report.claim, report.public_key = claim, public
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        key.verify(bytes.fromhex(sig), _signed_bytes(claim))
        signature.detail = f"Ed25519 by key {public[:16]}…"
    except (ValueError, InvalidSignature) as e:
        signature.fail(f"signature: does not verify over the claim for public_key {public[:16]}… "
                       f"({type(e).__name__}: the claim, the key or the signature changed after signing)")
    signer = Check("signer")
    report.checks.append(signer)
    if pubkey is not None:
        expected = raw_hex(load_public_key(pubkey))
        if expected != public:
            signer.fail(f"signed by key {public[:16]}…, not by {pubkey} ({expected[:16]}…)")
        else:
            report.pinned, signer.detail = True, f"the key of {pubkey}"
    else:
        signer.ok, signer.detail = None, "not pinned (give --pubkey KEY.pub)"
    if bundle is not None:
        match = Check("digest")
        report.checks.append(match)
        digest = (claim.get("digest") or {}).get("blake3") if isinstance(claim.get("digest"), dict) else None
        ours = root_digest(bundle) if bundle.exists() else None
        if ours is None:
            match.fail(f"{bundle}: no such bundle or ledger")
        elif ours != digest:
            match.fail(f"{bundle}: root digest {ours[:16]}… is not the receipt's {str(digest)[:16]}…")
        else:
            match.detail = f"{bundle} has the receipt's root digest {ours[:16]}…"
            report.bundle = verify(bundle, anchors_dir, tokenizer)
            report.checks.append(_claims_match(claim, bundle))
    return report


def _claims_match(claim: dict[str, Any], path: Path) -> Check:
    """The receipt's claim says what the ledger says (same digest makes this hold unless the claim was
    written by hand, and then the signature says who wrote it)."""
    check = Check("claims")
    ledger = read_ledger(path)
    header = ledger.header or {}
    model, run = header.get("model") or {}, header.get("run") or {}
    ours = {"checkpoint": {k: model.get(k) for k in IDENTITY}, "run": {k: run.get(k) for k in PLATFORM if k in run},
            "prompt_ids": run.get("prompt_ids"), "tokens": [s.get("token_id") for s in ledger.steps],
            "steps": len(ledger.steps), "status": ledger.status}
    for name, value in ours.items():
        if claim.get(name) != value:
            check.fail(f"claim {name}: {claim.get(name)!r}, the run says {value!r}")
    if check.ok:
        check.detail = "checkpoint, platform, prompt, tokens and status as the run records them"
    return check
