"""The live dashboard's state and its pure `render(state) -> renderable`.

`DashboardState.update(event)` folds run events into what the screen shows: step k of N, layer progress
with per-layer times and ETAs, the residual norm trajectory (this step beside the previous one), the
current MoE layer's experts and weights, a strip over all experts counting selections this run, I/O, the
decode mode (no-KV or KV cache, positions computed per step, router look-ahead and how often its guesses
were right), the weight cache's fill and hit rate, the answer as it forms (valid UTF-8 across tokens:
checkpoint.text_stream) and the token timeline. Before the run starts, `progress` shows the work before step 0 (building the default
checkpoint, reading headers, validating). A figure not known yet is left out, never shown as a guess.
`render` only reads the state; driving it (rich `Live`) is the CLI's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from rich.cells import chop_cells
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..evidence.events import Event, LayerDone, RunDone, RunStarted, StepDone, hit_rate, lookahead_counts
from ..evidence.derived import entropy, margin
from ..checkpoint.text_stream import TextStream, visible

SPARK = "▁▂▃▄▅▆▇█"
SHADE = " ░▒▓█"


@dataclass
class TokenRow:
    step: int
    token_id: int
    text: str | None
    logit: float
    margin: float
    entropy: float
    bytes_read: int
    wall_s: float
    positions: int = 0       # positions the step computed
    bytes_cached: int = 0    # bytes the weight cache served


@dataclass
class DashboardState:
    model_path: str = ""                    # this and the fields up to step_bytes_estimate: from RunStarted
    model_type: str = ""
    device: str = ""
    kernels: str = ""
    num_layers: int = 0
    n_routed_experts: int = 0
    max_new_tokens: int = 0
    context_len: int = 0
    step_bytes_estimate: int | None = None  # from the headers, before the first step has run
    kv_cache: bool = False                  # decode mode, weight cache budget and look-ahead: from RunStarted
    cache_budget: int = 0
    lookahead: bool = False
    tokenizer: object = None                # checkpoint.tokenizer.Tokenizer, or None: tokens shown as ids
    clock: object = time.perf_counter       # injectable for tests
    step: int = 0
    layers_done: int = 0
    layer_kind: str = ""
    layer_times: list[float] = field(default_factory=list)
    norms: list[float | None] = field(default_factory=list)              # this step, layer by layer
    finished_norms: list[list[float | None]] = field(default_factory=list)  # one trajectory per finished step
    moe_layer: int | None = None
    experts: tuple[int, ...] = ()
    weights: list[float] = field(default_factory=list)
    expert_counts: np.ndarray | None = None
    bytes_step: int = 0
    bytes_total: int = 0
    last_step_bytes: int | None = None
    step_times: list[float] = field(default_factory=list)
    step_started: float | None = None
    tokens: list[TokenRow] = field(default_factory=list)
    last_positions: int | None = None       # positions the last finished step computed
    cached_step: int = 0                    # bytes the weight cache served: this step's layers so far
    cached_total: int = 0                   # ... this run (finished steps and this step's layers so far)
    last_step_cached: int | None = None     # ... the last finished step
    cache_held: int | None = None           # bytes the weight cache held after the last finished step
    guesses_step: tuple[int, int] = (0, 0)  # look-ahead (right, used) over this step's guessed layers so far
    guesses_total: tuple[int, int] = (0, 0)  # ... this run
    last_step_guesses: tuple[int, int] | None = None  # ... the last finished step
    status: str = "running"                 # "starting" until RunStarted when made empty, then the run's
    preparing: tuple[str, int, int] | None = None   # (what, done, total) of the work before step 0
    answer: TextStream | None = None        # the text of this call's tokens (from the first StepDone on)

    def __post_init__(self):
        if not self.num_layers:
            self.status = "starting"
        if self.expert_counts is None:
            self.expert_counts = np.zeros(self.n_routed_experts, dtype=np.int64)
        if self.step_started is None:
            self.step_started = self.clock()

    def progress(self, what: str, done: int, total: int) -> None:
        self.preparing = (what, done, total)

    def update(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.model_path, self.device = event.model_path, event.device
            self.model_type = f"{event.model_type} {event.quantization}".strip()
            self.kernels = event.kernels
            self.num_layers, self.n_routed_experts = event.num_layers, event.n_routed_experts
            self.max_new_tokens, self.context_len = event.max_new_tokens, event.context_len
            self.step, self.step_bytes_estimate = event.first_step, event.step_bytes_estimate
            self.kv_cache, self.cache_budget, self.lookahead = event.kv_cache, event.cache_budget, event.lookahead
            self.expert_counts = np.zeros(self.n_routed_experts, dtype=np.int64)
            self.status, self.preparing, self.step_started = "running", None, self.clock()
        elif isinstance(event, LayerDone):
            self.layers_done = event.layer + 1
            self.layer_kind = event.kind
            self.layer_times.append(event.wall_s)
            self.norms.append(event.norm_out)
            self.bytes_step += event.bytes_read
            self.bytes_total += event.bytes_read
            self.cached_step += event.bytes_cached
            self.cached_total += event.bytes_cached
            hits, used = lookahead_counts([event])
            self.guesses_step = (self.guesses_step[0] + hits, self.guesses_step[1] + used)
            self.guesses_total = (self.guesses_total[0] + hits, self.guesses_total[1] + used)
            if event.experts is not None:
                self.moe_layer, self.experts = event.layer, event.experts
                self.weights = event.routing_weights or []
                self.expert_counts[list(event.experts)] += 1
        elif isinstance(event, StepDone):
            logits = np.asarray(event.logits)
            text = self.tokenizer.token_text(event.token_id) if self.tokenizer is not None else None
            if self.tokenizer is not None:
                self.answer = self.answer or TextStream(self.tokenizer)
                self.answer.add(event.token_id)
            self.tokens.append(TokenRow(event.step, event.token_id, text, event.logit, margin(logits),
                                        entropy(logits), event.bytes_read, event.wall_s, event.positions,
                                        event.bytes_cached))
            # The step's bytes also include the embedding rows, final norm and lm_head.
            self.bytes_total += event.bytes_read - self.bytes_step
            self.cached_total += event.bytes_cached - self.cached_step
            self.last_step_bytes, self.last_step_cached = event.bytes_read, event.bytes_cached
            self.last_positions, self.cache_held = event.positions, event.cache_held
            # The step's layers were folded in as they finished; the StepDone's are the same ones.
            self.last_step_guesses, self.guesses_step = self.guesses_step, (0, 0)
            self.cached_step = 0
            self.step_times.append(event.wall_s)
            self.finished_norms.append(self.norms)
            self.norms = []
            self.layer_times, self.layers_done, self.bytes_step = [], 0, 0
            self.step = event.step + 1
            self.context_len += 1
            self.step_started = self.clock()
        elif isinstance(event, RunDone):
            self.status = event.status
            self.step = min(self.step, self.max_new_tokens - 1)
            if event.status == "complete":
                self.layers_done = self.num_layers
                self.context_len -= 1  # show the last step's context, not the one a next step would have

    # ------------------------------------------------------------------ derived figures
    def trajectories(self) -> tuple[list[float | None], list[float | None]]:
        """(the step shown, the one before it): the running step, or the last finished one at the end."""
        done = self.finished_norms
        if self.norms or self.status == "running":
            return self.norms, done[-1] if done else []
        return (done[-1] if done else []), (done[-2] if len(done) > 1 else [])

    def eta_step(self) -> float | None:
        if self.status != "running":
            return 0.0
        if not self.layer_times:
            return self.step_times[-1] if self.step_times else None
        per_layer = sum(self.layer_times) / len(self.layer_times)
        return per_layer * (self.num_layers - self.layers_done)

    def eta_run(self) -> float | None:
        step_eta = self.eta_step()
        if step_eta is None:
            return None
        per_step = self.step_times[-1] if self.step_times else sum(self.layer_times) / len(self.layer_times) \
            * self.num_layers
        remaining_steps = max(self.max_new_tokens - self.step - 1, 0)
        return step_eta + per_step * remaining_steps

    def showing_running_step(self) -> bool:
        """Per-step figures are the running step's once a layer of it has finished, else the last step's."""
        return bool(self.layers_done) and self.status == "running"

    def step_hit_rate(self) -> float | None:
        """The weight cache's share of the bytes of the step shown (None: no step bytes yet)."""
        if self.showing_running_step():
            return hit_rate(self.bytes_step, self.cached_step)
        if self.last_step_bytes is None:
            return None
        return hit_rate(self.last_step_bytes, self.last_step_cached or 0)

    def run_hit_rate(self) -> float | None:
        return hit_rate(self.bytes_total, self.cached_total)

    def step_guesses(self) -> tuple[int, int] | None:
        """Look-ahead (right, used) of the step shown."""
        return self.guesses_step if self.showing_running_step() else self.last_step_guesses

    def throughput(self) -> float | None:
        elapsed = self.clock() - self.step_started
        return self.bytes_step / elapsed if elapsed > 0 and self.bytes_step else None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _pct(fraction: float) -> str:
    return f"{fraction:.1%}"


