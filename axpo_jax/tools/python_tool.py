"""The `python` tool: model-written code in a sandboxed, stateful Jupyter kernel, one kernel per trajectory.

Model-written code is untrusted, so it never runs in the trainer's process. Each session gets an ipykernel
process (driven with jupyter_client's `BlockingKernelClient` over ZMQ *ipc* sockets, no TCP) that a small
launcher (`_LAUNCHER`, run as `python -I -S -c`) confines before exec'ing the kernel. Everything is enforced by
the OS, not by trusting the code:

- its own process in a new session / process group (`start_new_session`), so the whole group can be killed;
- resource limits (`setrlimit`): CPU seconds, address space, processes/threads, file size, open files, no cores;
- a cgroup of its own where the trainer can create one (v2, or v1 memory/pids hierarchies), joined before the
  launcher forks: the memory limit (swap included) and the process limit then bound the kernel and everything it
  starts together; elsewhere only the per-process rlimits bound memory (a few children could each use it all);
- an unprivileged uid of its own (when the trainer is root: one uid per kernel slot, no passwd entry needed),
  `setgroups([])`, and `PR_SET_NO_NEW_PRIVS` (setuid binaries cannot raise it back);
- a new network namespace: no interface but a down loopback, so no TCP/UDP/DNS at all, not even to the host;
- a new IPC namespace: SysV shared memory / semaphores / message queues are private and die with the kernel;
- a new PID namespace: the kernel is pid 1 of its own namespace with a private /proc, so it cannot see or signal
  the trainer or other kernels, and when it dies every process it started dies with it;
- a new mount namespace: every mount is remounted read-only except the kernel's scratch dir and its socket dir;
  /tmp, /var/tmp, /dev/shm, /run, home directories and the trainer's working and script folders (its code, data
  and checkpoints) are covered by empty tmpfs (so host unix sockets, temp files and the trainer's files are
  unreachable), with only the Python installation re-exposed read-only;
- a seccomp filter: no new namespaces (user namespaces above all), mount, ptrace, bpf, perf, keyrings, modules;
- a minimal environment (nothing of the trainer's environment), cwd/HOME/TMPDIR = the scratch dir (mode 700);
- a wall timeout per call: interrupt (SIGINT), then kill the kernel (and all it started) and start a new one;
- processes the code leaves behind (e.g. forks) are killed after each call.

A trainer that is not root gets the namespaces through a user namespace (its own uid mapped to itself): no
other uid then, but the same network/PID/mount isolation. Where some of this is not available at all (no
namespaces), `PythonTool` probes at construction, logs a warning, and enforces the strongest subset;
`PythonTool.isolation` says exactly what is enforced (and `require=` makes a missing feature an error).
"""

from __future__ import annotations

import atexit
import base64
import collections
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

from PIL import Image

from axpo_jax.data.images import to_rgb
from axpo_jax.tools import schemas
from axpo_jax.tools.base import OK, OUTPUT_TOO_LARGE, TIMEOUT, TOOL_ERROR, BAD_ARGUMENTS, Observation, ToolContext
from axpo_jax.tools.base import ToolFailure

log = logging.getLogger(__name__)

# Directories covered by an empty tmpfs inside the sandbox (when a mount namespace is available): temp dirs and
# sockets of other programs (/run: dbus, databases...), and home directories. Paths the kernel needs (its scratch
# dir, the Python installation) are re-exposed on top, at the same paths.
DEFAULT_HIDDEN_PATHS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/var/run", "/root", "/home")
# Never hidden as the trainer's folder: the system's own (hiding an ancestor of one would hide it too)
_SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/var", "/proc", "/sys", "/dev")


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def trainer_dirs() -> tuple[str, ...]:
    """The trainer's working folder and its entry script's: where its code, data and checkpoints usually lie, as
    files any uid may read (the kernel's own uid alone does not keep it out of them)."""
    found = set()
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    for d in (os.getcwd(), os.path.dirname(os.path.abspath(script)) if script else ""):
        d = os.path.realpath(d) if d else ""
        if d and d != "/" and not any(_under(d, s) or _under(s, d) for s in _SYSTEM_DIRS):
            found.add(d)
    return tuple(sorted(found))

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

