"""tpu/pod.py: every gcloud command it prints checked against gcloud's documented flags, its state machine, and
whole steps run against a fake gcloud that plays a two-host slice in temp directories (no network, no gcloud).

The reference pages of the commands are cited in tests/tpu/gcloud_reference.py, next to their flag tables:
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/describe
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
  https://cloud.google.com/sdk/gcloud/reference/storage/rsync
  https://cloud.google.com/sdk/gcloud/reference (flags of every command)
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tpu.gcloud_reference import check_command

REPO = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("tpu_pod", REPO / "tpu" / "pod.py")
pod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pod)

TARGET = ["--name", "axpo-8b", "--zone", "us-east5-a", "--project", "my-proj"]
REQUEST = ["--accelerator-type", "v5p-32", "--spot"]
RUN = ["--config", "configs/demo.py", "--workdir", "gs://bucket/axpo/axpo-8b", "--override=--config.seed=3"]
NO_WAIT = ["--poll-seconds", "0"]
BASH = shutil.which("bash")


def dry_run(capsys, *argv) -> list[list[str]]:
    """The commands a dry run prints (stdout, one per line), each split back into argv."""
    assert pod.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("step, extra", [
    ("create", REQUEST), ("wait", []), ("setup", []), ("setup", ["--workdir", "gs://bucket/run"]), ("launch", RUN),
    ("launch", ["--config", "configs/eval.py", "--workdir", "gs://bucket/eval"]),
    ("launch", ["--config", "configs/rl.py", "--workdir", "runs/x"]),  # asks the slice's type first
    ("logs", ["--no-follow"]),
    ("copy-checkpoints", ["--workdir", "gs://bucket/run", "--to", "gs://archive/run"]),
    ("copy-checkpoints", ["--workdir", "/home/me/run", "--to", "gs://archive/run"]),
    ("delete", []), ("status", []), ("up", REQUEST + RUN), ("watch", REQUEST + RUN),
])
def test_every_dry_run_command_is_documented_gcloud(capsys, monkeypatch, tmp_path, step, extra):
    monkeypatch.setenv("PATH", str(tmp_path))  # a dry run must not need gcloud (nor find one)
    commands = dry_run(capsys, step, *TARGET, *extra)
    assert commands
    for argv in commands:
        path = check_command(argv)
        if path[-1] == "ssh":  # the remote script must be valid bash, and any gcloud inside it documented too
            script = next(a for a in argv if a.startswith("--command="))[len("--command="):]
            assert subprocess.run([BASH, "-n", "-c", script]).returncode == 0, script
            if "gcloud storage" in script:  # (after the `cd` into the folder launch runs in)
                check_command(shlex.split(script[script.index("gcloud storage"):]))


def test_dry_run_create_and_delete_say_exactly_what_they_run(capsys):
    describe, create = dry_run(capsys, "create", *TARGET, *REQUEST)
    assert describe[-1] == "--format=value(state.state)"
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and create[5] == "axpo-8b"
    assert {"--node-id=axpo-8b", "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", "--spot",
            "--zone=us-east5-a", "--project=my-proj"} <= set(create)
    [reserved] = dry_run(capsys, "create", *TARGET, "--accelerator-type", "v6e-16", "--reserved",
                         "--runtime-version", "custom-version")[1:]
    assert "--reserved" in reserved and "--spot" not in reserved and "--runtime-version=custom-version" in reserved
    _, delete = dry_run(capsys, "delete", *TARGET)
    assert {"--force", "--async", "--quiet"} <= set(delete)


def test_dry_run_wait_prints_the_polling_command_once(capsys):
    assert dry_run(capsys, "wait", *TARGET) == [shlex.split(shlex.join(pod.describe_command(
        pod.Target("axpo-8b", "us-east5-a", "my-proj"))))]


def test_spot_and_reserved_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        pod.main(["create", *TARGET, "--accelerator-type", "v5p-8", "--spot", "--reserved", "--dry-run"])


def test_reference_checker_rejects_what_gcloud_would(capsys):
    good = pod.create_command(pod.Target("a", "z", None), accelerator_type="v5p-8", runtime_version="v")
    check_command(good)
    for bad, why in [
        (good + ["--preemptible"], "not a documented flag"),  # a tpu-vm create flag, not a queued-resources one
        ([a for a in good if a != "a"], "positionals"),
        ([a for a in good if not a.startswith("--runtime-version")], "missing"),
        ([a for a in good if not a.startswith("--accelerator-type")], "exactly one"),
        (good + ["--spot", "--reserved"], "exclusive"),
        (good + ["--async=yes"], "boolean"),
        (["gcloud", "compute", "tpus", "tpu-vm", "ssh", "a", "--zone=z", "--worker"], "takes a value"),
        (["gcloud", "compute", "tpus", "tpu-vm", "scp", "only-one", "--zone=z"], "positionals"),
        (["gcloud", "compute", "tpus", "queued-resources", "start", "a"], "not a command"),
    ]:
        with pytest.raises(AssertionError, match=why):
            check_command(bad)


# ------------------------------------------------------------------------------------------- the state machine


def test_create_action_for_every_state():
    assert pod.create_action(None) == pod.CREATE
    for state in ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"):
        assert pod.create_action(state) == pod.KEEP
    assert pod.create_action("FAILED") == pod.RECREATE
    assert pod.create_action("SUSPENDED") == pod.RECREATE  # a preempted spot slice
    assert pod.create_action("SUSPENDING") == pod.WAIT_THEN_DECIDE
    assert pod.create_action("DELETING") == pod.WAIT_THEN_DECIDE
    with pytest.raises(pod.PodError, match="unknown queued resource state 'EXPLODED'"):
        pod.create_action("EXPLODED")


def test_wait_verdict_and_recovery():
    assert pod.wait_verdict("ACTIVE") == "ready"
    assert pod.wait_verdict("WAITING_FOR_RESOURCES") == pod.wait_verdict("PROVISIONING") == "waiting"
    for state in ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING", None):
        assert pod.wait_verdict(state) == "failed"
    assert [s for s in pod.KNOWN_STATES + (None,) if pod.needs_recovery(s)] == ["FAILED", "SUSPENDED", "SUSPENDING"]


def test_runtime_version_defaults_and_source_digest(tmp_path):
    assert pod.default_runtime_version("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert pod.default_runtime_version("v6e-8") == "v2-alpha-tpuv6e"
    with pytest.raises(pod.PodError, match="--runtime-version"):
        pod.default_runtime_version("v9x-8")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big").write_text("skipped")
    first = pod.source_digest(tmp_path)
    assert pod.source_files(tmp_path) == ["a.py"]
    (tmp_path / "a.py").write_text("x = 2\n")
    assert pod.source_digest(tmp_path) != first


# ------------------------------------------------------------------------------------------- a fake slice

FAKE_PYTHON3 = """#!/bin/bash
# python3 on a fake TPU host: passes the version check, makes a venv whose python is the fake below.
if [ "$1" = "-c" ]; then exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$FAKE_GCLOUD_DIR/venv-python" "$3/bin/python"; exit 0; fi
exit 1
"""
FAKE_VENV_PYTHON = """#!/bin/bash
# the venv's python on a fake host: pip succeeds; launch.py records its arguments and, like the trainer, resumes
# from the step it finds in its workdir and leaves the next one there (host 0 writes, as process 0 would).
echo "$HOME $*" >> "$FAKE_GCLOUD_DIR/python-calls.txt"
if [ "$2" = "pip" ]; then exit 0; fi
if [ "$1" = "launch.py" ]; then
  workdir=$(printf '%s\\n' "$@" | sed -n 's/^--config.workdir=//p')
  step=$(cat "$workdir/step" 2>/dev/null || echo 0)
  echo "$HOME $* resumed-at=$step" >> "$FAKE_GCLOUD_DIR/launches.txt"
  case "$HOME" in */0) mkdir -p "$workdir" && echo $((step + 1)) > "$workdir/step";; esac
  sleep "${FAKE_LAUNCH_SECONDS:-0}"; exit 0
