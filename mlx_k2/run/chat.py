"""A conversation with the model in one process: each turn appends the person's message, rendered with the
checkpoint's chat template, to the context and generates the reply over the KV cache kept from the turns
before, so a turn computes only its new positions (the message and the previous reply's last token).

The context is append-only: a new turn's ids are the text the template adds after the conversation so far
(the template rendered with and without the new message; what a reply was cut short of, its end-of-turn
token, first). The whole session is one ledger (or bundle), a KV-cache run whose header has `run.chat` (the
reply limit and the ids that end a reply) and whose first step of each later turn records `appended_ids`;
verify checks and replays it like any KV run. A reply ends at an end-of-turn id, at the reply limit, or when
the person stops it (a KeyboardInterrupt during `turn`): the session goes on from the last finished step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..checkpoint.chat_template import load_chat_template
from ..checkpoint.tokenizer import load_tokenizer
from ..errors import K2Error, UsageError
from ..evidence.events import Event, Progress, RunDone, StepDone
from ..evidence.derived import line_digest
from ..evidence.files import write_atomically
from ..evidence.kept_kv import CONVERSATION_FILE, kept_state
from ..evidence.ledger import LedgerWriter, read_ledger
from ..evidence.records import header_record, model_record
from ..evidence.schema import LEDGER_NAME
from .runner import KVCache, Model
from .session import check_space, keep_kv, new_ledger_path, run_started, versions
from .sinks import BundleSink, LedgerSink
from .spec import RunSpec
from .. import jsonio

END_OF_TURN = ("<|im_end|>",)  # K2.5's reply end (K25_FORMAT.md section 4), beside the checkpoint's EOS


@dataclass
class Reply:
    """One turn's outcome: the reply's ids and text, how it ended, the steps it took."""
    ids: list[int] = field(default_factory=list)
    text: str = ""
    ended: str = "limit"                        # "stop" (an end-of-turn id), "limit" or "stopped" (Ctrl-C)
    steps: list[StepDone] = field(default_factory=list)


@dataclass(frozen=True)
class Continuation:
    """An ended chat session's ledger, to go on with (`ChatSession.resume`): its path, bundle, header, step
    records and lines without the footer, the footer's kept KV cache record, and the conversation."""
    path: Path
    bundle_dir: Path | None
    header: dict
    steps: list[dict]
    lines: list[str]
    kept_kv: dict | None
    messages: list[dict]
    cache_restarts: tuple[int, ...]


