#!/usr/bin/env python3
"""Rent a Cloud TPU slice as a queued resource, run axpo-jax on every host, and give it back.

    python tpu/pod.py up --name axpo-8b --project my-proj --zone us-east5-a --accelerator-type v5p-32 --spot \\
        --config configs/demo.py --workdir gs://my-bucket/axpo/axpo-8b [--dry-run]

Steps (each one checks before it acts, so any step can be re-run at any time):

  create            request the slice (`gcloud compute tpus queued-resources create`); nothing if it already
                    exists and is alive; delete + re-create if it FAILED or was preempted (SUSPENDED)
  wait              poll its state until ACTIVE, one status line per change; stop with an error on FAILED,
                    SUSPENDING / SUSPENDED (preempted) or DELETING
  setup             mount a gs:// workdir's bucket on every host (Cloud Storage FUSE), copy this checkout to every
                    host and install it (.venv, `pip install -e . jax[tpu]`); each part skipped where done already
  launch            start `launch.py --config ... --config.workdir=WORKDIR` (`output_dir` for a config that has
                    that field instead, e.g. eval) on every host in the background; nothing on a host where it is
                    already running; gs://BUCKET/PATH reaches the trainer as /mnt/gcs/BUCKET/PATH; a WORKDIR on
                    the VMs' own disks is refused for a slice of more than one host (they must share it)
  logs              print (and follow) each host's log, lines prefixed with the host name
  copy-checkpoints  `gcloud storage rsync` the run's workdir to a gs:// destination
  delete            delete the queued resource and its TPU VMs; nothing if it is already gone
  status            the state, and what `up` would do about it
  up                create + wait + setup + launch
  watch             up, then poll; whenever the slice is preempted or fails, up again. The trainer resumes from
                    the latest checkpoint in WORKDIR, so WORKDIR must outlive the slice: use a gs:// path

`--dry-run` prints the gcloud commands a step would run, one per line on stdout, and runs none of them (it needs
no gcloud); for `wait` it prints the polling command once, for `create` it shows the path for a resource that
does not exist yet. Explanations go to stderr, prefixed with "# ".

The TPU VM (node) gets the queued resource's name. Everything here is plain argparse + subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_REPO = "~/axpo-jax"  # on every TPU VM
REMOTE_LOGS = "~/axpo-logs"
MOUNT_ROOT = "/mnt/gcs"  # gs://BUCKET is mounted at MOUNT_ROOT/BUCKET on every TPU VM

# ------------------------------------------------------------------------------------------- states

# https://cloud.google.com/tpu/docs/queued-resources (and the API's QueuedResourceState.State)
PENDING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
ACTIVE = "ACTIVE"
ENDED = ("FAILED", "SUSPENDED")  # must be deleted before the name can be used again
SETTLING = ("SUSPENDING", "DELETING")  # on the way to SUSPENDED / gone
KNOWN_STATES = PENDING + (ACTIVE,) + ENDED + SETTLING

# What `create` does about the state it finds (None: no such queued resource).
CREATE, KEEP, RECREATE, WAIT_THEN_DECIDE = "create", "keep", "recreate", "wait"


class PodError(RuntimeError):
    """A step cannot go on; the message says why and what to run."""


def create_action(state: str | None) -> str:
    """Pure: what `create` does given the queued resource's state."""
    if state is None:
        return CREATE
    if state == ACTIVE or state in PENDING:
        return KEEP
    if state in ENDED:
        return RECREATE
    if state in SETTLING:
        return WAIT_THEN_DECIDE
    raise PodError(f"unknown queued resource state {state!r}; known: {', '.join(KNOWN_STATES)}")


def wait_verdict(state: str | None) -> str:
    """Pure: "ready", "waiting", or "failed" for the state `wait` sees."""
    if state == ACTIVE:
        return "ready"
    if state in PENDING:
        return "waiting"
    if state is None or state in ENDED or state in SETTLING:
        return "failed"
    raise PodError(f"unknown queued resource state {state!r}; known: {', '.join(KNOWN_STATES)}")


def needs_recovery(state: str | None) -> bool:
    """Pure, for `watch`: the slice is gone from under the run (preempted or failed) and `up` must bring it back."""
    return state in ENDED or state == "SUSPENDING"


