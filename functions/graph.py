"""Microsoft Graph, with the service's own identity: group memberships (GraphGroups) and whether an
identity may still sign in (GraphDirectory, for the leaver sweep).

Group memberships, for users in too many groups for their token:

Past 200 groups Entra ID leaves `groups` out of the access token and puts `_claim_names` /
`_claim_sources` there instead ("groups overage"). Policy rules match groups, so the service then
asks Graph itself: `POST /v1.0/users/{oid}/getMemberObjects {"securityEnabledOnly": true}`, with its
own managed identity (application permission GroupMember.Read.All and User.ReadBasic.All). Answers are
cached per user for a few minutes. When Graph can't answer, the caller gets a 503, never a decision
made on missing groups.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .core.errors import BackendUnavailable

if TYPE_CHECKING:
    import requests

log = logging.getLogger("ezssh.graph")
CACHE_SECONDS = 600
MAX_PAGES = 20


class _Graph:
    """Microsoft Graph with the service's own identity: one HTTP session, a token per tenant."""

    def __init__(self, endpoint: str, credential: Any, *, verify: bool | str = True, timeout: float = 10.0) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._credential = credential
        self._verify = verify
        self._timeout = timeout
        self._session: requests.Session | None = None
        self.calls = 0  # Graph requests made (tests and metrics)

    def _http(self) -> requests.Session:
        if self._session is None:
            import requests

            s = requests.Session()
            s.trust_env = False
            s.verify = self._verify
            self._session = s
        return self._session

    def _token(self, tid: str) -> str:
        return self._credential.get_token(f"{self._endpoint}/.default", tenant_id=tid).token


