"""Bearer tokens: who may call what.

Two scopes, two tokens, read when the worker's server is built (never at import):
  CONVSERVE_API_TOKEN    inference, metadata, the model listing and the page's API
  CONVSERVE_ADMIN_TOKEN  model control (the repository API) only; it is not an inference token
Probes (/livez, /readyz, /v2/health/*) stay open. Without CONVSERVE_API_TOKEN inference is
open; without CONVSERVE_ADMIN_TOKEN model control is off (403, saying how to turn it on).

Tokens are compared in constant time (`hmac.compare_digest`) and never logged or echoed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum

from convserve.errors import ConvserveError, ErrorCode

BEARER = b"bearer "


class Scope(StrEnum):
    OPEN = "open"  # probes
    INFERENCE = "inference"
    ADMIN = "admin"  # model control


@dataclass(frozen=True, slots=True, repr=False)
class Tokens:
    inference: bytes | None = None
    admin: bytes | None = None

    def __repr__(self) -> str:  # whether each is set, never its value: a repr may reach a log
        def state(token: bytes | None) -> str:
            return "set" if token else "unset"

        return f"Tokens(inference={state(self.inference)}, admin={state(self.admin)})"

    @classmethod
    def of(cls, inference: str | None, admin: str | None) -> Tokens:
        return cls(inference.encode() if inference else None, admin.encode() if admin else None)

    def check(self, scope: Scope, authorization: bytes | None) -> None:
        """Nothing when a request of `scope` with this Authorization header may proceed;
        `ConvserveError` (401 or 403) when it may not."""
        if scope is Scope.OPEN:
            return
        if scope is Scope.ADMIN and self.admin is None:
            raise ConvserveError(
                ErrorCode.FORBIDDEN,
                "model control is off: start the server with CONVSERVE_ADMIN_TOKEN set to "
                "enable the repository API",
            )
        expected = self.admin if scope is Scope.ADMIN else self.inference
        if expected is None:
            return
        sent = _bearer(authorization)
        if sent is None:
            raise ConvserveError(
                ErrorCode.UNAUTHENTICATED, f"this route needs the {scope} token: send "
                "`Authorization: Bearer <token>`"
            )  # fmt: skip
        if not hmac.compare_digest(sent, expected):
            raise ConvserveError(ErrorCode.UNAUTHENTICATED, f"not the {scope} token")


def _bearer(authorization: bytes | None) -> bytes | None:
    if authorization is None or authorization[:7].lower() != BEARER:
        return None
    return authorization[7:].strip() or None