class ChatSession:
    def __init__(self, model_dir: str | Path, spec: RunSpec, max_reply_tokens: int,
                 ledger_path: str | Path | None = None, bundle_dir: str | Path | None = None,
                 overwrite: bool = False, system: str | None = None, progress: Progress | None = None,
                 continuing: Continuation | None = None):
        """Opens the checkpoint (its tokenizer and chat template are required) and claims the ledger path; the
        ledger's header is written with the first turn (it records the first turn's ids as the prompt).
        `continuing`: an ended session's ledger to append to instead, its KV cache taken from the kept file
        (or recomputed from its steps)."""
        if not spec.kv_cache:
            raise UsageError("a chat session keeps its KV cache between turns: give a spec with kv_cache")
        if max_reply_tokens < 1:
            raise UsageError(f"-n must be at least 1, got {max_reply_tokens}")
        self.dir, self.max_reply_tokens = Path(model_dir), max_reply_tokens
        self.tokenizer, self.template = load_tokenizer(self.dir), load_chat_template(self.dir)
        if self.tokenizer is None or self.template is None:
            raise UsageError(f"{self.dir}: chat needs the checkpoint's tokenizer and chat template "
                             f"({'no tokenizer' if self.tokenizer is None else 'no chat template'})")
        if continuing is None:
            self.ledger_path = new_ledger_path(ledger_path, bundle_dir, overwrite)
            self.bundle_dir = Path(bundle_dir) if bundle_dir is not None else None
        else:
            self.ledger_path, self.bundle_dir = continuing.path, continuing.bundle_dir
        self.model = Model(self.dir, spec, progress=progress)
        self.stop_ids = end_of_turn_ids(self.tokenizer, self.model.config.text.eos_token_id,
                                        self.template.special_tokens.get("eos_token"))
        self.reply_end = self._reply_end()
        self.messages = [{"role": "system", "content": system}] if system is not None else []
        self.context: list[int] = []
        self.kv = KVCache(self.model.config.text.num_hidden_layers)
        self.evidence: list[Callable[[Event], None]] = []  # the ledger (and bundle) sinks, from the first turn
        self.steps = 0
        self.cache_restarts: tuple[int, ...] = ()  # steps this session's ledger began with an empty weight cache
        if continuing is not None:
            self._continue(continuing, progress)

    # ------------------------------------------------------------------------------------------------ turns
    def turn(self, text: str, sinks: tuple[Callable[[Event], None], ...] = ()) -> Reply:
        """Add the person's message and generate the reply; every event goes to the ledger and to `sinks` (a
        RunStarted and a RunDone frame each turn for them). Ctrl-C stops the reply, not the session."""
        appended = self._appended_ids(text)
        self.model.check_prompt(self.context + appended + [0] * (self.max_reply_tokens - 1))
        if not self.evidence:
            self._start_ledger(appended)
        self.messages.append({"role": "user", "content": text})
        self.context += appended
        reply = Reply()
        for sink in sinks:
            sink(run_started(self.model, self.context, self.steps, self.steps + self.max_reply_tokens))
        mx.set_default_device(self.model.spec.mx_device)
        try:
            for event in self._reply_steps(reply):
                for sink in (*self.evidence, *sinks):
                    sink(event)
        except KeyboardInterrupt:
            reply.ended = "stopped"
        shown = reply.ids[:-1] if reply.ended == "stop" else reply.ids
        reply.text = self.tokenizer.decode(shown)
        self.messages.append({"role": "assistant", "content": reply.text})
        write_atomically(conversation_file(self.ledger_path), (json.dumps(self.messages, ensure_ascii=False)
                                                               + "\n").encode())
        done = RunDone(steps=len(reply.steps), bytes_read=sum(s.bytes_read for s in reply.steps),
                       wall_s=sum(s.wall_s for s in reply.steps), status="complete" if reply.ended != "stopped"
                       else "stopped", error=None if reply.ended != "stopped" else "reply stopped")
        for sink in sinks:
            sink(done)
        return reply

    def _reply_steps(self, reply: Reply) -> Iterator[Event]:
        """Steps until an end-of-turn id or the reply limit. A step counts (the context takes its token) as its
        StepDone is made, before anyone sees it: its KV state is committed by then, and the ledger writes it
        first, so a stop while the event is handed round leaves context, KV cache and ledger in agreement."""
        for _ in range(self.max_reply_tokens):
            for event in self.model.step(self.steps, self.context, self.kv):
                if isinstance(event, StepDone):
                    self.steps += 1
                    self.context = self.context + [event.token_id]
                    reply.ids.append(event.token_id)
                    reply.steps.append(event)
                yield event
            if event.token_id in self.stop_ids:
                reply.ended = "stop"
                return

    def _appended_ids(self, text: str) -> list[int]:
        """The ids a new user message adds: the whole rendered conversation for the first turn; later, what the
        template renders after the conversation so far, after the end-of-turn id a cut-short reply lacks."""
        message = {"role": "user", "content": text}
        rendered = self.template.render(self.messages + [message], add_generation_prompt=True)
        if not self.context:
            return self.tokenizer.encode(rendered)
        before = self.template.render(self.messages, add_generation_prompt=False)
        if not rendered.startswith(before):
            raise K2Error(f"{self.template.source}: the chat template renders the conversation so far differently "
                          "once a message is added; its turns cannot be appended to the KV cache")
        closing = [] if self.context[-1] in self.stop_ids else [self.reply_end]
        return closing + self.tokenizer.encode(rendered[len(before):])

    def _reply_end(self) -> int:
        """The id the template closes an assistant turn with (K2.5: <|im_end|>; DeepSeek-V3: EOS), for a reply
        cut short; the lowest end-of-turn id where the template's is not one."""
        marker = "\x00reply\x00"
        text = self.template.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                    add_generation_prompt=False)
        after = text.split(marker, 1)[1] if marker in text else ""
        ids = self.tokenizer.encode(after)[:1] if after else []
        return ids[0] if ids and ids[0] in self.stop_ids else min(self.stop_ids)

    def _continue(self, done: Continuation, progress: Progress | None) -> None:
        """Take up an ended session: its conversation, context and step count, its KV cache (kept, or
        recomputed step by step from the recorded contexts, each giving its recorded token), and its ledger
        reopened after the last step."""
        self.messages, self.steps = list(done.messages), len(done.steps)
        last = done.steps[-1]
        self.context = list(last["input_ids"]) + [last["token_id"]]
        kept = kept_state(done.path, done.kept_kv, len(last["input_ids"]), self.model.config.text.num_hidden_layers)
        if kept is not None:
            self.kv = KVCache.from_numpy(kept)
        else:
            mx.set_default_device(self.model.spec.mx_device)
            for k, record in enumerate(done.steps):
                for event in self.model.step(k, record["input_ids"], self.kv):
                    pass
                if event.token_id != record["token_id"]:
                    raise K2Error(f"{done.path}: recomputing the KV cache, step {k} gave token {event.token_id}, "
                                  f"the ledger has {record['token_id']}")
                if progress is not None:
                    progress("recomputing the KV cache", k + 1, len(done.steps))
        self.kept_from = "kept" if kept is not None else "recomputed"
        # from a kept KV cache the weight cache starts empty here (recomputing the steps refilled it)
        self.cache_restarts = done.cache_restarts + ((self.steps,) if kept is not None and
                                                     self.model.spec.cache_bytes else ())
        size = sum(len(line) + 1 for line in done.lines)
        writer = LedgerWriter(done.path, resume_at=(size, line_digest(done.lines[-1])))
        bundle = BundleSink(done.bundle_dir) if done.bundle_dir is not None else None
        self.evidence = [LedgerSink(writer, self.tokenizer, done.steps, turns=True), *([bundle] if bundle else [])]

    @classmethod
    def resume(cls, path: str | Path, model_dir: str | Path | None = None, device: str | None = None,
               progress: Progress | None = None) -> ChatSession:
        """Go on with the chat session recorded at `path` (a ledger or bundle) as its header says it computed;
        the conversation comes from its `.chat.json` beside the ledger."""
        done = recorded_chat(Path(path))
        try:
            spec = RunSpec.from_header(done.header["run"], device)
        except UsageError as e:
            raise UsageError(f"{done.path}: {e}") from None
        chat = done.header["run"]["chat"]
        return cls(model_dir if model_dir is not None else done.header["model"]["path"], spec,
                   chat["max_reply_tokens"], progress=progress, continuing=done)

    def _start_ledger(self, prompt_ids: list[int]) -> None:
        model, spec = self.model, self.model.spec
        try:
            self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
            bundle = BundleSink(self.bundle_dir) if self.bundle_dir is not None else None
            check_space(self.ledger_path.parent, model, self.max_reply_tokens, bundle is not None)
            writer = LedgerWriter(self.ledger_path)
        except OSError as e:
            raise UsageError(f"{self.ledger_path}: cannot write the ledger ({e.strerror})") from None
        chat = {"max_reply_tokens": self.max_reply_tokens, "stop_ids": sorted(self.stop_ids)}
        run = spec.header_run(prompt_ids, self.max_reply_tokens, versions(), model.platform, chat=chat)
        writer.write(header_record(model_record(self.dir, model.identity(), model.config), run))
        self.evidence = [LedgerSink(writer, self.tokenizer, turns=True), *([bundle] if bundle else [])]

    # ------------------------------------------------------------------------------------------------ end
    def close(self, status: str = "complete", error: str | None = None) -> None:
        """End the session: the ledger's footer (where a turn was taken), then the checkpoint is closed."""
        try:
            kept = keep_kv(self.kv, self.ledger_path) if self.evidence else None
            end = RunDone(steps=self.steps, bytes_read=0, wall_s=0.0, status=status, error=error, kept_kv=kept,
                          cache_restarts=self.cache_restarts)
            for sink in self.evidence:
                sink(end)
        finally:
            self.model.close()