# The launcher runs as `python -I -S -c _LAUNCHER <json>` (stdlib only, no site). As root (or inside a new user
# namespace) it enters new namespaces, forks the kernel as pid 1 of a new PID namespace, makes the filesystem
# read-only but for the scratch dir, sets rlimits, drops to the kernel's uid and execs the kernel. The parent stays
# as a tiny reaper that exits with the kernel (and kills it if the trainer goes away). In probe mode it tolerates
# failures, reports what worked as one JSON line on stdout, and execs a trivial python instead of the kernel.
_LAUNCHER = r'''
import ctypes, json, os, re, resource, select, signal, sys
cfg = json.loads(sys.argv[1])
probe = cfg["probe"]
want = cfg["want"]
got = {}
errors = {}
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
CLONE_NEWIPC = 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


def fatal(what, err):
    sys.stderr.write("sandbox launcher: cannot enforce %s: %s\n" % (what, err))
    sys.stderr.flush()
    os._exit(121)


def step(name, fn, *args):
    if not want.get(name):
        return False
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        if not probe:
            fatal(name, e)
        got[name] = False
        errors[name] = "%s: %s" % (type(e).__name__, e)
        return False
    got[name] = True
    return True


def check(r):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def unshare(flags):
    check(libc.unshare(flags))


def mount(src, tgt, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)))


def join_cgroup():
    # Before any fork: every process of the sandbox inherits the cgroup, so its limits bound them all together.
    for p in cfg["cgroup_procs"]:
        with open(p, "w") as f:
            f.write(str(os.getpid()))


def userns():
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write("%d %d 1" % (uid, uid))
    with open("/proc/self/gid_map", "w") as f:
        f.write("%d %d 1" % (gid, gid))


def under(p, d):
    return p == d or p.startswith(d.rstrip("/") + "/")


def unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


OPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
             "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def mounts():
    """The mounts a path lookup can reach: [(mountpoint, options)], stacked-over and orphaned ones left out."""
    rows = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            rows[int(parts[0])] = (int(parts[1]), unescape(parts[4]), parts[5].split(","))
    covered = {parent for mid, (parent, mp, _) in rows.items() if parent in rows and rows[parent][1] == mp}

    def reachable(mid):
        # Not stacked over, and no ancestor stacked over by something else than this chain's own stack.
        if mid in covered:
            return False
        child, parent = mid, rows[mid][0]
        while parent in rows and parent != child:
            if parent in covered and rows[parent][1] != rows[child][1]:
                return False
            child, parent = parent, rows[parent][0]
        return True

    return [(mp, opts) for mid, (parent, mp, opts) in rows.items() if reachable(mid)]


def filesystem(pidns):
    scratch = cfg.get("scratch")
    rw = [os.path.realpath(p) for p in cfg["rw_paths"]] + ([os.path.realpath(scratch["path"])] if scratch else [])
    keep = sorted({os.path.realpath(p) for p in cfg["rw_paths"] + cfg["ro_paths"] if os.path.exists(p)}, key=len)
    seeds = []
    for src, rel in (scratch or {}).get("seed", []):  # read now: they may lie under a dir about to be hidden
        with open(src, "rb") as f:
            seeds.append((rel, os.path.basename(src), f.read()))
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing below propagates back to the host
    fds = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in keep}
    shadowed = []
    if pidns:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        shadowed.append("/proc")
    hidden = []
    for h in cfg["hidden_paths"]:
        if os.path.islink(h) or not os.path.isdir(h) or any(under(h, x) for x in hidden):
            continue
        mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        hidden.append(h)
        shadowed.append(h)
    os.umask(0o022)
    for p in keep:
        if any(under(p, h) for h in hidden):
            os.makedirs(p, exist_ok=True)
        elif p not in rw:
            continue
        mount("/proc/self/fd/%d" % fds[p], p, None, MS_BIND | MS_REC, None)
    for fd in fds.values():
        os.close(fd)
    if scratch:
        # The scratch dir is a size-capped tmpfs owned by the kernel's uid: the code cannot fill the host's disk.
        p, uid = os.path.realpath(scratch["path"]), scratch["uid"]
        os.makedirs(p, exist_ok=True)
        mount("tmpfs", p, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "size=%d,mode=700,uid=%d,gid=%d" % (scratch["bytes"], uid, uid))
        for rel, name, data in seeds:
            d = p
            for part in rel.split("/"):
                d = os.path.join(d, part)
                os.makedirs(d, exist_ok=True)
                os.chown(d, uid, uid)
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
            os.chown(os.path.join(d, name), uid, uid)
    failed, gone = [], set()
    for mp, opts in mounts():
        if mp in rw or "ro" in opts:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in opts:
            flags |= OPT_FLAGS.get(o, 0)
        try:
            mount(None, mp, None, flags, None)
        except OSError as e:
            if any(under(mp, s) and mp != s for s in shadowed):
                gone.add(mp)  # mounted below a dir we covered: no path reaches it any more
            else:
                failed.append((mp, str(e)))
    # Verify: every mount the kernel can reach is read-only but its own dirs.
    writable = [mp for mp, opts in mounts() if mp not in rw and mp not in gone and "ro" not in opts]
    if "/" in writable or (set(writable) - set(cfg.get("allow_writable", [])) and not probe):
        raise OSError("mounts still writable: %s (%s)" % (writable, failed))
    got["hidden_paths"] = hidden
    if writable:
        got["writable_mounts"] = writable


def rlimits():
    names = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
             "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE}
    for k, v in cfg["rlimits"].items():
        soft, hard = v
        resource.setrlimit(names[k], (soft, hard))


def drop_uid():
    uid, gid = cfg["uid"], cfg["gid"]
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("uid did not change")


def no_new_privs():
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


# seccomp: syscalls a notebook never needs and that widen the attack surface on the host kernel: new namespaces
# (user namespaces above all), mounts, module/kexec/bpf/perf/keyring/ptrace. They fail with EPERM; clone3 fails
# with ENOSYS (its flags cannot be inspected), so libc falls back to clone, whose flags are checked.
SYSCALLS = {  # name: (x86_64, aarch64)
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "acct": (163, 89), "quotactl": (179, 60),
    "syslog": (103, 116), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
}
CLONE, CLONE3 = (56, 220), (435, 435)
CLONE_NS_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME


def seccomp():
    arch = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}.get(os.uname().machine)
    if arch is None:
        raise OSError("no seccomp syscall table for %s" % os.uname().machine)
    i, audit_arch = arch
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050000, 0x80000000
    EPERM, ENOSYS = 1, 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if i == 0:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | EPERM)]  # the x32 ABI: another syscall table
    for nrs in SYSCALLS.values():
        prog += [(JEQ, 0, 1, nrs[i]), (RET, 0, 0, ERRNO | EPERM)]
    prog += [(JEQ, 0, 1, CLONE3[i]), (RET, 0, 0, ERRNO | ENOSYS)]
    prog += [(JEQ, 0, 3, CLONE[i]), (LD, 0, 0, 16), (JSET, 0, 1, CLONE_NS_FLAGS), (RET, 0, 0, ERRNO | EPERM),
             (RET, 0, 0, ALLOW)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
    fprog = Prog(len(prog), filters)
    check(libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


step("cgroup", join_cgroup)
if want.get("user_namespace"):
    step("user_namespace", userns)
step("net_namespace", unshare, CLONE_NEWNET)
step("ipc_namespace", unshare, CLONE_NEWIPC)
mntns = step("mount_namespace", unshare, CLONE_NEWNS)
pidns = step("pid_namespace", unshare, CLONE_NEWPID)

child = os.fork() if pidns else 0
if child:
    # The reaper, outside the kernel's PID namespace (still root, but it only waits).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kill = lambda *a: os.kill(child, signal.SIGKILL)
    signal.signal(signal.SIGTERM, kill)
    signal.signal(signal.SIGHUP, kill)
    ppid = os.getppid()
    pfd = os.pidfd_open(child)
    while not select.select([pfd], [], [], 1.0)[0]:
        if os.getppid() != ppid:  # the trainer is gone: take the kernel with us
            kill()
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

if mntns and want.get("readonly_fs"):
    step("readonly_fs", filesystem, pidns)
step("rlimits", rlimits)
if want.get("uid"):
    step("uid", drop_uid)
step("no_new_privs", no_new_privs)
if pidns:  # after the uid change (a credential change clears it): die with the reaper
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
if got.get("no_new_privs"):
    step("seccomp", seccomp)
os.chdir(cfg["cwd"])
os.umask(0o077)
if probe:
    got["errors"] = errors
    sys.stdout.write(json.dumps(got) + "\n")
    sys.stdout.flush()
os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
'''


_REAP = (
    "import os as __axpo_os\n"
    "try:\n"
    "    while __axpo_os.waitpid(-1, __axpo_os.WNOHANG)[0] > 0:\n"
    "        pass\n"
    "except ChildProcessError:\n"
    "    pass\n"
    "del __axpo_os\n"
)


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = {"SIGKILL": "killed: CPU-time limit, memory, or stopped", "SIGXCPU": "CPU-time limit reached",
                "SIGSEGV": "segmentation fault", "SIGXFSZ": "file size limit reached"}.get(name)
        return f"{name}: {hint}" if hint else name
    return f"exit code {code}"


