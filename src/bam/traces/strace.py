"""strace log reader: what ``strace -f -ttt -o FILE CMD`` writes, and its common variants.

Users already have strace logs, so this is the cheapest way to profile a workload. The reader
accepts the output of ``-f`` (tid column) or not, ``-ttt`` (epoch), ``-tt``/``-t`` (time of day,
converted to seconds since midnight) or no timestamp (NaN; ``-r`` deltas are kept as printed, so
prefer ``-ttt``), and tolerates ``-y``/``-yy``, ``-s``, ``-T``, ``-i``, ``-n``, ``-k`` (stack
lines), ``-v`` and the ``[pid N]`` prefix strace writes to stderr. One compiled regular expression
classifies each line by its head; the result is found with ``str.rfind`` (arguments may hold any
text, and the result follows the *last* ``" = "``). Events accumulate in compact ``array``
buffers and become numpy arrays once per trace.

Decisions worth knowing:

* **pid/tid.** With ``-f`` strace prints the *thread* id. ``tid`` is that column; ``pid`` is the
  thread-group id, recovered from ``clone``/``clone3`` calls with ``CLONE_THREAD`` (the child's
  tid is the return value); a thread whose creation the log does not show keeps ``pid = tid``.
  Without ``-f`` (or with strace's stderr ``[pid N]`` prefix absent) there is no column: 0.
* **Unfinished/resumed pairs** become one event at the time of the ``<unfinished ...>`` line,
  with the return value of the ``<... name resumed>`` line. A ``resumed`` line without its start
  (log begun mid-call) is an event at its own time. A call never resumed keeps ``RET_UNKNOWN``.
* **Return values** are int64: the value printed, ``-errno`` when strace names an errno
  (``= -1 ENOENT`` gives -2, ``= ? ERESTARTSYS`` gives -512), :data:`RET_UNKNOWN` for ``= ?``.
* **Unknown syscall names are not fatal** (a newer strace or kernel than BAM's table):
  ``syscall_0x1c3``/``syscall_451`` map through the architecture's number table; a short list of
  recent x86_64 calls (``NEWER_X86_64``) maps to the id a live sensor would give that number;
  anything else gets a stable hashed id ``>= UNKNOWN_NAME_BASE`` (so two unknown names stay
  distinct and the same name always gets the same id). Every such name is listed in
  ``trace.meta["unknown_names"]`` (name -> id).
* **Signals** (``--- SIGCHLD ... ---``) and **exits** (``+++ exited with 0 +++``) are not system
  calls; they are kept, cheaply, in ``meta["signals"]``/``meta["exits"]`` as (ts, tid, text).
* **Security-relevant arguments** of a handful of calls (exec, network, file writes, renames,
  permission changes, executable mappings) go to ``meta["args"]`` as ``{call: [(index, text)]}``
  so explanations can say *which* program was run or *where* a connection went.
* **Truncation.** A last line that does not parse is tolerated when it is cut (no newline) or
  looks like the start of a call; ``meta["truncated_last_line"]`` names it. Any other line that is
  not strace output raises :class:`~bam.errors.TraceFormatError` naming file and line.
"""

from __future__ import annotations

import errno
import math
import re
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np

from bam.errors import TraceFormatError
from bam.events import I32, SyscallBatch, Trace
from bam.syscalls import Arch, canonical_ids, id_of

RET_UNKNOWN: Final = int(np.iinfo(np.int64).min)
"""``ret`` of a call whose result is unknown (``= ?``, never resumed, or no exit event)."""

UNKNOWN_NAME_BASE: Final = 1 << 20
"""Hashed ids of syscall names no table knows live in ``[UNKNOWN_NAME_BASE, 2 * UNKNOWN_NAME_BASE)``.

Above the canonical names (< 4096) and the unnamed-number range (4096..6143) of
:mod:`bam.syscalls`, so they can never collide with a real call.
"""

