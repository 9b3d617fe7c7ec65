"""The ledger explorer: one self-contained HTML page that renders a ledger or a bundle.

The page holds everything inline (CSS, JS, the ledger records as JSON) and fetches nothing: its own script
draws a token timeline, the residual norm trajectory (SVG), the layer table of the selected step and the
expert routing grid, and marks every value with its provenance class from the header's provenance map.
The header of the page, written here, says whether the ledger is complete or partial and shows the table of
`verify` checks, run at build time. A ledger without a footer is shown as partial; a final line cut off
mid-write is skipped and the page says so. It renders what the ledger holds and nothing more: no values
computed beyond the ledger's own, no interpretation. Prints nothing; the page (its CSS, script and
placeholders) is the template `explorer_page.html` beside this module.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import LEDGER_NAME
from .errors import K2Error
from .verify import Report, verify

TEMPLATE = "explorer_page.html"
# Display names for the header's model_type; anything else is shown as written.
MODEL_NAMES = {"kimi_k25": "Kimi K2.5", "kimi_k2": "Kimi K2", "deepseek_v3": "DeepSeek-V3"}


class ExplorerError(K2Error):
    """The path is not a readable ledger or bundle."""


@dataclass
class LedgerRead:
    """A ledger as the explorer reads it: tolerant of a missing footer and a cut-off final line."""

    path: Path
    bundle: bool
    header: dict[str, Any]
    steps: list[dict[str, Any]]
    footer: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The footer's status ("complete", "stopped", "failed"), or "partial" when there is no footer."""
        if self.footer is None:
            return "partial"
        return str(self.footer.get("status"))


def _constant(name: str) -> str:
    # NaN/Infinity are not JSON; the writer never emits them, an edited ledger might. Keep them visible as text.
    return name


def read_ledger(path: str | Path) -> LedgerRead:
    path = Path(path)
    if not path.exists():
        raise ExplorerError(f"{path}: no such file or directory")
    bundle = path.is_dir()
    ledger_path = path / LEDGER_NAME if bundle else path
    if not ledger_path.is_file():
        raise ExplorerError(f"{path}: a directory without {LEDGER_NAME} (not a bundle)")
    try:
        raw = ledger_path.read_bytes()
    except OSError as e:
        raise ExplorerError(f"{ledger_path}: cannot read ({e.strerror})") from None
    lines = raw.split(b"\n")
    cut = lines.pop()  # b"" when the file ends with a newline, as every complete write does
    notes: list[str] = []
    records: list[tuple[int, dict]] = []
    for number, line in enumerate(lines + ([cut] if cut else []), 1):
        last_cut = bool(cut) and number == len(lines) + 1
        if not line.strip():
            notes.append(f"line {number}: empty, skipped")
            continue
        try:
            rec = json.loads(line, parse_constant=_constant)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if last_cut:
                notes.append(f"line {number}: cut off mid-write ({len(line):,} bytes, no newline), skipped")
            else:
                notes.append(f"line {number}: not a JSON object ({e}), skipped")
            continue
        if last_cut:
            notes.append(f"line {number}: no final newline (the write may not have finished)")
        records.append((number, rec))
    if not records or records[0][0] != 1 or records[0][1].get("kind") != "header":
        raise ExplorerError(f"{ledger_path}: not a ledger (line 1 is not a readable header)")
    header = records[0][1]
    steps: list[dict] = []
    footer = None
    for number, rec in records[1:]:
        kind = rec.get("kind")
        if footer is not None:
            notes.append(f"line {number}: a {kind!r} line after the footer, skipped")
        elif kind == "step":
            steps.append(rec)
        elif kind == "footer":
            footer = rec
        else:
            notes.append(f"line {number}: unknown kind {kind!r}, skipped")
    if not isinstance(header.get("provenance"), dict):
        notes.append("header: no provenance map, so values carry no provenance marks")
    return LedgerRead(path, bundle, header, steps, footer, notes)


