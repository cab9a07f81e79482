"""Exit codes and the one exception type commands raise to end with one of them. Stdlib only."""

from __future__ import annotations

OK = 0
ERROR = 1
USAGE = 2
NOT_SIGNED_IN = 3  # also: not configured
DENIED = 4  # denied by policy (HTTP 403)
REQUEST_ENDED = 5  # access request denied, cancelled or expired
UNAVAILABLE = 6  # service or identity provider unavailable (5xx, 503, connection)
CHANGED = 7  # lost a race: the policy changed since it was read (HTTP 412/409); nothing was changed
INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  error
  2  usage error
  3  not configured or not signed in (run `ezssh configure` / `ezssh login`)
  4  denied by policy (HTTP 403)
  5  access request denied, cancelled or expired
  6  service or identity provider unavailable (5xx, connection refused, timeout)
  7  the policy changed since it was read (someone else edited it); nothing changed: retry
  `ezssh ssh` exits with ssh's own exit code once ssh has run; 130 when interrupted."""


class EzsshError(Exception):
    """A failure to report on stderr (one clear sentence) with a documented exit code."""

    def __init__(
        self,
        message: str,
        code: int = ERROR,
        *,
        request_id: str | None = None,
        error: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id
        self.error = error
        self.hint = hint

    def render(self) -> str:
        text = self.message
        extra = []
        if self.error:
            extra.append(f"error: {self.error}")
        if self.request_id:
            extra.append(f"request id: {self.request_id}")
        if extra:
            text += f" ({', '.join(extra)})"
        if self.hint:
            text += f"\n{self.hint}"
        return text


def not_configured() -> EzsshError:
    return EzsshError(
        "ezssh is not configured.",
        NOT_SIGNED_IN,
        hint="Run `ezssh configure --server https://<your ezssh service>` first.",
    )


def not_signed_in(why: str = "You are not signed in.") -> EzsshError:
    return EzsshError(why, NOT_SIGNED_IN, hint="Run `ezssh login`.")