NEWER_X86_64: Final[dict[str, int]] = {
    # x86_64 calls newer than BAM's bundled table (from arch/x86/entry/syscalls/syscall_64.tbl,
    # Linux 6.19). Mapping them to their number gives the id a live sensor would record.
    "uretprobe": 335,
    "uprobe": 336,
    "cachestat": 451,
    "fchmodat2": 452,
    "map_shadow_stack": 453,
    "futex_wake": 454,
    "futex_wait": 455,
    "futex_requeue": 456,
    "statmount": 457,
    "listmount": 458,
    "lsm_get_self_attr": 459,
    "lsm_set_self_attr": 460,
    "lsm_list_modules": 461,
    "mseal": 462,
    "setxattrat": 463,
    "getxattrat": 464,
    "listxattrat": 465,
    "removexattrat": 466,
    "open_tree_attr": 467,
    "file_getattr": 468,
    "file_setattr": 469,
    "listns": 470,
}

_I64_MAX: Final = (1 << 63) - 1
_I64_MIN: Final = -(1 << 63)
_I32_MAX: Final = (1 << 31) - 1
_SYSCALL_NR = re.compile(r"syscall_(?:0x([0-9a-fA-F]{1,8})|(\d{1,9}))", re.ASCII)

# Linux-internal errno values strace prints (include/linux/errno.h); Python's errno lacks them.
_KERNEL_ERRNO: Final[dict[str, int]] = {
    "ERESTARTSYS": 512,
    "ERESTARTNOINTR": 513,
    "ERESTARTNOHAND": 514,
    "ENOIOCTLCMD": 515,
    "ERESTART_RESTARTBLOCK": 516,
    "EPROBE_DEFER": 517,
    "EOPENSTALE": 518,
    "ENOPARAM": 519,
    "EBADHANDLE": 521,
    "ENOTSYNC": 522,
    "EBADCOOKIE": 523,
    "ENOTSUPP": 524,
    "ETOOSMALL": 525,
    "ESERVERFAULT": 526,
    "EBADTYPE": 527,
    "EJUKEBOX": 528,
    "EIOCBQUEUED": 529,
    "ERECALLCONFLICT": 530,
}
_ERRNO: Final[dict[str, int]] = {
    **{name: code for code, name in errno.errorcode.items()},
    **{n: getattr(errno, n) for n in dir(errno) if n.startswith("E") and n.isupper()},
    **_KERNEL_ERRNO,
}

_PREFIX = (
    r"[ \t]*"
    r"(?:(?P<pid>\d{1,10})[ \t]+|\[pid[ \t]+(?P<pid2>\d{1,10})\][ \t]+)?"  # -f column / [pid N]
    r"(?:(?P<ts>\d{1,12}\.\d{1,9}|\d\d:\d\d:\d\d(?:\.\d{1,9})?)[ \t]+)?"  # -ttt/-r, -tt/-t
    r"(?:\[[ \t]*\d{1,4}\][ \t]+)?"  # -n: syscall number
    r"(?:\[[0-9a-fA-F?]{1,16}\][ \t]+)?"  # -i: instruction pointer
)
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# The one regex every line goes through. It classifies the line by its head only: the
# arguments can be long and hold any text, and the result sits after the *last* " = ", which
# str.rfind finds far faster than a backtracking regex could.
_HEAD = re.compile(
    _PREFIX
    + rf"(?:(?P<name>{_NAME})\("  # a call, complete or unfinished
    + rf"|<\.\.\.[ \t](?P<rname>{_NAME})[ \t]resumed>"  # the end of an unfinished call
    + r"|(?P<other>---[ \t]|\+\+\+[ \t]|\[[ \t]Process[ \t]|>[ \t]|strace:[ \t]|\?\?\?\?\())",
    re.ASCII,
)
# Lines that are not system calls (signals, exits, notices, -k stack frames), validated in full.
_OTHER = re.compile(
    _PREFIX
    + r"(?:---[ \t](?P<sig>.*?)[ \t]---"
    + r"|\+\+\+[ \t](?P<exit>.*?)[ \t]\+\+\+"
    + r"|\[[ \t]Process[ \t]PID=(?P<mpid>\d{1,10})[ \t]runs[ \t]in[ \t](?P<bits>\d\d)[ \t]bit"
    + r"[ \t]mode\.[ \t]\]"
    + r"|>[ \t].*|strace:[ \t].*|\?\?\?\?\(.*)[ \t]*\r?\n?",
    re.ASCII,
)
_UNFINISHED_ENDS = (
    "<unfinished ...>\n",
    "<unfinished ...>",
    "<detached ...>\n",
    "<detached ...>",
    "<unfinished ...>\r\n",
    "<detached ...>\r\n",
)
_ERRNAME = re.compile(r"E[A-Z0-9_]{1,30}", re.ASCII)
_HEX = re.compile(r"0x[0-9a-fA-F]{1,16}", re.ASCII)
_DEC = re.compile(r"-?\d{1,20}", re.ASCII)