fi
exit 1
"""
# Cloud Storage FUSE on a fake host: the bucket's contents live in a shared directory (they outlive the VMs), the
# mount itself is per host (a marker in the host's home, wiped with the host when the slice is re-created).
FAKE_GCSFUSE = """#!/bin/bash
echo "$*" >> "$FAKE_GCLOUD_DIR/gcsfuse-calls.txt"; touch "$HOME/.mounted-$(basename "${@: -1}")"
"""
FAKE_MOUNTPOINT = """#!/bin/bash
[ "$1" = "-q" ] && shift; [ -f "$HOME/.mounted-$(basename "$1")" ]
"""
FAKE_SUDO = """#!/bin/bash
exec "$@"
"""


@pytest.fixture
def fake_slice(tmp_path, monkeypatch):
    root = tmp_path / "gcloud"
    (root / "bin").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "tpu" / "fake_gcloud.py", root / "bin" / "gcloud")
    for name, text in (("python3", FAKE_PYTHON3), ("gcsfuse", FAKE_GCSFUSE), ("mountpoint", FAKE_MOUNTPOINT),
                       ("sudo", FAKE_SUDO)):
        (root / "bin" / name).write_text(text)
    (root / "venv-python").write_text(FAKE_VENV_PYTHON)
    for exe in [*(root / "bin").iterdir(), root / "venv-python"]:
        exe.chmod(0o755)
    monkeypatch.setattr(pod, "MOUNT_ROOT", str(tmp_path / "mnt"))  # where the "buckets" live
    # the fake gcloud is a python script: give it this interpreter whatever python3 means on PATH
    (root / "bin" / "gcloud").write_text(f"#!{sys.executable}\n" + (root / "bin" / "gcloud").read_text())
    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(root))
    monkeypatch.setenv("FAKE_GCLOUD_HOSTS", "2")

    class Slice:
        dir = root
        workdir = tmp_path / "mnt" / "bucket" / "axpo" / "axpo-8b"  # gs://bucket/axpo/axpo-8b as the hosts see it

        def states(self, *states):
            (root / "states.txt").write_text("\n".join(states) + "\n")

        def calls(self):
            path = root / "calls.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        def verbs(self):
            return [" ".join(argv[2:4]) if argv[0] == "compute" else " ".join(argv[:2]) for argv in self.calls()]

        def launches(self, expected, timeout=10.0):
            """Lines the fake launch.py wrote, waiting (nohup runs it in the background) for `expected` of them."""
            path, deadline = root / "launches.txt", time.monotonic() + timeout
            while time.monotonic() < deadline:
                lines = path.read_text().splitlines() if path.exists() else []
                if len(lines) >= expected:
                    return lines
                time.sleep(0.05)
            return lines

    return Slice()


def run_pod(*argv) -> int:
    return pod.main(list(argv), gcloud=pod.Gcloud(sleep=lambda seconds: None))


def test_up_on_a_preempted_slice_recreates_it_and_relaunches_the_run_in_the_same_workdir(fake_slice, capfd):
    fake_slice.states("SUSPENDED", "PROVISIONING", "ACTIVE")
    assert run_pod("up", *TARGET, *REQUEST, *RUN, *NO_WAIT) == 0
    assert fake_slice.verbs() == [
        "queued-resources describe", "queued-resources delete", "queued-resources create",  # create: recreate
        "queued-resources describe", "queued-resources describe",  # wait: PROVISIONING, ACTIVE
        "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh",  # setup: mount the bucket, copy and install the source
        "tpu-vm ssh",  # launch
    ]
    for argv in fake_slice.calls():
        check_command(["gcloud", *argv])
    delete = fake_slice.calls()[1]
    assert "--force" in delete and "--async" not in delete  # must be gone before the create that follows
    launches = fake_slice.launches(2)
    assert len(launches) == 2 and all(
        f"--config=configs/demo.py --config.workdir={fake_slice.workdir} --config.seed=3" in line
        for line in launches)
    for host in ("0", "1"):
        home = fake_slice.dir / "hosts" / host
        assert (home / "axpo-jax" / "launch.py").is_file()  # the source was unpacked
        assert list((home / "axpo-jax").glob(".axpo-setup-*"))
        log = home / "axpo-logs" / "axpo-8b.log"
        deadline = time.monotonic() + 10
        while "exited with status 0" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "[pod] launch.py exited with status 0" in log.read_text()
    out = capfd.readouterr().out
    assert "[pod] axpo-8b: PROVISIONING" in out and "[pod] axpo-8b: ACTIVE" in out


def test_steps_are_idempotent_on_a_live_slice(fake_slice, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_LAUNCH_SECONDS", "5")  # the run is still going when launch runs a second time
    fake_slice.states("ACTIVE")
    assert run_pod("create", *TARGET, *REQUEST, *NO_WAIT) == 0
    assert fake_slice.verbs() == ["queued-resources describe"]  # exists and alive: no create
    assert run_pod("launch", *TARGET, *RUN) == 1  # the bucket is not mounted yet: refused, nothing started
    assert "is not mounted; run setup" in capfd.readouterr().err
    setup = ("setup", *TARGET, "--workdir", "gs://bucket/axpo/axpo-8b")
    assert run_pod(*setup) == 0 and run_pod(*setup) == 0
    assert run_pod("launch", *TARGET, *RUN) == 0
    fake_slice.launches(2)
    assert run_pod("launch", *TARGET, *RUN) == 0
    out = capfd.readouterr().out
    assert out.count("installed\n") == 4 and out.count("already installed") == 2  # 2 hosts x (install, skip)
    assert out.count("mounted at") == 4 and out.count("already mounted") == 2
    assert len((fake_slice.dir / "gcsfuse-calls.txt").read_text().splitlines()) == 2  # once per host
    assert out.count("is already running") == 2
    pip_installs = [line for line in (fake_slice.dir / "python-calls.txt").read_text().splitlines()
                    if "pip install --quiet -e ." in line]
    assert len(pip_installs) == 2  # once per host
    assert len(fake_slice.launches(2)) == 2  # the second launch started nothing


def test_watch_recovers_from_a_preemption_and_stops_when_the_slice_is_deleted(fake_slice, capfd):
    fake_slice.states("ACTIVE", "ACTIVE",  # up: create keeps it, wait sees it ready
                      "ACTIVE", "SUSPENDED",  # watch polls: fine, then preempted
                      "SUSPENDED", "ACTIVE",  # up again: create recreates, wait
                      "NOT_FOUND")  # the user deleted it: watch ends
    assert run_pod("watch", *TARGET, *REQUEST, *RUN, *NO_WAIT) == 0
    verbs = fake_slice.verbs()
    assert verbs.count("queued-resources create") == 1 and verbs.count("queued-resources delete") == 1
    assert verbs.count("tpu-vm scp") == 2  # fresh VMs get the source again
    launches = fake_slice.launches(4)
    assert len(launches) == 4
    commands = {line.split(" ", 1)[1].rsplit(" resumed-at=", 1)[0] for line in launches}
    assert len(commands) == 1  # the same command every time
    # host 0 (process 0) started from scratch and left step 1 in the bucket; relaunched on the new VMs, it found it
    host0 = [line.rsplit(" resumed-at=", 1)[1] for line in launches if line.split(" ", 1)[0].endswith("hosts/0")]
    assert host0 == ["0", "1"]
    assert len((fake_slice.dir / "gcsfuse-calls.txt").read_text().splitlines()) == 4  # re-mounted on the new VMs
    out = capfd.readouterr().out
    assert "recovery 1: up again, the run resumes from gs://bucket/axpo/axpo-8b" in out


def test_wait_stops_with_a_clear_error_when_the_request_fails(fake_slice, capfd):
    fake_slice.states("WAITING_FOR_RESOURCES", "FAILED")
    assert run_pod("wait", *TARGET, *NO_WAIT) == 1
    captured = capfd.readouterr()
    assert "[pod] axpo-8b: WAITING_FOR_RESOURCES" in captured.out
    assert "tpu/pod.py wait: error: queued resource axpo-8b is FAILED" in captured.err
    assert "requests it again" in captured.err


def test_delete_is_a_no_op_when_already_gone(fake_slice):
    fake_slice.states("NOT_FOUND")
    assert run_pod("delete", *TARGET) == 0
    assert fake_slice.verbs() == ["queued-resources describe"]
    fake_slice.states("ACTIVE")
    assert run_pod("delete", *TARGET) == 0
    assert fake_slice.verbs()[-1] == "queued-resources delete" and "--async" in fake_slice.calls()[-1]


def test_a_new_source_replaces_the_old_but_keeps_the_venv_and_runs(tmp_path):
    """setup on a VM that has an older source: a relative workdir's checkpoints (under ~/axpo-jax/runs, where
    launch runs) survive it, as does the venv; the old source files do not."""
    home = tmp_path / "home"
    repo = home / "axpo-jax"
    (repo / "runs" / "x" / "checkpoints" / "40").mkdir(parents=True)
    (repo / "old_module.py").write_text("")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "launch.py").write_text("")
    subprocess.run(["tar", "-czf", str(home / "src.tar.gz"), "-C", str(tmp_path / "src"), "."], check=True)
    subprocess.run(["bash", "-c", pod.setup_script("src.tar.gz", "abc")], check=True, capture_output=True,
                   env={**os.environ, "HOME": str(home)})
    assert (repo / "launch.py").is_file() and not (repo / "old_module.py").exists()
    assert (repo / "runs" / "x" / "checkpoints" / "40").is_dir() and (repo / ".venv" / "bin" / "python").is_file()


def test_copy_checkpoints_from_a_local_workdir_runs_where_launch_ran(fake_slice):
    for host in ("0", "1"):
        (fake_slice.dir / "hosts" / host / "axpo-jax" / "runs" / "x").mkdir(parents=True)
    assert run_pod("copy-checkpoints", *TARGET, "--workdir", "runs/x", "--to", "gs://archive/run") == 0
    [ssh] = [argv for argv in fake_slice.calls() if "tpu-vm" in argv]
    assert "--command=cd ~/axpo-jax && gcloud storage rsync runs/x gs://archive/run --recursive" in ssh


def test_copy_checkpoints_from_a_bucket_runs_here(fake_slice):
    assert run_pod("copy-checkpoints", *TARGET, "--workdir", "gs://bucket/run", "--to", "gs://archive/run") == 0
    assert fake_slice.calls() == [["storage", "rsync", "gs://bucket/run", "gs://archive/run", "--recursive"]]
    assert run_pod("copy-checkpoints", *TARGET, "--workdir", "gs://bucket/run", "--to", "/tmp/x") == 1


# ------------------------------------------------------------------------------------------- the workdir


def test_the_run_folder_goes_to_the_field_the_config_has():
    """eval's config names its folder output_dir: --config.workdir would be an unknown field on every host."""
    assert pod.workdir_field("configs/eval.py") == "output_dir"
    assert pod.workdir_field("configs/rl.py:8b,v5p-16") == pod.workdir_field("configs/demo.py") == "workdir"
    script = pod.launch_script("n", "configs/eval.py", "gs://bucket/evalrun")
    assert "--config.output_dir=/mnt/gcs/bucket/evalrun" in script and "--config.workdir" not in script
    assert "--config.workdir=runs/x" in pod.launch_script("n", "configs/sft.py", "runs/x")


