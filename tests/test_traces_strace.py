"""strace reader: hand-written corner cases, real recorded logs, and property-based tests."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bam.errors import TraceFormatError
from bam.events import Trace
from bam.syscalls import canonical_ids, id_of, name_of
from bam.traces import read_traces
from bam.traces.strace import (
    RET_UNKNOWN,
    UNKNOWN_NAME_BASE,
    iter_strace,
    parse_strace,
    read_strace,
)
from conftest import require, require_tool


def write(tmp_path: Path, text: str, name: str = "trace.log") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def names(trace: Trace) -> list[str]:
    return [name_of(int(s)) for s in trace.events.sid]


# --- the basic shape ----------------------------------------------------------------------------

BASIC = """\
4553  1700000000.100000 execve("/usr/bin/sh", ["sh", "-c", "ls"], 0x7ffe1f259e10 /* 35 vars */) = 0
4553  1700000000.200000 brk(NULL)       = 0x561644db1000
4553  1700000000.300000 access("/etc/ld.so.preload", R_OK) = -1 ENOENT (No such file or directory)
4553  1700000000.400000 openat(AT_FDCWD, "/etc/x", O_RDONLY) = 3
4553  1700000000.500000 close(3)        = 0
4553  1700000000.600000 exit_group(0)   = ?
4553  1700000000.700000 +++ exited with 0 +++
"""


def test_complete_calls_give_names_returns_times_and_ids(tmp_path: Path) -> None:
    t = read_strace(write(tmp_path, BASIC))
    assert names(t) == ["execve", "brk", "access", "openat", "close", "exit_group"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [0, 0x561644DB1000, -2, 3, 0, RET_UNKNOWN]
    np.testing.assert_allclose(t.events.ts, 1700000000.0 + np.arange(1, 7) / 10)
    assert t.events.ts.dtype == np.float64
    assert set(t.events.pid.tolist()) == set(t.events.tid.tolist()) == {4553}
    assert t.events.pid.dtype == t.events.tid.dtype == t.events.sid.dtype == np.int32
    assert t.meta["timestamps"] == "epoch"
    assert t.meta["pid_column"] is True
    assert t.meta["exits"] == [(1700000000.7, 4553, "exited with 0")]
    assert t.meta["unknown_names"] == {}
    assert t.name == str(tmp_path / "trace.log")


def test_unfinished_and_resumed_become_one_event_at_the_start_time(tmp_path: Path) -> None:
    log = """\
100  1.000000 wait4(-1,  <unfinished ...>
101  1.500000 openat(AT_FDCWD, "/etc/hostname", O_RDONLY <unfinished ...>
101  1.600000 <... openat resumed>) = 3
101  1.700000 read(3, "vm\\n", 4096) = 3
101  1.800000 exit_group(0 <unfinished ...>
101  1.900000 <... exit_group resumed>) = ?
101  1.950000 +++ exited with 0 +++
100  2.000000 <... wait4 resumed>[{WIFEXITED(s) && WEXITSTATUS(s) == 0}], 0, NULL) = 101
100  2.100000 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=101, si_status=0} ---
100  2.200000 exit_group(0) = ?
"""
    t = read_strace(write(tmp_path, log))
    assert names(t) == ["wait4", "openat", "read", "exit_group", "exit_group"]
    assert t.events.ts.tolist() == [1.0, 1.5, 1.7, 1.8, 2.2]
    assert t.events.tid.tolist() == [100, 101, 101, 101, 100]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [101, 3, 3, RET_UNKNOWN, RET_UNKNOWN]
    assert t.meta["signals"] == [(2.1, 100, "SIGCHLD")]
    assert [e[2] for e in t.meta["exits"]] == ["exited with 0"]
    assert "unpaired_resumed" not in t.meta


def test_resumed_without_its_start_is_an_event_at_its_own_time(tmp_path: Path) -> None:
    log = '7  5.0 <... read resumed>"abc", 10) = 3\n7  6.0 close(0) = 0\n'
    t = read_strace(write(tmp_path, log))
    assert names(t) == ["read", "close"]
    assert t.events.ts.tolist() == [5.0, 6.0]
    assert t.meta["unpaired_resumed"] == 1


def test_never_resumed_call_keeps_an_unknown_return(tmp_path: Path) -> None:
    log = """\