def _proc_info(pid: int) -> tuple[int, int, bool] | None:
    """(real uid, parent pid, is a zombie) of a process, from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            uid = ppid = zombie = None
            for line in f:
                if line.startswith("State:"):
                    zombie = line.split()[1] == "Z"
                elif line.startswith("PPid:"):
                    ppid = int(line.split()[1])
                elif line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    return uid, ppid, bool(zombie)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


CGROUP_ROOT = "/sys/fs/cgroup"


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _cgroup_parents(root: str = CGROUP_ROOT) -> tuple[int, dict[str, str]]:
    """(cgroup version, {controller: dir to create kernel cgroups in}) where this process may create cgroups with
    a memory controller; raises OSError (with why) elsewhere."""
    controllers = os.path.join(root, "cgroup.controllers")
    if os.path.isfile(controllers):
        with open(controllers) as f:
            available = f.read().split()
        if "memory" not in available:
            raise OSError(f"no memory controller in {controllers}")
        subtree = os.path.join(root, "cgroup.subtree_control")
        with open(subtree) as f:
            enabled = f.read().split()
        for c in ("memory", "pids"):
            if c in available and c not in enabled:
                _write(subtree, f"+{c}")  # children get a controller only once their parent delegates it
        if not os.access(root, os.W_OK):
            raise OSError(f"{root} is not writable")
        return 2, {"memory": root, **({"pids": root} if "pids" in available else {})}
    memory, pids = os.path.join(root, "memory"), os.path.join(root, "pids")
    if not os.path.isfile(os.path.join(memory, "memory.limit_in_bytes")):
        raise OSError(f"no cgroup v2 or v1 memory controller under {root}")
    if not os.access(memory, os.W_OK):
        raise OSError(f"{memory} is not writable")
    parents = {"memory": memory}
    if os.path.isfile(os.path.join(pids, "cgroup.procs")) and os.access(pids, os.W_OK):
        parents["pids"] = pids
    return 1, parents


# `_new_cgroup`'s names: the creating trainer's PID namespace and pid first. The cgroup hierarchy can be shared by
# trainers in other PID namespaces (containers), whose pids mean nothing here: only our namespace's are judged.
_KERNEL_CGROUP = re.compile(r"axpo-(\d+)-(\d+)-")


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphan_cgroups(parents: dict[str, str]) -> list[str]:
    """Deletes the empty kernel cgroups of trainers of this PID namespace that are gone (one killed before its
    `close()` leaves them behind), returning their paths. Only empty ones: rmdir refuses a cgroup that still holds
    a process, so nothing is killed here."""
    removed, namespace = [], _pid_namespace()
    for parent in sorted(set(parents.values())):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            m = _KERNEL_CGROUP.match(name)
            if not m or int(m.group(1)) != namespace:
                continue
            pid = int(m.group(2))
            if pid == os.getpid() or _pid_alive(pid):
                continue
            try:
                os.rmdir(os.path.join(parent, name))
                removed.append(os.path.join(parent, name))
            except OSError:  # not empty, or not ours to remove
                pass
    return removed


class _Cgroup:
    """A kernel's own cgroup (one per controller hierarchy on v1): memory (swap included) and pids bounded for the
    kernel and everything it starts together, where rlimits bound each process alone."""

    def __init__(self, version: int, parents: dict[str, str], name: str, memory_bytes: int, pids: int):
        self.version = version
        self.dirs: list[str] = []
        try:
            if version == 2:
                d = self._mkdir(parents["memory"], name)
                _write(os.path.join(d, "memory.max"), str(memory_bytes))
                if os.path.exists(os.path.join(d, "memory.swap.max")):
                    _write(os.path.join(d, "memory.swap.max"), "0")
                if os.path.exists(os.path.join(d, "pids.max")):
                    _write(os.path.join(d, "pids.max"), str(pids))
            else:
                d = self._mkdir(parents["memory"], name)
                _write(os.path.join(d, "memory.limit_in_bytes"), str(memory_bytes))
                if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):  # else the excess goes to swap
                    _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                if "pids" in parents:
                    _write(os.path.join(self._mkdir(parents["pids"], name), "pids.max"), str(pids))
        except BaseException:
            self.remove()
            raise

    def _mkdir(self, parent: str, name: str) -> str:
        d = os.path.join(parent, name)
        os.mkdir(d)
        self.dirs.append(d)
        return d

    @property
    def procs(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def remove(self) -> bool:
        """Kills what is left in it and deletes it; False if a dir could not be removed."""
        ok = True
        for d in reversed(self.dirs):
            kill = os.path.join(d, "cgroup.kill")
            for attempt in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: processes still in it (exiting, or not yet reaped)
                    if attempt == 0:
                        self._kill_members(d, kill)
                    time.sleep(0.01)
            else:
                ok = False
                log.warning("python tool: could not remove the kernel cgroup %s", d)
        self.dirs = []
        return ok

    @staticmethod
    def _kill_members(d: str, kill: str) -> None:
        try:
            if os.path.exists(kill):  # v2: the kernel kills them all at once, forks in flight included
                _write(kill, "1")
                return
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclasses.dataclass
class _Result:
    text: list[str] = dataclasses.field(default_factory=list)
    images: list[Image.Image] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    chars: int = 0
    dropped_chars: int = 0
    error: bool = False
    interrupted: bool = False
    killed: bool = False  # did not respond to the interrupt
    died: str | None = None  # the kernel process exited during the call


class _Kernel:
    """One sandboxed kernel process and its client."""

    def __init__(self, tool: PythonTool, uid: int | None):
        self.tool = tool
        self.uid = uid
        self.dir = tempfile.mkdtemp(prefix="k", dir=tool.root_dir)
        os.chmod(self.dir, 0o711)
        self.work = os.path.join(self.dir, "work")
        self.ipc = os.path.join(self.dir, "ipc")
        for d in (self.work, self.ipc):
            os.mkdir(d, 0o700)
            if uid is not None:
                os.chown(d, uid, uid)
        self.images_dir = os.path.join(self.dir, "images")
        os.mkdir(self.images_dir, 0o755)  # written by the trainer, read-only to the kernel
        self.n_images = 0
        self.cgroup: _Cgroup | None = None
        self.proc: subprocess.Popen | None = None
        self.kc = None
        self.poller = None

    # ----------------------------------------------------------------------------------------- lifecycle
    def start(self, deadline_s: float) -> None:
        from jupyter_client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file
        import zmq

        tool = self.tool
        seed = [(tool._font_cache, ".config/matplotlib")] if tool._font_cache else []
        if seed and not tool._want.get("readonly_fs"):  # no tmpfs scratch: the host dir is the kernel's cwd
            mpl = os.path.join(self.work, ".config", "matplotlib")
            os.makedirs(mpl)
            shutil.copy(tool._font_cache, mpl)
            if self.uid is not None:
                for root, dirs, files in os.walk(os.path.join(self.work, ".config")):
                    for n in [root] + [os.path.join(root, x) for x in dirs + files]:
                        os.chown(n, self.uid, self.uid)
        conn, _ = write_connection_file(os.path.join(self.ipc, "kernel.json"), transport="ipc",
                                        ip=os.path.join(self.ipc, "s"))
        if self.uid is not None:
            os.chown(conn, self.uid, self.uid)
        argv = [tool.python, "-m", "ipykernel_launcher", "-f", conn, "--IPKernelApp.quiet=True",
                "--HistoryManager.enabled=False", "--InteractiveShell.xmode=Plain",
                "--InteractiveShell.colors=nocolor"]
        if tool._want.get("cgroup"):
            self.cgroup = tool._new_cgroup(os.path.basename(self.dir))
        cfg = tool._launch_config(argv=argv, uid=self.uid, work=self.work, rw=[self.ipc], ro=[self.images_dir],
                                  seed=seed, env=tool._kernel_env(self.work), probe=False,
                                  cgroup=self.cgroup.procs if self.cgroup else [])
        self.log_path = os.path.join(self.dir, "kernel.log")
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([tool.python, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, close_fds=True,
                                         start_new_session=True, env={"PATH": "/usr/bin:/bin"}, cwd="/")
        kc = BlockingKernelClient(context=tool._zmq)
        kc.load_connection_file(conn)
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self.kc = kc
        self.poller = zmq.Poller()
        self.poller.register(kc.iopub_channel.socket, zmq.POLLIN)
        self.poller.register(kc.shell_channel.socket, zmq.POLLIN)
        # Ready when the kernel answers kernel_info on shell and we have seen an IOPub message (subscribed).
        kc.kernel_info()
        got_reply = got_iopub = False
        while not (got_reply and got_iopub):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the kernel exited at start ({_signal_name(self.proc.returncode)}): "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline_s:
                raise RuntimeError(f"the kernel did not start in time: {self.log_tail()}")
            events = dict(self.poller.poll(50))
            if kc.shell_channel.socket in events:
                msg = kc.shell_channel.get_msg(timeout=0)
                got_reply |= msg["msg_type"] == "kernel_info_reply"
            if kc.iopub_channel.socket in events:
                kc.iopub_channel.get_msg(timeout=0)
                got_iopub = True
            if got_reply and not got_iopub and not events:
                kc.kernel_info()  # its status messages were sent before we subscribed: ask again
        if self.uid is not None:
            # The socket dir is on the host's disk, outside the scratch tmpfs cap: once the kernel has bound its
            # sockets (all of them, at startup) it must not create or grow files there. Connecting to its sockets
            # needs no write permission on the dir, and a restarted kernel gets a new dir.
            os.chown(conn, os.getuid(), os.getgid())
            os.chown(self.ipc, os.getuid(), os.getgid())
            os.chmod(self.ipc, 0o711)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def interrupt(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGINT)  # the reaper ignores it; the kernel raises KeyboardInterrupt
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Kills the kernel and everything it started, and frees its resources (the scratch dir too)."""
        if self.kc is not None:
            try:
                self.kc.stop_channels()
            except Exception:  # noqa: BLE001
                pass
            self.kc = None
        if self.proc is not None and self.proc.poll() is None:
            if self.tool._want.get("pid_namespace"):
                # The reaper SIGKILLs the kernel (pid 1 of its namespace: all it started dies with it), reaps it
                # and exits. Killing both at once would leave the kernel a zombie for the host's init to reap.
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log.warning("python tool: kernel launcher %d did not exit after SIGKILL", self.proc.pid)
        self.clean = True
        if self.tool._uid_isolation and self.uid is not None:
            # Without a PID namespace, forks may have left the process group: kill by uid too.
            self.clean = self.tool._kill_uid(self.uid)
        if self.cgroup is not None:
            self.clean &= self.cgroup.remove()
            self.cgroup = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # ----------------------------------------------------------------------------------------- processes
    def strays(self) -> tuple[list[int], int]:
        """Processes started by the code that still run (the kernel and its reaper excluded), and how many of
        the code's processes are zombies."""
        if self.proc is None:
            return [], 0
        if self.tool._want.get("pid_namespace") and os.path.exists(f"/proc/{self.proc.pid}/task"):
            walked = self._walk_tree()
            if walked is not None:
                return walked
        table = {pid: info for pid in _all_pids() if (info := _proc_info(pid)) is not None}
        kernel_pids = {self.proc.pid}  # without a PID namespace the launcher exec'd the kernel itself
        if self.tool._uid_isolation and self.uid is not None:
            mine = [pid for pid, info in table.items() if info[0] == self.uid and pid not in kernel_pids]
        else:
            children = collections.defaultdict(list)
            for pid, info in table.items():
                children[info[1]].append(pid)
            mine, todo = [], list(kernel_pids)
            while todo:
                for c in children.get(todo.pop(), []):
                    if c not in kernel_pids:
                        mine.append(c)
                    todo.append(c)
        running = [p for p in mine if not table[p][2]]
        return running, len(mine) - len(running)

    def _walk_tree(self) -> tuple[list[int], int] | None:
        """The code's processes from the process tree under the reaper: everything in the kernel's PID namespace
        descends from the kernel (pid 1 there adopts orphans), so this reads only the sandbox's own /proc entries."""

        def children(pid: int) -> list[int]:
            out = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(c) for c in f.read().split()]
            return out

        try:
            kernels = children(self.proc.pid)
            running, zombies, todo = [], 0, list(kernels)
            while todo:
                pid = todo.pop()
                for c in children(pid) if os.path.exists(f"/proc/{pid}/task") else []:
                    info = _proc_info(c)
                    if info is None:
                        continue
                    if info[2]:
                        zombies += 1
                    else:
                        running.append(c)
                        todo.append(c)
            return running, zombies
        except (OSError, ValueError):
            return None  # no /proc/<pid>/task/<tid>/children here, or a race: scan all of /proc instead

    # ----------------------------------------------------------------------------------------- execution
    def execute(self, code: str, timeout_s: float, *, silent: bool = False) -> _Result:
        tool, kc, res = self.tool, self.kc, _Result()
        iopub, shell = kc.iopub_channel, kc.shell_channel
        msg_id = kc.execute(code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=False)
        deadline = time.monotonic() + timeout_s
        idle = False
        reply_at = None
        while not idle:
            now = time.monotonic()
            if reply_at is not None and now - reply_at > 1.0:
                break  # the reply came but IOPub's idle was lost (dropped under flooding): don't wait for it
            if now >= deadline:
                if not res.interrupted:
                    res.interrupted = True
                    self.interrupt()
                    deadline = now + tool.interrupt_grace_s
                    continue
                res.killed = True
                return res
            events = dict(self.poller.poll(max(1, min(200, int((deadline - now) * 1000)))))
            if not events:
                if not self.alive():
                    res.died = _signal_name(self.proc.returncode)
                    return res
                continue
            if shell.socket in events:
                msg = shell.get_msg(timeout=0)
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
                    reply_at = now
            if iopub.socket in events:
                msg = iopub.get_msg(timeout=0)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "status" and content.get("execution_state") == "idle":
                    idle = True
                elif kind == "stream":
                    self._add_text(res, content.get("text", ""))
                elif kind in ("execute_result", "display_data", "update_display_data"):
                    data = content.get("data", {})
                    if "image/png" in data:
                        self._add_image(res, data["image/png"])
                    elif "text/plain" in data:
                        self._add_text(res, data["text/plain"] + "\n")
                elif kind == "error":
                    res.error = True
                    tb = content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]
                    tb = "\n".join(line.rstrip("\n") for line in tb)
                    self._add_text(res, _strip_ansi(tb) + "\n")
        return res

    def _add_text(self, res: _Result, text: str) -> None:
        room = self.tool.max_output_chars - res.chars
        if len(text) > room:
            res.dropped_chars += len(text) - max(room, 0)
            text = text[: max(room, 0)]
        if text:
            res.text.append(text)
            res.chars += len(text)

    def _add_image(self, res: _Result, b64: str | list) -> None:
        tool = self.tool
        if len(res.images) >= tool.max_images:
            res.notes.append(f"[more than {tool.max_images} figures: the rest were dropped]")
            return
        try:
            data = base64.b64decode("".join(b64) if isinstance(b64, list) else b64)
            # Only the PNG decoder runs in the trainer on the code's bytes, whatever they claim to be.
            img = Image.open(io.BytesIO(data), formats=["PNG"])
            w, h = img.size
            if w * h > tool.max_image_pixels:
                res.notes.append(f"[a {w}x{h} figure is too large and was dropped]")
                return
            img.load()
            img = to_rgb(img)  # 16-bit, float, 1-bit, palette and alpha figures would reach the processor as-is
        except Exception as e:  # noqa: BLE001  (a malformed PNG is the code's problem, not the trainer's)
            res.notes.append(f"[a figure could not be decoded and was dropped: {type(e).__name__}]")
            return
        res.images.append(img)

    def load_images(self, images: list[Image.Image], timeout_s: float) -> None:
        """Appends the conversation images not loaded yet to `_images` / `_pil_images` in the kernel."""
        new = images[self.n_images:]
        if not new:
            return
        paths = []
        for i, img in enumerate(new, start=self.n_images):
            path = os.path.join(self.images_dir, f"{i}.png")
            try:
                img.save(path, format="PNG", compress_level=1)
            except (OSError, ValueError):
                img.convert("RGB").save(path, format="PNG", compress_level=1)
            os.chmod(path, 0o644)
            paths.append(path)
        code = (
            "import PIL.Image as __axpo_pil\n"
            "if not isinstance(globals().get('_images'), list): _images = []\n"
            "if not isinstance(globals().get('_pil_images'), list): _pil_images = []\n"
            f"for __axpo_p in {paths!r}:\n"
            "    __axpo_im = __axpo_pil.open(__axpo_p); __axpo_im.load()\n"
            "    _images.append(__axpo_p); _pil_images.append(__axpo_im)\n"
            "del __axpo_pil, __axpo_p, __axpo_im\n"
        )
        res = self.execute(code, timeout_s, silent=True)
        if res.error or res.killed or res.died or res.interrupted:
            raise RuntimeError(f"preloading images failed: {''.join(res.text)[-500:]} {res.died or ''}")
        self.n_images = len(images)