def conversation_file(ledger_path: Path) -> Path:
    """The conversation's messages beside a chat ledger (`NAME.chat.json`; in a bundle `chat.json`), written
    after every turn: what `chat --resume` renders the next turns with. Not evidence: the ledger's ids are."""
    ledger_path = Path(ledger_path)
    if ledger_path.name == LEDGER_NAME:
        return ledger_path.parent / CONVERSATION_FILE
    return ledger_path.with_name(ledger_path.stem + ".chat.json")


def recorded_chat(path: Path) -> Continuation:
    """The chat session recorded at `path`, checked to be one that can go on, or a one-line UsageError."""
    from ..evidence.verify import verify

    ledger = read_ledger(path)
    for c in verify(path).checks:
        if c.name in ("parse", "schema", "chain", "manifest", "context", "layers") and c.ok is False:
            raise UsageError(f"{ledger.ledger_path}: cannot resume: check {c.name} fails ({c.detail})")
    if "chat" not in ledger.header.get("run", {}):
        raise UsageError(f"{ledger.ledger_path}: not a chat session's ledger (run --resume continues a run)")
    if not ledger.steps:
        raise UsageError(f"{ledger.ledger_path}: no turn recorded; start a new chat")
    messages_path = conversation_file(ledger.ledger_path)
    try:
        messages = jsonio.loads(messages_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{messages_path}: the conversation to go on with cannot be read ({e})") from None
    lines = ledger.raw_lines[:-1] if ledger.footer is not None else ledger.raw_lines
    kept = ledger.footer.get("kv_cache") if ledger.footer is not None else None
    restarts = tuple(ledger.footer.get("weight_cache_restarts", [])) if ledger.footer is not None else ()
    return Continuation(ledger.ledger_path, ledger.ledger_path.parent if ledger.bundle else None, ledger.header,
                        ledger.steps, lines, kept if isinstance(kept, dict) else None, messages, restarts)


def end_of_turn_ids(tokenizer, eos_token_id: int | None, eos_token: str | None) -> set[int]:
    """The ids that end a reply: the checkpoint's EOS, and each of its tokenizer's EOS text and K2.5's
    `<|im_end|>` where the tokenizer has it as one token."""
    ids = {eos_token_id} if eos_token_id is not None else set()
    for text in filter(None, (eos_token, *END_OF_TURN)):
        encoded = tokenizer.encode(text)
        if len(encoded) == 1:
            ids.add(encoded[0])
    if not ids:
        raise UsageError("the checkpoint has no EOS id to end a reply with")
    return ids
