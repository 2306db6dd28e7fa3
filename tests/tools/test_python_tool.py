"""The python tool: a stateful Jupyter kernel per session, and a sandbox that contains untrusted code.

One tool (and, where possible, one kernel) is shared by the module. Each break-out attempt asserts what this
machine enforces: `PythonTool.isolation` is checked against what the machine allows (root, namespaces), and each
attack must be contained wherever the corresponding isolation is reported.
"""

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from axpo_jax.tools import python_tool as pt
from axpo_jax.tools.base import BAD_ARGUMENTS, OK, OUTPUT_TOO_LARGE, TIMEOUT, TOOL_ERROR, ToolContext, ToolFailure

REPO = Path(__file__).resolve().parents[2]
FILE_BYTES = 8 << 20
SCRATCH_BYTES = 16 << 20


def _uid_processes(uid):
    """Running (non-zombie) processes of `uid` on the host."""
    return [p for p in pt._all_pids() if (info := pt._proc_info(p)) is not None and info[0] == uid and not info[2]]


@pytest.fixture(scope="module")
def tool():
    # AXPO_PYTHON_TOOL_DISABLE=net_namespace,pid_namespace,... runs the module against a weaker sandbox, as on a
    # machine without namespaces: the attacks must then be contained by whatever `isolation` still reports.
    disable = tuple(x for x in os.environ.get("AXPO_PYTHON_TOOL_DISABLE", "").split(",") if x)
    t = pt.PythonTool(timeout_s=12, cpu_seconds=60, memory_bytes=1 << 30, max_processes=16, file_bytes=FILE_BYTES,
                      scratch_bytes=SCRATCH_BYTES, max_sessions=16, interrupt_grace_s=1.0, disable=disable)
    yield t
    uids = range(t._uid_base, t._uid_base + 1000)
    root = t.root_dir
    t.close()
    # Nothing the kernels started survives the tool.
    assert not os.path.exists(root)
    if t._uid_isolation:
        left = [p for p in pt._all_pids() if (i := pt._proc_info(p)) is not None and i[0] in uids and not i[2]]
        assert left == []


def _machine_has_cgroup_memory():
    """Whether this process can give a kernel a memory cgroup of its own (checked apart from the tool's probe)."""
    root = "/sys/fs/cgroup"
    if os.path.isfile(f"{root}/cgroup.controllers"):  # v2: the tool enables memory for children if it may
        with open(f"{root}/cgroup.subtree_control") as f:
            return "memory" in f.read().split() and os.access(root, os.W_OK)
    d = f"{root}/memory/axpo-test-{uuid.uuid4().hex}"
    try:
        os.mkdir(d)
    except OSError:
        return False
    try:
        return os.path.isfile(f"{d}/memory.limit_in_bytes")
    finally:
        os.rmdir(d)


def _host_sysv_keys():
    """Keys of the SysV shared memory segments the host's IPC namespace holds."""
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]): int(line.split()[1]) for line in list(f)[1:]}


def run(tool, code, session="main", images=(), timeout=None):
    args = {"code": code} if timeout is None else {"code": code, "timeout": timeout}
    return tool(args, ToolContext(images=list(images), session_id=session, timeout_s=max(12.0, timeout or 0)))


def _kernel(tool, session):
    return tool._sessions[session].kernel


# ----------------------------------------------------------------------------------------------------- the tool


