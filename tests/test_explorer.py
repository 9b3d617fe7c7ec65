"""The explorer page, built from synthetic-run ledgers and bundles: what the HTML embeds, that it needs no
network, and what a real browser (headless Chromium, networking disabled) renders from it.

Every expectation is taken from the ledger lines or from `verify` run separately, never from the page's own
output. The browser tests skip when /usr/bin/chromium is absent (Debian: apt-get install -y chromium); the
screenshot and the page go to $MLX_K2_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_k2_cli.main import app
from mlx_k2.explorer.page import build_explorer
from mlx_k2.evidence.ledger import read_ledger
from mlx_k2.evidence.schema import LEDGER_NAME
from mlx_k2.evidence.verify import verify
from mlx_k2.run.session import run

from conftest import cpu_spec

CHROMIUM = Path("/usr/bin/chromium")
BOS = 163584


# ---- a small DOM for asserting on HTML (the generated page and Chromium's --dump-dom) ---------------------
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def all(self, tag: str | None = None, cls: str | None = None, **attrs) -> list["Node"]:
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in (n.attrs.get("class") or "").split())
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def by_id(self, id_: str) -> "Node":
        found = [n for n in self.iter() if n.attrs.get("id") == id_]
        assert len(found) == 1, f"#{id_}: {len(found)} elements"
        return found[0]

    def text(self) -> str:
        return "".join(c.text() if isinstance(c, Node) else c for c in self.children)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class Tree(HTMLParser):
    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def dom(source: str) -> Node:
    return Tree(source).root


def embedded(page: str) -> dict:
    return json.loads(dom(page).by_id("ledger-data").text())


def lines_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_bytes().split(b"\n") if x]


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle5(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("explorer") / "b5"
    result = run(synth_dir, prompt_ids=[BOS], max_new_tokens=5, bundle_dir=out, spec=cpu_spec())
    assert result.status == "complete"
    return out


@pytest.fixture(scope="module")
def ledger5(bundle5):
    """The bundle's ledger on its own: a plain ledger file."""
    path = bundle5.parent / "l5.jsonl"
    shutil.copyfile(bundle5 / LEDGER_NAME, path)
    return path


