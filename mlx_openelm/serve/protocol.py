"""The OpenAI API's requests as pydantic models, their checks, and OpenAI error bodies.

The ranges are OpenAI's (temperature 0-2, top_p 0-1, top_logprobs 0-20, at most 4 stop strings
there; 16 here); the extensions (top_k, min_p, repetition_penalty, ignore_eos) are llama.cpp's and
vLLM's names. Unknown fields are ignored, as vLLM does, so apps that send more still work.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from ..errors import MAX_SEED

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_N = 64  # the server also caps n at --max-batch
Prob = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class APIError(Exception):
    """An error the client gets as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_validation(e: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    err = e.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    message = err["msg"]
    if err["type"] == "missing":
        message = f"'{param}' is a required property"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return APIError(400, message, param=param, code="invalid_value")


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False, frozen=True)


class StreamOptions(Strict):
    include_usage: StrictBool = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Sampling(Strict):
    """The options both endpoints share."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # OpenAI's API takes null for any optional field and means its default; clients send it.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: str
    max_tokens: Annotated[int, Field(strict=True)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Prob = 1.0
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024)]
        | None
    ) = None  # noqa: E501
    user: str | None = None
    response_format: ResponseFormat | None = None
    # llama.cpp's and vLLM's extensions
    top_k: Annotated[int, Field(strict=True, ge=-1)] = 0
    min_p: Prob = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 1.0
    ignore_eos: StrictBool = False

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(
                400, f"stop strings are at most {MAX_STOP_CHARS} characters", param="stop"
            )
        return stop


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(strict=True)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(strict=True, ge=0, le=5)] | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(strict=True, ge=1)] | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)