def fallback_id(name: str, arch: Arch = "x86_64") -> int | None:
    """Canonical id of a syscall name BAM's table lacks, or ``None`` if it has to be hashed.

    ``syscall_0x1c3``/``syscall_451`` (strace's spelling of unnamed calls) map through ``arch``'s
    number table, and recent x86_64 names through :data:`NEWER_X86_64`, so they agree with the
    ids live sensors produce from raw numbers.
    """
    m = _SYSCALL_NR.fullmatch(name)
    if m:
        nr = int(m.group(1), 16) if m.group(1) else int(m.group(2))
        if nr < 1024:
            return int(canonical_ids([nr], arch)[0])
        return None
    if name in NEWER_X86_64:
        return int(canonical_ids([NEWER_X86_64[name]], "x86_64")[0])
    return None


def hashed_id(name: str) -> int:
    """Stable id for a name nothing else knows: the same on every machine and run (CRC-32)."""
    return UNKNOWN_NAME_BASE + (zlib.crc32(name.encode("utf-8", "surrogatepass")) & 0xFFFFF)


def resolve_name(name: str, unknown: dict[str, int], arch: Arch = "x86_64") -> int:
    """Canonical id of ``name``; names outside BAM's table are recorded in ``unknown``."""
    try:
        return id_of(name)
    except KeyError:
        pass
    cid = fallback_id(name, arch)
    if cid is None:
        cid = hashed_id(name)
    unknown[name] = cid
    return cid


# --- security-relevant argument extraction (only on a few, mostly rare, calls) -----------------

_EXEC_CALLS = frozenset({"execve", "execveat"})
_NET_CALLS = frozenset({"connect", "bind", "accept", "accept4"})
_OPEN_CALLS = frozenset({"open", "openat", "openat2", "creat"})
_PATH_CALLS = frozenset({"unlink", "unlinkat", "rmdir"})
_RENAME_CALLS = frozenset({"rename", "renameat", "renameat2"})
_CHMOD_CALLS = frozenset({"chmod", "fchmod", "fchmodat", "fchmodat2"})
_MAP_CALLS = frozenset({"mmap", "mmap2", "mprotect", "pkey_mprotect"})
_CLONE_CALLS = frozenset({"clone", "clone3"})
ARG_CALLS: Final = (
    _EXEC_CALLS | _NET_CALLS | _OPEN_CALLS | _PATH_CALLS | _RENAME_CALLS | _CHMOD_CALLS | _MAP_CALLS
)
"""Calls whose arguments are summarised in ``meta["args"]``."""

_KEEP_ARGS = ARG_CALLS | _CLONE_CALLS
# Calls whose interesting part is printed only when they return (the peer of an accept, the
# new thread of a clone): for these an unfinished line waits for its resumption.
_NEED_RESULT = frozenset({"accept", "accept4"}) | _CLONE_CALLS
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"', re.ASCII)
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)", re.ASCII | re.DOTALL)
_SIMPLE_ESC = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "e": 27}
_INET = re.compile(r'sin_port=htons\((\d+)\),\s*sin_addr=inet_addr\("([^"]*)"\)', re.ASCII)
_INET6 = re.compile(r'sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6,\s*"([^"]*)"', re.ASCII)
_UNIX = re.compile(r'sun_path=(@?)"((?:[^"\\]|\\.)*)"', re.ASCII)
_FAMILY = re.compile(r"sa_family=([A-Z0-9_]+)", re.ASCII)
_MODE = re.compile(r"(?:^|,\s*)(0[0-7]*)\s*(?:,|$)", re.ASCII)
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
_MAX_ARG_TEXT = 512


