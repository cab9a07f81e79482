"""Is a name a public suffix (com, co.uk, github.io ...)? The Public Suffix List, as the
`publicsuffixlist` package ships it, loaded once per worker on first use. Names under no known
suffix (localhost, contoso.internal) are not public: their owners declare them."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _list() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList(accept_unknown=False)


def is_public_suffix(name: str) -> bool:
    return bool(_list().is_public(name.lower().rstrip(".")))
