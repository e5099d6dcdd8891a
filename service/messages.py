"""What an operation takes and gives, whoever received the request and whatever protocol it
speaks: the request's parts (`Request`) and the answer (`Answer`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = b"application/json"


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request as operations need it, whoever received it."""

    query_string: bytes
    content_type: str | None
    body: bytes
    header_length: str | None = None  # Inference-Header-Content-Length (OIP binary data)
    path_params: Mapping[str, str] = field(default_factory=dict[str, str])


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes
    media_type: bytes = JSON
    headers: Mapping[str, str] = field(default_factory=dict[str, str])
    status: int = 200


def json_answer(value: Any, status: int = 200) -> Answer:
    return Answer(json.dumps(value).encode(), status=status)
