"""A JSON document as parsed (json.loads): what an admin sends, before core checks its shape."""

from __future__ import annotations

from typing import TypeAlias

JsonValue: TypeAlias = dict[str, "JsonValue"] | list["JsonValue"] | str | int | float | bool | None
