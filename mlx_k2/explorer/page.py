"""The ledger explorer: one self-contained HTML page that renders a ledger or a bundle.

The page holds everything inline (CSS, JS, the ledger records as JSON) and fetches nothing: its own script
draws a token timeline, the residual norm trajectory (SVG), the layer table of the selected step and the
expert routing grid, and marks every value with its provenance class from the header's provenance map.
The header of the page, written here, shows the prompt and the generated text (decoded with the tokenizer
where one is given, else the prompt's ids and the steps' token_text), says whether the ledger is complete or
partial and shows the table of `verify` checks, run at build time, with verify's summary line; given a
re-execution (`mlx_k2.run.replay`) or a checked receipt (`receipt.check_receipt`), it shows their results too, step by step and check by check. A ledger without a footer is shown as partial; a final line cut off
mid-write is skipped and the page says so. It renders what the ledger holds and nothing more: no values
computed beyond the ledger's own, no interpretation; given a vindex, a panel shows which of its feature
directions each step's saved MoE inputs project onto (`vindex.features`, from the bundle's tensors). The ledger is read by `ledger.read_ledger`. Prints
nothing; the page (its CSS, script and placeholders) is the template `page.html` beside this module.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import K2Error
from ..evidence.ledger import Ledger, read_ledger, require_ledger
from ..evidence.receipt import ReceiptReport
from ..evidence.replayed import Replay, ReplayReport
from ..evidence.verify import Check, Report, verify

TEMPLATE = "page.html"
# Display names for the header's model_type; anything else is shown as written.
MODEL_NAMES = {"kimi_k25": "Kimi K2.5", "kimi_k2": "Kimi K2", "deepseek_v3": "DeepSeek-V3"}


class ExplorerError(K2Error):
    """The path is not a readable ledger or bundle."""


def _constants_as_text(value: Any) -> Any:
    """NaN and ±Infinity as their names, so they stay visible: they are not JSON (the writer never emits
    them; an edited ledger might)."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _constants_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_constants_as_text(v) for v in value]
    return value