_STATE_MEANING = {
    "FAILED": "the request failed (bad request, quota, or no capacity before its deadline)",
    "SUSPENDING": "its TPU VMs are being deleted (a spot slice being preempted, or a delete)",
    "SUSPENDED": "its TPU VMs were deleted (a spot slice is preempted this way)",
    "DELETING": "it is being deleted",
    None: "it does not exist",
}

# ------------------------------------------------------------------------------------------- commands


def default_runtime_version(accelerator_type: str) -> str:
    """The TPU software version Google lists for JAX on each generation (`gcloud compute tpus tpu-vm versions
    list` shows what a zone offers): https://cloud.google.com/tpu/docs/runtimes"""
    generation = accelerator_type.rsplit("-", 1)[0]
    versions = {"v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e",
                "v4": "tpu-ubuntu2204-base"}
    if generation not in versions:
        raise PodError(f"no default runtime version for {accelerator_type!r}; pass --runtime-version")
    return versions[generation]


def slice_hosts(accelerator_type: str) -> int | None:
    """How many hosts (TPU VMs) a slice of `accelerator_type` has, or None for a type this script does not know.
    v2, v3, v4 and v5p count TensorCores (2 per chip, 4 chips per host); v5litepod and v6e count chips, up to 8 on
    one host, 4 per host beyond: https://cloud.google.com/tpu/docs/system-architecture-tpu-vm"""
    generation, _, size = accelerator_type.rpartition("-")
    if not size.isdigit():
        return None
    if generation in ("v2", "v3", "v4", "v5p"):
        return max(1, int(size) // 8)
    if generation in ("v5litepod", "v6e"):
        return 1 if int(size) <= 8 else int(size) // 4
    return None


def check_workdir_for_slice(workdir: str, accelerator_type: str) -> None:
    """A workdir on the VMs' own disks is a different folder on each host: multi-host checkpoints (each host writes
    its shards, process 0 the metadata) then hang the first save for 10 minutes and crash, so only a one-host
    slice may use one."""
    if workdir.startswith("gs://"):
        return
    hosts = slice_hosts(accelerator_type)
    if hosts != 1:
        raise PodError(f"workdir {workdir} is on each TPU VM's own disk but {accelerator_type} has "
                       f"{f'{hosts} hosts' if hosts else 'an unknown number of hosts'}, which must share it: use "
                       f"--workdir gs://BUCKET/PATH (the one shared folder pod.py sets up: it mounts the bucket on "
                       f"every VM)")


def workdir_field(config: str, root: str = REPO_ROOT) -> str:
    """The config field that takes the run's folder: `workdir` (sft, rl, demo, ...) or `output_dir` (eval,
    compare). Read from the config file's text, since this script runs without the project's packages."""
    path = config.split(":", 1)[0]
    path = path if os.path.isabs(path) else os.path.join(root, path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise PodError(f"cannot read the config file {path}: {error.strerror or error}") from None
    for field in ("workdir", "output_dir"):
        if re.search(rf"\bconfig\.{field}\s*=", text):
            return field
    raise PodError(f"{config} sets neither config.workdir nor config.output_dir: no field to pass --workdir in")


class Target:
    """The queued resource every command is about: name, zone, project (the TPU node has the same name)."""

    def __init__(self, name: str, zone: str, project: str | None):
        self.name, self.zone, self.project = name, zone, project

    def where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


_QR = ["gcloud", "compute", "tpus", "queued-resources"]
_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


def describe_command(t: Target) -> list[str]:
    return _QR + ["describe", t.name, *t.where(), "--format=value(state.state)"]


def create_command(t: Target, *, accelerator_type: str, runtime_version: str, spot: bool = False,
                   reserved: bool = False, valid_until_duration: str | None = None) -> list[str]:
    if spot and reserved:
        raise PodError("--spot and --reserved are exclusive")
    argv = _QR + ["create", t.name, *t.where(), f"--node-id={t.name}", f"--accelerator-type={accelerator_type}",
                  f"--runtime-version={runtime_version}"]
    argv += ["--spot"] if spot else []
    argv += ["--reserved"] if reserved else []
    argv += [f"--valid-until-duration={valid_until_duration}"] if valid_until_duration else []
    return argv


def delete_command(t: Target, *, wait: bool) -> list[str]:
    """--force deletes the TPU VMs first (a live queued resource cannot be deleted without it); --quiet answers
    the confirmation prompt; --async returns at once unless the caller must wait to re-create."""
    return _QR + ["delete", t.name, *t.where(), "--force", "--quiet"] + ([] if wait else ["--async"])


def node_type_command(t: Target) -> list[str]:
    """The accelerator type of the slice's TPU VMs (the node has the queued resource's name)."""
    return _VM + ["describe", t.name, *t.where(), "--format=value(acceleratorType)"]


def ssh_command(t: Target, script: str, worker: str = "all") -> list[str]:
    return _VM + ["ssh", t.name, *t.where(), f"--worker={worker}", f"--command={script}"]


def scp_command(t: Target, local_path: str, remote_path: str, worker: str = "all") -> list[str]:
    return _VM + ["scp", local_path, f"{t.name}:{remote_path}", *t.where(), f"--worker={worker}"]


def storage_rsync_command(source: str, destination: str) -> list[str]:
    return ["gcloud", "storage", "rsync", source, destination, "--recursive"]


# ------------------------------------------------------------------------------------------- remote scripts


def setup_script(tarball: str, digest: str) -> str:
    """Unpacks the source next to the existing .venv and installs it; a marker file named after the source digest
    makes a second run a no-op. The project needs Python >= 3.11; TPU images ship Ubuntu 22.04's 3.10, so the
    venv comes from uv (pip-installed) with a 3.12 interpreter when python3 is older. One line, so that a dry run
    prints one command per line."""
    marker = f"{REMOTE_REPO}/.axpo-setup-{digest}"
    return "; ".join([
        "set -euo pipefail",
        f'if [ -f {marker} ]; then echo "$(hostname): source {digest} already installed"; exit 0; fi',
        f"mkdir -p {REMOTE_REPO}",
        # the old source goes; the venv stays, and so does runs/ (a relative workdir's checkpoints live there)
        f"find {REMOTE_REPO} -mindepth 1 -maxdepth 1 ! -name .venv ! -name runs -exec rm -rf {{}} +",
        f"tar -xzf ~/{tarball} -C {REMOTE_REPO}",
        f"cd {REMOTE_REPO}",
        "if [ ! -x .venv/bin/python ]; then if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; "
        "then python3 -m venv .venv; else python3 -m pip install --user --quiet uv && "
        "~/.local/bin/uv venv --seed --python 3.12 .venv; fi; fi",
        ".venv/bin/python -m pip install --quiet --upgrade pip",
        ".venv/bin/python -m pip install --quiet -e . 'jax[tpu]'",
        f"touch {marker}",
        f'echo "$(hostname): source {digest} installed"',
    ])


def split_gcs(url: str) -> tuple[str, str]:
    """("bucket", "path/in/it") of gs://bucket/path/in/it."""
    if not url.startswith("gs://") or not url[5:].split("/", 1)[0]:
        raise PodError(f"{url!r} is not a gs://BUCKET/... path")
    bucket, _, path = url[5:].partition("/")
    return bucket, path.strip("/")


def host_workdir(workdir: str) -> str:
    """The workdir as the trainer on a TPU VM sees it: a gs:// workdir through its bucket's FUSE mount (the trainer
    writes its workdir with plain file calls), anything else as given."""
    if not workdir.startswith("gs://"):
        return workdir
    bucket, path = split_gcs(workdir)
    return f"{MOUNT_ROOT}/{bucket}" + (f"/{path}" if path else "")


def mount_script(bucket: str) -> str:
    """Mounts gs://BUCKET at MOUNT_ROOT/BUCKET with Cloud Storage FUSE, installing gcsfuse from Google's apt
    repository when the image lacks it (https://cloud.google.com/storage/docs/cloud-storage-fuse/install);
    nothing when it is mounted already. --implicit-dirs shows directories another host created by writing files
    under them; --rename-dir-limit lets orbax rename a finished checkpoint's temporary directory (a copy + delete
    on a flat bucket, atomic on a bucket with hierarchical namespace)."""
    point = f"{MOUNT_ROOT}/{bucket}"
    return "; ".join([
        "set -euo pipefail",
        f'if mountpoint -q {point}; then echo "$(hostname): gs://{bucket} already mounted at {point}"; exit 0; fi',
        "if ! command -v gcsfuse >/dev/null; then "
        "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
        "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
        "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
        "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi",
        f'sudo mkdir -p {point} && sudo chown "$(id -u):$(id -g)" {point}',
        f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 {bucket} {point}",
        f'echo "$(hostname): gs://{bucket} mounted at {point}"',
    ])


def launch_script(run_name: str, config: str, workdir: str, overrides: Sequence[str] = ()) -> str:
    """Starts launch.py in the background with nohup (it survives the ssh session), its output appended to the
    run's log; a pid file makes a second launch a no-op while the first one runs. The same command runs on every
    host: launch.py / jax.distributed find the other hosts of the slice themselves."""
    log, pid = f"{REMOTE_LOGS}/{run_name}.log", f"{REMOTE_LOGS}/{run_name}.pid"
    argv = [".venv/bin/python", "launch.py", f"--config={config}",
            f"--config.{workdir_field(config)}={host_workdir(workdir)}", *overrides]
    command = shlex.join(argv) + '; echo "[pod] launch.py exited with status $?"'
    mounted = []
    if workdir.startswith("gs://"):
        point = f"{MOUNT_ROOT}/{split_gcs(workdir)[0]}"
        mounted = [f'if ! mountpoint -q {point}; then echo "$(hostname): {point} is not mounted; run setup with '
                   f'--workdir {workdir}" >&2; exit 1; fi']
    return "; ".join([
        "set -euo pipefail",
        *mounted,
        f"mkdir -p {REMOTE_LOGS}",
        f"cd {REMOTE_REPO}",
        f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
        f'echo "$(hostname): {run_name} is already running (pid $(cat {pid}))"; exit 0; fi',
        f"nohup sh -c {shlex.quote(command)} >> {log} 2>&1 < /dev/null & echo $! > {pid}",
        f'echo "$(hostname): started {run_name} (pid $(cat {pid})), log {log}"',
    ])


def logs_script(run_name: str, lines: int, follow: bool) -> str:
    log = f"{REMOTE_LOGS}/{run_name}.log"
    tail = f"tail -n {int(lines)}" + (" -F" if follow else "")
    return f'{tail} {log} 2>&1 | sed -u "s/^/$(hostname): /"'


# ------------------------------------------------------------------------------------------- the source tarball

_SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", "node_modules"}


def source_files(root: str = REPO_ROOT) -> list[str]:
    """Paths (relative to root) of this checkout's files: git's tracked and untracked-but-not-ignored files when
    git is there (a read-only query), else a walk that skips virtualenvs, run outputs and caches."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             capture_output=True, check=True).stdout.decode()
        files = [p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p))]
        if files:
            return sorted(files)
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if not f.endswith(".pyc")]
    return sorted(files)


def source_digest(root: str = REPO_ROOT, files: Sequence[str] | None = None) -> str:
    """12 hex digits that change when any file's path or bytes change (names the tarball and the setup marker)."""
    h = hashlib.sha256()
    for rel in files if files is not None else source_files(root):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:12]


def write_source_tarball(out_dir: str, root: str = REPO_ROOT) -> tuple[str, str]:
    """(path, digest) of a gzipped tar of the checkout's source files."""
    files = source_files(root)
    digest = source_digest(root, files)
    path = os.path.join(out_dir, f"axpo-jax-{digest}.tar.gz")
    if not os.path.exists(path):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for rel in files:
                tar.add(os.path.join(root, rel), arcname=rel, recursive=False)
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    return path, digest


# ------------------------------------------------------------------------------------------- running gcloud


def note(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


class Gcloud:
    """Runs (or, dry, prints) gcloud command lines. `sleep` and `clock` are injectable for tests."""

    def __init__(self, dry_run: bool = False, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.dry_run, self.sleep, self.clock = dry_run, sleep, clock

    def run(self, argv: list[str]) -> None:
        """Runs a command with its output going to ours; raises PodError when it fails."""
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return
        note("$ " + _short(argv))
        try:
            completed = subprocess.run(argv)
        except FileNotFoundError:
            raise PodError("gcloud is not installed or not on PATH (https://cloud.google.com/sdk/docs/install)")
        if completed.returncode != 0:
            raise PodError(f"{_short(argv)} failed with exit status {completed.returncode}")

    def state(self, t: Target) -> str | None:
        """The queued resource's state (e.g. "ACTIVE"), or None when it does not exist. Not called when dry."""
        argv = describe_command(t)
        try:
            completed = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            raise PodError("gcloud is not installed or not on PATH (https://cloud.google.com/sdk/docs/install)")
        if completed.returncode != 0:
            if "NOT_FOUND" in completed.stderr:  # gcloud: "ERROR: (gcloud....describe) NOT_FOUND: ..."
                return None
            last_line = (completed.stderr.strip().splitlines() or ["no error message"])[-1]
            raise PodError(f"{_short(argv)} failed: {last_line}")
        return completed.stdout.strip() or None

    def accelerator_type(self, t: Target) -> str:
        """The slice's accelerator type (e.g. "v5p-16"), asked of its TPU VMs. Not called when dry."""
        argv = node_type_command(t)
        try:
            completed = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            raise PodError("gcloud is not installed or not on PATH (https://cloud.google.com/sdk/docs/install)")
        if completed.returncode != 0 or not completed.stdout.strip():
            last_line = (completed.stderr.strip().splitlines() or ["no accelerator type"])[-1]
            raise PodError(f"{_short(argv)} failed: {last_line}")
        return completed.stdout.strip()


def _short(argv: Sequence[str]) -> str:
    """A command for a status line, with a long --command script cut short."""
    parts = [a if not a.startswith("--command=") or len(a) < 90 else a[:80] + " ..." for a in argv]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------- the steps


def step_create(g: Gcloud, t: Target, args) -> None:
    runtime = args.runtime_version or default_runtime_version(args.accelerator_type)
    create = create_command(t, accelerator_type=args.accelerator_type, runtime_version=runtime, spot=args.spot,
                            reserved=args.reserved, valid_until_duration=args.valid_until_duration)
    if g.dry_run:
        print(shlex.join(describe_command(t)))
        note(f"dry run: shown for a queued resource {t.name} that does not exist yet; had it FAILED or been "
             f"preempted (SUSPENDED), `{shlex.join(delete_command(t, wait=True))}` would run first")
        g.run(create)
        return
    while True:
        state = g.state(t)
        action = create_action(state)
        if action == KEEP:
            note(f"{t.name} exists ({state}); nothing to create")
            return
        if action == WAIT_THEN_DECIDE:
            note(f"{t.name} is {state}: {_STATE_MEANING[state]}; checking again in {args.poll_seconds}s")
            g.sleep(args.poll_seconds)
            continue
        if action == RECREATE:
            note(f"{t.name} is {state}: {_STATE_MEANING[state]}; deleting it to request it again")
            g.run(delete_command(t, wait=True))
        g.run(create)
        return


def step_wait(g: Gcloud, t: Target, args) -> None:
    if g.dry_run:
        print(shlex.join(describe_command(t)))
        note(f"dry run: the command above is polled every {args.poll_seconds}s until it prints ACTIVE")
        return
    started, last = g.clock(), object()
    while True:
        state = g.state(t)
        verdict = wait_verdict(state)
        elapsed = int(g.clock() - started)
        if state != last:
            print(f"[pod] {t.name}: {state or 'NOT FOUND'} after {elapsed // 60}m{elapsed % 60:02d}s", flush=True)
            last = state
        if verdict == "ready":
            return
        if verdict == "failed":
            raise PodError(f"queued resource {t.name} is {state or 'gone'}: {_STATE_MEANING[state]}; "
                           f"`python tpu/pod.py create ...` (or `up`) requests it again")
        if args.timeout_seconds and elapsed >= args.timeout_seconds:
            raise PodError(f"{t.name} still {state} after {elapsed}s (--timeout-seconds); it stays queued, run "
                           f"`wait` again or `delete` it")
        g.sleep(args.poll_seconds)


def step_setup(g: Gcloud, t: Target, args) -> None:
    workdir = getattr(args, "workdir", None)
    if workdir and workdir.startswith("gs://"):
        g.run(ssh_command(t, mount_script(split_gcs(workdir)[0])))  # every time: fresh VMs have no mount
    if g.dry_run:
        digest = source_digest()
        tarball = f"axpo-jax-{digest}.tar.gz"
        note(f"dry run: the source ({len(source_files())} files, digest {digest}) would be packed as {tarball}")
        g.run(scp_command(t, os.path.join(tempfile.gettempdir(), tarball), tarball))
        g.run(ssh_command(t, setup_script(tarball, digest)))
        return
    with tempfile.TemporaryDirectory(prefix="axpo-pod-") as tmp:
        path, digest = write_source_tarball(tmp)
        tarball = os.path.basename(path)
        g.run(scp_command(t, path, tarball))
        g.run(ssh_command(t, setup_script(tarball, digest)))


def _run_name(args) -> str:
    return args.run_name or args.name


def step_launch(g: Gcloud, t: Target, args) -> None:
    workdir_field(args.config)  # a config with no folder field at all fails here, not on every host
    if not args.workdir.startswith("gs://"):
        accelerator_type = getattr(args, "accelerator_type", None)  # up / watch know it; launch alone asks
        if accelerator_type is None and g.dry_run:
            print(shlex.join(node_type_command(t)), flush=True)
            note(f"dry run: launch refuses workdir {args.workdir} if the slice has more than one host")
        else:
            check_workdir_for_slice(args.workdir, accelerator_type or g.accelerator_type(t))
        note(f"workdir {args.workdir} is on the TPU VMs' own disks: a re-created slice starts from scratch "
             f"(use a gs:// workdir to resume after preemption)")
    else:
        note(f"the trainer sees {args.workdir} as {host_workdir(args.workdir)} (Cloud Storage FUSE)")
    g.run(ssh_command(t, launch_script(_run_name(args), args.config, args.workdir, args.override)))


def step_logs(g: Gcloud, t: Target, args) -> None:
    g.run(ssh_command(t, logs_script(_run_name(args), args.lines, args.follow), worker=args.worker))


def step_copy_checkpoints(g: Gcloud, t: Target, args) -> None:
    if not args.to.startswith("gs://"):
        raise PodError(f"--to must be a gs:// path, got {args.to!r}")
    if args.workdir.startswith("gs://"):
        g.run(storage_rsync_command(args.workdir, args.to))  # bucket to bucket, from here
    else:  # on the hosts' disks: each host sends what it has (rsync never deletes at the destination); from the
        # folder `launch` runs in, where a relative workdir lives
        rsync = shlex.join(storage_rsync_command(args.workdir, args.to))
        g.run(ssh_command(t, f"cd {REMOTE_REPO} && {rsync}", worker="all"))


def step_delete(g: Gcloud, t: Target, args) -> None:
    if not g.dry_run:
        state = g.state(t)
        if state is None:
            note(f"{t.name} does not exist; nothing to delete")
            return
        if state == "DELETING":
            note(f"{t.name} is already being deleted")
            return
    else:
        print(shlex.join(describe_command(t)))
    g.run(delete_command(t, wait=False))


def step_status(g: Gcloud, t: Target, args) -> None:
    if g.dry_run:
        print(shlex.join(describe_command(t)))
        return
    state = g.state(t)
    action = create_action(state)
    meaning = _STATE_MEANING.get(state, "")
    todo = {CREATE: "create it", KEEP: "keep it", RECREATE: "delete and re-create it",
            WAIT_THEN_DECIDE: "wait for it to settle, then decide"}[action]
    print(f"[pod] {t.name}: {state or 'NOT FOUND'}{': ' + meaning if meaning else ''}; `up` would {todo}", flush=True)


def step_up(g: Gcloud, t: Target, args) -> None:
    # before renting anything: a config or workdir that launch would refuse
    workdir_field(args.config)
    check_workdir_for_slice(args.workdir, args.accelerator_type)
    step_create(g, t, args)
    step_wait(g, t, args)
    step_setup(g, t, args)
    step_launch(g, t, args)


def step_watch(g: Gcloud, t: Target, args) -> None:
    """up, then keep the run alive: a preempted or failed slice is requested again, set up and relaunched, and the
    trainer resumes from the latest checkpoint in the workdir. Stops when the queued resource is deleted."""
    step_up(g, t, args)
    if g.dry_run:
        note(f"dry run: then `{shlex.join(describe_command(t))}` every {args.poll_seconds}s; on FAILED/SUSPENDING/"
             f"SUSPENDED the steps above run again")
        return
    recoveries = 0
    while True:
        g.sleep(args.poll_seconds)
        state = g.state(t)
        if state is None:
            note(f"{t.name} is gone (deleted); stopped watching")
            return
        if not needs_recovery(state):
            continue
        if recoveries >= args.max_recoveries:
            raise PodError(f"{t.name} is {state} again after {recoveries} recoveries (--max-recoveries)")
        recoveries += 1
        print(f"[pod] {t.name}: {state} ({_STATE_MEANING[state]}); recovery {recoveries}: up again, the run "
              f"resumes from {args.workdir}", flush=True)
        step_up(g, t, args)


STEPS = {
    "create": step_create, "wait": step_wait, "setup": step_setup, "launch": step_launch, "logs": step_logs,
    "copy-checkpoints": step_copy_checkpoints, "delete": step_delete, "status": step_status, "up": step_up,
    "watch": step_watch,
}


# ------------------------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="queued resource name (the TPU VM gets the same name)")
    common.add_argument("--zone", required=True, help="e.g. us-east5-a")
    common.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run none")

    request = argparse.ArgumentParser(add_help=False)
    request.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v6e-16, v5litepod-16")
    request.add_argument("--runtime-version", help="TPU software version (default: per generation, see "
                                                   "default_runtime_version)")
    tier = request.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="spot capacity (cheaper, can be preempted)")
    tier.add_argument("--reserved", action="store_true", help="use the project's reservation")
    request.add_argument("--valid-until-duration", help="give up queueing after this long, e.g. 6h")

    polling = argparse.ArgumentParser(add_help=False)
    polling.add_argument("--poll-seconds", type=float, default=30.0)
    polling.add_argument("--timeout-seconds", type=float, default=0.0, help="wait: give up after this (0: never)")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", required=True, help="config file for launch.py, e.g. configs/demo.py[:arg]")
    run.add_argument("--workdir", required=True, help="gs://BUCKET/PATH (mounted on the hosts; survives the slice, "
                                                      "so a re-created slice resumes) or, for a one-host slice, a "
                                                      "path on its disk")
    run.add_argument("--override", action="append", default=[], metavar="--config.FIELD=VALUE",
                     help="extra launch.py flag (repeatable)")
    run.add_argument("--run-name", help="names the log and pid files on the hosts (default: --name)")

    p = argparse.ArgumentParser(prog="tpu/pod.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("create", parents=[common, request, polling])
    sub.add_parser("wait", parents=[common, polling])
    setup = sub.add_parser("setup", parents=[common])
    setup.add_argument("--workdir", help="a gs:// workdir: also mount its bucket on every host")
    sub.add_parser("launch", parents=[common, run])
    logs = sub.add_parser("logs", parents=[common])
    logs.add_argument("--run-name")
    logs.add_argument("--worker", default="all", help="'all' or a host index")
    logs.add_argument("--lines", type=int, default=50)
    logs.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True)
    copy = sub.add_parser("copy-checkpoints", parents=[common])
    copy.add_argument("--workdir", required=True)
    copy.add_argument("--to", required=True, help="gs:// destination")
    sub.add_parser("delete", parents=[common])
    sub.add_parser("status", parents=[common])
    sub.add_parser("up", parents=[common, request, polling, run])
    watch = sub.add_parser("watch", parents=[common, request, polling, run])
    watch.add_argument("--max-recoveries", type=int, default=100)
    return p


def main(argv: Sequence[str] | None = None, gcloud: Gcloud | None = None) -> int:
    args = parser().parse_args(argv)
    g = gcloud or Gcloud(dry_run=args.dry_run)
    g.dry_run = args.dry_run
    try:
        STEPS[args.step](g, Target(args.name, args.zone, args.project), args)
    except PodError as e:
        print(f"tpu/pod.py {args.step}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        note("interrupted; every step is safe to re-run")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