@pytest.fixture(scope="module")
def artifacts() -> Path:
    d = Path(os.environ.get("MLX_K2_ARTIFACTS") or Path(__file__).parent / "artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---- the page's content -----------------------------------------------------------------------------------
def test_page_from_ledger_embeds_every_record(ledger5):
    page = build_explorer(ledger5)
    records = lines_of(ledger5)
    data = embedded(page)
    assert data["header"] == records[0]
    assert data["steps"] == records[1:-1]  # exact: floats round-trip through the embedded JSON
    assert data["footer"] == records[-1]
    root = dom(page)
    assert root.all("title")[0].text() == "Kimi K2.5 Output Formation Ledger"
    assert root.all("h1")[0].text() == "Kimi K2.5 Output Formation Ledger"
    status = root.by_id("ledger-status")
    assert status.attrs["data-status"] == "complete" and "ledger complete" in status.text()
    assert "5 steps" in status.text()


def test_page_from_bundle_embeds_verify(bundle5):
    page = build_explorer(bundle5)
    report = verify(bundle5)
    rows = [r for r in dom(page).by_id("verify").all("tr") if "data-check" in r.attrs]
    assert [r.attrs["data-check"] for r in rows] == [c.name for c in report.checks]
    assert "manifest" in [c.name for c in report.checks]  # bundle-only check
    results = {True: "pass", False: "FAIL", None: "skip/warn"}
    for row, check in zip(rows, report.checks):
        assert row.all("td", cls="check-result")[0].text() == results[check.ok]
        assert row.all("td", cls="check-detail")[0].text() == check.detail
    assert dom(page).by_id("verify").attrs["data-ok"] == ("pass" if report.ok else "fail")


def test_partial_ledger_without_footer(ledger5, tmp_path):
    raw = ledger5.read_bytes().split(b"\n")[:-2]  # drop the footer (and the empty tail)
    path = tmp_path / "partial.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    page = build_explorer(path)
    status = dom(page).by_id("ledger-status")
    assert status.attrs["data-status"] == "partial" and "ledger partial" in status.text()
    assert "no footer" in status.text()
    data = embedded(page)
    assert data["footer"] is None and len(data["steps"]) == 5
    assert verify(path).partial
    assert dom(page).by_id("verify").all("tr", data_check="complete")[0].all("td")[1].text() == "skip/warn"


def test_partial_ledger_cut_mid_line(ledger5, tmp_path):
    raw = ledger5.read_bytes().split(b"\n")[:-2]
    last = raw[-1]
    path = tmp_path / "cut.jsonl"
    path.write_bytes(b"\n".join(raw[:-1]) + b"\n" + last[: len(last) // 2])  # killed mid-write of step 4
    page = build_explorer(path)
    root = dom(page)
    assert root.by_id("ledger-status").attrs["data-status"] == "partial"
    notes = root.by_id("read-notes").text()
    assert f"line {len(raw)}: cut off mid-write ({len(last) // 2:,} bytes" in notes and "skipped" in notes
    assert embedded(page)["steps"] == lines_of(ledger5)[1:5]
    # verify, run independently, sees the same cut line.
    assert verify(path).check("parse").ok is False


def test_stopped_run_is_not_complete(ledger5, tmp_path):
    records = lines_of(ledger5)
    records[-1] = {**records[-1], "status": "stopped", "error": "interrupted"}
    path = tmp_path / "stopped.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    status = dom(build_explorer(path)).by_id("ledger-status")
    assert status.attrs["data-status"] == "stopped" and "partial: run stopped" in status.text()
    assert "interrupted" in status.text()


HOSTILE = '</script><img src=x onerror="document.title=1"><script>document.title="pwned"</script><!--'


def hostile_ledger(ledger5: Path, path: Path) -> Path:
    records = lines_of(ledger5)
    records[1]["token_text"] = HOSTILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_token_text_cannot_leave_the_data_element(ledger5, tmp_path):
    page = build_explorer(hostile_ledger(ledger5, tmp_path / "hostile.jsonl"))
    root = dom(page)
    assert len(root.all("script")) == 2 and not root.all("img")
    assert embedded(page)["steps"][0]["token_text"] == HOSTILE
    assert "</script><img" not in page and "<!--" not in page


def network_refs(page: str) -> list[str]:
    bad = []
    for node in dom(page).iter():
        for name, value in node.attrs.items():
            v = (value or "").strip().lower()
            if name in ("src", "href", "xlink:href", "srcset", "action", "poster", "data") and (
                    v.startswith(("http:", "https:", "//")) or name == "src"):
                bad.append(f"<{node.tag} {name}={value!r}>")
        if node.tag in ("style",) or "style" in node.attrs:
            css = node.text() if node.tag == "style" else node.attrs["style"]
            bad += [f"css {m!r}" for m in re.findall(r"@import|url\(\s*['\"]?\s*(?:https?:|//)", css, re.I)]
        if node.tag in ("link", "iframe", "object", "embed", "base"):
            bad.append(f"<{node.tag}>")
    return bad


def test_no_network_resources(ledger5, bundle5, tmp_path):
    raw = ledger5.read_bytes().split(b"\n")[:-2]
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(raw)[:-100])
    for path in (ledger5, bundle5, cut):
        page = build_explorer(path)
        assert network_refs(page) == [], path
        # Scripts are inline only, and the page forbids any fetch by its own policy.
        assert all("src" not in s.attrs for s in dom(page).all("script"))
        assert "default-src 'none'" in page


def test_non_ledgers_are_refused(tmp_path):
    from mlx_k2.explorer.page import ExplorerError
    from mlx_k2.evidence.ledger import LedgerReadError

    (tmp_path / "not.jsonl").write_text('{"kind": "step"}\n')
    for path, message in ((tmp_path / "missing.jsonl", "no such file"), (tmp_path, "not a bundle")):
        with pytest.raises(LedgerReadError, match=message):
            read_ledger(path)
        with pytest.raises(LedgerReadError, match=message):
            build_explorer(path)
    # The reader is tolerant of a first line that is no header (verify reports it); the explorer refuses it,
    # and refuses what holds no ledger record at all as verify does.
    assert read_ledger(tmp_path / "not.jsonl").header is None
    with pytest.raises(ExplorerError, match="line 1 is not a readable header"):
        build_explorer(tmp_path / "not.jsonl")


# ---- the command ------------------------------------------------------------------------------------------
def test_cli_writes_the_page(bundle5, tmp_path):
    out = tmp_path / "explorer.html"
    result = CliRunner().invoke(app, ["explore", str(bundle5), "-o", str(out)])
    assert result.exit_code == 0, result.output
    size = out.stat().st_size
    assert result.output.strip() == f"wrote {out} ({size:,} bytes, {size / 1024:.1f} KiB)"
    assert embedded(out.read_text(encoding="utf-8"))["steps"] == lines_of(bundle5 / LEDGER_NAME)[1:-1]


def test_cli_default_output_leaves_the_bundle_as_written(bundle5):
    result = CliRunner().invoke(app, ["explore", str(bundle5)])
    assert result.exit_code == 0, result.output
    out = bundle5.parent / "b5.html"
    assert out.is_file() and str(out) in result.output
    assert verify(bundle5).ok  # nothing was added inside the bundle


def test_cli_refuses_to_write_over_its_input(bundle5, ledger5):
    for path, out in ((ledger5, ledger5), (bundle5, bundle5 / "explorer.html")):
        before = path.read_bytes() if path.is_file() else None
        result = CliRunner().invoke(app, ["explore", str(path), "-o", str(out)])
        assert result.exit_code == 2 and result.output.startswith(f"error: {out}: would overwrite")
        assert before is None or path.read_bytes() == before
    assert not (bundle5 / "explorer.html").exists()


def test_cli_missing_path_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["explore", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: no such file or directory"]
    assert not (tmp_path / "x.html").exists()


# ---- a real browser ---------------------------------------------------------------------------------------
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs /usr/bin/chromium "
                                                                 "(Debian: apt-get install -y chromium)")


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rendered(tmp_path: Path, page: str, fragment: str = "") -> Node:
    path = tmp_path / f"page-{time.monotonic_ns()}.html"
    path.write_text(page, encoding="utf-8")
    root = dom(chromium(tmp_path, path.as_uri() + fragment, "--dump-dom"))
    assert root.all("body")[0].attrs.get("data-rendered") == "true", "the page's script did not finish"
    return root


def cell_value(td: Node) -> object:
    """The full value a cell's title carries: 'field = <JSON> · measured (M)'."""
    m = re.match(r"(\w+) = (.*?)(?: · (measured|derived) \(([MD])\))?(?:\n|$)", td.attrs["title"])
    assert m, td.attrs["title"]
    return json.loads(m.group(2))


@needs_chromium
def test_browser_renders_every_panel(bundle5, tmp_path, artifacts):
    records = lines_of(bundle5 / LEDGER_NAME)
    header, steps = records[0], records[1:-1]
    n_layers = header["model"]["num_layers"]
    page = build_explorer(bundle5)
    root = rendered(tmp_path, page)
    assert float(root.all("body")[0].attrs["data-render-ms"]) < 2000

    chart = root.by_id("norm-chart")
    assert len(chart.all("circle", cls="pt-out")) == n_layers == 61
    assert len(chart.all("circle", cls="pt-in")) == n_layers
    for cls in ("norm-in", "norm-out"):
        d = chart.all("path", cls=cls)[0].attrs["d"]
        assert d.count("M") == 1 and d.count("L") == n_layers - 1, cls
    assert len(chart.all("path", cls="faint")) == len(steps) - 1

    timeline = root.by_id("timeline-rows").all("tr")
    assert [int(r.attrs["data-step"]) for r in timeline] == [s["step"] for s in steps]
    for row, s in zip(timeline, steps):
        cells = {td.attrs["data-field"]: td for td in row.all("td") if "data-field" in td.attrs}
        assert cell_value(cells["token_id"]) == s["token_id"] and cell_value(cells["logit"]) == s["logit"]
        assert cell_value(cells["entropy"]) == s["entropy"] and cell_value(cells["wall_s"]) == s["wall_s"]
    assert "selected" in timeline[0].classes()

    rows = root.by_id("layer-rows").all("tr")
    assert len(rows) == n_layers
    # Provenance marks of both classes, each on the fields the header's map gives that class.
    provenance = header["provenance"]
    marked = [td for td in root.by_id("app").all("td") if "pv" in td.classes()]
    assert {c for td in marked for c in td.classes()} >= {"pv-M", "pv-D"}
    for td in marked:
        assert f"pv-{provenance[td.attrs['data-field']]}" in td.classes()

    grid = root.by_id("routing-grid")
    marks = grid.all("path", cls="mark-path")
    assert len(marks) == 1  # one path for the selected step, not a node per cell
    assert int(marks[0].attrs["data-count"]) == sum(len(x["experts"] or []) for x in steps[0]["layers"])

    shot = artifacts / "explorer-1400x1000.png"
    shot.unlink(missing_ok=True)
    page_path = artifacts / "explorer.html"
    page_path.write_text(page, encoding="utf-8")
    chromium(tmp_path, page_path.as_uri(), f"--screenshot={shot}", "--window-size=1400,1000",
             "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def in_a_frame(tmp_path: Path, page: str, width: int, height: int = 1000) -> Path:
    """A page holding `page` in a `width` px wide frame (headless Chromium's window is never narrower than
    500 px; a frame is the phone's viewport) whose script writes, once the page has rendered, its
    document's scrollWidth and clientWidth to the body's data-scroll-width and data-client-width."""
    import html

    wrapper = tmp_path / f"frame-{time.monotonic_ns()}.html"
    wrapper.write_text(f"""<!doctype html><html><body style="margin:0">
<iframe id="f" style="border:0;width:{width}px;height:{height}px" srcdoc="{html.escape(page, quote=True)}"></iframe>
<script>
var frame = document.getElementById("f");
frame.addEventListener("load", function () {{
  var d = frame.contentDocument;
  document.body.setAttribute("data-rendered", d.body.getAttribute("data-rendered"));
  document.body.setAttribute("data-scroll-width", String(d.documentElement.scrollWidth));
  document.body.setAttribute("data-client-width", String(d.documentElement.clientWidth));
}});
</script></body></html>""", encoding="utf-8")
    return wrapper


@needs_chromium
def test_browser_phone_width_does_not_scroll_sideways(bundle5, tmp_path, artifacts):
    """390 px (a phone held upright): the page fits its width; wide tables scroll inside their cards."""
    wrapper = in_a_frame(tmp_path, build_explorer(bundle5), 390, 2400)
    body = dom(chromium(tmp_path, wrapper.as_uri(), "--dump-dom")).all("body")[0]
    assert body.attrs["data-rendered"] == "true"
    scroll, client = int(body.attrs["data-scroll-width"]), int(body.attrs["data-client-width"])
    assert client <= 390 and scroll <= client, f"scrollWidth {scroll} > clientWidth {client}"
    shot = artifacts / "explorer-390.png"
    shot.unlink(missing_ok=True)
    chromium(tmp_path, wrapper.as_uri(), f"--screenshot={shot}", "--window-size=390,2400", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
def test_browser_selects_step_from_the_url(bundle5, tmp_path):
    steps = lines_of(bundle5 / LEDGER_NAME)[1:-1]
    root = rendered(tmp_path, build_explorer(bundle5), "#step=2")
    assert root.all("body")[0].attrs["data-selected-step"] == "2"
    selected = [r for r in root.by_id("timeline-rows").all("tr") if "selected" in r.classes()]
    assert [r.attrs["data-step"] for r in selected] == ["2"]
    assert root.by_id("step-title").text() == "2"
    rows = root.by_id("layer-rows").all("tr")
    want = steps[2]["layers"]
    assert steps[2]["layers"] != steps[0]["layers"]
    for row, layer in zip(rows, want, strict=True):
        cells = {td.attrs["data-field"]: td for td in row.all("td") if "data-field" in td.attrs}
        for field in ("norm_in", "norm_out", "experts", "routing_weights", "unique_experts", "bytes_read"):
            assert cell_value(cells[field]) == layer[field], (layer["layer"], field)
    marks = root.by_id("routing-grid").all("path", cls="mark-path")
    assert marks[0].attrs["data-step"] == "2"
    assert int(marks[0].attrs["data-count"]) == sum(len(x["experts"] or []) for x in want)


@needs_chromium
def test_browser_renders_a_header_only_ledger(ledger5, tmp_path):
    path = tmp_path / "header-only.jsonl"
    path.write_bytes(ledger5.read_bytes().split(b"\n")[0] + b"\n")  # killed before the first step ended
    root = rendered(tmp_path, build_explorer(path))
    assert root.by_id("ledger-status").attrs["data-status"] == "partial"
    assert root.by_id("timeline-rows").text() == "No step lines in this ledger."
    assert not root.by_id("norm-chart").all("circle")


@needs_chromium
def test_browser_shows_hostile_token_text_as_text(ledger5, tmp_path):
    root = rendered(tmp_path, build_explorer(hostile_ledger(ledger5, tmp_path / "hostile.jsonl")))
    assert root.all("title")[0].text() == "Kimi K2.5 Output Formation Ledger"
    assert not root.all("img") and len(root.all("script")) == 2
    first = root.by_id("timeline-rows").all("tr")[0]
    token = [td for td in first.all("td") if td.attrs.get("data-field") == "token_text"][0]
    assert token.text() == HOSTILE


CACHE_FIELDS = ("positions", "bytes_cached")   # LEDGER.md, schema 2 additions (layer records: bytes_cached)


def fields_of(row: Node) -> dict[str, Node]:
    return {td.attrs["data-field"]: td for td in row.all("td") if "data-field" in td.attrs}


@needs_chromium
def test_browser_shows_the_cache_fields_where_the_ledger_has_them(ledger5, tmp_path):
    """Step positions and bytes_cached, layer bytes_cached: shown with their values and provenance where the
    records hold them; no column for them in a ledger from before them."""
    recs = lines_of(ledger5)
    header, steps = recs[0], recs[1:-1]
    root = rendered(tmp_path, build_explorer(ledger5), "#step=2")
    assert {"positions", "bytes_cached"} <= {th.text() for th in root.by_id("timeline").all("th")}
    for row, s in zip(root.by_id("timeline-rows").all("tr"), steps, strict=True):
        cells = fields_of(row)
        for field in CACHE_FIELDS:
            assert cell_value(cells[field]) == s[field], field
            assert f"pv-{header['provenance'][field]}" in cells[field].classes()
    facts = {dd.attrs["data-field"]: dd.text() for dd in root.by_id("step-detail").all("dd")}
    assert facts["positions"] == str(steps[2]["positions"]) == "3"
    assert facts["bytes_cached"].startswith(f"{steps[2]['bytes_cached']:,}")
    assert "bytes_cached" in {th.text() for th in root.by_id("layer-table").all("th")}
    for row, layer in zip(root.by_id("layer-rows").all("tr"), steps[2]["layers"], strict=True):
        assert cell_value(fields_of(row)["bytes_cached"]) == layer["bytes_cached"]

    old = tmp_path / "before-the-cache.jsonl"
    for field in CACHE_FIELDS:
        del header["provenance"][field]
    for s in steps:
        for field in CACHE_FIELDS:
            del s[field]
        for x in s["layers"]:
            del x["bytes_cached"]
    old.write_text("".join(json.dumps(r) + "\n" for r in recs))
    root = rendered(tmp_path, build_explorer(old), "#step=2")
    heads = {th.text() for table in ("timeline", "layer-table") for th in root.by_id(table).all("th")}
    assert not heads & set(CACHE_FIELDS) and "bytes_read" in heads
    shown = {td.attrs.get("data-field") for td in root.by_id("app").all("td")} | \
            {dd.attrs.get("data-field") for dd in root.by_id("step-detail").all("dd")}
    assert not shown & set(CACHE_FIELDS) and "bytes_read" in shown
    # every row has as many cells as its table has columns
    for table, rows in (("timeline", "timeline-rows"), ("layer-table", "layer-rows")):
        width = len(root.by_id(table).all("th"))
        assert {len(row.all("td")) for row in root.by_id(rows).all("tr")} == {width}, table


@pytest.mark.slow
@needs_chromium
def test_twenty_steps_stay_quick(synth_dir, tmp_path):
    path = tmp_path / "l20.jsonl"
    run(synth_dir, prompt_ids=[BOS], max_new_tokens=20, ledger_path=path, spec=cpu_spec())
    start = time.perf_counter()
    page = build_explorer(path)
    assert time.perf_counter() - start < 5.0
    start = time.perf_counter()
    root = rendered(tmp_path, page, "#step=19&routing=all")
    assert time.perf_counter() - start < 30.0
    assert float(root.all("body")[0].attrs["data-render-ms"]) < 2000
    assert len(root.by_id("norm-chart").all("path", cls="faint")) == 19
    assert len(root.by_id("routing-grid").all("path", cls="mark-path")) <= 20