def _accuracy(counts: tuple[int, int] | None) -> str | None:
    """`right/used (share)` of look-ahead guesses, or None while no guessed layer has run."""
    if not counts or not counts[1]:
        return None
    return f"{counts[0]}/{counts[1]} ({_pct(counts[0] / counts[1])})"


def _known(label: str, value, fmt) -> str:
    """`  label value`, or nothing while the value is not known."""
    return "" if value is None else f"  {label} {fmt(value)}"


def sparkline(values: list[float | None], top: float, width: int) -> str:
    """One character per layer, height by value / top (blank for layers not run yet)."""
    chars = []
    for v in values[:width]:
        if v is None or top <= 0:
            chars.append(" ")
        else:
            chars.append(SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)])
    return "".join(chars)


def expert_strip(counts: np.ndarray, width: int) -> str:
    """Experts folded into `width` cells (each the sum of its bucket), shaded by selection count."""
    buckets = np.array_split(counts, width) if counts.size > width else [counts[i:i + 1] for i in range(counts.size)]
    sums = np.array([b.sum() for b in buckets])
    top = sums.max() if sums.size and sums.max() > 0 else 1
    return "".join(SHADE[0] if s == 0 else SHADE[min(1 + int(s / top * (len(SHADE) - 2) + 0.5), len(SHADE) - 1)]
                   for s in sums)


