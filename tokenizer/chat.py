"""Chat templates: the model's own Jinja template, rendered in a sandbox."""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from dair.errors import DairError

# llama.cpp falls back to ChatML when a model has no template; so do we.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


# llama.cpp's Gemma format (llama-chat.cpp, LLM_CHAT_TEMPLATE_GEMMA): "assistant" is "model", a
# system message is merged into the next user turn, contents are trimmed.
GEMMA = ("{% set sys = namespace(p='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{% set sys.p = sys.p + (m['content'] | trim) %}{% else %}"
         "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' }}{% if sys.p and role != 'model' %}{{ sys.p + '\n\n' }}"
         "{% set sys.p = '' %}{% endif %}{{ (m['content'] | trim) + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

# The template of a family whose file carries none (general.architecture -> template); the
# others get ChatML at render time, as in llama.cpp.
BUILTIN = {"gemma3": GEMMA}


def builtin_template(arch: str | None) -> str | None:
    return BUILTIN.get(arch or "")


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment settings as HF transformers, which the templates are written for.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(template: str | None, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                bos_token: str, eos_token: str, source: str = "", **extra: Any) -> str:
    from jinja2 import TemplateError

    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DairError(f"chat message {m!r} needs 'role' and 'content'")
    try:
        tpl = _compile(template or CHATML)
        return tpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                          bos_token=bos_token, eos_token=eos_token, **extra)
    except _TemplateRaised as e:
        raise DairError(f"chat template of {source or 'the model'}: {e}") from None
    except TemplateError as e:
        raise DairError(f"chat template of {source or 'the model'} failed: {e}") from None
