"""Bearer token -> Identity.

Checks, in order, before any key is fetched: the token's shape, a pinned algorithm (RS256), a tenant
on the allow-list. Then the signature against the issuer's JWKS (cached; refreshed when an unknown
kid appears, at most once per REFRESH_FLOOR seconds so forged kids can't make us hammer the issuer),
issuer, audience, expiry and not-before with a small leeway, and either a delegated user token (oid,
tid, and the API scope in scp) or an app-only token of a workload (Entra's optional claim `idtyp` is
"app", no scp, the app role EZSSH.Workload in `roles`; enable `idtyp` on the API's app registration).

A token that verified is remembered until its own `exp` (ValidatedTokens: keyed by the token's
SHA-256, bounded in size), so a client that sends the same token on every call is checked once per
worker, not once per call. The cache never extends a token's life: an entry dies at `exp` itself,
without the leeway the first check allows. What it does not notice, within that life, is a signing
key the identity provider has withdrawn from its JWKS meanwhile; the JWKS cache has the same blind
spot for a day (PyJWKClient keeps keys 24 h), and Entra ID access tokens live about an hour. Tokens
whose groups come from Microsoft Graph (groups overage) are not cached: their groups follow the
Graph cache's own lifetime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt

from .core.errors import BackendUnavailable, Forbidden, Unauthenticated
from .core.policy import WORKLOAD_ROLE, Identity, upn_domain
from .settings import Settings

log = logging.getLogger(__name__)
ALGORITHMS = ["RS256"]
LEEWAY = 60
REFRESH_FLOOR = 30.0


class _IssuerKeys:
    """JWKS of one issuer, found through its discovery document."""

    def __init__(self, issuer: str, ssl_context: ssl.SSLContext) -> None:
        self.issuer = issuer
        self._ctx = ssl_context
        self._lock = threading.Lock()
        self._client: jwt.PyJWKClient | None = None
        self._last_fetch = 0.0

    def _discover(self) -> jwt.PyJWKClient:
        url = self.issuer + "/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=5, context=self._ctx) as resp:  # https only
                doc = json.load(resp)
        except Exception as exc:
            raise BackendUnavailable("The identity provider cannot be reached to check your token.") from exc
        if doc.get("issuer") != self.issuer:
            raise BackendUnavailable("The identity provider's discovery document names another issuer.")
        return jwt.PyJWKClient(doc["jwks_uri"], cache_keys=True, lifespan=24 * 3600, ssl_context=self._ctx, timeout=5)

    def _jwks_client(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._client is None:
                self._client = self._discover()
            return self._client

    def warm(self) -> None:
        self._jwks_client().get_signing_keys()

    def key_for(self, kid: str) -> Any:
        client = self._jwks_client()
        try:
            keys = {k.key_id: k for k in client.get_signing_keys()}
        except jwt.PyJWKClientConnectionError as exc:
            raise BackendUnavailable("The identity provider's keys cannot be fetched.") from exc
        except jwt.PyJWKClientError as exc:
            raise Unauthenticated("The identity provider's key set is not usable.") from exc
        if kid not in keys:
            with self._lock:
                now = time.monotonic()
                if now - self._last_fetch < REFRESH_FLOOR:
                    raise Unauthenticated("The token is signed with an unknown key.")
                self._last_fetch = now
            try:
                keys = {k.key_id: k for k in client.get_signing_keys(refresh=True)}
            except jwt.PyJWKClientConnectionError as exc:
                raise BackendUnavailable("The identity provider's keys cannot be fetched.") from exc
            if kid not in keys:
                raise Unauthenticated("The token is signed with an unknown key.")
        return keys[kid].key


class ValidatedTokens:
    """Identities of tokens that verified, each until its token's `exp`; at most `size` of them (the
    least recently used go first). Keyed by the SHA-256 of the token, so no token is kept in memory."""

    def __init__(self, size: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str) -> Identity | None:
        key = self._key(token)
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if self._clock() >= hit[0]:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return hit[1]

    def put(self, token: str, exp: float, identity: Identity) -> None:
        if self._size <= 0 or self._clock() >= exp:
            return
        key = self._key(token)
        with self._lock:
            self._entries[key] = (exp, identity)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _cacheable_exp(token: str) -> float | None:
    """The `exp` of a token that just verified, unless its groups came from Graph (overage)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    names = claims.get("_claim_names")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or (isinstance(names, dict) and "groups" in names):
        return None
    return float(exp)


