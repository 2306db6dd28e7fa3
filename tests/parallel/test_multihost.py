"""Multi-host training and rollouts with `jax.distributed`, as several CPU processes on 127.0.0.1.

Every run is tests/parallel/multihost_worker.py started once per process (each with its own fake CPU devices,
joined through the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables launch.py reads). The
reference is one process holding all the devices and the whole global batch; the multi-process runs build only
their own rows, and must compute what it computes:

- 2 processes x 2 devices (mesh data=2 x fsdp=2): SFT steps, an orbax checkpoint, the processes exit, new ones
  resume (parameters, optimizer and each process's data cursor) and go on, then one AXPO step: rollouts with real
  tool calls where each process runs the tools of its questions, a global AXPO selection, forks of the prefixes
  each process owns (padded to one count), and one update over every process's rows.
- 4 processes x 1 device: the SFT steps only (a 4-process RL step is too slow for this 2-core box's suite).
- launch.py itself, 2 processes: it joins the cluster from the environment before the mode runs.

The sft and rl modes themselves, run through launch.py as 2 processes, are tests/parallel/test_multihost_modes.py
(which reuses `Run` from here).
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from axpo_jax.parallel.distributed import CPU_SCHEDULER_FLAG

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH = "data=2,fsdp=2"
SFT_STEPS, SFT_BATCH, RL_STEPS = 3, 4, 1
RTOL = 1e-5  # fp32: the same sums, reduced in a different order across processes


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny checkpoint, the SFT data set every run reads its rows from, and a compilation cache the runs share
    (a resumed run compiles nothing its first run compiled)."""
    from axpo_jax.demo import build_tiny_checkpoint
    from tests.parallel.multihost_worker import write_sft_data

    folder = tmp_path_factory.mktemp("multihost")
    checkpoint = str(folder / "checkpoint")
    # one decoder layer and one vision block: compile time, not model size, is what these runs spend
    build_tiny_checkpoint(checkpoint, seed=0, num_hidden_layers=1, vision_depth=1, deepstack_visual_indexes=(0,))
    write_sft_data(checkpoint, str(folder / "sft.npz"), SFT_STEPS * SFT_BATCH)
    return {"checkpoint": checkpoint, "sft_data": str(folder / "sft.npz"), "cache": str(folder / "jax_cache")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(argv: list[str], timeout: float = 120) -> list[tuple[str, str]]:
    """Runs `argv` from the repo root as jax.distributed processes 0 and 1 of one cluster on the CPU (gloo, a free
    port on 127.0.0.1); each one's (stdout, stderr), after asserting it exited with 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    workers = [subprocess.Popen(argv, cwd=ROOT, text=True, env={**env, "JAX_PROCESS_ID": str(i)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=timeout) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    return outputs


class Run:
    """`processes` processes of one run started now (a run goes on while the test starts another); `records()` waits
    for them and, on a failure or timeout, kills them and fails with their output.

    By default each process is multihost_worker.py (its record: the JSON file it writes). With `command` (argv,
    e.g. launch.py and its flags) each process runs that with the cluster variables launch.py reads and
    `devices_per_process` fake CPU devices; its record is the JSON line it prints last. `env`: extra environment
    variables, or a function of the process index that returns them."""

    def __init__(self, shared, folder, name, *, processes, devices_per_process, args=(), timeout=400, command=None,
                 env=None):
        base_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        base_env.update(PYTHONPATH=ROOT + os.pathsep + base_env.get("PYTHONPATH", ""),
                        JAX_COMPILATION_CACHE_DIR=shared["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        self.name, self.timeout, self.deadline = name, timeout, time.monotonic() + timeout
        self.command = command
        self.outputs = [os.path.join(folder, f"{name}-{i}.json") for i in range(processes)]
        self.stdouts = [os.path.join(folder, f"{name}-{i}.out") for i in range(processes)]
        port = _free_port()
        self.workers, self.logs, self._records = [], [], None
        for i in range(processes):
            log = open(os.path.join(folder, f"{name}-{i}.log"), "w+")
            self.logs.append(log)
            process_env = dict(base_env, **((env(i) if callable(env) else env) or {}))
            if command is None:
                argv = [sys.executable, WORKER, "--checkpoint", shared["checkpoint"], "--sft-data", shared["sft_data"],
                        "--sft-batch", str(SFT_BATCH), "--out", self.outputs[i], "--process-id", str(i),
                        "--num-processes", str(processes), "--port", str(port),
                        "--devices-per-process", str(devices_per_process), "--mesh", MESH, *map(str, args)]
            else:
                argv = [sys.executable, *map(str, command)]
                process_env.update(JAX_PLATFORMS="cpu",
                                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
                                             f"{CPU_SCHEDULER_FLAG}")
                if processes > 1:
                    process_env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                                       JAX_PROCESS_ID=str(i))
            with open(self.stdouts[i], "w") as stdout:
                self.workers.append(subprocess.Popen(argv, stdout=stdout, stderr=log, env=process_env, cwd=ROOT))

    def records(self) -> list[dict]:
        if self._records is not None:
            return self._records
        try:
            for worker in self.workers:
                worker.wait(timeout=max(self.deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pass
        finally:
            timed_out = [w for w in self.workers if w.poll() is None]
            for worker in timed_out:
                worker.kill()
                worker.wait()
        failed = [i for i, w in enumerate(self.workers) if w.returncode != 0]
        if failed:
            report = []
            for i in failed:
                self.logs[i].seek(0)
                tail = "".join(line for line in self.logs[i] if not line.startswith(("W0", "I0", "[Gloo]")))
                report.append(f"--- {self.name} process {i} (rc {self.workers[i].returncode}) ---\n{tail[-4000:]}")
            pytest.fail(f"{self.name}: {'timed out' if timed_out else 'failed'} (limit {self.timeout}s)\n"
                        + "\n".join(report))
        for log in self.logs:
            log.close()
        if self.command is None:
            self._records = [json.load(open(path)) for path in self.outputs]
        else:  # launch.py prints the mode's result as the last line of stdout
            self._records = [json.loads(open(path).read().strip().splitlines()[-1]) for path in self.stdouts]
        return self._records


def launch(shared, folder, name, **kwargs) -> list[dict]:
    return Run(shared, folder, name, **kwargs).records()


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
    """One process, all four devices, the whole global batch; its forks laid out as a 2-process run lays them.
    Started here and read when first needed, so it runs beside the first 2-process run."""
    folder = str(tmp_path_factory.mktemp("reference"))
    run = Run(shared, folder, "reference", processes=1, devices_per_process=4,
              args=["--sft-steps", SFT_STEPS, "--rl-steps", RL_STEPS, "--layout-shards", 2])
    yield lambda: run.records()[0]
    run.records()  # never leave it running


def _assert_sft_matches(records, reference_steps, steps):
    for record in records:  # the global batch's numbers, on every process
        got = {s["step"]: s for s in record["sft"]}
        for step in steps:
            want = reference_steps[step - 1]
            for key in ("loss", "grad_norm", "entropy"):
                assert got[step][key] == pytest.approx(want[key], rel=RTOL), (record["process_index"], step, key)
            assert got[step]["trained_tokens"] == want["trained_tokens"]
    # each process trained on its own rows only, and together on exactly the reference's global batch
    for step in steps:
        rows = [r for record in records for r in next(s["rows"] for s in record["sft"] if s["step"] == step)]
        assert rows == reference_steps[step - 1]["rows"], (step, rows)


def test_two_processes_train_checkpoint_resume_and_roll_out_like_one_process(shared, reference, tmp_path):
    ckpt = str(tmp_path / "orbax")
    first = launch(shared, str(tmp_path), "first", processes=2, devices_per_process=2,
                   args=["--sft-steps", SFT_STEPS, "--save-at", 1, "--stop-after-save", "--checkpoint-dir", ckpt])
    expected = reference()
    assert [s["step"] for s in expected["sft"]] == list(range(1, SFT_STEPS + 1))
    assert [r["data_shard"] for r in first] == [[0, 2], [1, 2]]
    _assert_sft_matches(first, expected["sft"], steps=[1])
    assert sorted(os.listdir(ckpt)) == ["1"]  # committed by both processes, once

    resumed = launch(shared, str(tmp_path), "resumed", processes=2, devices_per_process=2,
                     args=["--sft-steps", SFT_STEPS, "--resume", "--checkpoint-dir", ckpt, "--rl-steps", RL_STEPS])
    assert [r["resumed_from"] for r in resumed] == [1, 1]
    _assert_sft_matches(resumed, expected["sft"], steps=[2, 3])

    for step in range(RL_STEPS):
        want = expected["rl"][step]
        got = [r["rl"][step] for r in resumed]
        # each process rolled out its own questions; together, the reference's rollouts token for token
        assert [g["questions"] for g in got] == [want["questions"][:2], want["questions"][2:]]
        trajectories = {int(row): ids for g in got for row, ids in g["trajectories"].items()}
        assert trajectories == {int(row): ids for row, ids in want["trajectories"].items()}
        # the same global AXPO selection everywhere, from gathered rewards / tool use / confidences
        for g in got:
            assert g["selections"] == want["selections"] and g["rewards_qn"] == want["rewards_qn"]
            assert g["resample_rewards_sk"] == want["resample_rewards_sk"]
        assert want["selections"], "no AXPO prefix was selected: the fork path went untested (change the RL key)"
        owners = [sum(question // 2 == p for question, _ in want["selections"]) for p in range(2)]
        assert owners[0] != owners[1], f"both processes forked {owners}: padding went untested (change the RL key)"
        # each process forked only the sources it owns (its rows are 8 * p .. 8 * p + 7), and the continuations
        # are the reference's
        for p, g in enumerate(got):
            assert all(8 * p <= source < 8 * (p + 1) for source, _ in g["resamples"])
        forks = sorted((source, tuple(ids)) for g in got for source, ids in g["resamples"])
        assert forks == sorted((source, tuple(ids)) for source, ids in want["resamples"])
        assert want["metrics"]["tool_calls"] > 0 and want["metrics"]["resamples_used"] > 0
        # the update: loss, gradient norm and every other metric are the global batch's
        assert want["metrics"]["loss"] != 0.0
        for g in got:
            for key, value in want["metrics"].items():
                if not key.startswith("time_") and key != "tokens_per_s":
                    assert g["metrics"][key] == pytest.approx(value, rel=RTOL, abs=1e-6), key


def test_four_processes_sft_matches_one_process(shared, reference, tmp_path):
    records = launch(shared, str(tmp_path), "four", processes=4, devices_per_process=1,
                     args=["--sft-steps", SFT_STEPS])
    assert [r["data_shard"] for r in records] == [[i, 4] for i in range(4)]
    _assert_sft_matches(records, reference()["sft"], steps=range(1, SFT_STEPS + 1))


LAUNCHED_MODE = '''
import runpy, sys
from axpo_jax import modes

@modes.register("where_am_i")
def _where_am_i(config):
    import jax
    import jax.numpy as jnp
    from axpo_jax.parallel import distributed
    from axpo_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": -1})
    rows = distributed.global_from_local([[jax.process_index() + 1]] * 2, mesh)  # 2 rows from each process
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "sum": float(jnp.sum(rows)), "shard": distributed.data_shard(mesh).index}

sys.argv = ["launch.py", "--config", sys.argv[1]]
runpy.run_path("launch.py", run_name="__main__")
'''


def test_launch_joins_the_cluster_from_the_environment(tmp_path):
    """launch.py starts jax.distributed from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID before the
    mode runs (gloo for CPU collectives), and says which process it is."""
    config = tmp_path / "config.py"
    config.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict("
                      "dict(mode='where_am_i', jax_platforms='cpu', xla_host_device_count=2))\n")
    for i, (out, err) in enumerate(two_processes([sys.executable, "-c", LAUNCHED_MODE, str(config)])):
        assert json.loads(out.strip().splitlines()[-1]) == {"process": i, "processes": 2, "devices": 4,
                                                            "sum": 6.0, "shard": i}
        assert f"jax.distributed: process {i}/2, 2 of 4 devices" in err
