"""The user functions that function_app.py registers, for tests that call them as the Functions host
would. `app.get_functions()` may run only once per app object, so every test module shares this."""

from __future__ import annotations

_FUNCTIONS: dict = {}
_TRIGGERS: dict = {}


def _load() -> None:
    if not _FUNCTIONS:
        import function_app

        for f in function_app.app.get_functions():
            _FUNCTIONS[f.get_function_name()] = f.get_user_function()
            _TRIGGERS[f.get_function_name()] = f.get_trigger().get_dict_repr()


def user_functions() -> dict:
    _load()
    return _FUNCTIONS


def triggers() -> dict:
    """function name -> its trigger binding as function.json would say it (type, queueName, ...)."""
    _load()
    return _TRIGGERS