def test_slice_hosts():
    assert [pod.slice_hosts(t) for t in ("v5p-8", "v5p-16", "v4-32", "v5litepod-8", "v5litepod-16", "v6e-64")] == [
        1, 2, 4, 1, 4, 16]
    assert pod.slice_hosts("v9x-8") is None


def test_a_workdir_on_the_hosts_disks_is_refused_on_a_multi_host_slice(fake_slice, capfd, monkeypatch):
    """Each host's own disk under one path: orbax's first save would hang 10 minutes, then crash."""
    local = ["--config", "configs/rl.py", "--workdir", "runs/x"]
    assert run_pod("up", *TARGET, "--accelerator-type", "v5p-16", *local, *NO_WAIT) == 1
    assert fake_slice.calls() == []  # refused before renting anything
    assert run_pod("launch", *TARGET, *local) == 1  # launch alone asks the slice's type
    assert fake_slice.verbs() == ["tpu-vm describe"]
    err = capfd.readouterr().err
    assert err.count("workdir runs/x is on each TPU VM's own disk but v5p-16 has 2 hosts, which must share it: use "
                     "--workdir gs://BUCKET/PATH") == 2
    monkeypatch.setenv("FAKE_GCLOUD_HOSTS", "1")
    assert run_pod("setup", *TARGET) == 0 and run_pod("launch", *TARGET, *local) == 0
    assert fake_slice.verbs()[-2:] == ["tpu-vm describe", "tpu-vm ssh"]
    assert len(fake_slice.launches(1)) == 1
