"""The PKCS#11 module as a process-wide thing: loaded and initialised once per path (with OS locking),
one login per token, errors that mean "reopen", the gate that keeps C_Finalize away from calls in
flight, and the fair session pool the key store leases from.

functions/signing/pkcs11.py builds the key store on top of this; nothing here knows about CA keys.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pkcs11
from pkcs11 import exceptions as px

from functions.core.errors import SignerUnavailable

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib  # the class; pkcs11.lib is the function that loads one

log = logging.getLogger("functions.signing.pkcs11")

# Errors after which the session (or the whole token/library state) is not usable: reopen once.
_DEAD = (
    px.SessionHandleInvalid,
    px.SessionClosed,
    px.DeviceRemoved,
    px.DeviceError,
    px.DeviceMemory,
    px.TokenNotPresent,
    px.TokenNotRecognised,
    px.UserNotLoggedIn,
    px.SlotIDInvalid,
    px.GeneralError,
)

# ---- process-wide state: one loaded module per path, one login per token -------------------------

_libs: dict[str, Pkcs11Lib] = {}
_gates: dict[str, ModuleGate] = {}
_threadsafe: dict[str, bool] = {}
_call_locks: dict[str, threading.Lock] = {}
_logins: dict[tuple[str, bytes], pkcs11.Session] = {}
_global_lock = threading.RLock()

_CKF_OS_LOCKING_OK = 0x02


class ModuleGate:
    """Who is inside one loaded PKCS#11 module: any number of threads holding a session (shared), or
    the one thread that closes every session or finalises the module (exclusive).

    C_Finalize frees every session; a thread still inside C_Sign or C_FindObjects on one of them
    then reads freed memory (SoftHSM: SIGSEGV). So a key store holds the gate shared for as long as
    it leases a session, and reopens or re-initialises only under the exclusive hold. A waiting
    exclusive holder stops new entries, so the calls in flight finish (or fail, the token being
    away) and it gets its turn; every wait is bounded by the caller's budget and ends in
    SignerUnavailable. `epoch` counts re-initialisations: a session from an earlier epoch is gone
    with its handle number, which a new session may already reuse, so it is dropped, never closed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.epoch = 0
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._owner: int | None = None  # the thread holding (or waiting for) the exclusive hold
        self._mine = threading.local()  # shared holds of the current thread

    def enter(self, timeout: float) -> int:
        """A shared hold (the epoch it is in), waiting at most `timeout` s for an exclusive holder."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._owner is None, max(0.0, timeout)):
                raise SignerUnavailable(f"PKCS#11 module {self.path} is being re-initialised; try again")
            self._inside += 1
            self._mine.n = getattr(self._mine, "n", 0) + 1
            return self.epoch

    def leave(self) -> None:
        with self._cond:
            self._inside -= 1
            self._mine.n -= 1
            if self._inside == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        """Alone in the module: no thread holds a session from it while the block runs."""
        if getattr(self._mine, "n", 0):
            raise RuntimeError("a thread holding a PKCS#11 session cannot take the module's exclusive hold")
        me, end = threading.get_ident(), time.monotonic() + max(0.0, timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self._owner is None, max(0.0, end - time.monotonic())):
                raise SignerUnavailable(f"PKCS#11 module {self.path} is being re-initialised; try again")
            self._owner = me
            if not self._cond.wait_for(lambda: self._inside == 0, max(0.0, end - time.monotonic())):
                self._owner = None
                self._cond.notify_all()
                raise SignerUnavailable(f"PKCS#11 module {self.path}: calls in flight did not finish in time")
        try:
            yield
        finally:
            with self._cond:
                self._owner = None
                self._cond.notify_all()


class _InitArgs(ctypes.Structure):  # CK_C_INITIALIZE_ARGS
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _FunctionListHead(ctypes.Structure):  # the first members of CK_FUNCTION_LIST
    _fields_ = [
        ("version", ctypes.c_ubyte * 2),
        ("C_Initialize", ctypes.c_void_p),
        ("C_Finalize", ctypes.c_void_p),
    ]


def _initialize_with_os_locking(path: str) -> bool:
    """Re-run C_Initialize telling the module that this application is multi-threaded.

    python-pkcs11 always calls C_Initialize(NULL), which per PKCS#11 lets a module assume it is never
    called from two threads at once; SoftHSM then really switches its internal mutexes off and
    crashes (SIGSEGV) under concurrent C_Sign. Called right after loading, before any session
    exists: C_Finalize, then C_Initialize with CKF_OS_LOCKING_OK. Returns False if the module cannot
    lock (CKR_CANT_LOCK) or this fails; the module is then initialised as before and every call into
    it is serialised by the key store.
    """
    try:
        dll = ctypes.CDLL(path)  # same handle as python-pkcs11's dlopen of the same file
        get_list = dll.C_GetFunctionList
        get_list.restype = ctypes.c_ulong
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionListHead))]
        flist = ctypes.POINTER(_FunctionListHead)()
        if get_list(ctypes.byref(flist)) != 0 or not flist:
            return False
        init = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(flist.contents.C_Initialize)
        final = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(flist.contents.C_Finalize)
    except (OSError, AttributeError, ValueError):
        return False
    final(None)
    args = _InitArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
    if init(ctypes.byref(args)) == 0:
        return True
    init(None)
    return False


def load_library(module_path: str) -> Pkcs11Lib:
    """The PKCS#11 module at `module_path`, loaded and initialised once per process.

    SoftHSM reads SOFTHSM2_CONF here (at C_Initialize): set it before the first call.
    """
    path = os.path.realpath(module_path)
    with _global_lock:
        lib = _libs.get(path)
        if lib is None:
            if not os.path.isfile(path):
                raise SignerUnavailable(f"PKCS#11 module {module_path} does not exist")
            try:
                lib = pkcs11.lib(path)
            except px.PKCS11Error as e:
                raise SignerUnavailable(f"PKCS#11 module {module_path} cannot be loaded: {_describe(e)}") from None
            _libs[path] = lib
            _gates[path] = ModuleGate(path)
            _call_locks[path] = threading.Lock()
            _threadsafe[path] = _initialize_with_os_locking(path)
            if not _threadsafe[path]:
                log.warning("PKCS#11 module %s cannot lock for threads: calls into it are serialised", path)
        elif not lib.initialized:
            lib.initialize()
            _threadsafe[path] = _initialize_with_os_locking(path)
        return lib


def gate(module_path: str) -> ModuleGate:
    """The gate of a module loaded by load_library."""
    return _gates[os.path.realpath(module_path)]


def reinitialize_library(module_path: str, timeout: float = 30.0) -> None:
    """C_Finalize + C_Initialize (with OS locking): every session and login of the process dies.

    Waits (at most `timeout` s) until no thread holds a session; key stores reopen on their next
    call. Use this instead of python-pkcs11's lib.reinitialize(), which re-initialises without
    locking and without waiting for the calls in flight.
    """
    path = os.path.realpath(module_path)
    if path in _gates:
        with _gates[path].exclusive(timeout):
            reinitialize_exclusive(path)


def reinitialize_exclusive(module_path: str) -> None:
    """reinitialize_library for a caller that already holds the module's exclusive hold."""
    path = os.path.realpath(module_path)
    with _global_lock:
        if path in _libs:
            _threadsafe[path] = _initialize_with_os_locking(path)
            _gates[path].epoch += 1
            for key in [k for k in _logins if k[0] == path]:
                _logins.pop(key, None)  # C_Finalize ended every login


