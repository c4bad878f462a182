"""A seccomp filter for sandboxed commands: syscalls a shell, a compiler or a test runner never
needs, refused with EPERM before they reach the kernel.

The namespaces, the unprivileged identity and the dropped capabilities already stop these calls
from doing harm; the filter is a second wall against kernel bugs reachable without privileges
(keyrings, io_uring, eBPF, userfaultfd, new namespaces, the mount API). It is a classic BPF
program, written out here so that no libseccomp is needed; bubblewrap loads it with `--seccomp FD`.
See docs/sandbox.md, "Isolation".
"""

from __future__ import annotations

import errno
import platform
import struct

# Syscalls refused everywhere. Names, not numbers: the numbers differ per architecture.
DENIED = (
    # mounts and the new mount API: a sandbox's filesystem is fixed before the command starts
    "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr",
    # namespaces: the sandbox already has its own; new ones are kernel attack surface
    "unshare", "setns",
    # kernel modules, kexec, reboot, swap, clocks, host names, accounting, quotas
    "init_module", "finit_module", "delete_module", "create_module", "query_module",
    "get_kernel_syms", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "acct", "quotactl", "iopl", "ioperm",
    # reachable without privileges, never needed by shell work, frequent sources of kernel bugs
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at",
    "name_to_handle_at", "fanotify_init", "lookup_dcookie", "syslog", "vhangup", "uselib", "ustat",
    "sysfs", "_sysctl", "nfsservctl",
)

# Syscall numbers from the kernel's uapi headers (asm/unistd_64.h; asm-generic/unistd.h for arm64).
SYSCALLS = {
    "x86_64": {
        "mount": 165, "umount2": 166, "pivot_root": 155, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 272, "setns": 308, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "create_module": 174, "query_module": 178, "get_kernel_syms": 177, "kexec_load": 246,
        "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168, "settimeofday": 164,
        "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170,
        "setdomainname": 171, "acct": 163, "quotactl": 179, "iopl": 172, "ioperm": 173, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248,
        "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "fanotify_init": 300,
        "lookup_dcookie": 212, "syslog": 103, "vhangup": 153, "uselib": 134, "ustat": 136,
        "sysfs": 139, "_sysctl": 156, "nfsservctl": 180, "clone": 56, "clone3": 435,
    },
    "aarch64": {
        "mount": 40, "umount2": 39, "pivot_root": 41, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 97, "setns": 268, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "kexec_load": 104, "kexec_file_load": 294, "reboot": 142, "swapon": 224, "swapoff": 225,
        "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
        "sethostname": 161, "setdomainname": 162, "acct": 89, "quotactl": 60, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217,
        "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "fanotify_init": 262,
        "lookup_dcookie": 18, "syslog": 116, "vhangup": 58, "nfsservctl": 42, "clone": 220,
        "clone3": 435,
    },
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# clone() flags that make a namespace (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET);
# the low byte of clone's flags is the exit signal, so CLONE_NEWTIME cannot be matched there
CLONE_NAMESPACE_FLAGS = 0x7E020000
X32_SYSCALL_BIT = 0x40000000

_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (little-endian low word of args[0])


def supported() -> bool:
    """Whether a filter exists for this machine's architecture."""
    return platform.machine() in SYSCALLS


def program(machine: str | None = None) -> bytes:
    """The BPF program (an array of struct sock_filter) for `machine` (default: this one).

    Calls from another ABI (i386 on x86_64, arm32 on arm64, x32) get ENOSYS: the deny list is
    written in native numbers, so a foreign ABI would slip past it. `clone3` gets ENOSYS too, so
    that libc falls back to `clone`, whose flags a classic filter can inspect.
    """
    machine = machine or platform.machine()
    numbers = SYSCALLS[machine]
    denied = sorted({numbers[name] for name in DENIED if name in numbers})
    # the tail every jump lands on: [allow, EPERM, ENOSYS, clone check (3 instructions)]
    body = [(_LD_ABS, 0, 0, _ARCH), ("arch", AUDIT_ARCH[machine]), (_LD_ABS, 0, 0, _NR)]
    if machine == "x86_64":
        body.append(("ge", X32_SYSCALL_BIT))
    body += [("enosys", numbers["clone3"]), ("clone", numbers["clone"])]
    body += [("eperm", nr) for nr in denied]
    n = len(body)
    eperm, enosys, clone = n + 1, n + 2, n + 3  # the allow return is at n
    code = []
    for i, item in enumerate(body):
        if isinstance(item[0], int):
            code.append(item)
            continue
        kind, k = item
        if kind == "arch":  # a foreign ABI: ENOSYS
            code.append((_JEQ, 0, enosys - i - 1, k))
        elif kind == "ge":
            code.append((_JGE, enosys - i - 1, 0, k))
        else:
            target = {"enosys": enosys, "clone": clone, "eperm": eperm}[kind]
            code.append((_JEQ, target - i - 1, 0, k))
    code += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO | errno.EPERM), (_RET, 0, 0, _ERRNO | errno.ENOSYS),
             (_LD_ABS, 0, 0, _ARG0), (_JSET, 0, 1, CLONE_NAMESPACE_FLAGS),
             (_RET, 0, 0, _ERRNO | errno.EPERM), (_RET, 0, 0, _ALLOW)]
    if any(not 0 <= jt <= 255 or not 0 <= jf <= 255 for _, jt, jf, _ in code):
        raise RuntimeError("seccomp program too long for 8-bit jumps")
    return b"".join(struct.pack("<HBBI", *ins) for ins in code)