def _json_for_script(value: Any) -> str:
    """JSON that cannot end its <script> element: every <, > and & inside strings becomes a \\u escape."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _template() -> str:
    return resources.files("mlx_k2").joinpath(TEMPLATE).read_text(encoding="utf-8")


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, so a value that happens to contain {{NAME}} is never expanded.
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], template)


def _obj(value: Any) -> dict:
    """A header sub-object, or {} when an edited ledger holds something else there."""
    return value if isinstance(value, dict) else {}


def recorded_model_dir(header: dict) -> Path | None:
    """The checkpoint directory the header names (where its tokenizer is), if it names one."""
    path = _obj(header.get("model")).get("path")
    return Path(path) if isinstance(path, str) and path else None


def page_title(header: dict) -> str:
    model_type = _obj(header.get("model")).get("model_type")
    name = MODEL_NAMES.get(model_type, model_type) if isinstance(model_type, str) and model_type else "Model"
    return f"{name} Output Formation Ledger"


def _status_html(ledger: LedgerRead) -> str:
    n = len(ledger.steps)
    steps = f"{n} step{'s' if n != 1 else ''}"
    if ledger.footer is None:
        label, cls = "partial", "partial"
        detail = f"{steps}, no footer: the run did not end normally (or is still running)"
    elif ledger.status == "complete":
        label, cls = "complete", "complete"
        detail = f"{steps}, footer status complete"
    else:
        label, cls = f"partial: run {ledger.status}", "failed" if ledger.status == "failed" else "partial"
        error = ledger.footer.get("error")
        detail = f"{steps}, footer status {ledger.status}" + (f": {error}" if error else "")
    return (f'<div id="ledger-status" class="status status-{cls}" data-status="{html.escape(ledger.status)}">'
            f'<span class="badge">ledger {html.escape(label)}</span>'
            f'<span class="status-detail">{html.escape(detail)}</span></div>')


RESULT = {True: ("pass", "pass"), False: ("FAIL", "fail"), None: ("skip/warn", "skip")}


def _verify_html(report: Report | None, error: str | None, bundle: bool) -> str:
    what = "bundle" if bundle else "ledger"
    if report is None:
        return (f'<section id="verify" class="verify" data-ok="error"><h2>verify</h2>'
                f'<p class="verify-summary fail">verify did not finish on this {what}: {html.escape(error or "")}</p>'
                f'</section>')
    failed = sum(c.ok is False for c in report.checks)
    summary = (f"all {len(report.checks)} checks pass" if failed == 0 else
               f"{failed} of {len(report.checks)} checks FAIL")
    if not bundle:
        summary += " (ledger only; a bundle also recomputes every value from its tensors)"
    rows = "".join(
        f'<tr class="check-{RESULT[c.ok][1]}" data-check="{html.escape(c.name)}">'
        f'<td class="check-name">{html.escape(c.name)}</td>'
        f'<td class="check-result"><span class="res res-{RESULT[c.ok][1]}">{RESULT[c.ok][0]}</span></td>'
        f'<td class="check-detail">{html.escape(c.detail)}</td></tr>'
        for c in report.checks)
    state = "pass" if failed == 0 else "fail"
    return (f'<section id="verify" class="verify" data-ok="{state}">'
            f'<h2>verify <span class="verify-what">{what}, run when this page was built</span></h2>'
            f'<p class="verify-summary {state}">{html.escape(summary)}</p>'
            f'<table class="checks"><thead><tr><th>check</th><th>result</th><th>detail</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></section>')


def _meta_html(ledger: LedgerRead) -> str:
    h = ledger.header
    model, run = _obj(h.get("model")), _obj(h.get("run"))
    versions = _obj(run.get("versions"))
    prompt = run.get("prompt_ids")
    items = [
        ("source", f"{ledger.path} ({'bundle' if ledger.bundle else 'ledger'})"),
        ("model", str(model.get("path", "?"))),
        ("model_type", str(model.get("model_type", "?"))),
        ("layers × experts", f"{model.get('num_layers', '?')} × {model.get('n_routed_experts', '?')}, "
                             f"top-{model.get('experts_per_token', '?')}"),
        ("run", f"{run.get('backend', '?')} {run.get('device', '?')} {run.get('compute_dtype', '?')}, "
                f"kv_cache {json.dumps(run.get('kv_cache'))}, capture {json.dumps(run.get('capture'))}"),
        ("prompt_ids", json.dumps(prompt) if prompt is not None else "?"),
        ("max_new_tokens", str(run.get("max_new_tokens", "?"))),
        ("created", str(h.get("created", "?"))),
        ("schema", str(h.get("schema", "?"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "?"),
        ("config_blake3", str(model.get("config_blake3", "?"))),
        ("index_blake3", str(model.get("index_blake3", "?"))),
    ]
    return "".join(f'<div><dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd></div>' for k, v in items)


def _notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f'<div id="read-notes" class="notes"><strong>Read notes</strong><ul>{items}</ul></div>'


def build_explorer(path: str | Path, anchors_dir: Path | None = None, tokenizer=None) -> str:
    """The explorer page (HTML) for a ledger file or a bundle directory."""
    ledger = read_ledger(path)
    report, verify_error = None, None
    try:
        report = verify(ledger.path, anchors_dir, tokenizer)
    except K2Error as e:
        verify_error = str(e)
    except Exception as e:  # noqa: BLE001  verify's own bug on an odd ledger: show it, still render the ledger
        verify_error = f"verify raised {type(e).__name__}: {e}"
    data = {"header": ledger.header, "steps": ledger.steps, "footer": ledger.footer, "status": ledger.status,
            "notes": ledger.notes}
    title = page_title(ledger.header)
    return _fill(_template(), {
        "TITLE": html.escape(title),
        "STATUS": _status_html(ledger),
        "META": _meta_html(ledger),
        "NOTES": _notes_html(ledger.notes),
        "VERIFY": _verify_html(report, verify_error, ledger.bundle),
        "VERSION": html.escape(__version__),
        "DATA": _json_for_script(data),
    })