def _call_lock(path: str) -> threading.Lock | contextlib.nullcontext:
    return contextlib.nullcontext() if _threadsafe.get(path, False) else _call_locks[path]


def is_loaded(module_path: str) -> bool:
    with _global_lock:
        return os.path.realpath(module_path) in _libs


def _describe(e: BaseException | None) -> str:
    if e is None:
        return "no error recorded"
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _rv(e: px.PKCS11Error) -> int | None:
    """The CKR_ code of an error python-pkcs11 did not map to a class of its own ("Unmapped error code 0x68")."""
    m = re.search(r"Unmapped error code (0x[0-9a-fA-F]+)", str(e))
    return int(m.group(1), 16) if m else None


def _is_dead(e: BaseException) -> bool:
    """True if the error means the session/login/library state is gone (reopen), not a bad request."""
    if isinstance(e, _DEAD):
        return True
    # python-pkcs11 maps CKR_CRYPTOKI_NOT_INITIALIZED to a bare PKCS11Error with this text
    return type(e) is px.PKCS11Error and "not initialized" in str(e)


def _session_alive(session: pkcs11.Session) -> bool:
    try:
        session.generate_random(64)
        return True
    except px.PKCS11Error:
        return False


def _ensure_login(lib_path: str, token: pkcs11.Token, pin: str) -> None:
    """Log the application in to `token` once; the login session stays open for the process."""
    key = (lib_path, bytes(token.serial))
    with _global_lock:
        sess = _logins.get(key)
        if sess is not None:
            if _session_alive(sess):
                return
            _logins.pop(key, None)
        try:
            _logins[key] = token.open(user_pin=pin)
        except px.UserAlreadyLoggedIn:
            # Somebody else in this process logged in with its own session; that login is ours too.
            # (python-pkcs11 leaves the just-opened session open; it is closed at C_Finalize.)
            log.info("PKCS#11 token %r: user already logged in", token.label)
        except (px.PinIncorrect, px.PinInvalid, px.PinLenRange) as e:
            raise SignerUnavailable(f"PKCS#11 token {token.label!r} rejected the PIN ({type(e).__name__})") from None
        except (px.PinLocked, px.PinExpired) as e:
            raise SignerUnavailable(
                f"PKCS#11 token {token.label!r}: user PIN is {type(e).__name__[3:].lower()}"
            ) from None