def _json_for_script(value: Any) -> str:
    """JSON that cannot end its <script> element: every <, > and & inside strings becomes a \\u escape."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _template() -> str:
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, so a value that happens to contain {{NAME}} is never expanded.
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], template)


def _obj(value: Any) -> dict:
    """A header sub-object, or {} when an edited ledger holds something else there."""
    return value if isinstance(value, dict) else {}


def page_title(header: dict) -> str:
    """The header's model_type by its display name (as written where it has none), else the name of the
    checkpoint directory the header names, else "Model"."""
    model = _obj(header.get("model"))
    model_type, path = model.get("model_type"), model.get("path")
    if isinstance(model_type, str) and model_type:
        name = MODEL_NAMES.get(model_type, model_type)
    else:
        name = Path(path).name if isinstance(path, str) and Path(path).name else "Model"
    return f"{name} Output Formation Ledger"


# Control, zero-width and bidi characters, shown as escapes so a token cannot hide or reorder text (as the
# page's script does for token_text).
_INVISIBLE = re.compile("[\u0000-\u001f\u007f-\u009f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _visible(text: str) -> str:
    return _INVISIBLE.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text)


def _ids(value: Any) -> list[int] | None:
    ints = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    return value if ints else None


def _decoded(ids: list[int], tokenizer) -> str | None:
    """`ids` decoded with `tokenizer`, or None without one or where it cannot decode them (an edited id)."""
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode(ids)
    except Exception:  # noqa: BLE001  ids outside this tokenizer's vocabulary: shown as ids instead
        return None


def _texts(ledger: Ledger, tokenizer) -> list[tuple[str, str, str, str]]:
    """(element id, heading, how it was made, text) of the prompt and of the generated tokens: decoded with
    the tokenizer where one is given (the verifier's own, from --model: never one the ledger names), else the
    ledger's own token_text (the generated tokens, marked unverified) or the ids."""
    prompt = _ids(_obj(_obj(ledger.header).get("run")).get("prompt_ids"))
    tokens = _ids([s.get("token_id") for s in ledger.steps])
    pieces = [s.get("token_text") for s in ledger.steps]
    out = []
    for element, heading, ids in (("prompt-text", "Prompt", prompt), ("output-text", "Generated", tokens)):
        count = "?" if ids is None else f"{len(ids)} token{'s' if len(ids) != 1 else ''}"
        text = None if ids is None else _decoded(ids, tokenizer)
        if text is not None:
            how = "decoded with the tokenizer of the checkpoint given (--model)"
        elif element == "output-text" and pieces and all(isinstance(p, str) for p in pieces):
            text, how = "".join(pieces), "the steps' token_text, joined, as the ledger states it: unverified (no " \
                                         "tokenizer given: --model DIR checks and decodes it)"
        elif ids is not None:
            text, how = " ".join(map(str, ids)), "token ids (no tokenizer given: --model DIR decodes them)"
        else:
            text, how = "", "not recorded as token ids"
        out.append((element, heading, f"{count} · {how}", text))
    return out


def _text_html(ledger: Ledger, tokenizer) -> str:
    return '<section id="run-text" class="run-text">' + "".join(
        f'<div class="text-part"><h2>{html.escape(heading)} <span class="hint">{html.escape(how)}</span></h2>'
        f'<pre id="{element}" class="text-box">{html.escape(_visible(text))}</pre></div>'
        for element, heading, how, text in _texts(ledger, tokenizer)) + "</section>"


def _text_verified(report: Report | None) -> bool:
    """Whether verify checked the steps' token_text (against the verifier's tokenizer, or by a replay) and
    found it right: the page shows it unmarked only then."""
    return report is not None and report.check("derived").ok is True and not report.text_unchecked


def _status_html(ledger: Ledger) -> str:
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


def _checks_table(checks: list[Check]) -> str:
    rows = "".join(
        f'<tr class="check-{RESULT[c.ok][1]}" data-check="{html.escape(c.name)}">'
        f'<td class="check-name">{html.escape(c.name)}</td>'
        f'<td class="check-result"><span class="res res-{RESULT[c.ok][1]}">{RESULT[c.ok][0]}</span></td>'
        f'<td class="check-detail">{html.escape(c.detail)}</td></tr>'
        for c in checks)
    return (f'<table class="checks"><thead><tr><th>check</th><th>result</th><th>detail</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _replay_html(replay: ReplayReport | None) -> str:
    if replay is None:
        return ""
    rows = "".join(
        f'<tr class="check-{"pass" if r.ok else "fail"}" data-step="{r.step}">'
        f'<td>{r.step}</td><td>{r.positions}</td><td>{"" if r.token_id is None else r.token_id}</td>'
        f'<td class="check-result"><span class="res res-{"pass" if r.ok else "fail"}">'
        f'{("identical" if replay.exact else "agrees") if r.ok else "DIFFERS"}</span></td>'
        f'<td>{r.compared:,}</td><td class="check-detail">{html.escape("; ".join(r.differences[:3]))}</td></tr>'
        for r in replay.results)
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in replay.identity_problems)
    return (f'<div id="replay" class="replay" data-ok="{"pass" if replay.ok else "fail"}">'
            f'<h2>replay <span class="verify-what">re-executed from {html.escape(replay.model_dir)} '
            f'in {replay.wall_s:.1f} s</span></h2>'
            f'<p class="verify-summary {"pass" if replay.ok else "fail"}">{html.escape(replay.summary())}</p>'
            + (f'<ul class="identity-problems">{problems}</ul>' if problems else "")
            + f'<table class="checks"><thead><tr><th>step</th><th>positions</th><th>token</th><th>result</th>'
              f'<th>values compared</th><th>differences</th></tr></thead><tbody>{rows}</tbody></table></div>')


def _receipt_html(receipt: ReceiptReport | None) -> str:
    if receipt is None:
        return ""
    passes, line = receipt.summary()
    state = "pass" if passes else "fail"
    return (f'<div id="receipt" class="receipt" data-ok="{state}">'
            f'<h2>receipt <span class="verify-what">{html.escape(str(receipt.path))}</span></h2>'
            f'<p class="verify-summary {state}">{html.escape(line)}</p>{_checks_table(receipt.checks)}</div>')


def _verify_html(report: Report | None, error: str | None, bundle: bool, receipt: ReceiptReport | None = None) -> str:
    what = "bundle" if bundle else "ledger"
    if report is None:
        return (f'<section id="verify" class="verify" data-ok="error"><h2>verify</h2>'
                f'<p class="verify-summary fail">verify did not finish on this {what}: {html.escape(error or "")}</p>'
                f'</section>')
    proven, summary = report.summary()
    state = "pass" if report.ok else "fail"
    return (f'<section id="verify" class="verify" data-ok="{state}" data-proven="{"yes" if proven else "no"}">'
            f'<h2>verify <span class="verify-what">{what}, run when this page was built</span></h2>'
            f'<p class="verify-summary {"pass" if proven else "fail"}">{html.escape(summary)}</p>'
            f'{_checks_table(report.checks)}{_replay_html(report.replay)}{_receipt_html(receipt)}</section>')


def _cache_budget(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return "0 (no weight cache)" if value == 0 else f"{value:,} bytes (weight cache budget)"
    return json.dumps(value)


def _meta_html(ledger: Ledger) -> str:
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
        ("kernels", str(run.get("kernels", "mlx-builtin (schema 1)"))),
        *([("expert_cache_bytes", _cache_budget(run["expert_cache_bytes"]))] if "expert_cache_bytes" in run else []),
        *([("cache_policy", str(run["cache_policy"]))] if "cache_policy" in run else []),
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


def _features(ledger: Ledger, report: Report | None, vindex: Path, anchors_dir: Path | None) -> dict[str, Any]:
    """The features panel's data (`vindex.features`) for a bundle that verify passes; else why there is none.
    A vindex or a bundle that features cannot read at all raises (the user asked for it)."""
    from ..vindex.features import step_features  # numpy only, like the rest of the page

    if report is None or not report.ok:
        return {"error": "not computed: verify does not pass on this bundle", "vindex": str(vindex)}
    return step_features(ledger.path, vindex, FEATURES_TOP, anchors_dir=anchors_dir, verified=True).to_json()


# Features listed per selected expert in the features panel (the cell shows the first three, its title all).
FEATURES_TOP = 5


def build_explorer(path: str | Path, anchors_dir: Path | None = None, tokenizer=None, replay: Replay | None = None,
                   receipt: ReceiptReport | None = None, vindex: Path | None = None, replay_text: bool = True) -> str:
    """The explorer page (HTML) for a ledger file or a bundle directory; `replay` and `receipt`, when given,
    are shown with verify's checks (`tokenizer` and `replay_text` as verify takes them); `vindex` (a vindex
    directory) adds the panel of the feature directions each step's MoE inputs project onto
    (`vindex.features`). The steps' token_text is marked unverified unless verify checked it."""
    ledger = require_ledger(read_ledger(path))  # verify's decision of what is no ledger at all
    if ledger.header is None:
        raise ExplorerError(f"{ledger.ledger_path}: a damaged ledger: line 1 is not a readable header, so there "
                            f"is no run to show (mlx-k2 verify says what is wrong)")
    notes = list(ledger.notes)
    if not isinstance(ledger.header.get("provenance"), dict):
        notes.append("header: no provenance map, so values carry no provenance marks")
    ledger = dataclasses.replace(ledger, header=_constants_as_text(ledger.header),
                                 steps=_constants_as_text(ledger.steps), footer=_constants_as_text(ledger.footer),
                                 notes=notes)
    report, verify_error = None, None
    try:
        report = verify(ledger.path, anchors_dir, tokenizer, replay=replay, replay_text=replay_text)
    except K2Error as e:
        verify_error = str(e)
    except Exception as e:  # noqa: BLE001  verify's own bug on an odd ledger: show it, still render the ledger
        verify_error = f"verify raised {type(e).__name__}: {e}"
    data = {"header": ledger.header, "steps": ledger.steps, "footer": ledger.footer, "status": ledger.status,
            "notes": ledger.notes, "text_verified": _text_verified(report)}
    if vindex is not None:
        data["features"] = _features(ledger, report, Path(vindex), anchors_dir)
    title = page_title(ledger.header)
    return _fill(_template(), {
        "TITLE": html.escape(title),
        "STATUS": _status_html(ledger),
        "META": _meta_html(ledger),
        "NOTES": _notes_html(ledger.notes),
        "TEXT": _text_html(ledger, tokenizer),
        "VERIFY": _verify_html(report, verify_error, ledger.bundle, receipt),
        "VERSION": html.escape(__version__),
        "DATA": _json_for_script(data),
    })