def _unescape(s: str) -> str:
    """Undo strace's C-style escapes (``\\"``, ``\\n``, ``\\x41``, ``\\303``) for display."""
    if "\\" not in s:
        return s

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] == "x" and len(e) == 3:
            v = int(e[1:], 16)
        elif e[0] in "01234567":
            v = int(e, 8) & 0xFF
        else:
            return chr(_SIMPLE_ESC[e]) if e in _SIMPLE_ESC else e
        return chr(0xDC00 + v) if v >= 0x80 else chr(v)  # a raw byte, as surrogateescape does

    raw = _ESCAPE.sub(one, s)
    # Bytes >= 0x80 were carried as surrogates; re-decode them as UTF-8 where they form text.
    try:
        data = raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: keep the text
        return raw
    return data.decode("utf-8", "backslashreplace")


def _strings(args: str, n: int) -> list[str]:
    return [_unescape(m.group(1)) for m in _STRING.finditer(args, 0, len(args))][:n]


def _address(args: str) -> str:
    m = _INET.search(args)
    if m:
        return f"{m.group(2)}:{m.group(1)}"
    m6 = _INET6.search(args)
    if m6:
        return f"[{m6.group(2)}]:{m6.group(1)}"
    mu = _UNIX.search(args)
    if mu:
        return f"unix:{mu.group(1)}{_unescape(mu.group(2))}"
    mf = _FAMILY.search(args)
    if mf:
        return mf.group(1)
    return args[:_MAX_ARG_TEXT]


def summarize_args(name: str, args: str) -> str | None:
    """Short, human-readable summary of a security-relevant call's arguments, or ``None``.

    ``None`` also means "not interesting this time": reads-only opens and non-executable
    mappings are skipped, since they are the bulk of every trace and say little.
    """
    if name in _EXEC_CALLS:
        s = _strings(args, 1)
        return s[0] if s else args[:_MAX_ARG_TEXT]
    if name in _NET_CALLS:
        return _address(args)
    if name in _OPEN_CALLS:
        if name != "creat" and not any(f in args for f in _WRITE_FLAGS):
            return None
        s = _strings(args, 1)
        return s[0] if s else args[:_MAX_ARG_TEXT]
    if name in _PATH_CALLS:
        s = _strings(args, 1)
        return s[0] if s else args[:_MAX_ARG_TEXT]
    if name in _RENAME_CALLS:
        s = _strings(args, 2)
        return " -> ".join(s) if s else args[:_MAX_ARG_TEXT]
    if name in _CHMOD_CALLS:
        s = _strings(args, 1)
        rest = _STRING.sub("", args)
        mm = _MODE.search(rest)
        mode = mm.group(1) if mm else "?"
        return f"{s[0]} {mode}" if s else args[:_MAX_ARG_TEXT]
    if name in _MAP_CALLS:
        if "PROT_EXEC" not in args:
            return None
        parts = [p.strip() for p in args.split(",")]
        if name.startswith("mmap") and len(parts) >= 5:
            return f"{parts[2]} {parts[3]} fd={parts[4]}"
        return parts[2] if len(parts) >= 3 else args[:_MAX_ARG_TEXT]
    return None


# --- the parser ---------------------------------------------------------------------------------


