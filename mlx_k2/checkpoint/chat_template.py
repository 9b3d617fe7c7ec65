"""The checkpoint's own chat template: a conversation rendered to the text the model was trained on.

K2.5 is a chat model; its checkpoint ships a Jinja template (K25_FORMAT.md, "Chat format"), and so does every
DeepSeek-V3 checkpoint, each in its own form. The template is read from where Hugging Face keeps it:
`chat_template.jinja` beside the weights (how transformers saves one now), else tokenizer_config.json's
`chat_template` (a string, or a list of named templates whose "default" is the chat one). It is rendered the
way transformers renders it: jinja2's immutable sandbox with trim_blocks and lstrip_blocks, `raise_exception`
and `tojson`, the messages, `add_generation_prompt`, and the special tokens tokenizer_config.json names
(`bos_token`, `eos_token`, ...). The rendered text holds the special tokens as text; the tokenizer encodes
them to their ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..errors import CheckpointError, UsageError
from .. import jsonio

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    source: Path           # the file the template was read from
    text: str              # the Jinja source
    special_tokens: dict   # bos_token, eos_token, ... as text, from tokenizer_config.json

    @property
    def blake3(self) -> str:
        return blake3.blake3(self.text.encode()).hexdigest()

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's text. `messages`: {"role": system|user|assistant, "content": str}."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UsageError(f"a chat message needs a role ({', '.join(ROLES)}) and text content, got {m!r}")

        def raise_exception(message):
            raise UsageError(f"{self.source}: the chat template refuses this conversation: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"])
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        try:
            template = environment.from_string(self.text)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
        except UsageError:
            raise
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{self.source}: the chat template does not render ({type(e).__name__}: "
                                  f"{e})") from None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None where it ships none."""
    model_dir = Path(model_dir)
    config_path = model_dir / TOKENIZER_CONFIG
    config = _read_json(config_path) if config_path.is_file() else {}
    specials = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    template_path = model_dir / TEMPLATE_FILE
    if template_path.is_file():
        try:
            return ChatTemplate(template_path, template_path.read_text(encoding="utf-8"), specials)
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{template_path}: cannot read the chat template ({e})") from None
    text = config.get("chat_template")
    if isinstance(text, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    if text is None:
        return None
    if not isinstance(text, str):
        raise CheckpointError(f"{config_path}: chat_template is {type(text).__name__}, expected a string or a "
                              "list of named templates")
    return ChatTemplate(config_path, text, specials)


def _read_json(path: Path) -> dict:
    try:
        value = jsonio.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _token_text(value) -> str:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken dict with its content."""
    return value.get("content", "") if isinstance(value, dict) else str(value)
