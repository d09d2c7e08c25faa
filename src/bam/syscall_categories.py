"""Coarse semantic categories of system calls (file I/O, network, IPC, process, memory, ...).

Why: which *individual* calls a program makes varies between builds, libc versions and
architectures (``mmap`` vs ``mmap2``, ``socket`` vs ``socketcall``, ``fstat`` vs ``fstat64``),
while the *kind* of work it does in what order is far more stable. A language model over eleven
categories can afford a much longer context (16 calls in a 64-bit key instead of 8) and, on
ADFA-LD's official protocol, separates attacks better than one over individual calls (see
:mod:`bam.models.category_lm`).

The map is by syscall **name**, so ADFA-LD's i386 traces, strace logs and live x86_64 sensors
share it. It is written out explicitly, one name per line of its category, rather than derived
from prefix rules: a category assignment changes what every category model means, so it must
only change on purpose. Every name of BAM's x86_64 and i386 tables is listed (a test checks);
anything else (a call from a newer kernel, an unnamed number) is ``other``.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import numpy.typing as npt

from bam.syscalls import ARCHES, UNKNOWN_BASE, canonical_names, id_of

OTHER = "other"

_MEMBERS: dict[str, str] = {
    "net": """
        accept accept4 bind connect getpeername getsockname getsockopt listen recvfrom recvmmsg
        recvmmsg_time64 recvmsg sendfile sendfile64 sendmmsg sendmsg sendto setsockopt shutdown
        socket socketcall socketpair
    """,
    # Waiting for and exchanging with other tasks: pipes, SysV/POSIX IPC, futexes, event
    # multiplexing and notification descriptors.
    "ipc": """
        _newselect epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2
        epoll_wait epoll_wait_old eventfd eventfd2 fanotify_init fanotify_mark futex futex_time64
        futex_waitv get_robust_list inotify_add_watch inotify_init inotify_init1
        inotify_rm_watch ipc mq_getsetattr mq_notify mq_open mq_timedreceive
        mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink msgctl msgget msgrcv
        msgsnd pipe pipe2 poll ppoll ppoll_time64 pselect6 pselect6_time64 select semctl semget
        semop semtimedop semtimedop_time64 set_robust_list shmat shmctl shmdt shmget signalfd
        signalfd4 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
        timerfd_settime64
    """,
    "signal": """
        alarm kill pause pidfd_send_signal restart_syscall rt_sigaction rt_sigpending
        rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
        rt_sigtimedwait_time64 rt_tgsigqueueinfo sgetmask sigaction sigaltstack signal
        sigpending sigprocmask sigreturn sigsuspend ssetmask tgkill tkill
    """,
    # Creating, replacing, inspecting and confining tasks; kernel modules; scheduling; limits.
    "process": """
        acct arch_prctl capget capset chroot clone clone3 create_module delete_module execve
        execveat exit exit_group finit_module fork get_kernel_syms get_thread_area getcpu
        getpgid getpgrp getpriority getrlimit getrusage getsid idle init_module ioperm iopl
        ioprio_get ioprio_set kcmp kexec_file_load kexec_load landlock_add_rule
        landlock_create_ruleset landlock_restrict_self modify_ldt nice personality pidfd_getfd
        pidfd_open prctl prlimit64 process_madvise process_mrelease process_vm_readv
        process_vm_writev ptrace query_module reboot rseq sched_get_priority_max
        sched_get_priority_min sched_getaffinity sched_getattr sched_getparam sched_getscheduler
        sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity sched_setattr
        sched_setparam sched_setscheduler sched_yield seccomp set_thread_area set_tid_address
        setns setpgid setpriority setrlimit setsid ugetrlimit ulimit unshare uselib vfork vhangup
        vm86 vm86old wait4 waitid waitpid
    """,
    # Credentials and task identity.
    "ident": """
        getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getpid getppid
        getresgid getresgid32 getresuid getresuid32 gettid getuid getuid32 setfsgid setfsgid32
        setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setregid setregid32 setresgid
        setresgid32 setresuid setresuid32 setreuid setreuid32 setuid setuid32
    """,
    "memory": """
        brk get_mempolicy madvise mbind membarrier memfd_create memfd_secret migrate_pages mincore
        mlock mlock2 mlockall mmap mmap2 move_pages mprotect mremap msync munlock munlockall
        munmap pkey_alloc pkey_free pkey_mprotect remap_file_pages set_mempolicy
        set_mempolicy_home_node swapoff swapon userfaultfd
    """,
    "time": """
        adjtimex clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
        clock_gettime64 clock_nanosleep clock_nanosleep_time64 clock_settime clock_settime64 ftime
        getitimer gettimeofday nanosleep setitimer settimeofday stime time timer_create
        timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
        times
    """,
    # Looking at the file system without changing it.
    "fs_meta": """
        access chdir faccessat faccessat2 fchdir fgetxattr flistxattr fremovexattr fsetxattr fstat
        fstat64 fstatat64 fstatfs fstatfs64 getcwd getdents getdents64 getxattr lgetxattr
        listxattr llistxattr lookup_dcookie lremovexattr lsetxattr lstat lstat64
        name_to_handle_at newfstatat oldfstat oldlstat oldolduname oldstat olduname readlink
        readlinkat removexattr setxattr stat stat64 statfs statfs64 statx sysfs sysinfo uname
        ustat
    """,
    # Changing the file system's names, modes, owners, sizes, mounts and durability.
    "fs_mod": """
        bdflush chmod chown chown32 creat fallocate fchmod fchmodat fchown fchown32 fchownat
        fdatasync fsconfig fsmount fsopen fspick fsync ftruncate ftruncate64 futimesat lchown
        lchown32 link linkat mkdir mkdirat mknod mknodat mount mount_setattr move_mount
        nfsservctl pivot_root quotactl quotactl_fd rename renameat renameat2 rmdir symlink
        symlinkat sync sync_file_range syncfs truncate truncate64 umask umount umount2 unlink
        unlinkat utime utimensat utimensat_time64 utimes
    """,
    # Opening, reading, writing and controlling descriptors (files, ttys, devices, AIO).
    "fs_io": """
        _llseek close close_range copy_file_range dup dup2 dup3 fadvise64 fadvise64_64 fcntl
        fcntl64 flock io_cancel io_destroy io_getevents io_pgetevents io_pgetevents_time64
        io_setup io_submit io_uring_enter io_uring_register io_uring_setup ioctl lseek open
        open_by_handle_at open_tree openat openat2 pread64 preadv preadv2 pwrite64 pwritev
        pwritev2 read readahead readdir readv splice tee vmsplice write writev
    """,
    # Kernel keyrings, tracing/BPF, host administration and calls no kernel implements any more.
    OTHER: """
        _sysctl add_key afs_syscall bpf break getpmsg getrandom gtty keyctl lock mpx
        perf_event_open prof profil putpmsg request_key security setdomainname sethostname stty
        syslog tuxcall vserver
    """,
}

CATEGORIES: tuple[str, ...] = tuple(_MEMBERS)
"""Category names; a category's id is its index here (``other`` is last)."""