class TokenValidator:
    def __init__(self, settings: Settings, groups: Any = None) -> None:
        """`groups` (a functions.graph.GraphGroups) resolves groups overage; without it such tokens
        are refused with 503 rather than judged without their groups."""
        self._s = settings
        self._groups = groups
        self._ctx = (
            ssl.create_default_context(cafile=settings.oidc_ca_bundle)
            if settings.oidc_ca_bundle
            else ssl.create_default_context()
        )
        self._issuers: dict[str, _IssuerKeys] = {}
        self._lock = threading.Lock()
        self.tokens = ValidatedTokens()

    def _keys(self, issuer: str) -> _IssuerKeys:
        with self._lock:
            k = self._issuers.get(issuer)
            if k is None:
                k = self._issuers[issuer] = _IssuerKeys(issuer, self._ctx)
            return k

    def warm(self) -> None:
        """Fetch discovery and keys for every allowed tenant (best effort, at start)."""
        for tid in self._s.tenants:
            try:
                self._keys(self._s.issuer_for(tid)).warm()
            except Exception:  # warming is an optimisation only
                pass

    def check_issuer(self, tid: str) -> None:
        """The tenant's issuer signing keys are loadable (the JWKS client's cache, else discovery and
        the JWKS fetched now); BackendUnavailable or the JWKS client's error if not (health)."""
        self._keys(self._s.issuer_for(tid)).warm()

    def cached(self, authorization: str | None) -> Identity | None:
        """The Identity of a bearer token that verified before and has not expired; None otherwise
        (no I/O, no refusal: call validate for the answer)."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return self.tokens.get(token)
        return None

    def validate(self, authorization: str | None) -> Identity:
        """The caller's Identity; from the cache of verified tokens when this token verified before."""
        hit = self.cached(authorization)
        if hit is not None:
            return hit
        token = (authorization or "").partition(" ")[2].strip()
        identity = self._verify(authorization)
        exp = _cacheable_exp(token)
        if exp is not None:
            self.tokens.put(token, exp, identity)
        return identity

    def _verify(self, authorization: str | None) -> Identity:
        if not authorization:
            raise Unauthenticated("Sign in first: no bearer token was sent.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("The Authorization header must be 'Bearer <token>'.")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("The bearer token is not a valid JWT.") from None
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated("The token's signing algorithm is not accepted.")
        tid = unverified.get("tid")
        if not isinstance(tid, str) or tid not in self._s.tenants:
            raise Unauthenticated("Tokens from this tenant are not accepted here.")
        issuer = self._s.issuer_for(tid)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("The token names no signing key.")
        key = self._keys(issuer).key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self._s.audiences,
                issuer=issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("The token has expired; sign in again.") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("The token is not meant for this API.") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("The token's issuer does not match its tenant.") from None
        except jwt.PyJWTError:
            raise Unauthenticated("The token's signature or claims do not verify.") from None
        oid = claims.get("oid")
        scopes = str(claims.get("scp") or "").split()
        if not isinstance(oid, str) or not oid:
            raise Unauthenticated("The token carries no user object id (oid).")
        roles = frozenset(r for r in (claims.get("roles") or []) if isinstance(r, str))
        if claims.get("idtyp") == "app":
            return self._workload(claims, tid, oid, roles, scopes)
        if self._s.api_scope not in scopes:
            raise Unauthenticated(f"The token lacks the '{self._s.api_scope}' scope.")
        groups = claims.get("groups") or []
        names = claims.get("_claim_names")
        if isinstance(names, dict) and "groups" in names:
            # Too many groups for the token: ask Microsoft Graph (cached per user).
            if self._groups is None:
                raise BackendUnavailable("Your token lists too many groups and this service cannot look them up.")
            groups = sorted(self._groups.member_groups(tid, oid))
        upn = str(claims.get("preferred_username") or claims.get("upn") or claims.get("unique_name") or oid)
        guest = is_guest(claims, issuer, tid)
        return Identity(
            oid=oid.lower(),
            tid=tid.lower(),
            upn=upn,
            name=str(claims.get("name") or ""),
            groups=frozenset(g.lower() for g in groups if isinstance(g, str)),
            roles=roles,
            guest=guest,
            domain_verified=not guest and upn_domain(upn) in self._s.verified_domains_for(tid),
        )

    @staticmethod
    def _workload(claims: dict, tid: str, oid: str, roles: frozenset[str], scopes: list[str]) -> Identity:
        """An app-only token (Entra's `idtyp` optional claim is "app"): a service principal or managed
        identity, known by its object id, allowed in only with the EZSSH.Workload app role. Its name is
        `app:<client id>` (the `azp` claim: the appId that `az ad sp show --id` finds)."""
        if scopes:
            raise Unauthenticated("An app-only token carries no delegated scopes (scp).")
        if WORKLOAD_ROLE not in roles:
            raise Forbidden(
                f"This app has not been assigned the '{WORKLOAD_ROLE}' app role of the ezssh API; "
                "an admin assigns it (Entra ID: Enterprise applications > ezssh API > "
                "Users and groups, or az rest ... appRoleAssignedTo)."
            )
        azp = claims.get("azp") or claims.get("appid")
        if not isinstance(azp, str) or not azp:
            raise Unauthenticated("The app token names no client (azp).")
        groups = claims.get("groups") or []
        return Identity(
            oid=oid.lower(),
            tid=tid.lower(),
            upn=f"app:{azp.lower()}",
            name=str(claims.get("app_displayname") or ""),
            groups=frozenset(g.lower() for g in groups if isinstance(g, str)),
            roles=roles,
            app=True,
        )


def is_guest(claims: dict, issuer: str, tid: str) -> bool:
    """Whether a verified token's subject is a guest (an account from outside the tenant).

    Entra ID marks guests in three ways, any of which is enough here: the optional claim `acct`
    is 1 (0 for members); the UPN (`upn`, or `preferred_username`) holds `#EXT#`, as B2B guests'
    UPNs do; `idp` names an identity provider other than the tenant itself (a guest's home tenant,
    a personal Microsoft account, a social provider). A member's token has no `idp`, or one equal to
    the issuer. A guest token with none of these marks cannot be told apart: enable the `acct`
    optional claim on the API's app registration."""
    acct = claims.get("acct")
    if acct is not None and str(acct).strip() != "0":
        return True
    for name in ("upn", "preferred_username", "unique_name", "email"):
        v = claims.get(name)
        if isinstance(v, str) and "#ext#" in v.lower():
            return True
    idp = claims.get("idp")
    if idp is not None:
        own = {
            issuer.rstrip("/").lower(),
            f"https://sts.windows.net/{tid}".lower(),
            f"https://login.microsoftonline.com/{tid}/v2.0".lower(),
        }
        if not isinstance(idp, str) or idp.rstrip("/").lower() not in own:
            return True
    return False