7  5.0 read(0,  <unfinished ...>
8  5.1 execve("/tmp/x", ["x"], 0x7ffd /* 3 vars */ <unfinished ...>
7  6.0 +++ killed by SIGKILL +++
8  6.1 +++ killed by SIGKILL +++
"""
    t = read_strace(write(tmp_path, log))
    assert names(t) == ["read", "execve"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [RET_UNKNOWN, RET_UNKNOWN]
    assert t.meta["exits"] == [(6.0, 7, "killed by SIGKILL"), (6.1, 8, "killed by SIGKILL")]
    assert t.meta["args"] == {"execve": [(1, "/tmp/x")]}  # known at the start


def test_error_returns_are_minus_errno(tmp_path: Path) -> None:
    log = """\
1 1.0 open("/x", O_RDONLY) = -1 ENOENT (No such file or directory)
1 1.1 connect(3, {sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 ECONNREFUSED (Connection refused)
1 1.2 read(0,  <unfinished ...>
1 1.3 <... read resumed>0x7ffc, 10) = ? ERESTARTSYS (To be restarted if SA_RESTART is set)
1 1.4 futex(0x1, FUTEX_WAIT, 0, NULL) = -1 EAGAIN (Resource temporarily unavailable)
1 1.5 poll([{fd=3, events=POLLIN}], 1, 0) = 0 (Timeout)
1 1.6 fcntl(3, F_GETFL) = 0x8002 (flags O_RDWR|O_LARGEFILE)
1 1.7 mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, -1, 0) = 0xffffffffffffffff
"""
    t = read_strace(write(tmp_path, log))
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [-2, -111, -512, -11, 0, 0x8002, -1]


def test_strings_with_parentheses_quotes_and_equals(tmp_path: Path) -> None:
    log = r"""1 1.0 write(1, "f(x) = 5; \"quoted\" (a=b) = c", 30) = 30
1 1.1 write(1, "<... fake resumed>) = 9", 23 <unfinished ...>
1 1.2 <... write resumed>) = 23
1 1.3 execve("/bin/we ird\"(x) = 1", ["a"], 0x0 /* 0 vars */) = 0
1 1.4 openat(AT_FDCWD, "/tmp/a = b (c).txt", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 4
"""
    t = read_strace(write(tmp_path, log))
    assert names(t) == ["write", "write", "execve", "openat"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [30, 23, 0, 4]
    assert t.meta["args"]["execve"] == [(2, '/bin/we ird"(x) = 1')]
    assert t.meta["args"]["openat"] == [(3, "/tmp/a = b (c).txt")]


def test_variants_without_pid_or_timestamps_and_time_of_day(tmp_path: Path) -> None:
    no_pid = read_strace(write(tmp_path, "1700000000.5 close(3) = 0\n", "a"))
    assert no_pid.events.pid.tolist() == no_pid.events.tid.tolist() == [0]
    assert no_pid.events.ts.tolist() == [1700000000.5]
    assert no_pid.meta["pid_column"] is False

    nothing = read_strace(
        write(tmp_path, "close(3)                    = 0\nexit_group(0) = ?\n", "b")
    )
    assert names(nothing) == ["close", "exit_group"]
    assert all(math.isnan(x) for x in nothing.events.ts)
    assert nothing.meta["timestamps"] == "none"

    tod = read_strace(write(tmp_path, "10:56:32.439124 close(3) = 0\n12:00:00 close(4) = 0\n", "c"))
    assert tod.events.ts.tolist() == pytest.approx([39392.439124, 43200.0])
    assert tod.meta["timestamps"] == "time-of-day"

    pid_only = read_strace(write(tmp_path, "42  close(3) = 0\n", "d"))
    assert pid_only.events.tid.tolist() == [42]
    assert math.isnan(pid_only.events.ts[0])


def test_decorations_of_other_strace_options_are_tolerated(tmp_path: Path) -> None:
    log = """\
4616  [ 257] [00007f1d74f83011] openat(AT_FDCWD</tmp>, "/etc/hostname", O_RDONLY) = 3</etc/hostname> <0.002559>
4616  [ 231] [00007f16973f8409] exit_group(0) = ?
4616  [ 231] [????????????????] +++ exited with 0 +++
execve("/usr/bin/true", ["true"], 0x7ffc012b3928 /* 35 vars */) = 0
 > /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2(_dl_catch_error+0x26f0) [0x1ab70]
strace: Process 4617 attached
[pid  4617] 1.0 socket(AF_INET, SOCK_STREAM, IPPROTO_TCP) = 5<TCP:[1234]>
[ Process PID=4617 runs in 32 bit mode. ]
[pid  4617] 1.1 syscall_0x5(0x1, 0x2) = -1 ENOSYS (Function not implemented)
4618  ????( <detached ...>
"""
    t = read_strace(write(tmp_path, log))
    assert names(t) == ["openat", "exit_group", "execve", "socket", "open"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [3, RET_UNKNOWN, 0, 5, -38]
    assert t.events.tid.tolist() == [4616, 4616, 0, 4617, 4617]


def test_crlf_line_ends_are_accepted(tmp_path: Path) -> None:
    p = tmp_path / "crlf.log"
    p.write_bytes(
        b'1 1.0 close(3) = 0\r\n1 1.1 read(0,  <unfinished ...>\r\n1 1.2 <... read resumed>"", 1) = 0\r\n'
    )
    t = read_strace(p)
    assert names(t) == ["close", "read"]
    assert t.events.ret is not None
    assert t.events.ret.tolist() == [0, 0]


# --- unknown names ------------------------------------------------------------------------------


def test_unknown_names_get_stable_ids_and_are_listed(tmp_path: Path) -> None:
    log = """\
1 1.0 syscall_0x1c3(0x3, 0x4) = 0
1 1.1 cachestat(3, {off=0, len=0}, 0x7ffc, 0) = 0
1 1.2 frobnicate(1) = 0
1 1.3 frobnicate(2) = 0
1 1.4 wibble() = 0
"""
    t = read_strace(write(tmp_path, log))
    sid = t.events.sid.tolist()
    nr451 = int(canonical_ids([451], "x86_64")[0])
    # strace's spelling of an unnamed number and the newer name agree with a live sensor's id
    assert sid[0] == sid[1] == nr451
    assert sid[2] == sid[3] >= UNKNOWN_NAME_BASE
    assert sid[4] >= UNKNOWN_NAME_BASE
    assert sid[4] != sid[2]
    assert t.meta["unknown_names"] == {
        "syscall_0x1c3": nr451,
        "cachestat": nr451,
        "frobnicate": sid[2],
        "wibble": sid[4],
    }
    again = read_strace(write(tmp_path, "9 frobnicate(0) = 1\n", "again"))
    assert again.events.sid.tolist() == [sid[2]]  # the same name always maps to the same id


# --- threads and processes ----------------------------------------------------------------------


def test_threads_are_grouped_into_their_process(tmp_path: Path) -> None:
    log = """\
10  1.0 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, child_tid=0x7f, parent_tid=0x7f, exit_signal=0, stack=0x7f, stack_size=0x7fff80, tls=0x7f} => {parent_tid=[11]}, 88) = 11
11  1.1 futex(0x1, FUTEX_WAKE_PRIVATE, 1) = 0
12  1.2 set_robust_list(0x7f, 24) = 0
11  1.3 clone(child_stack=0x7f, flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM <unfinished ...>
11  1.4 <... clone resumed>, parent_tid=[12], tls=0x7f, child_tidptr=0x7f) = 12
10  1.5 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x7f) = 20
20  1.6 getpid() = 20
"""
    t = read_strace(write(tmp_path, log))
    assert t.events.tid.tolist() == [10, 11, 12, 11, 10, 20]
    # 12 printed before its creation is known; 12 -> 11 -> 10; the fork child 20 is its own.
    assert t.events.pid.tolist() == [10, 10, 10, 10, 10, 20]


# --- security-relevant arguments ----------------------------------------------------------------


def test_security_relevant_arguments_are_summarised(tmp_path: Path) -> None:
    log = r"""5 1.0 execve("/bin/sh", ["sh", "-i"], 0x7ffd /* 3 vars */) = 0
5 1.1 connect(3, {sa_family=AF_INET, sin_port=htons(4444), sin_addr=inet_addr("127.0.0.1")}, 16) = 0
5 1.2 connect(4, {sa_family=AF_INET6, sin6_port=htons(80), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ECONNREFUSED (Connection refused)
5 1.3 connect(5, {sa_family=AF_UNIX, sun_path="/run/x.sock"}, 110) = 0
5 1.4 bind(6, {sa_family=AF_INET, sin_port=htons(8080), sin_addr=inet_addr("0.0.0.0")}, 16) = 0
5 1.5 accept4(6,  <unfinished ...>
5 1.6 <... accept4 resumed>{sa_family=AF_INET, sin_port=htons(5555), sin_addr=inet_addr("10.0.0.2")}, [16], SOCK_CLOEXEC) = 7
5 1.7 openat(AT_FDCWD, "/etc/passwd", O_RDONLY|O_CLOEXEC) = 8
5 1.8 openat(AT_FDCWD, "/home/u/doc.txt.enc", O_WRONLY|O_CREAT|O_TRUNC, 0644) = 9
5 1.9 rename("/home/u/doc.txt.enc", "/home/u/doc.txt") = 0
5 2.0 unlinkat(AT_FDCWD, "/home/u/\303\251t\303\251.txt", 0) = 0
5 2.1 chmod("/tmp/x", 04755) = 0
5 2.2 mmap(NULL, 4096, PROT_READ|PROT_WRITE|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f00
5 2.3 mmap(NULL, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f10
5 2.4 mprotect(0x7f10, 4096, PROT_READ|PROT_EXEC) = 0
"""
    a = read_strace(write(tmp_path, log)).meta["args"]
    assert a["execve"] == [(0, "/bin/sh")]
    assert a["connect"] == [(1, "127.0.0.1:4444"), (2, "[::1]:80"), (3, "unix:/run/x.sock")]
    assert a["bind"] == [(4, "0.0.0.0:8080")]
    assert a["accept4"] == [(5, "10.0.0.2:5555")]
    assert a["openat"] == [(7, "/home/u/doc.txt.enc")]  # read-only opens are not listed
    assert a["rename"] == [(8, "/home/u/doc.txt.enc -> /home/u/doc.txt")]
    assert a["unlinkat"] == [(9, "/home/u/été.txt")]
    assert a["chmod"] == [(10, "/tmp/x 04755")]
    assert a["mmap"] == [(11, "PROT_READ|PROT_WRITE|PROT_EXEC MAP_PRIVATE|MAP_ANONYMOUS fd=-1")]
    assert a["mprotect"] == [(13, "PROT_READ|PROT_EXEC")]


# --- truncation and garbage ---------------------------------------------------------------------


def test_truncated_last_line_is_tolerated(tmp_path: Path) -> None:
    cut = read_strace(
        write(tmp_path, BASIC[:-1] + '\n4553  1700000000.8 openat(AT_FDCWD, "/e', "a")
    )
    assert len(cut.events) == 6
    assert cut.meta["truncated_last_line"] == 8
    cut_mid_number = read_strace(write(tmp_path, "1 1.0 close(3) = 0\n45", "b"))
    assert names(cut_mid_number) == ["close"]
    # a last line cut at a line boundary by a copy tool, then given a newline
    cut_nl = read_strace(write(tmp_path, '1 1.0 close(3) = 0\n1 1.1 read(3, "ab\n', "c"))
    assert cut_nl.meta["truncated_last_line"] == 2


def test_garbage_line_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "1 1.0 close(3) = 0\nthis is not strace\n1 1.2 close(4) = 0\n")
    with pytest.raises(TraceFormatError, match=r"trace\.log:2: not an strace line") as e:
        read_strace(p)
    assert e.value.line == 2
    assert e.value.path == str(p)


def test_a_cut_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, '1 1.0 close(3) = 0\n1 1.1 openat(AT_FDCWD, "/e\n1 1.2 close(4) = 0\n')
    with pytest.raises(TraceFormatError, match=":2:"):
        read_strace(p)


def test_binary_content_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "bin"
    p.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\n\xff\xfe\x00\x00garbage\n")
    with pytest.raises(TraceFormatError, match=r"bin:1: not strace output: binary content"):
        read_strace(p)


def test_empty_or_eventless_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="no system calls"):
        read_strace(write(tmp_path, "", "empty"))
    with pytest.raises(TraceFormatError, match="no system calls"):
        read_strace(write(tmp_path, "1 1.0 +++ exited with 0 +++\n", "exits"))


def test_missing_file_and_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="cannot read"):
        read_strace(tmp_path / "nope")
    with pytest.raises(TraceFormatError, match="is a folder"):
        read_strace(tmp_path)


def test_a_folder_is_every_file_in_it_sorted(tmp_path: Path) -> None:
    write(tmp_path, "1 1.0 close(3) = 0\n", "b.log")
    write(tmp_path, '1 1.0 read(0, "", 1) = 0\n', "a.log")
    write(tmp_path, "garbage\n", ".hidden")
    traces = list(iter_strace(tmp_path))
    assert [Path(t.name).name for t in traces] == ["a.log", "b.log"]
    via_registry = list(read_traces("strace", [tmp_path / "b.log"]))
    assert names(via_registry[0]) == ["close"]


def test_parsing_time_is_linear_even_for_hostile_lines() -> None:
    """A coarse guard against backtracking blow-ups: huge lines full of ``) = `` and quotes."""
    import time

    hostile = '1 1.0 write(1, "' + ') = 1 \\" (' * 20000 + '", 9) = 9\n'
    lines = BASIC.splitlines(keepends=True)[:6] * 5000 + [hostile] * 20
    t0 = time.perf_counter()
    t = parse_strace(lines, "bench")
    assert len(t.events) == 30020
    assert time.perf_counter() - t0 < 5.0


# --- real logs ----------------------------------------------------------------------------------


def record(tmp_path: Path, *cmd: str) -> Path:
    strace = require_tool("strace")
    out = tmp_path / "real.log"
    r = subprocess.run(
        [strace, "-f", "-ttt", "-o", str(out), *cmd], capture_output=True, text=True, timeout=60
    )
    require(r.returncode == 0 or out.exists(), f"strace able to trace ({r.stderr.strip()[:200]})")
    require("Operation not permitted" not in r.stderr, "ptrace permission for strace")
    return out


def test_real_shell_log(tmp_path: Path) -> None:
    log = record(tmp_path, "sh", "-c", "ls / >/dev/null; cat /etc/hostname; (sleep 0.1 &) ; wait")
    t = read_strace(log)
    n = names(t)
    assert len(t.events) > 100
    assert n[0] == "execve"
    assert "exit_group" in n
    assert "openat" in n
    programs = [text for _, text in t.meta["args"]["execve"]]
    assert any(p.endswith("/ls") for p in programs)
    assert any(p.endswith("/cat") for p in programs)
    assert any(p.endswith("/sleep") for p in programs)
    assert len(set(t.events.pid.tolist())) >= 4  # sh, ls, cat, subshell, sleep
    assert "truncated_last_line" not in t.meta
    assert np.all(np.diff(t.events.ts) >= -1e-3)  # start times in log order
    assert t.meta["exits"]
    assert t.meta["signals"]


def test_real_threaded_python_log(tmp_path: Path) -> None:
    code = (
        "import threading\n"
        "def work():\n    open('/etc/hostname').read()\n"
        "ts = [threading.Thread(target=work) for _ in range(3)]\n"
        "[t.start() for t in ts]\n[t.join() for t in ts]\n"
    )
    t = read_strace(record(tmp_path, sys.executable, "-c", code))
    tids = set(t.events.tid.tolist())
    assert len(tids) >= 4
    leader = int(t.events.tid[0])
    assert set(t.events.pid.tolist()) == {leader}  # every thread belongs to the one process
    hostname_reads = [i for i, s in enumerate(t.events.sid) if s == id_of("openat")]
    assert len({int(t.events.tid[i]) for i in hostname_reads}) >= 2


# --- property-based -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=120), max_size=12))
def test_arbitrary_text_raises_only_trace_format_errors(lines: list[str]) -> None:
    with contextlib.suppress(TraceFormatError):
        parse_strace([ln + "\n" for ln in lines], "fuzz")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_in_a_file_raise_only_trace_format_errors(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "f"
    p.write_bytes(data)
    error: TraceFormatError | None = None
    try:
        read_strace(p)
    except TraceFormatError as e:
        error = e
    assert error is None or error.path == str(p)


_ARG_TEXT = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40
).filter(lambda s: not s.rstrip().endswith("...>"))
_NAMES = st.sampled_from(["read", "openat", "close", "mmap", "futex", "execve", "wait4", "clone3"])
_ERRNOS = {"ENOENT": 2, "EAGAIN": 11, "EINTR": 4, "ERESTARTSYS": 512}


@st.composite
def _call(draw: st.DrawFn) -> tuple[int, int, str, str, str, int, bool]:
    tid = draw(st.integers(1, 4_000_000))
    usec = draw(st.integers(0, 10**15))
    name = draw(_NAMES)
    args = draw(_ARG_TEXT)
    kind = draw(st.sampled_from(["dec", "hex", "err", "unknown"]))
    if kind == "dec":
        v = draw(st.integers(-(2**63), 2**63 - 1))
        rendered, want = str(v), v
    elif kind == "hex":
        v = draw(st.integers(0, 2**63 - 1))
        rendered, want = hex(v), v
    elif kind == "err":
        e = draw(st.sampled_from(sorted(_ERRNOS)))
        rendered, want = f"-1 {e} (Some text)", -_ERRNOS[e]
    else:
        rendered, want = "?", RET_UNKNOWN
    split = draw(st.booleans())
    return tid, usec, name, args, rendered, want, split


@settings(max_examples=200, deadline=None)
@given(st.lists(_call(), min_size=1, max_size=15))
def test_generated_lines_round_trip(calls: list[tuple[int, int, str, str, str, int, bool]]) -> None:
    lines: list[str] = []
    for tid, usec, name, args, rendered, _, split in calls:
        ts = f"{usec // 10**6}.{usec % 10**6:06d}"
        if split:  # unfinished then resumed, as strace -f prints a call another thread interrupts
            lines.append(f"{tid} {ts} {name}({args} <unfinished ...>\n")
            lines.append(f"{tid} {ts} <... {name} resumed>) = {rendered}\n")
        else:
            lines.append(f"{tid} {ts} {name}({args}) = {rendered}\n")
    t = parse_strace(lines, "gen")
    assert t.events.ret is not None
    assert names(t) == [c[2] for c in calls]
    assert t.events.tid.tolist() == [c[0] for c in calls]
    assert t.events.ret.tolist() == [c[5] for c in calls]
    want_ts = [float(f"{c[1] // 10**6}.{c[1] % 10**6:06d}") for c in calls]
    assert t.events.ts.tolist() == want_ts


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(BASIC.splitlines(keepends=True)), min_size=1, max_size=6),
    st.data(),
)
def test_mutated_real_lines_raise_only_trace_format_errors(
    lines: list[str], data: st.DataObject
) -> None:
    text = "".join(lines)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 8)))
        text = text[:i] + data.draw(st.text(max_size=6)) + text[j:]
    with contextlib.suppress(TraceFormatError):
        parse_strace(text.splitlines(keepends=True), "mutated")