OTHER_ID = CATEGORIES.index(OTHER)


@cache
def category_map() -> dict[str, str]:
    """Syscall name -> category name, for every name the map lists."""
    out: dict[str, str] = {}
    for cat, names in _MEMBERS.items():
        for name in names.split():
            if name in out:
                raise AssertionError(f"{name} is listed in both {out[name]} and {cat}")
            out[name] = cat
    return out


def category_of(name: str) -> str:
    """Category of a syscall name (``other`` for names the map does not list)."""
    return category_map().get(name, OTHER)


def members() -> dict[str, list[str]]:
    """Category -> sorted syscall names: the map in the form a model persists."""
    return {cat: sorted(names.split()) for cat, names in _MEMBERS.items()}


LUT_SIZE = UNKNOWN_BASE + len(ARCHES) * 1024
"""Canonical ids below this have a LUT entry (named calls and unnamed numbers of each arch)."""


def lut_from_members(saved: dict[str, list[str]]) -> npt.NDArray[np.int32]:
    """Canonical id -> category id, for a map in :func:`members` form (e.g. a saved model's).

    Names this BAM's tables do not know are skipped (they cannot occur in its traces); every id
    not listed, including unnamed numbers, maps to ``other``.
    """
    lut = np.full(LUT_SIZE, OTHER_ID, dtype=np.int32)
    known = set(canonical_names())
    for cat, names in saved.items():
        if cat not in CATEGORIES:
            raise ValueError(f"unknown syscall category {cat!r}")
        cid = CATEGORIES.index(cat)
        for name in names:
            if name in known:
                lut[id_of(name)] = cid
    return lut


@cache
def category_lut() -> npt.NDArray[np.int32]:
    """Canonical id -> category id under this BAM's map."""
    lut = lut_from_members(members())
    lut.setflags(write=False)
    return lut


def to_categories(ids: npt.ArrayLike) -> npt.NDArray[np.int32]:
    """Category ids of canonical syscall ids (vectorised; out-of-range ids are ``other``)."""
    a = np.asarray(ids, dtype=np.int64)
    lut = category_lut()
    out: npt.NDArray[np.int32] = lut[np.clip(a, 0, LUT_SIZE - 1)]
    out[(a < 0) | (a >= LUT_SIZE)] = OTHER_ID
    return out
