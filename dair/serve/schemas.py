"""Request bodies of the HTTP API, validated by pydantic before a handler sees them.

Every field a client may send is declared: the ones dair honours with their types and ranges,
the ones it cannot honour as `Any` so that `refuse_unsupported` can answer 400 naming them when
they ask for something (n > 1, tools, ...). Anything else is refused by `extra="forbid"`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dair.serve.errors import APIError, unsupported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1)
    user: str | None = None  # an end-user id for the caller's own logs: accepted, nothing to do
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise unsupported("stop", "at most 4 stop sequences")
        return [s for s in stops if s]

    def _refuse_common(self) -> None:
        if self.n not in (None, 1):
            raise unsupported("n", "dair returns one choice per request (n must be 1)")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise unsupported(name)
        if self.logit_bias:
            raise unsupported("logit_bias")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: Any = None

    def refuse_unsupported(self) -> None:
        self._refuse_common()
        for name in ("tools", "functions", "function_call", "audio", "prediction", "reasoning_effort"):
            if getattr(self, name):
                raise unsupported(name)
        if self.tool_choice not in (None, "none"):
            raise unsupported("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            raise unsupported("response_format", "only {\"type\": \"text\"}")
        if self.modalities not in (None, ["text"]):
            raise unsupported("modalities", "only [\"text\"]")
        if self.store:
            raise unsupported("store")
        if self.service_tier not in (None, "auto", "default"):
            raise unsupported("service_tier")
        if self.top_logprobs and not self.logprobs:
            raise unsupported("top_logprobs", "needs logprobs: true")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        self._refuse_common()
        if self.echo:
            raise unsupported("echo")
        if self.best_of not in (None, 1):
            raise unsupported("best_of")
        if self.suffix:
            raise unsupported("suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise unsupported("prompt", "one prompt per request (a list of one string, or of token ids)")


# --- Ollama -----------------------------------------------------------------------------------
class OllamaOptions(_Strict):
    temperature: float | None = Field(default=None, ge=0.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    repeat_last_n: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    num_predict: int | None = None
    stop: list[str] | None = None
    # Server-side settings in Ollama that front-ends send with every request; dair's context is
    # the bus's max_context and its threads are the stages', so these are accepted and unused.
    num_ctx: int | None = None
    num_thread: int | None = None
    num_gpu: int | None = None


class OllamaMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    images: Any = None


class OllamaBase(_Strict):
    model: str
    stream: bool = True
    options: OllamaOptions | None = None
    format: Any = None
    keep_alive: Any = None  # models stay loaded on the stages: accepted, nothing to do

    def refuse_common(self) -> None:
        if self.format:
            raise unsupported("format")


class OllamaGenerateRequest(OllamaBase):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    template: str | None = None
    context: Any = None
    images: Any = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        self.refuse_common()
        for name in ("template", "context", "images", "suffix"):
            if getattr(self, name):
                raise unsupported(name)


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(min_length=1)
    tools: Any = None

    def refuse_unsupported(self) -> None:
        self.refuse_common()
        if self.tools:
            raise unsupported("tools")
        if any(m.images for m in self.messages):
            raise unsupported("images")


class OllamaShowRequest(_Strict):
    model: str | None = None
    name: str | None = None  # what older Ollama clients send instead of model
    verbose: bool = False
    system: Any = None  # Ollama's own CLI may send these; they do not change the answer
    template: Any = None
    options: Any = None

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise APIError(400, "model is required", param="model")
        return name