def _bar(fraction: float, width: int) -> str:
    filled = int(round(max(0.0, min(fraction, 1.0)) * width))
    return "█" * filled + "·" * (width - filled)


FULL_HEIGHT = 42  # rows the full layout needs (its timeline of 8 tokens and answer of 4 lines included)
FULL_WIDTH = 100  # columns its lines need unwrapped


def render(state: DashboardState, width: int = 120, height: int | None = None):
    """The whole screen for `state` (pure: reads the state, returns rich renderables). A terminal smaller than
    the full layout (`height` rows, `width` columns) gets the compact one, whose every line fits."""
    inner = max(width - 6, 40)
    if state.status == "starting":
        return Panel(_preparing(state, inner), title="output formation", width=width)
    if (height is not None and height < FULL_HEIGHT) or width < FULL_WIDTH:
        return _compact(state, width, height or FULL_HEIGHT)
    # Between steps and after the last one, the per-step figures shown are the last finished step's.
    step_label = "this step" if state.showing_running_step() else "last step"
    routing_title, routing = _routing(state)
    lines = [_head(state), _layer_progress(state, inner), _io_line(state, step_label), _mode_line(state, step_label),
             _cache_line(state, step_label)]
    for line in lines:  # one line each: cut with an ellipsis, never wrapped
        line.no_wrap, line.overflow = True, "ellipsis"
    head, progress, io, mode, cache = lines
    return Panel(Group(head, progress, Text(""), _norms(state, inner), Text(""), routing_title, routing,
                       _expert_strip_line(state, inner), Text(""), io, mode, cache, Text(""), _answer(state, inner),
                       _timeline(state)),
                 title="output formation", width=width)


COMPACT_FIXED = 9  # the compact layout's rows besides the answer: borders, 6 lines, the answer's title


def _compact(state: DashboardState, width: int, height: int) -> Panel:
    """The layout for a small terminal (80x24 and up): one line each for the step, the layers, the current
    MoE layer's experts, I/O and the decode mode with the cache, the last token, then the answer in the rows
    left. Lines are cut with an ellipsis, never wrapped."""
    inner = width - 4
    step_label = "this step" if state.showing_running_step() else "last step"
    last_time = state.layer_times[-1] if state.layer_times else None
    lines = [
        Text.assemble(("step ", "bold"), f"{min(state.step + 1, state.max_new_tokens)}/{state.max_new_tokens}  ",
                      ("context ", "bold"), f"{state.context_len}  ", (state.status, "italic"),
                      f"  {state.device} {state.kernels}  {state.model_type}"),
        Text.assemble(("layers ", "bold"), _bar(state.layers_done / state.num_layers, 20),
                      f" {state.layers_done}/{state.num_layers} {state.layer_kind or '-'}"
                      + _known("ETA step", state.eta_step(), _secs) + _known("run", state.eta_run(), _secs)
                      + _known("last layer", last_time, _secs)),
        _compact_experts(state),
        _compact_io(state, step_label),
        _compact_token(state),
    ]
    answer_rows = max(height - COMPACT_FIXED, 1)
    answer = _answer(state, inner, answer_rows)
    for line in lines:
        line.no_wrap, line.overflow = True, "ellipsis"
    return Panel(Group(*lines, answer), title="output formation", width=width)


