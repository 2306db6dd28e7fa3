"""What every host must see the same of, checked on 2 real processes (jax.distributed over gloo on 127.0.0.1, no
model): the workdir (one folder for all hosts, or orbax's first save hangs) and the data sources (a record one host
drops makes every batch differ). Each check must fail on every process alike, so none is left waiting."""

import json
import sys

import numpy as np
from PIL import Image

from tests.parallel.test_multihost import two_processes

WORKER = r'''
import json, os, sys
from axpo_jax.parallel import distributed

distributed.initialize_from_env("env")
import jax

from axpo_jax.data import tasks
from axpo_jax.modes import ModeError
from axpo_jax.train.checkpoints import check_shared_workdir

me = jax.process_index()
shared, tasks_file, own = sys.argv[1], sys.argv[2], sys.argv[3 + me]
out = {}
check_shared_workdir(shared)
distributed.sync("process 0 removed its token")
out["shared_left"] = os.listdir(shared)
try:
    check_shared_workdir(own)  # the same path on each host, another disk: here another folder per process
    out["own"] = "passed"
except ModeError as error:
    out["own"] = str(error).replace(own, "<own>")
tasks.check_same_records("tasks", tasks.TaskFileSource(tasks_file))
out["same_source"] = "passed"
if me == 1:  # a transient read error while this host scans the file
    real = tasks.load_image
    def flaky(path, failed=[]):
        if "000001_0" in path and not failed:
            failed.append(path)
            raise OSError(5, "Input/output error")
        return real(path)
    tasks.load_image = flaky
try:
    tasks.check_same_records("tasks", tasks.TaskFileSource(tasks_file))
    out["flaky_source"] = "passed"
except tasks.DataFileError as error:
    out["flaky_source"] = str(error)
missing = tasks_file if me == 0 else tasks_file + ".not-on-this-host"  # a file one host does not have
try:
    tasks.read_on_every_process("tasks", lambda: tasks.TaskFileSource(missing))
    out["missing_on_one"] = "passed"
except (tasks.DataFileError, OSError) as error:
    out["missing_on_one"] = type(error).__name__  # process 1 raises its own error, process 0 names process 1's
from axpo_jax.modes import check_run_settings
if me == 0:  # an output folder on each host's own disk; host 0's holds another run's results
    check_run_settings(os.path.join(own, "run_config.json"), {"seed": 1}, write=True, holds="results",
                       option="output_dir")
try:
    distributed.fail_together("output_dir", lambda: check_run_settings(
        os.path.join(own, "run_config.json"), {"seed": 2}, write=False, holds="results", option="output_dir"),
        ModeError)
    out["other_run_on_one"] = "passed"
except ModeError as error:
    out["other_run_on_one"] = str(error).replace(sys.argv[3], "<own0>")


def batch_verdict(batches):
    try:
        return tasks.next_batch_on_every_process(batches, "the step's questions")
    except (tasks.DataFileError, OSError) as error:
        return f"{type(error).__name__}: {error}"


def failing_read():
    raise OSError(5, "Input/output error")
    yield


out["same_batch"] = batch_verdict(iter([[{"q": 1}, {"q": 2}]]))
out["shifted_batch"] = batch_verdict(iter([[{"q": 1}, {"q": 2 if me == 0 else 3}]]))  # host 1 skipped record 2
out["unreadable_batch"] = batch_verdict(iter([[{"q": 1}]]) if me == 0 else failing_read())
print(json.dumps(out), flush=True)
'''


def test_an_unshared_workdir_and_a_differing_source_fail_on_every_process(tmp_path):
    from axpo_jax.data.tasks import write_task_jsonl
    from axpo_jax.rollout.agent_loop import Task

    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    tasks_file = tmp_path / "tasks.jsonl"
    write_task_jsonl(tasks_file, [Task(f"q{i}", [image], str(i), f"t{i}") for i in range(3)])
    folders = [tmp_path / name for name in ("shared", "own0", "own1")]
    for folder in folders:
        folder.mkdir()
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in two_processes(
        [sys.executable, "-c", WORKER, str(folders[0]), str(tasks_file), str(folders[1]), str(folders[2])])]
    assert [r.pop("missing_on_one") for r in results] == ["DataFileError", "FileNotFoundError"]  # neither waits
    refused = "<own0> holds results of a run with other settings (seed: 1 -> 2); use a new --config.output_dir"
    assert [r.pop("other_run_on_one") for r in results] == [
        refused + ", or delete that one to start over",
        f"output_dir: failed on process 0 (ModeError: {refused}, or delete that one to start over)"]
    assert [r.pop("unreadable_batch") for r in results] == [
        "DataFileError: reading the step's questions: failed on process 1 (OSError: [Errno 5] Input/output error)",
        "OSError: [Errno 5] Input/output error"]  # mid-run: neither host waits for the other
    assert results[0] == results[1]  # the same verdicts on both processes
    assert results[0].pop("same_batch") == [{"q": 1}, {"q": 2}]
    assert results[0].pop("shifted_batch") == ("DataFileError: the step's questions: processes [1] read a different "
                                               "batch than process 0 (a record one host could not read: see its "
                                               "log); resume once every host reads the data")
    result = results[0]
    assert result["shared_left"] == [] and result["same_source"] == "passed"
    assert result["own"] == ("workdir <own> is not shared between hosts (processes [1] do not see the file process 0 "
                             "wrote there): use a gs:// bucket or a shared filesystem")
    assert result["flaky_source"].startswith("tasks differs between processes [1] and process 0 (process 0 holds 3 "
                                             "records, 0 lines skipped; process 1 holds 2 records, 1 lines skipped")