class GraphGroups(_Graph):
    def __init__(
        self,
        endpoint: str,
        credential: Any,
        *,
        verify: bool | str = True,
        timeout: float = 10.0,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        super().__init__(endpoint, credential, verify=verify, timeout=timeout)
        self._ttl = cache_seconds
        self._cache: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def member_groups(self, tid: str, oid: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((tid, oid))
            if hit is not None and now - hit[0] < self._ttl:
                return hit[1]
        groups = self._fetch(tid, oid)
        with self._lock:
            self._cache[(tid, oid)] = (now, groups)
        return groups

    def _fetch(self, tid: str, oid: str) -> frozenset[str]:
        try:
            token = self._token(tid)
            url = f"{self._endpoint}/v1.0/users/{oid}/getMemberObjects"
            body: dict[str, bool] | None = {"securityEnabledOnly": True}
            out: set[str] = set()
            for _ in range(MAX_PAGES):
                self.calls += 1
                if body is not None:
                    r = self._http().post(
                        url, json=body, timeout=self._timeout, headers={"Authorization": f"Bearer {token}"}
                    )
                else:
                    r = self._http().get(url, timeout=self._timeout, headers={"Authorization": f"Bearer {token}"})
                if r.status_code != 200:
                    raise BackendUnavailable(
                        f"Your group memberships could not be read from Microsoft Graph (HTTP {r.status_code}); "
                        "the service's identity needs GroupMember.Read.All and User.ReadBasic.All."
                    )
                doc = r.json()
                out.update(v for v in doc.get("value", []) if isinstance(v, str))
                next_link = doc.get("@odata.nextLink")
                if not next_link:
                    break
                url, body = next_link, None
            return frozenset(out)
        except BackendUnavailable:
            raise
        except Exception as exc:  # transport, credential, JSON
            log.warning("graph lookup for %s failed: %s", oid, exc)
            raise BackendUnavailable("Your group memberships could not be read from Microsoft Graph.") from None


# What the leaver sweep learns of an identity holding a live certificate.
ACTIVE, DISABLED, DELETED = "active", "disabled", "deleted"
BATCH = 20  # Graph's JSON batching takes at most 20 requests per call
RISK_LEVELS = ("low", "medium", "high")


class GraphDirectory(_Graph):
    """Whether people and apps may still sign in: `accountEnabled` of users and service principals
    (an object found as neither was deleted), and Entra ID Protection's risky users. Application
    permissions: User.Read.All, Application.Read.All, and IdentityRiskyUser.Read.All for the risk
    check (Entra ID P2). Several ids go in one JSON batch call (20 each)."""

    def account_states(self, tid: str, oids: list[str]) -> dict[str, str]:
        """ACTIVE, DISABLED or DELETED for each object id. Raises BackendUnavailable when Graph can't
        say for any of them: nobody is revoked on a guess."""
        token = self._token_or_unavailable(tid)
        states: dict[str, str] = {}
        missing = self._enabled(token, "users", oids, states)
        for oid in self._enabled(token, "servicePrincipals", missing, states):
            states[oid] = DELETED
        return states

    def risky_users(self, tid: str, min_level: str) -> set[str]:
        """Object ids of users Entra ID Protection rates at `min_level` or above and still at risk."""
        token = self._token_or_unavailable(tid)
        levels = RISK_LEVELS[RISK_LEVELS.index(min_level) :]
        flt = " or ".join(f"riskLevel eq '{lv}'" for lv in levels)
        url: str | None = (
            f"{self._endpoint}/v1.0/identityProtection/riskyUsers?$select=id,riskLevel,riskState"
            f"&$filter=riskState eq 'atRisk' and ({flt})"
        )
        out: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = self._call("GET", url or "", token)
            out.update(
                u["id"].lower() for u in doc.get("value", []) if isinstance(u, dict) and isinstance(u.get("id"), str)
            )
            url = doc.get("@odata.nextLink")
            if not url:
                break
        return out

    def _token_or_unavailable(self, tid: str) -> str:
        try:
            return self._token(tid)
        except Exception as exc:  # any credential failure
            log.warning("graph token for %s failed: %s", tid, exc)
            raise BackendUnavailable("Microsoft Graph cannot be reached with the service's identity.") from None

    def _enabled(self, token: str, kind: str, oids: list[str], states: dict[str, str]) -> list[str]:
        """Fill `states` for the objects of `kind` found; return the ids not found."""
        missing: list[str] = []
        for i in range(0, len(oids), BATCH):
            chunk = oids[i : i + BATCH]
            doc = self._call(
                "POST",
                f"{self._endpoint}/v1.0/$batch",
                token,
                {
                    "requests": [
                        {"id": str(n), "method": "GET", "url": f"/{kind}/{oid}?$select=id,accountEnabled"}
                        for n, oid in enumerate(chunk)
                    ]
                },
            )
            answers = {str(r.get("id")): r for r in doc.get("responses", []) if isinstance(r, dict)}
            for n, oid in enumerate(chunk):
                r = answers.get(str(n)) or {}
                status, body = r.get("status"), r.get("body") or {}
                if status == 200 and isinstance(body, dict) and isinstance(body.get("accountEnabled"), bool):
                    states[oid] = ACTIVE if body["accountEnabled"] else DISABLED
                elif status == 404:
                    missing.append(oid)
                else:
                    raise BackendUnavailable(
                        f"Microsoft Graph could not say whether {kind} {oid} may sign in "
                        f"(HTTP {status}); the service's identity needs User.Read.All and "
                        "Application.Read.All."
                    )
        return missing

    def _call(self, method: str, url: str, token: str, body: dict | None = None) -> dict:
        self.calls += 1
        try:
            r = self._http().request(
                method, url, json=body, timeout=self._timeout, headers={"Authorization": f"Bearer {token}"}
            )
        except Exception as exc:  # transport
            log.warning("graph %s %s failed: %s", method, url, exc)
            raise BackendUnavailable("Microsoft Graph cannot be reached.") from None
        if r.status_code != 200:
            raise BackendUnavailable(f"Microsoft Graph answered HTTP {r.status_code} to {method} {url.split('?')[0]}.")
        try:
            doc = r.json()
        except ValueError:
            raise BackendUnavailable("Microsoft Graph answered something that is not JSON.") from None
        return doc if isinstance(doc, dict) else {}