def _forget_login(lib_path: str, token: pkcs11.Token | None) -> None:
    if token is None:
        return
    with _global_lock:
        try:
            key = (lib_path, bytes(token.serial))
        except Exception:  # the token object may be unusable itself
            return
        sess = _logins.get(key)
        if sess is not None and not _session_alive(sess):
            _logins.pop(key, None)


def _close_quietly(session: pkcs11.Session, lib_path: str) -> None:
    try:
        with _call_lock(lib_path):
            session.close()
    except Exception:  # a dead session may refuse to close; nothing to do about it
        pass


# ---- the session pool -------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("event", "lease")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lease: _Lease | None = None


class _FairPool:
    """Free sessions plus a FIFO of waiting threads; a released session goes straight to the
    longest waiter. (queue.Queue lets the releasing thread grab it back at once, which starved
    the longest waiters when threads outnumber sessions.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_Lease] = []
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def put(self, lease: _Lease) -> None:
        with self._lock:
            if self._waiters:
                w = self._waiters.popleft()
                w.lease = lease
                w.event.set()
            else:
                self._free.append(lease)

    def get(self, timeout: float) -> _Lease | None:
        with self._lock:
            if self._free and not self._waiters:
                return self._free.pop()
            w = _Waiter()
            self._waiters.append(w)
        w.event.wait(timeout)
        with self._lock:
            if w.lease is not None:
                return w.lease
            if w in self._waiters:
                self._waiters.remove(w)
            return None

    def drain(self) -> list[_Lease]:
        with self._lock:
            free, self._free = self._free, []
            return free

    def wake_waiters(self) -> None:
        """Every waiting thread gets None now (the store has no sessions to hand out)."""
        with self._lock:
            waiters, self._waiters = self._waiters, collections.deque()
        for w in waiters:
            w.event.set()


@dataclass(eq=False)
class _Lease:
    session: pkcs11.Session
    generation: int  # the store's: sessions of an earlier generation are closed, not reused
    epoch: int  # the module's (ModuleGate.epoch): sessions of an earlier epoch died with C_Finalize
    keys: dict[bytes, pkcs11.PrivateKey] = field(default_factory=dict)
