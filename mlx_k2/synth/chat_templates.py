"""The chat templates the synthetic checkpoints ship, each in its family's own form (K25_FORMAT.md, "Chat
format"), so a synthetic checkpoint is rendered through the same path as a real one.

Kimi K2.5 (`chat_template.jinja`): role blocks `<|im_{role}|>{name}<|im_middle|>{content}<|im_end|>` with no
separators, a default system block where the conversation has none, earlier assistant turns with an empty
`<think></think>`, and the generation prompt `<|im_assistant|>assistant<|im_middle|>`.
DeepSeek-V3 (tokenizer_config.json's `chat_template`): BOS, the system text, then `<｜User｜>` and
`<｜Assistant｜>` markers, each assistant turn closed by EOS, and `<｜Assistant｜>` as the generation prompt.
"""

KIMI_DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."

KIMI_K25 = """\
{%- if not messages or messages[0]['role'] != 'system' -%}
<|im_system|>system<|im_middle|>""" + KIMI_DEFAULT_SYSTEM + """<|im_end|>
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
<|im_system|>system<|im_middle|>{{ message['content'] }}<|im_end|>
{%- elif message['role'] == 'user' -%}
<|im_user|>user<|im_middle|>{{ message['content'] }}<|im_end|>
{%- else -%}
<|im_assistant|>assistant<|im_middle|>
{%- if '<think>' not in message['content'] %}<think></think>{% endif -%}
{{ message['content'] }}<|im_end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""

DEEPSEEK_V3 = """\
{{ bos_token }}
{%- for message in messages if message['role'] == 'system' -%}{{ message['content'] }}{%- endfor -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
<｜User｜>{{ message['content'] }}
{%- elif message['role'] == 'assistant' -%}
<｜Assistant｜>{{ message['content'] }}{{ eos_token }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<｜Assistant｜>{%- endif -%}
"""