def _compact_experts(state: DashboardState) -> Text:
    """`layer L e3 .41 e9 .22 ...`: the current MoE layer's experts and routing weights on one line."""
    if state.moe_layer is None:
        return Text("no MoE layer yet", style="bold")
    pairs = "  ".join(f"e{e} {w:.2f}".replace(" 0.", " .") for e, w in zip(state.experts, state.weights))
    return Text.assemble((f"layer {state.moe_layer} experts ", "bold"), pairs)


def _compact_io(state: DashboardState, step_label: str) -> Text:
    """Bytes of the step shown and of the run, the decode mode, the weight cache's hit rates."""
    step_bytes = state.bytes_step if state.showing_running_step() else state.last_step_bytes
    cache = "no cache" if not state.cache_budget else (
        "cache" + _known(step_label, state.step_hit_rate(), _pct) + _known("run", state.run_hit_rate(), _pct))
    return Text.assemble(("I/O ", "bold"), _known(step_label, step_bytes, _gb).lstrip(),
                         _known("total", state.bytes_total, _gb), "  ",
                         "KV" if state.kv_cache else "no-KV", "  ", cache)


def _compact_token(state: DashboardState) -> Text:
    """The last token: step, id, text, logit, time."""
    if not state.tokens:
        return Text("no token yet", style="dim")
    t = state.tokens[-1]
    text = repr(visible(t.text)) if t.text is not None else "-"
    return Text.assemble(("token ", "bold"), f"step {t.step} id {t.token_id} {text} logit {t.logit:.3f} "
                         f"{_secs(t.wall_s)}")


def _head(state: DashboardState) -> Text:
    """Model, device, kernels, step k of N, context length and the run's status."""
    return Text.assemble(("mlx-k2 ", "bold"), f"{state.model_type}  {state.model_path}  device {state.device}  ",
                         *((("kernels ", "bold"), f"{state.kernels}  ") if state.kernels else ()),
                         ("step ", "bold"), f"{min(state.step + 1, state.max_new_tokens)}/{state.max_new_tokens}  ",
                         ("context ", "bold"), f"{state.context_len} tokens  ", (state.status, "italic"))


def _layer_progress(state: DashboardState, inner: int) -> Text:
    """The step's layers done, the last one's kind and time, and the ETAs."""
    last_time = state.layer_times[-1] if state.layer_times else None
    return Text.assemble(
        ("layers ", "bold"), _bar(state.layers_done / state.num_layers, min(61, inner - 60)),
        f" {state.layers_done}/{state.num_layers}",
        f"  {state.layer_kind or '-'}" + _known("last layer", last_time, _secs)
        + _known("ETA step", state.eta_step(), _secs) + _known("ETA run", state.eta_run(), _secs))


def _norms(state: DashboardState, inner: int) -> Text:
    """The residual norm trajectories, this step above the one before, on one scale."""
    this, previous = state.trajectories()
    known = [v for v in this + previous if v is not None]
    top = max(known) if known else 0.0
    spark_w = min(state.num_layers, inner - 22)
    return Text.assemble(
        ("norm_out this step ", "bold"), sparkline(this, top, spark_w),
        f"  {this[-1]:.2f}" if this and this[-1] is not None else "", "\n",
        ("norm_out prev step ", "dim"), (sparkline(previous, top, spark_w), "dim"),
        f"  max {top:.2f}" if known else "")


def _routing(state: DashboardState) -> tuple[Text, Table]:
    """The last MoE layer's experts with their routing weights (bars relative to the largest)."""
    routing = Table.grid(padding=(0, 1))
    routing.add_column(justify="right")
    routing.add_column()
    routing.add_column(justify="right")
    title = f"layer {state.moe_layer} experts" if state.moe_layer is not None else "no MoE layer yet"
    top_w = max(state.weights) if state.weights else 1.0
    for e, w in zip(state.experts, state.weights):
        routing.add_row(f"e{e}", _bar(w / top_w, 24), f"{w:.3f}")
    return Text(title, style="bold"), routing