def _parse_ret(text: str) -> int | None:
    """The result after ``" = "``: ``0``, ``0x7f..``, ``-1 ENOENT (...)``, ``? ERESTARTSYS``,
    ``3</etc/passwd>`` (``-y``), ``0 <0.000012>`` (``-T``). ``None`` if it is not a result."""
    parts = text.split(None, 2)
    if not parts:
        return None
    tok = parts[0]
    lt = tok.find("<")
    if lt > 0:
        tok = tok[:lt]  # "3</etc/passwd>": the fd's path, printed by -y
    err = parts[1] if len(parts) > 1 else ""
    if err in _ERRNO and _ERRNAME.fullmatch(err) and (tok == "?" or _DEC.fullmatch(tok)):
        return -_ERRNO[err]
    if tok == "?":
        return RET_UNKNOWN
    if _DEC.fullmatch(tok):
        v = int(tok)
    elif _HEX.fullmatch(tok):
        v = int(tok, 16)
    else:
        return None
    if v > _I64_MAX:
        v -= 1 << 64  # printed unsigned (an address or -1 as %lu)
    if not _I64_MIN <= v <= _I64_MAX:
        return None
    return v


def _call_args(line: str, start: int, eq: int) -> str | None:
    """Arguments of a complete call: the text between ``name(`` and the ``)`` before ``" = "``.

    ``None`` when there is no such ``)``, i.e. the line is not a complete call."""
    head = line[start:eq].rstrip(" \t")
    if not head.endswith(")"):
        return None
    return head[:-1]


def _tod_seconds(tok: str) -> float:
    h, m, s = tok.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _timestamp_kind(tok: str | None) -> str:
    """What the time column held (judged from its first value): epoch seconds, time of day."""
    if tok is None:
        return "none"
    return "time-of-day" if ":" in tok else "epoch"


def _describe_bad(line: str) -> str:
    text = line.rstrip("\r\n")
    if "\x00" in text or any(0xDC80 <= ord(c) <= 0xDCFF for c in text[:4096]):
        return "not strace output: binary content"
    return f"not an strace line: {text[:80]!r}"