class _Session:
    def __init__(self, sid: str):
        self.sid = sid
        self.lock = threading.Lock()
        self.kernel: _Kernel | None = None
        self.closed = False
        self.note: str | None = None  # why the previous kernel is gone, told to the model on the next call


class PythonTool:
    """The `python` tool (see the module docstring). Thread-safe: calls of different sessions run concurrently,
    calls of one session serialize."""

    name = "python"
    schema = schemas.PYTHON

    def __init__(
        self,
        timeout_s: float = 12.0,
        cpu_seconds: int = 120,
        memory_bytes: int = 2 << 30,
        max_processes: int = 64,
        scratch_root: str | None = None,
        max_sessions: int = 64,
        *,
        file_bytes: int = 64 << 20,
        scratch_bytes: int = 256 << 20,
        open_files: int = 256,
        max_output_chars: int = 20_000,
        max_images: int = 8,
        max_image_pixels: int = 4096 * 4096,
        interrupt_grace_s: float = 2.0,
        start_timeout_s: float = 30.0,
        hidden_paths: tuple[str, ...] = DEFAULT_HIDDEN_PATHS,
        python: str | None = None,
        uid_base: int | None = None,
        disable: tuple[str, ...] = (),
        require: tuple[str, ...] = (),
    ):
        """
        timeout_s: the most wall seconds one call may run (the `timeout` argument is capped by it).
        cpu_seconds / memory_bytes / max_processes / file_bytes / open_files: the kernel's rlimits (CPU seconds
            over the kernel's life; address space; processes+threads of its uid; largest file; open fds).
            memory_bytes and max_processes also bound the kernel and all it starts together where it gets its own
            cgroup (`isolation["cgroup"]`); elsewhere memory_bytes is per process.
        scratch_root: where the per-kernel dirs are made (default: the system temp dir).
        scratch_bytes: size of the kernel's scratch dir (a tmpfs, in memory) where a mount namespace is available;
            elsewhere the scratch dir is a host dir bounded only per file (file_bytes).
        max_sessions: kernels kept at once; beyond it the least recently used idle session is shut down.
        hidden_paths: dirs covered by an empty tmpfs inside the sandbox (needs a mount namespace).
        disable: sandbox features not to use even where available (names as in `isolation`, e.g. "seccomp"),
            for debugging or a machine where one misbehaves.
        require: sandbox features that must be enforced (names as in `isolation`): construction fails otherwise
            (e.g. require=("uid", "net_namespace") for a run that must not degrade silently).
        uid_base: first uid of this tool's kernels when running as root (default: derived from the pid, so that
            several trainer processes on one machine never share a uid); one uid per kernel slot.
        """
        import zmq

        if max_sessions > 900:
            raise ValueError("max_sessions must be at most 900 (each kernel needs a uid of the tool's range)")
        self._owner_pid = os.getpid()  # a forked child (e.g. a data worker) must never touch these kernels
        self.timeout_s = float(timeout_s)
        self.cpu_seconds = int(cpu_seconds)
        self.memory_bytes = int(memory_bytes)
        self.max_processes = int(max_processes)
        self.file_bytes = int(file_bytes)
        self.scratch_bytes = int(scratch_bytes)
        self.open_files = int(open_files)
        self.max_sessions = int(max_sessions)
        self.max_output_chars = int(max_output_chars)
        self.max_images = int(max_images)
        self.max_image_pixels = int(max_image_pixels)
        self.interrupt_grace_s = float(interrupt_grace_s)
        self.start_timeout_s = float(start_timeout_s)
        home = os.path.realpath(os.path.expanduser("~"))
        self.hidden_paths = (tuple(hidden_paths) + ((home,) if home != "/" and os.path.isdir(home) else ())
                             + trainer_dirs())
        self.python = python or sys.executable
        self.disable = tuple(disable)
        self.root_dir = tempfile.mkdtemp(prefix="axpo-python-", dir=scratch_root)
        os.chmod(self.root_dir, 0o711)
        self._lock = threading.Lock()
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        # sessions shut down to make room while still open: their next call is told its variables are gone
        self._evicted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._closed = False
        self._zmq = zmq.Context()
        self._zmq.setsockopt(zmq.MAXMSGSIZE, 256 << 20)  # a kernel cannot make the trainer buffer more than this
        self._zmq.setsockopt(zmq.RECONNECT_IVL, 20)  # the kernel binds its sockets ~1 s after we connect
        self._is_root = os.geteuid() == 0
        self._uid_base = uid_base if uid_base is not None else 1_000_000 + (os.getpid() % 1_000_000) * 1000
        self._free_uids = list(range(self._uid_base + 998, self._uid_base - 1, -1)) if self._is_root else []
        self._font_cache = None
        fonts = self._start_font_cache()
        try:
            self._want = self._probe()
        except BaseException:
            fonts[1].kill()
            fonts[1].wait()
            shutil.rmtree(self.root_dir, ignore_errors=True)
            self._zmq.destroy(linger=0)
            raise
        self.isolation = self._describe()
        self._uid_isolation = bool(self._want.get("uid"))
        self._finish_font_cache(fonts)
        missing = [k for k in ("uid", "net_namespace", "ipc_namespace", "pid_namespace", "readonly_fs", "rlimits",
                               "seccomp", "cgroup")
                   if not self.isolation.get(k)]
        if missing:
            log.warning("python tool: sandbox degraded on this machine, not enforced: %s (%s)", missing,
                        self._probe_errors)
        if self._kernel_is_root():
            log.warning("python tool: kernels run as root here: RLIMIT_NPROC does not bound a fork bomb")
        unmet = [k for k in require if not self.isolation.get(k)]
        if unmet:
            shutil.rmtree(self.root_dir, ignore_errors=True)
            self._zmq.destroy(linger=0)
            raise RuntimeError(f"python tool: required sandbox features not available here: {unmet} "
                               f"({self._probe_errors})")
        _live_tools.add(self)

    # ----------------------------------------------------------------------------------------- sandbox setup
    def _rlimits(self) -> dict[str, tuple[int, int]]:
        return {"cpu": (self.cpu_seconds, self.cpu_seconds), "as": (self.memory_bytes, self.memory_bytes),
                "nproc": (self.max_processes, self.max_processes), "fsize": (self.file_bytes, self.file_bytes),
                "nofile": (self.open_files, self.open_files), "core": (0, 0)}

    def _kernel_env(self, work: str) -> dict[str, str]:
        bindir = os.path.dirname(self.python)
        return {
            "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "USER": "sandbox",
            "LOGNAME": "sandbox", "LANG": "C.UTF-8", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "MPLCONFIGDIR": os.path.join(work, ".config", "matplotlib"), "IPYTHONDIR": os.path.join(work, ".ipython"),
            "JUPYTER_CONFIG_DIR": os.path.join(work, ".jupyter"), "JUPYTER_DATA_DIR": os.path.join(work, ".jupyter"),
            "JUPYTER_RUNTIME_DIR": os.path.join(work, ".jupyter", "runtime"), "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }

    def _python_paths(self) -> list[str]:
        """What the kernel's interpreter needs to read, re-exposed if it lies under a hidden dir."""
        paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                 os.path.dirname(os.path.realpath(self.python)), os.path.dirname(os.path.abspath(self.python))}
        # not the trainer's own folders on sys.path (its script's, its cwd): hidden, they stay hidden
        paths |= {p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) not in trainer_dirs()}
        return sorted(os.path.realpath(p) for p in paths)

    def _launch_config(self, *, argv, uid, work, rw, ro=(), seed=(), env, probe, want=None, cgroup=()) -> dict:
        """The launcher's config. `work` is the kernel's cwd: with a mount namespace a fresh size-capped tmpfs
        (seeded with `seed`: [(file, dir relative to work)]), else the host dir itself (then it is in `rw`)."""
        want = want or self._want
        tmpfs = bool(want.get("readonly_fs"))
        owner = uid if uid is not None else os.getuid()
        return {"probe": probe, "want": want, "argv": argv, "uid": uid, "gid": uid, "cwd": work, "env": env,
                "rw_paths": list(rw) + ([] if tmpfs else [work]), "ro_paths": self._python_paths() + list(ro),
                "scratch": ({"path": work, "bytes": self.scratch_bytes, "uid": owner, "seed": [list(x) for x in seed]}
                            if tmpfs else None),
                "hidden_paths": list(self.hidden_paths), "rlimits": self._rlimits(), "cgroup_procs": list(cgroup),
                "allow_writable": getattr(self, "_probe_extra", {}).get("writable_mounts", [])}

    def _probe(self) -> dict:
        """Runs the launcher once asking for everything; keeps what this machine allows."""
        want = {"user_namespace": not self._is_root, "net_namespace": True, "ipc_namespace": True,
                "mount_namespace": True, "pid_namespace": True, "readonly_fs": True, "rlimits": True,
                "uid": self._is_root, "no_new_privs": True, "seccomp": True, "cgroup": True}
        want = {k: v and k not in self.disable for k, v in want.items()}
        cgroup, cgroup_error = None, None
        self._cgroup_layout = None
        if want["cgroup"]:
            try:
                self._cgroup_layout = _cgroup_parents()
                remove_orphan_cgroups(self._cgroup_layout[1])
                cgroup = self._new_cgroup("probe")
            except OSError as e:
                cgroup_error = f"{type(e).__name__}: {e}"
                want["cgroup"] = False
        d = tempfile.mkdtemp(prefix="probe", dir=self.root_dir)
        os.chmod(d, 0o711)
        uid = self._free_uids[0] if self._is_root else None
        if uid is not None:
            os.chown(d, uid, uid)
        check = ("import os, socket\n"
                 "s = socket.socket(); s.settimeout(1)\n"
                 "try:\n    s.connect(('1.1.1.1', 53)); print('NET')\nexcept OSError: pass\n")
        # Everything first; if the kernel's python cannot even start that way (e.g. it lives under /root and there
        # is no mount namespace to re-expose it to another uid), without the uid change; then rlimits alone.
        attempts = [want, {**want, "uid": False}, {"rlimits": True, "no_new_privs": True, "cgroup": want["cgroup"]}]
        failures = []
        try:
            for attempt in attempts:
                cfg = self._launch_config(argv=[self.python, "-I", "-S", "-c", check], uid=uid, work=d, rw=[],
                                          env={"PATH": "/usr/bin:/bin"}, probe=True, want=attempt,
                                          cgroup=cgroup.procs if cgroup else [])
                try:
                    out = subprocess.run([self.python, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                                         capture_output=True, text=True, timeout=30, start_new_session=True, cwd="/",
                                         env={"PATH": "/usr/bin:/bin"})
                except subprocess.TimeoutExpired as e:
                    failures.append(f"probe timed out: {e}")
                    continue
                lines = out.stdout.splitlines()
                if out.returncode == 0 and lines:
                    got = json.loads(lines[0])
                    if "NET" in lines[1:]:
                        got["net_namespace"] = False
                    break
                failures.append(f"probe with {sorted(k for k, v in attempt.items() if v)} exited "
                                f"{out.returncode}: {out.stderr.strip()[-500:]}")
            else:
                raise RuntimeError("the kernel's python cannot be started by the sandbox launcher: "
                                   + " | ".join(failures))
        finally:
            shutil.rmtree(d, ignore_errors=True)
            if cgroup is not None:
                cgroup.remove()
        if failures:
            got.setdefault("errors", {})["probe"] = " | ".join(failures)
        if cgroup_error:
            got.setdefault("errors", {})["cgroup"] = cgroup_error
        self._probe_errors = got.pop("errors", {})
        self._probe_extra = {k: got.pop(k) for k in ("hidden_paths", "writable_mounts") if k in got}
        return {k: bool(v) for k, v in got.items() if v}

    def _new_cgroup(self, name: str) -> _Cgroup:
        version, parents = self._cgroup_layout
        # +1: the launcher's reaper lives in it too
        return _Cgroup(version, parents,
                       f"axpo-{_pid_namespace()}-{os.getpid()}-{os.path.basename(self.root_dir)}-{name}",
                       self.memory_bytes, self.max_processes + 1)

    def _kernel_is_root(self) -> bool:
        return self._is_root and not self._want.get("uid") and not self._want.get("user_namespace")

    def _describe(self) -> dict[str, Any]:
        w = self._want
        return {
            "own_process": True,
            "process_group": True,  # start_new_session: killed as a group
            "uid": (f"one unprivileged uid per kernel from {self._uid_base}" if w.get("uid") else None),
            "user_namespace": bool(w.get("user_namespace")),
            "rlimits": ({k: (None if k == "nproc" and self._kernel_is_root() else v[0])  # uid 0 ignores NPROC
                         for k, v in self._rlimits().items()} if w.get("rlimits") else None),
            "no_new_privs": bool(w.get("no_new_privs")),
            "seccomp": bool(w.get("seccomp")),  # no namespaces/mount/ptrace/bpf/keyring/module syscalls
            "net_namespace": bool(w.get("net_namespace")),
            "ipc_namespace": bool(w.get("ipc_namespace")),  # SysV shm/semaphores/queues die with the kernel
            # memory_bytes / max_processes for the kernel and all it starts together, not only per process
            "cgroup": ({"version": self._cgroup_layout[0], "memory": self.memory_bytes,
                        "pids": self.max_processes + 1 if "pids" in self._cgroup_layout[1] else None}
                       if w.get("cgroup") else None),
            "pid_namespace": bool(w.get("pid_namespace")),
            "private_proc": bool(w.get("pid_namespace") and w.get("readonly_fs")),  # /proc shows only the sandbox
            "mount_namespace": bool(w.get("mount_namespace")),
            "readonly_fs": bool(w.get("readonly_fs")),
            "hidden_paths": self._probe_extra.get("hidden_paths", []) if w.get("readonly_fs") else [],
            "writable_mounts": self._probe_extra.get("writable_mounts", []),
            "scratch_bytes": self.scratch_bytes if w.get("readonly_fs") else None,  # tmpfs cap of its writes
            "minimal_env": True,
            "transport": "ipc",
        }

    def _start_font_cache(self):
        """matplotlib's font list, built once per tool in a subprocess and copied into each kernel's config dir
        (a kernel building it itself would take seconds)."""
        d = os.path.join(self.root_dir, "mplcache")
        os.mkdir(d)
        env = {"PATH": "/usr/bin:/bin", "MPLCONFIGDIR": d, "HOME": d}
        return d, subprocess.Popen([self.python, "-c", "import matplotlib.font_manager"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _finish_font_cache(self, fonts) -> None:
        d, proc = fonts
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        found = [f for f in os.listdir(d) if f.startswith("fontlist") and f.endswith(".json")]
        self._font_cache = os.path.join(d, found[0]) if found else None

    def _kill_uid(self, uid: int) -> bool:
        """SIGKILLs every process of `uid` (its kernel's whole process tree, wherever it went); True if none is
        left."""
        for _ in range(50):
            pids = [p for p in _all_pids() if (info := _proc_info(p)) is not None and info[0] == uid and not info[2]]
            if not pids:
                return True
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        return False

    # ----------------------------------------------------------------------------------------- sessions
    def _new_kernel(self, context: ToolContext) -> _Kernel:
        with self._lock:
            if self._is_root and self._uid_isolation and not self._free_uids:
                raise ToolFailure(TOOL_ERROR, "no free sandbox uid: too many python kernels")
            uid = self._free_uids.pop() if self._uid_isolation else None
        kernel = _Kernel(self, uid)
        try:
            kernel.start(time.monotonic() + self.start_timeout_s)
            kernel.load_images(list(context.images), self.start_timeout_s)
        except BaseException:
            self._release(kernel)
            raise
        return kernel

    def _release(self, kernel: _Kernel) -> None:
        kernel.kill()
        if kernel.uid is not None:
            if not kernel.clean:  # never hand a uid that still owns processes to a new kernel
                log.warning("python tool: processes of sandbox uid %d survived SIGKILL; uid retired", kernel.uid)
                return
            with self._lock:
                self._free_uids.append(kernel.uid)

    def _session(self, sid: str) -> _Session:
        victims = []
        with self._lock:
            if self._closed:
                raise ToolFailure(TOOL_ERROR, "the python tool is closed")
            sess = self._sessions.get(sid)
            if sess is None:
                sess = self._sessions[sid] = _Session(sid)
                if sid in self._evicted:
                    del self._evicted[sid]
                    sess.note = (f"the python kernel was stopped to make room for others (at most "
                                 f"{self.max_sessions} at once)")
            self._sessions.move_to_end(sid)
            excess = len(self._sessions) - self.max_sessions
            for other in list(self._sessions.values()):
                if excess <= 0:
                    break
                if other is not sess and not other.lock.locked():
                    del self._sessions[other.sid]
                    other.closed = True
                    victims.append(other)
                    self._evicted[other.sid] = None
                    excess -= 1
            while len(self._evicted) > 16 * self.max_sessions:  # sessions never closed must not pile up here
                self._evicted.popitem(last=False)
        for v in victims:
            self._shutdown(v)
        return sess

    def _shutdown(self, sess: _Session) -> None:
        with sess.lock:
            sess.closed = True
            if sess.kernel is not None:
                self._release(sess.kernel)
                sess.kernel = None

    def close_session(self, session_id: str) -> None:
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            sess = self._sessions.pop(session_id, None)
            self._evicted.pop(session_id, None)
        if sess is not None:
            self._shutdown(sess)

    def close(self) -> None:
        """Shuts every kernel down and deletes the scratch root."""
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            self._shutdown(s)
        shutil.rmtree(self.root_dir, ignore_errors=True)
        self._zmq.destroy(linger=0)
        _live_tools.discard(self)

    def __enter__(self) -> PythonTool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- the call
    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> Observation:
        code, timeout = self._parse(arguments, context)
        if os.getpid() != self._owner_pid:
            raise ToolFailure(TOOL_ERROR, "the python tool was created in another process (this one was forked)")
        while True:
            sess = self._session(context.session_id)
            with sess.lock:
                if sess.closed:  # evicted or closed while we waited for the lock: start over
                    continue
                return self._call_locked(sess, code, timeout, context)

    def _parse(self, arguments: dict[str, Any], context: ToolContext) -> tuple[str, float]:
        extra = set(arguments) - {"code", "timeout"}
        if extra:
            raise ToolFailure(BAD_ARGUMENTS, f"unexpected argument(s) for python: {sorted(extra)}")
        code = arguments.get("code")
        if not isinstance(code, str):
            raise ToolFailure(BAD_ARGUMENTS, "python needs `code`, a string")
        try:
            code.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ToolFailure(BAD_ARGUMENTS, f"`code` is not valid text: {e.reason} at character {e.start} "
                                             f"({code[e.start:e.end]!r})") from None
        timeout = arguments.get("timeout", 12)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ToolFailure(BAD_ARGUMENTS, "`timeout` must be a positive number of seconds")
        return code, float(min(timeout, self.timeout_s, context.timeout_s))

    def _call_locked(self, sess: _Session, code: str, timeout: float, context: ToolContext) -> Observation:
        prefix = []
        k = sess.kernel
        if k is not None and not k.alive():
            sess.note = f"the python kernel died ({_signal_name(k.proc.returncode)})"
            self._release(k)
            k = sess.kernel = None
        if k is not None:
            try:
                k.load_images(list(context.images), timeout)
            except Exception as e:  # noqa: BLE001  (e.g. the code broke PIL in the kernel): start afresh
                sess.note = f"the python kernel could not load the new images ({e})"
                self._release(k)
                k = sess.kernel = None
        if k is None:
            try:
                k = sess.kernel = self._new_kernel(context)
            except ToolFailure:
                raise
            except Exception as e:  # noqa: BLE001
                raise ToolFailure(TOOL_ERROR, f"could not start the python kernel: {e}") from e
            if sess.note:
                prefix.append(f"[{sess.note}; a new kernel was started, earlier variables are gone]\n")
                sess.note = None
        res = k.execute(code, timeout)
        text = "".join(res.text)
        if res.dropped_chars:
            text += f"\n[output truncated: {res.dropped_chars} more characters]"
        status = OK
        if res.killed or res.died:
            if res.killed:
                what = (f"[timeout: the code ran longer than {timeout:g} s and did not stop when interrupted: the "
                        "kernel was killed")
                status = TIMEOUT
            else:
                what = f"[the python kernel died while running the code ({res.died})"
                status = TOOL_ERROR
            self._release(k)
            sess.kernel = None
            try:
                sess.kernel = self._new_kernel(context)
                what += "; a new kernel was started, earlier variables are gone]"
            except Exception as e:  # noqa: BLE001
                sess.note = "the python kernel could not be restarted"
                what += f"; a new kernel could not be started yet ({e}); earlier variables are gone]"
            text = (text + "\n" if text else "") + what
        else:
            if res.interrupted:
                status = TIMEOUT
                text += (f"\n[timeout: the code ran longer than {timeout:g} s and was interrupted; "
                         "variables defined earlier are kept]")
            elif res.error:
                status = TOOL_ERROR
            elif res.dropped_chars:
                status = OUTPUT_TOO_LARGE
            killed, zombies = set(), 0
            for _ in range(100):  # until none is left (a fork bomb may still be forking while we kill)
                strays, zombies = k.strays()
                if not strays:
                    break
                for pid in strays:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed.update(strays)
                time.sleep(0.005)
            if killed:
                res.notes.append(f"[{len(killed)} background process(es) started by the code were killed]")
            if killed or zombies:
                if k.alive():  # the killed children are the kernel's zombies until it reaps them
                    k.execute(_REAP, 5.0, silent=True)
        text = "".join(prefix) + text + "".join("\n" + n for n in res.notes)
        if not text.strip() and not res.images:
            text = "(no output)"
        return Observation(text=text.strip("\n") if text.strip() else text, images=res.images, status=status)


_live_tools: weakref.WeakSet[PythonTool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for tool in list(_live_tools):
        try:
            tool.close()
        except Exception:  # noqa: BLE001
            pass