def test_isolation_matches_this_machine(tool):
    iso = tool.isolation
    print("isolation enforced here:", iso)
    assert iso["own_process"] and iso["process_group"] and iso["minimal_env"] and iso["transport"] == "ipc"
    nproc = None if os.geteuid() == 0 and not iso["uid"] else 16  # uid 0 is exempt from RLIMIT_NPROC
    assert iso["scratch_bytes"] in (None, SCRATCH_BYTES)
    assert iso["rlimits"] == {"cpu": 60, "as": 1 << 30, "nproc": nproc, "fsize": FILE_BYTES, "nofile": 256, "core": 0}
    if tool.disable:
        assert not any(iso[k] for k in tool.disable if k in iso)
        return
    if os.geteuid() == 0:
        assert iso["uid"], "as root the kernel must run as an unprivileged uid"
    # Where this machine allows namespaces (checked independently with util-linux), the tool must use them.
    if shutil.which("unshare") and os.geteuid() == 0:
        if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
            assert iso["net_namespace"]
        if subprocess.run(["unshare", "--ipc", "true"], capture_output=True).returncode == 0:
            assert iso["ipc_namespace"]
        if subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"], capture_output=True).returncode == 0:
            assert iso["pid_namespace"] and iso["mount_namespace"] and iso["readonly_fs"]
            assert iso["writable_mounts"] == [] and iso["scratch_bytes"] == SCRATCH_BYTES
    if os.uname().machine in ("x86_64", "aarch64"):
        assert iso["seccomp"] and iso["no_new_privs"]
    if _machine_has_cgroup_memory():
        assert iso["cgroup"] and iso["cgroup"]["memory"] == 1 << 30, tool._probe_errors


def test_state_persists_and_outputs_come_back(tool):
    out = run(tool, "import sys\nx = 41\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nx + 1")
    assert out.status == OK, out.text
    assert "to stdout" in out.text and "to stderr" in out.text and "42" in out.text  # last expression's repr
    out = run(tool, "x += 1\nprint(x)")
    assert (out.status, out.text) == (OK, "42")
    assert run(tool, "y = 1").text == "(no output)"


def test_runs_in_another_process_and_uid(tool):
    out = run(tool, "import os\nprint(os.getpid(), os.getuid(), os.getcwd())")
    pid, uid, cwd = out.text.split()
    assert int(pid) != os.getpid()
    k = _kernel(tool, "main")
    assert cwd == k.work
    if tool.isolation["uid"]:
        assert int(uid) == k.uid != 0
        assert stat.S_IMODE(os.stat(k.work).st_mode) == 0o700 and os.stat(k.work).st_uid == k.uid


def test_images_are_preloaded_and_appended(tool):
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("L", (20, 10), 7)]
    out = run(tool, "import os\nprint(_pil_images[0].size, _pil_images[1].size, _pil_images[0].getpixel((0, 0)), "
                    "len(_images), all(os.path.exists(p) for p in _images))", session="img", images=images)
    assert out.text == "(40, 30) (20, 10) (255, 0, 0) 2 True", out.text
    images.append(Image.new("RGB", (7, 5)))  # e.g. a zoom crop added to the conversation since
    out = run(tool, "print(len(_pil_images), _pil_images[2].size, len(_images))", session="img", images=images)
    assert out.text == "3 (7, 5) 3", out.text
    tool.close_session("img")


def test_matplotlib_figure_comes_back_as_an_image(tool):
    out = run(tool, "import matplotlib.pyplot as plt\nplt.plot([0, 1, 4])\nplt.title('squares')\nplt.show()")
    assert out.status == OK, out.text
    assert len(out.images) == 1
    img = out.images[0]
    assert isinstance(img, Image.Image) and img.size[0] > 100 and img.size[1] > 100


def test_figures_are_decoded_as_png_only_and_come_back_rgb(tool):
    code = (
        "import base64, io\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from IPython.display import display\n"
        "def show(im, fmt='PNG'):\n"
        "    b = io.BytesIO(); im.save(b, format=fmt)\n"
        "    display({'image/png': base64.b64encode(b.getvalue()).decode()}, raw=True)\n"
        "show(Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)))\n"  # 16-bit gray
        "show(Image.new('RGB', (8, 8), (255, 0, 0)).convert('P'))\n"
        "show(Image.new('1', (8, 8), 0))\n"
        "show(Image.new('RGBA', (8, 8), (0, 0, 0, 0)))\n"
        "show(Image.new('RGB', (8, 8)), 'GIF')\n"  # not a PNG, whatever the code calls it
    )
    out = run(tool, code)
    assert out.status == OK, out.text
    assert [im.mode for im in out.images] == ["RGB"] * 4
    assert out.images[0].getextrema()[0] == (0, 255)  # 12 bits in 16 spread over 8, not near-black or white
    assert out.images[1].getpixel((0, 0)) == (255, 0, 0)
    assert out.images[2].getpixel((0, 0)) == (0, 0, 0)
    assert out.images[3].getpixel((0, 0)) == (255, 255, 255)  # transparency over white
    assert "[a figure could not be decoded and was dropped: UnidentifiedImageError]" in out.text


