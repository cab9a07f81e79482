"""Run a program and wait for it, with os.posix_spawn where it exists (the subprocess module is slow
to import, on a path whose budget is counted in milliseconds). Stdlib only."""

from __future__ import annotations

import os


def run(argv: list[str], env: dict[str, str] | None = None, *, capture: bool = False) -> tuple[int, bytes]:
    """(exit code, stdout if `capture`). With `capture`, stdin and stderr are /dev/null; without it the
    program shares this process's terminal. Exit code is negative -N when killed by signal N.
    Raises FileNotFoundError when the program does not exist."""
    if not hasattr(os, "posix_spawnp"):
        import subprocess

        if capture:
            done = subprocess.run(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            return done.returncode, done.stdout
        return subprocess.run(argv, env=env).returncode, b""
    env = dict(os.environ) if env is None else env
    if not capture:
        pid = os.posix_spawnp(argv[0], argv, env)
        return _wait(pid), b""
    r, w = os.pipe()
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_CLOSE, r),
        ]
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    os.close(w)
    chunks: list[bytes] = []
    with os.fdopen(r, "rb") as f:
        while True:
            chunk = f.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return _wait(pid), b"".join(chunks)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