def _expert_strip_line(state: DashboardState, inner: int) -> Text:
    """Selections this run over all routed experts, folded to fit the width."""
    strip_w = min(state.n_routed_experts, inner)
    per_cell = -(-state.n_routed_experts // strip_w)
    return Text.assemble((f"selections across layers this run, {state.n_routed_experts} experts "
                          f"({per_cell} per cell): ", "bold"), "\n", expert_strip(state.expert_counts, strip_w))


def _io_line(state: DashboardState, step_label: str) -> Text:
    """Bytes of the step shown, of the run, the read rate now and what a whole step reads."""
    step_bytes = state.bytes_step if state.showing_running_step() else state.last_step_bytes
    return Text.assemble(("I/O ", "bold"), _known(step_label, step_bytes, _gb).lstrip(),
                         _known("total", state.bytes_total, _gb),
                         _known("rate", state.throughput(), lambda r: _gb(int(r)) + "/s"),
                         _known("a step reads", state.last_step_bytes or state.step_bytes_estimate,
                                lambda n: "~" + _gb(n)))


def _mode_line(state: DashboardState, step_label: str) -> Text:
    """The decode mode, positions computed, and look-ahead: its accuracy, the share of the experts a layer
    used that were guessed and read ahead."""
    right = (_known(f"right {step_label}", _accuracy(state.step_guesses()), str)
             + _known("run", _accuracy(state.guesses_total), str)) if state.lookahead else ""
    return Text.assemble(("decode ", "bold"), "KV cache" if state.kv_cache else "no-KV (whole context)",
                         _known("positions last step", state.last_positions, str), "  ",
                         ("look-ahead ", "bold"), right.lstrip() or ("on" if state.lookahead else "off"))


def _timeline(state: DashboardState) -> Table:
    """The last 8 tokens, one row each (bytes cached only when there is a weight cache)."""
    timeline = Table(box=None, padding=(0, 1), header_style="bold")
    columns = ("step", "token", "text", "logit", "margin", "entropy", "pos", "bytes",
               *(("cached",) if state.cache_budget else ()), "time")
    for col in columns:
        timeline.add_column(col, justify="left" if col == "text" else "right")
    for t in state.tokens[-8:]:
        timeline.add_row(str(t.step), str(t.token_id), repr(t.text) if t.text is not None else "-",
                         f"{t.logit:.4f}", f"{t.margin:.4f}", f"{t.entropy:.3f}", str(t.positions), _gb(t.bytes_read),
                         *((_gb(t.bytes_cached),) if state.cache_budget else ()), _secs(t.wall_s))
    return timeline


ANSWER_LINES = 4


def _answer(state: DashboardState, inner: int, rows: int = ANSWER_LINES) -> Text:
    """The answer so far: its last `rows` lines at the panel's width (the whole text is printed at the end),
    control characters escaped."""
    if state.answer is None:
        return Text.assemble(("answer ", "bold"), "-" if state.tokenizer is None or not state.tokens else "")
    lines = []
    for line in visible(state.answer.shown).split("\n"):
        lines += chop_cells(line, inner) or [""]  # by terminal cells: a CJK character takes two
    return Text.assemble(("answer", "bold"), "\n", "\n".join(lines[-rows:]))


def _cache_line(state: DashboardState, step_label: str) -> Text:
    """The weight cache: its fill (held of budget, after the last finished step) and hit rates."""
    if not state.cache_budget:
        return Text.assemble(("weight cache ", "bold"), "none")
    fill = () if state.cache_held is None else (
        _bar(state.cache_held / state.cache_budget, 20),
        f" {_gb(state.cache_held)} of {_gb(state.cache_budget)} ({_pct(state.cache_held / state.cache_budget)})")
    budget = () if fill else (f"budget {_gb(state.cache_budget)}",)
    return Text.assemble(("weight cache ", "bold"), *fill, *budget,
                         _known(f"hit rate {step_label}", state.step_hit_rate(), _pct),
                         _known("run", state.run_hit_rate(), _pct))


def _preparing(state: DashboardState, inner: int) -> Text:
    """The screen before step 0: what is being prepared, with a bar when its size is known."""
    if state.preparing is None:
        return Text("starting", style="italic")
    what, done, total = state.preparing
    return Text.assemble((f"{what} ", "bold"), _bar(done / total if total else 0.0, min(40, inner - 40)),
                         f" {done}/{total}")