def parse_strace(lines: Iterable[str], source: str | Path = "<strace>") -> Trace:
    """Parse strace output ``lines`` (with or without their newlines) into one :class:`Trace`.

    ``source`` names the input in errors and becomes the trace's name. Lines may hold
    surrogate-escaped bytes (a file decoded with ``errors="surrogateescape"``): such a line is
    reported as binary content, never as a Unicode traceback.

    This loop is the hot path (a busy program writes millions of lines), hence the inlined
    appends and the fast ``int()`` attempt before the general result parser.
    """
    src = str(source)
    ts_buf = array("d")
    tid_buf = array("q")
    sid_buf = array("i")
    ret_buf = array("q")
    ids: dict[str, int] = {}
    unknown: dict[str, int] = {}
    pending: dict[int, tuple[int, str, str | None]] = {}
    args_meta: dict[str, list[tuple[int, str]]] = {}
    thread_parent: dict[int, int] = {}
    signals: list[tuple[float, int, str]] = []
    exits: list[tuple[float, int, str]] = []
    bits32: set[int] = set()
    have_pid2 = False
    first_ts: str | None = None
    unpaired = 0
    bad: tuple[int, str] | None = None
    truncated: int | None = None
    nan = math.nan
    head = _HEAD.match
    keep = _KEEP_ARGS
    always = _KEEP_ARGS - _OPEN_CALLS - _MAP_CALLS
    opens = _OPEN_CALLS
    maps = _MAP_CALLS
    tids: dict[str, int] = {}
    digits = frozenset("0123456789")
    unf_ends = _UNFINISHED_ENDS
    ts_append, tid_append, sid_append, ret_append = (
        ts_buf.append,
        tid_buf.append,
        sid_buf.append,
        ret_buf.append,
    )
    lineno = 0

    def sid_slow(name: str, tid: int) -> int:
        if name.startswith("syscall_") and tid in bits32:
            return resolve_name(name, unknown, "i386")
        cid = resolve_name(name, unknown)
        ids[name] = cid
        return cid

    def note_args(idx: int, name: str, args: str, ret: int) -> None:
        if name in _CLONE_CALLS:
            if "CLONE_THREAD" in args and ret > 0:
                thread_parent[ret] = tid_buf[idx]
            return
        text = summarize_args(name, args)
        if text is not None:
            args_meta.setdefault(name, []).append((idx, text))

    for lineno, line in enumerate(lines, 1):
        m = head(line)
        if m is not None:
            pid, pid2, ts_tok, name, rname, other = m.groups()
            if pid is not None:
                tid = tids.get(pid)
                if tid is None:
                    tid = tids[pid] = int(pid)
            elif pid2 is not None:
                tid = int(pid2)
                have_pid2 = True
            else:
                tid = 0
            if ts_tok is None:
                ts = nan
            elif first_ts is None:
                first_ts = ts_tok
                ts = _tod_seconds(ts_tok) if ":" in ts_tok else float(ts_tok)
            elif ts_tok[2] == ":":
                ts = _tod_seconds(ts_tok)
            else:
                ts = float(ts_tok)

            if name is not None:
                if line.endswith(unf_ends):  # a call that has not returned yet
                    if bad is not None:
                        break
                    idx = len(sid_buf)
                    ts_append(ts)
                    tid_append(tid)
                    sid = ids.get(name)
                    sid_append(sid if sid is not None else sid_slow(name, tid))
                    ret_append(RET_UNKNOWN)
                    args = None
                    if name in keep:
                        args = line[m.end() : line.rfind("<")].rstrip(" \t")
                        if name not in _NEED_RESULT:  # all it says is known already
                            note_args(idx, name, args, RET_UNKNOWN)
                            args = None
                    pending[tid] = (idx, name, args)
                    continue
                eq = line.rfind(" = ")
                if eq >= m.end() and (
                    line[eq - 1] == ")" or _call_args(line, m.end(), eq) is not None
                ):
                    rest = line[eq + 3 :]
                    ret: int | None
                    if rest[:1] in digits and rest.find(" ") < 0:  # "0", "832", "0x7f3a..."
                        try:
                            ret = int(rest, 0)
                        except ValueError:
                            ret = _parse_ret(rest)
                        else:
                            if ret > _I64_MAX:
                                ret = _parse_ret(rest)
                    else:  # "-1 ENOENT (...)", "?", "3</etc/passwd>", "0 <0.000012>"
                        ret = _parse_ret(rest)
                    if ret is not None:
                        if bad is not None:
                            break
                        idx = len(sid_buf)
                        ts_append(ts)
                        tid_append(tid)
                        sid = ids.get(name)
                        sid_append(sid if sid is not None else sid_slow(name, tid))
                        ret_append(ret)
                        if name in keep and (
                            name in always
                            or (
                                name in opens
                                and (
                                    "O_WRONLY" in line
                                    or "O_RDWR" in line
                                    or "O_CREAT" in line
                                    or name == "creat"
                                )
                            )
                            or (name in maps and "PROT_EXEC" in line)
                        ):
                            note_args(idx, name, line[m.end() : eq].rstrip(" \t")[:-1], ret)
                        continue
            elif rname is not None:
                eq = line.rfind(" = ")
                if eq >= m.end() and line[m.end() : eq].rstrip(" \t").endswith(")"):
                    ret = _parse_ret(line[eq + 3 :])
                    if ret is not None:
                        if bad is not None:
                            break
                        start = pending.pop(tid, None)
                        if start is not None and start[1] == rname:
                            ret_buf[start[0]] = ret
                            if start[2] is not None:
                                rargs = line[m.end() : eq].rstrip(" \t")[:-1]
                                note_args(start[0], rname, start[2] + rargs, ret)
                            continue
                        if start is not None:
                            pending[tid] = start  # another call's resumption: keep waiting
                        unpaired += 1
                        idx = len(sid_buf)
                        ts_append(ts)
                        tid_append(tid)
                        sid = ids.get(rname)
                        sid_append(sid if sid is not None else sid_slow(rname, tid))
                        ret_append(ret)
                        if rname in keep:
                            note_args(idx, rname, line[m.end() : eq].rstrip(" \t")[:-1], ret)
                        continue
            elif other is not None:
                om = _OTHER.fullmatch(line)
                if om is not None:
                    if bad is not None:
                        break
                    _note_other(om, ts, tid, signals, exits, bits32)
                    continue
        # not a line strace writes (or a cut one)
        if not line.strip():
            continue
        if bad is not None:
            break
        bad = (lineno, line)  # fatal unless it turns out to be the last line

    if bad is not None:
        # A cut last line is tolerated: cut mid-line (no newline), or clearly an strace line.
        cut = not bad[1].endswith("\n") or _HEAD.match(bad[1]) is not None
        if lineno != bad[0] or not cut:
            raise TraceFormatError(src, _describe_bad(bad[1]), bad[0])
        truncated = bad[0]
    if not sid_buf:
        raise TraceFormatError(src, "no system calls found (empty, or not an strace log)")

    tid_arr = np.frombuffer(tid_buf, dtype=np.int64)
    if int(tid_arr.max()) > _I32_MAX:
        raise TraceFormatError(src, f"thread id {int(tid_arr.max())} out of range")
    tid32 = tid_arr.astype(np.int32)

    meta: dict[str, Any] = {
        "format": "strace",
        "source": src,
        "lines": lineno,
        "pid_column": bool(tids) or have_pid2,
        "timestamps": _timestamp_kind(first_ts),
        "unknown_names": unknown,
        "args": args_meta,
        "signals": signals,
        "exits": exits,
    }
    if unpaired:
        meta["unpaired_resumed"] = unpaired
    if truncated is not None:
        meta["truncated_last_line"] = truncated
    events = SyscallBatch(
        ts=np.frombuffer(ts_buf, dtype=np.float64).copy(),
        pid=_thread_groups(tid32, thread_parent),
        tid=tid32,
        sid=np.frombuffer(sid_buf, dtype=np.int32).copy(),
        ret=np.frombuffer(ret_buf, dtype=np.int64).copy(),
    )
    return Trace(name=src, events=events, label=None, meta=meta)