def test_exception_is_a_tool_error_with_the_user_traceback(tool):
    out = run(tool, "def f(a):\n    return a / 0\n\nprint('before')\nf(3)")
    assert out.status == TOOL_ERROR
    assert "before" in out.text and "ZeroDivisionError: division by zero" in out.text
    assert "return a / 0" in out.text and "f(3)" in out.text
    assert "site-packages" not in out.text and "\x1b[" not in out.text  # the user's frames only, no colors
    assert run(tool, "print('still here')").text == "still here"


def test_bad_arguments(tool):
    for args in ({}, {"code": 3}, {"code": "1", "timeout": -1}, {"code": "1", "timeout": "5"},
                 {"code": "1", "extra": 1}, {"code": "print('\ud800')"}):
        with pytest.raises(ToolFailure) as e:
            tool(args, ToolContext(images=[], session_id="main"))
        assert e.value.status == BAD_ARGUMENTS
    assert "not valid text" in str(e.value) and "surrogate" in str(e.value)  # a lone UTF-16 surrogate


def test_output_is_truncated(tool):
    out = run(tool, "print('x' * 50_000)")
    assert out.status == OUTPUT_TOO_LARGE
    assert out.text.count("x") == tool.max_output_chars and "[output truncated" in out.text


def test_rlimits_are_set_inside(tool):
    out = run(tool, "import resource as r\nprint([r.getrlimit(k)[0] for k in (r.RLIMIT_CPU, r.RLIMIT_AS, "
                    "r.RLIMIT_NPROC, r.RLIMIT_FSIZE, r.RLIMIT_NOFILE, r.RLIMIT_CORE)])")
    assert out.text == str([60, 1 << 30, 16, FILE_BYTES, 256, 0])


