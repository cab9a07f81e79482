"""The user functions that function_app.py registers, for tests that call them as the Functions host
would. `app.get_functions()` may run only once per app object, so every test module shares this."""

from __future__ import annotations

_FUNCTIONS: dict = {}


def user_functions() -> dict:
    if not _FUNCTIONS:
        import function_app

        _FUNCTIONS.update({f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()})
    return _FUNCTIONS
