"""Group memberships from Microsoft Graph, for users in too many groups for their token.

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
from typing import Any

from .core.errors import BackendUnavailable

log = logging.getLogger("ezssh.graph")
CACHE_SECONDS = 600
MAX_PAGES = 20


class GraphGroups:
    def __init__(self, endpoint: str, credential: Any, *, verify: bool | str = True, timeout: float = 10.0,
                 cache_seconds: float = CACHE_SECONDS) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._credential = credential
        self._verify = verify
        self._timeout = timeout
        self._ttl = cache_seconds
        self._cache: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()
        self._session = None
        self.calls = 0  # Graph requests made (tests and metrics)

    def _http(self):  # type: ignore[no-untyped-def]
        if self._session is None:
            import requests

            s = requests.Session()
            s.trust_env = False
            s.verify = self._verify
            self._session = s
        return self._session

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
            token = self._credential.get_token(f"{self._endpoint}/.default", tenant_id=tid).token
            url: str | None = f"{self._endpoint}/v1.0/users/{oid}/getMemberObjects"
            body: dict | None = {"securityEnabledOnly": True}
            out: set[str] = set()
            for _ in range(MAX_PAGES):
                self.calls += 1
                if body is not None:
                    r = self._http().post(url, json=body, timeout=self._timeout,
                                          headers={"Authorization": f"Bearer {token}"})
                else:
                    r = self._http().get(url, timeout=self._timeout, headers={"Authorization": f"Bearer {token}"})
                if r.status_code != 200:
                    raise BackendUnavailable(
                        f"Your group memberships could not be read from Microsoft Graph (HTTP {r.status_code}); "
                        "the service's identity needs GroupMember.Read.All and User.ReadBasic.All.")
                doc = r.json()
                out.update(v for v in doc.get("value", []) if isinstance(v, str))
                url, body = doc.get("@odata.nextLink"), None
                if not url:
                    break
            return frozenset(out)
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - transport, credential, JSON
            log.warning("graph lookup for %s failed: %s", oid, exc)
            raise BackendUnavailable("Your group memberships could not be read from Microsoft Graph.") from None
