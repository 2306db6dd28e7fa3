#!/usr/bin/env python3
"""A stand-in `gcloud` for tests: put a copy named `gcloud` first on PATH and set FAKE_GCLOUD_DIR.

It appends every argv to $FAKE_GCLOUD_DIR/calls.jsonl and acts out the commands tpu/pod.py uses on a pretend
slice of $FAKE_GCLOUD_HOSTS hosts, each a home directory $FAKE_GCLOUD_DIR/hosts/<i>:

  queued-resources describe  prints the next line of states.txt (the last one repeats); NOT_FOUND fails like
                             gcloud does for a missing resource
  queued-resources create    wipes the hosts (a new slice has fresh VMs)
  queued-resources delete    nothing
  tpu-vm describe            prints the accelerator type of a v5p slice of that many hosts (v5p-8 per host)
  tpu-vm scp SRC NAME:DEST   copies SRC into every host's home
  tpu-vm ssh --command=S     runs S with bash in every host's home (HOME set to it, $FAKE_GCLOUD_DIR/bin first on
                             PATH), prints what it prints
  storage rsync              nothing
"""

import json
import os
import shutil
import subprocess
import sys

root = os.environ["FAKE_GCLOUD_DIR"]
argv = sys.argv[1:]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
hosts = [os.path.join(root, "hosts", str(i)) for i in range(int(os.environ.get("FAKE_GCLOUD_HOSTS", "2")))]
flags = {a.split("=", 1)[0]: a.partition("=")[2] for a in argv if a.startswith("--")}

if argv[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    path = os.path.join(root, "states.txt")
    with open(path) as f:
        states = [line.strip() for line in f if line.strip()]
    state = states[0]
    if len(states) > 1:
        with open(path, "w") as f:
            f.write("\n".join(states[1:]) + "\n")
    if state == "NOT_FOUND":
        print(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource '{argv[4]}' was not found",
              file=sys.stderr)
        sys.exit(1)
    print(state)
elif argv[:4] == ["compute", "tpus", "queued-resources", "create"]:
    shutil.rmtree(os.path.join(root, "hosts"), ignore_errors=True)
    print(f"Create request issued for: [{argv[4]}]")
elif argv[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(f"v5p-{8 * len(hosts)}")
elif argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    source, destination = [a for a in argv[4:] if not a.startswith("--")]
    for home in hosts:
        os.makedirs(home, exist_ok=True)
        shutil.copy(source, os.path.join(home, destination.split(":", 1)[1]))
elif argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    env = dict(os.environ, PATH=os.path.join(root, "bin") + os.pathsep + os.environ["PATH"])
    worst = 0
    for home in hosts:
        os.makedirs(home, exist_ok=True)
        done = subprocess.run(["bash", "-c", flags["--command"]], cwd=home, env=dict(env, HOME=home),
                              capture_output=True, text=True, timeout=60)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        worst = worst or done.returncode
    sys.exit(worst)