def test_sessions_run_concurrently_and_calls_of_one_session_serialize(tool):
    outs = {}

    def call(key, session, code):
        outs[key] = run(tool, code, session=session)

    threads = [threading.Thread(target=call, args=(s, s, "import time\nn = 0")) for s in ("c1", "c2")]
    [t.start() for t in threads]  # two kernels start at once
    [t.join() for t in threads]
    t0 = time.monotonic()
    threads = [threading.Thread(target=call, args=(s, s, "time.sleep(0.6)\nprint('done')")) for s in ("c1", "c2")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert time.monotonic() - t0 < 1.1  # the two sessions ran in parallel
    assert outs["c1"].text == outs["c2"].text == "done"
    code = "v = n\ntime.sleep(0.3)\nn = v + 1\nprint(n)"
    t0 = time.monotonic()
    threads = [threading.Thread(target=call, args=(i, "c1", code)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert time.monotonic() - t0 >= 0.6  # one session: one call at a time, no lost update
    assert sorted(outs[i].text for i in range(2)) == ["1", "2"]
    tool.close_session("c1")
    tool.close_session("c2")


def test_close_session_kills_the_kernel_and_deletes_scratch(tool):
    run(tool, "z = 1", session="closing")
    k = _kernel(tool, "closing")
    tool.close_session("closing")
    assert k.proc.poll() is not None and not os.path.exists(k.dir)
    if tool.isolation["uid"]:
        assert _uid_processes(k.uid) == []
    out = run(tool, "print(z)", session="closing")  # a new kernel: state is gone
    assert out.status == TOOL_ERROR and "NameError" in out.text
    tool.close_session("closing")


# ----------------------------------------------------------------------------------------------------- break-outs


@pytest.mark.slow
def test_infinite_loop_times_out_and_the_session_works_again(tool):
    out = run(tool, "kept = 5\nwhile True:\n    pass", session="loop", timeout=1)
    assert out.status == TIMEOUT and "interrupted" in out.text and "KeyboardInterrupt" in out.text
    assert run(tool, "print(kept)", session="loop").text == "5"  # interrupted, not restarted: state kept
    # Code that ignores the interrupt: the kernel is killed and replaced, and the observation says so.
    t0 = time.monotonic()
    out = run(tool, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
              session="loop", timeout=1)
    assert time.monotonic() - t0 < 8  # 1 s, the interrupt's 1 s grace, a kernel start
    assert out.status == TIMEOUT and "killed" in out.text and "earlier variables are gone" in out.text
    out = run(tool, "print(kept)", session="loop")
    assert out.status == TOOL_ERROR and "NameError" in out.text
    assert run(tool, "print('works')", session="loop").text == "works"
    tool.close_session("loop")


def test_memory_bomb_is_contained(tool):
    out = run(tool, "x = bytearray(10**10)", session="main")
    assert out.status == TOOL_ERROR and "MemoryError" in out.text
    assert run(tool, "print(len(bytearray(10**7)))", session="main").text == "10000000"


def test_fork_bomb_is_bounded_and_cleaned_up(tool):
    if tool.isolation["rlimits"]["nproc"] is None:
        # The kernel runs as uid 0 on this machine, which RLIMIT_NPROC does not bound: the report says so, and the
        # bomb is not set off (it would endanger the machine).
        assert os.geteuid() == 0 and not tool.isolation["uid"]
        return
    out = run(tool, "import os\nwhile True:\n    os.fork()", session="fork", timeout=5)
    assert out.status == TOOL_ERROR
    assert "BlockingIOError" in out.text or "Resource temporarily unavailable" in out.text, out.text
    assert "background process(es) started by the code were killed" in out.text
    k = _kernel(tool, "fork")
    if tool.isolation["uid"]:
        assert len(_uid_processes(k.uid)) == 1  # the kernel alone
    assert run(tool, "print('alive')", session="fork").text == "alive"
    tool.close_session("fork")


def test_children_share_the_kernel_memory_limit(tool):
    # Three fresh interpreters of 400 MB each: every one is within the 1 GiB per-process limit, together they are
    # over it. Where the kernel has a cgroup of its own, the kernel's limit bounds them together.
    code = (
        "import subprocess, sys\n"
        "hog = 'b = bytearray(b\"\\\\x01\") * (400 << 20); import time; time.sleep(3)'\n"
        "ps = [subprocess.Popen([sys.executable, '-c', hog]) for _ in range(3)]\n"
        "print('exits', [p.wait() for p in ps])\n"
    )
    out = run(tool, code, session="mem", timeout=12)
    print(out.text)
    if tool.isolation["cgroup"]:
        assert "exits" not in out.text or "-9" in out.text or "the python kernel died" in out.text, out.text
    assert run(tool, "print('alive')", session="mem").text.endswith("alive")
    tool.close_session("mem")


def test_socket_dir_is_not_writable_by_the_kernel(tool):
    # The socket dir is on the host's disk, not under the scratch dir's tmpfs cap.
    code = (
        "import os, sys\n"
        "ipc = os.path.dirname(sys.argv[sys.argv.index('-f') + 1])\n"
        "try:\n"
        "    with open(os.path.join(ipc, 'fill'), 'wb') as f:\n"
        "        f.write(b'0' * (1 << 20))\n"
        "    print('wrote')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    out = run(tool, code, session="ipc")
    k = _kernel(tool, "ipc")
    if tool.isolation["uid"]:
        assert out.text == "PermissionError", out.text
        assert os.listdir(k.ipc) and "fill" not in os.listdir(k.ipc)
    assert run(tool, "print('still talking')", session="ipc").text == "still talking"
    tool.close_session("ipc")


def test_sysv_shared_memory_dies_with_the_kernel(tool):
    key = 0x41580000 + (os.getpid() % 0x10000)
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"print(libc.shmget({key}, 1 << 20, 0o1000 | 0o600))\n"  # IPC_CREAT
    )
    out = run(tool, code, session="sysv")
    assert out.status == OK and int(out.text) >= 0, out.text
    tool.close_session("sysv")
    left = _host_sysv_keys()
    if key in left and not tool.isolation["ipc_namespace"]:  # not contained here: do not leave it behind
        import ctypes
        ctypes.CDLL(None).shmctl(left[key], 0, None)  # IPC_RMID
    if tool.isolation["ipc_namespace"]:
        assert key not in left


def test_file_size_limit(tool):
    out = run(tool, f"open('big.bin', 'wb').write(b'0' * {2 * FILE_BYTES})", session="main")
    assert out.status == TOOL_ERROR and "File too large" in out.text
    run(tool, "import os\nos.remove('big.bin')", session="main")


def test_scratch_dir_is_capped(tool):
    code = (
        "import os\nn = 0\n"
        "try:\n"
        "    for i in range(100):\n"
        "        with open(f'fill{i}.bin', 'wb') as f:\n"
        "            n += f.write(b'0' * (1 << 20) * 7)\n"
        "except OSError as e:\n"
        "    print('STOPPED', e.strerror)\n"
        "print('WROTE', n)\n"
        "for i in range(100):\n"
        "    if os.path.exists(f'fill{i}.bin'):\n"
        "        os.remove(f'fill{i}.bin')\n"
    )
    out = run(tool, code, session="main")
    written = int(out.text.split("WROTE ")[1].split()[0])
    if tool.isolation["scratch_bytes"]:
        assert "STOPPED No space left on device" in out.text, out.text
        assert written <= SCRATCH_BYTES


def test_writes_outside_scratch_fail(tool):
    home = os.path.expanduser("~")
    targets = [str(REPO / "pwned.txt"), "/tmp/pwned.txt", os.path.join(home, "pwned.txt"), "/root/pwned.txt",
               "/etc/pwned.txt", "/var/tmp/pwned.txt", "/dev/shm/pwned.txt"]
    before = {p: os.path.exists(p) for p in targets}
    code = ("import os\nfor p in %r:\n    try:\n        open(p, 'w').write('pwned')\n        print('WROTE', p)\n"
            "    except OSError as e:\n        print('DENIED', p, e.strerror)\nopen('mine.txt', 'w').write('ok')\n"
            "print('SCRATCH', open('mine.txt').read())" % targets)
    out = run(tool, code, session="main")
    assert "SCRATCH ok" in out.text  # the scratch dir is writable
    wrote = [line.split()[1] for line in out.text.splitlines() if line.startswith("WROTE")]
    if tool.isolation["readonly_fs"]:
        assert wrote == [], out.text
    elif tool.isolation["uid"]:
        assert not {str(REPO / "pwned.txt"), "/root/pwned.txt", "/etc/pwned.txt"} & set(wrote), out.text
    for p in targets:  # whatever the kernel managed, nothing appeared on the host where it was denied
        if p not in wrote and not before[p]:
            assert not os.path.exists(p), p
    for p in wrote:
        if not before[p] and os.path.exists(p):
            os.remove(p)


def test_no_network(tool):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.setblocking(False)
    port = srv.getsockname()[1]
    code = (
        "import socket\n"
        "for host, port in [('127.0.0.1', %d), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try:\n        s.connect((host, port)); print('CONNECTED', host)\n"
        "    except OSError as e:\n        print('BLOCKED', host, e)\n"
        "try:\n    socket.getaddrinfo('example.com', 80); print('RESOLVED')\n"
        "except OSError as e:\n    print('NO DNS', e)\n" % port
    )
    out = run(tool, code, session="main", timeout=10)
    try:
        srv.accept()
        accepted = True
    except BlockingIOError:
        accepted = False
    srv.close()
    if tool.isolation["net_namespace"]:
        assert "CONNECTED" not in out.text and "RESOLVED" not in out.text, out.text
        assert out.text.count("BLOCKED") == 3 and "NO DNS" in out.text
        assert not accepted


def test_trainer_environment_and_root_files_are_not_readable(tool, monkeypatch, tmp_path):
    monkeypatch.setenv("AXPO_TEST_SECRET", "hunter2-" + uuid.uuid4().hex)
    secret = os.environ["AXPO_TEST_SECRET"]
    trainer_file = tmp_path / "secret.txt"  # a trainer file, root-only
    trainer_file.write_text(secret)
    trainer_file.chmod(0o600)
    run(tool, "pass", session="main")
    k = _kernel(tool, "main")
    beside = Path(k.images_dir) / "root_only.txt"  # a root-only file in a dir the kernel can read
    beside.write_text(secret)
    beside.chmod(0o600)
    code = (
        "import os\n"
        "print('ENV', 'AXPO_TEST_SECRET' in os.environ, any(%r in v for v in os.environ.values()))\n"
        "for p in [%r, %r, '/proc/%d/environ', '/proc/1/environ', '/etc/shadow']:\n"
        "    try:\n        data = open(p, 'rb').read()\n        print('READ', p, %r.encode() in data)\n"
        "    except OSError as e:\n        print('DENIED', p, e.strerror)\n"
        % (secret, str(trainer_file), str(beside), os.getpid(), secret)
    )
    out = run(tool, code, session="main")
    assert out.status == OK, out.text
    assert "ENV False False" in out.text  # the kernel gets a minimal environment, never the trainer's
    lines = dict((line.split()[1], line.split()[0]) for line in out.text.splitlines()[1:])
    if tool.isolation["uid"] or tool.isolation["private_proc"]:
        assert lines[f"/proc/{os.getpid()}/environ"] == "DENIED", out.text
    if tool.isolation["uid"]:
        assert "True" not in out.text.split("ENV False False", 1)[1], out.text  # no read returned the secret
        assert lines[str(beside)] == "DENIED" and lines[str(trainer_file)] == "DENIED", out.text
        assert lines["/etc/shadow"] == "DENIED"


def test_the_trainer_folder_is_hidden_even_where_world_readable(tool):
    """The trainer's working folder (here the repo, where pytest runs: its code, runs/ and data) holds files any uid
    may read; the kernel sees an empty folder there, while the Python it runs on (a venv inside it) still works."""
    assert pt.trainer_dirs() and os.path.realpath(os.getcwd()) in pt.trainer_dirs()
    folder = tempfile.mkdtemp(prefix="trainer-file-", dir=os.getcwd())
    try:
        path = os.path.join(folder, "checkpoint.json")
        with open(path, "w") as f:
            f.write("weights")
        os.chmod(folder, 0o755)
        os.chmod(path, 0o644)
        out = run(tool, f"try:\n    print('READ', open({path!r}).read())\n"
                        f"except OSError as e:\n    print('DENIED', type(e).__name__)",
                  session="trainer-folder")
        assert out.status == OK, out.text
        if tool.isolation["readonly_fs"]:  # the mount namespace that hides folders
            assert "DENIED FileNotFoundError" in out.text and "READ" not in out.text, out.text
    finally:
        shutil.rmtree(folder)


def test_cannot_signal_the_trainer(tool):
    received = []
    old = {s: signal.signal(s, lambda sig, frame: received.append(sig)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = (
            "import os, signal\n"
            "for pid in (os.getppid(), %d):\n"
            "    for sig in (signal.SIGTERM, signal.SIGUSR1):\n"
            "        try:\n            os.kill(pid, sig); print('SENT', pid, sig)\n"
            "        except OSError as e:\n            print('FAILED', pid, type(e).__name__)\n" % os.getpid()
        )
        out = run(tool, code, session="main")
        time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if tool.isolation["uid"] or tool.isolation["pid_namespace"]:
        assert received == [], out.text
        # (a root kernel without its own uid may take down its own launcher, i.e. itself: contained too)
        assert f"FAILED {os.getpid()}" in out.text or "the python kernel died" in out.text, out.text
    if tool.isolation["pid_namespace"] and "the python kernel died" not in out.text:
        assert "FAILED %d ProcessLookupError" % os.getpid() in out.text  # the trainer is not even visible
    assert run(tool, "print('ok')", session="main").text.endswith("ok")


def test_cannot_make_namespaces_mount_or_ptrace(tool):
    code = (
        "import ctypes, subprocess\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
        "print('mount', libc.mount(b'none', b'/mnt', b'tmpfs', 0, None), ctypes.get_errno())\n"
        "print('ptrace', libc.ptrace(16, 1, 0, 0), ctypes.get_errno())\n"  # PTRACE_ATTACH
        "print('spawn', subprocess.run(['true']).returncode)\n"  # ordinary processes still work
    )
    out = run(tool, code, session="main")
    assert "spawn 0" in out.text, out.text
    if tool.isolation["seccomp"]:
        assert "unshare -1 1" in out.text and "mount -1 1" in out.text and "ptrace -1 1" in out.text, out.text


def test_kernel_death_is_reported_and_the_session_restarts(tool):
    run(tool, "gone = 1", session="die")
    out = run(tool, "import os\nos._exit(3)", session="die")
    assert out.status == TOOL_ERROR
    assert "the python kernel died" in out.text and "exit code 3" in out.text
    assert "a new kernel was started, earlier variables are gone" in out.text
    out = run(tool, "print(globals().get('gone'))", session="die")
    assert out.text == "None"
    # Killed from outside between calls: the next call says so and runs in a new kernel.
    os.killpg(_kernel(tool, "die").proc.pid, signal.SIGKILL)
    _kernel(tool, "die").proc.wait()
    out = run(tool, "print('back')", session="die")
    assert out.status == OK and "the python kernel died" in out.text and out.text.endswith("back")
    tool.close_session("die")


@pytest.mark.slow
def test_cpu_time_limit_kills_the_kernel(tool, monkeypatch):
    monkeypatch.setattr(tool, "cpu_seconds", 2)
    monkeypatch.setattr(tool, "timeout_s", 60.0)  # a loaded machine may need more wall time for 2 CPU seconds
    out = run(tool, "while True:\n    pass", session="cpu", timeout=60)
    assert out.status == TOOL_ERROR and "the python kernel died" in out.text and "SIGKILL" in out.text
    tool.close_session("cpu")


def test_least_recently_used_session_is_shut_down(tool, monkeypatch):
    monkeypatch.setattr(tool, "max_sessions", 1)
    run(tool, "a = 1", session="lru-a")
    k = _kernel(tool, "lru-a")
    run(tool, "b = 1", session="lru-b")
    assert list(tool._sessions) == ["lru-b"]
    assert k.proc.poll() is not None and not os.path.exists(k.dir)
    # its conversation goes on: told that its variables are gone, not left to find a NameError
    out = run(tool, "print('a' in globals())", session="lru-a")
    assert out.text.startswith("[the python kernel was stopped to make room for others (at most 1 at once); a new "
                               "kernel was started, earlier variables are gone]") and "False" in out.text
    tool.close_session("lru-a")
    tool.close_session("lru-b")
    run(tool, "c = 1", session="lru-b")  # closed, then used again: a new conversation, nothing to tell
    assert "earlier variables" not in run(tool, "print(c)", session="lru-b").text
    tool.close_session("lru-b")


def test_empty_cgroups_of_dead_trainers_are_removed(tmp_path):
    """A trainer killed before `close()` leaves its kernels' `axpo-<pid namespace>-<pid>-...` cgroups behind; the
    next tool removes the empty ones of this PID namespace's pids that are gone, and leaves alone a live trainer's,
    a non-empty one, one of another PID namespace (a container sharing the hierarchy: its pids mean nothing here)
    and foreign names."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    ns = pt._pid_namespace()
    assert ns > 0
    parent = tmp_path / "memory"
    names = {"orphan": f"axpo-{ns}-{dead.pid}-py1-k0", "live": f"axpo-{ns}-{os.getpid()}-py2-k0",
             "busy": f"axpo-{ns}-{dead.pid}-py3-k1", "other_namespace": f"axpo-{ns + 1}-{dead.pid}-py4-k0",
             "foreign": "other-1"}
    for name in names.values():
        (parent / name).mkdir(parents=True)
    (parent / names["busy"] / "cgroup.procs").write_text("")  # rmdir refuses it, as a busy cgroup
    removed = pt.remove_orphan_cgroups({"memory": str(parent), "pids": str(parent)})
    assert removed == [str(parent / names["orphan"])]
    assert sorted(os.listdir(parent)) == sorted(n for k, n in names.items() if k != "orphan")
    if _machine_has_cgroup_memory():  # and a real one, made as `_Cgroup` makes them
        version, parents = pt._cgroup_parents()
        orphan = pt._Cgroup(version, parents, f"axpo-{ns}-{dead.pid}-test-{uuid.uuid4().hex[:8]}", 1 << 28, 8)
        assert all(os.path.isdir(d) for d in orphan.dirs)
        assert set(orphan.dirs) <= set(pt.remove_orphan_cgroups(parents))
        assert not any(os.path.isdir(d) for d in orphan.dirs)