def _note_other(
    m: re.Match[str],
    ts: float,
    tid: int,
    signals: list[tuple[float, int, str]],
    exits: list[tuple[float, int, str]],
    bits32: set[int],
) -> None:
    """Record what is not a system call: signals, exits, and 32/64-bit personality changes."""
    sig = m.group("sig")
    if sig is not None:
        signals.append((ts, tid, sig.split(" ", 1)[0]))
        return
    ex = m.group("exit")
    if ex is not None:
        exits.append((ts, tid, ex))
        return
    mpid = m.group("mpid")
    if mpid is not None:
        if m.group("bits") == "32":
            bits32.add(int(mpid))
        else:
            bits32.discard(int(mpid))


def _thread_groups(tid: I32, parent: dict[int, int]) -> I32:
    """Thread-group id (pid) per event, following ``CLONE_THREAD`` parents to the group leader."""
    if not parent:
        return tid.copy()
    uniq, inv = np.unique(tid, return_inverse=True)
    leader = np.empty(len(uniq), dtype=np.int32)
    for i, t in enumerate(uniq.tolist()):
        seen = {t}
        while t in parent and parent[t] not in seen:
            t = parent[t]
            seen.add(t)
        leader[i] = t
    out: I32 = leader[inv]
    return out


def read_strace(path: str | Path) -> Trace:
    """Read one strace log file (see the module docstring for what is accepted)."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8", errors="surrogateescape", newline=None) as f:
            return parse_strace(f, p)
    except IsADirectoryError:
        raise TraceFormatError(p, "is a folder; use iter_strace for folders") from None
    except OSError as e:
        raise TraceFormatError(p, f"cannot read: {e.strerror or e}") from None


def iter_strace(path: str | Path) -> Iterator[Trace]:
    """One trace per file: ``path`` itself, or every non-hidden file in a folder, sorted."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                yield read_strace(f)
    else:
        yield read_strace(p)
