"""gcloud's documented synopsis for every command tpu/pod.py generates, as data, and a checker.

Each entry is copied from the command's reference page (fetched 2026; the URL is next to it): the positional
arguments it takes and every flag it documents, boolean flags separately from flags that take a value. Flags
available to all commands (GCLOUD_WIDE_FLAG) come from https://cloud.google.com/sdk/gcloud/reference.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Synopsis:
    url: str
    positionals: tuple[int, int | None]  # (min, max); None: no maximum
    value_flags: frozenset[str]
    bool_flags: frozenset[str]
    required: frozenset[str] = frozenset()  # flags the command cannot run without (as pod.py calls it)
    exactly_one: tuple[frozenset[str], ...] = ()  # groups of which one flag is required
    at_most_one: tuple[frozenset[str], ...] = ()  # groups of mutually exclusive flags


GCLOUD_WIDE_VALUE = frozenset({"--account", "--billing-project", "--configuration", "--flags-file", "--flatten",
                               "--format", "--project", "--verbosity", "--access-token-file",
                               "--impersonate-service-account", "--trace-token"})
GCLOUD_WIDE_BOOL = frozenset({"--help", "--quiet", "--version", "--log-http", "--no-user-output-enabled",
                              "--user-output-enabled"})

SYNOPSES = {
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
    ("compute", "tpus", "queued-resources", "create"): Synopsis(
        url="https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create",
        positionals=(1, 1),
        value_flags=frozenset({"--zone", "--runtime-version", "--accelerator-type", "--topology", "--type",
                               "--node-id", "--node-count", "--node-prefix", "--boot-disk", "--data-disk",
                               "--description", "--labels", "--metadata", "--metadata-from-file", "--network",
                               "--range", "--scopes", "--service-account", "--subnetwork", "--tags",
                               "--valid-after-duration", "--valid-after-time", "--valid-until-duration",
                               "--valid-until-time", "--reservation-host-folder",
                               "--reservation-host-organization", "--reservation-host-project"}),
        bool_flags=frozenset({"--async", "--guaranteed", "--internal-ips", "--reserved", "--shielded-secure-boot",
                              "--spot"}),
        required=frozenset({"--zone", "--runtime-version"}),
        exactly_one=(frozenset({"--accelerator-type", "--topology"}), frozenset({"--node-id", "--node-count"})),
        at_most_one=(frozenset({"--spot", "--reserved", "--guaranteed"}),),
    ),
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/describe
    ("compute", "tpus", "queued-resources", "describe"): Synopsis(
        url="https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/describe",
        positionals=(1, 1), value_flags=frozenset({"--zone"}), bool_flags=frozenset(),
        required=frozenset({"--zone"}),
    ),
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
    ("compute", "tpus", "queued-resources", "delete"): Synopsis(
        url="https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete",
        positionals=(1, 1), value_flags=frozenset({"--zone"}), bool_flags=frozenset({"--async", "--force"}),
        required=frozenset({"--zone"}),
    ),
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/describe
    ("compute", "tpus", "tpu-vm", "describe"): Synopsis(
        url="https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/describe",
        positionals=(1, 1), value_flags=frozenset({"--zone"}), bool_flags=frozenset(),
    ),
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh
    ("compute", "tpus", "tpu-vm", "ssh"): Synopsis(
        url="https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh",
        positionals=(1, 1),
        value_flags=frozenset({"--ssh-flag", "--ssh-key-file", "--strict-host-key-checking", "--worker", "--zone",
                               "--command", "--output-directory", "--ssh-key-expiration",
                               "--ssh-key-expire-after"}),
        bool_flags=frozenset({"--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain"}),
        required=frozenset({"--zone"}),
    ),
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
    ("compute", "tpus", "tpu-vm", "scp"): Synopsis(
        url="https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp",
        positionals=(2, None),
        value_flags=frozenset({"--scp-flag", "--ssh-key-file", "--strict-host-key-checking", "--worker", "--zone",
                               "--ssh-key-expiration", "--ssh-key-expire-after"}),
        bool_flags=frozenset({"--compress", "--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain",
                              "--recurse"}),
        required=frozenset({"--zone"}),
    ),
    # https://cloud.google.com/sdk/gcloud/reference/storage/rsync
    ("storage", "rsync"): Synopsis(
        url="https://cloud.google.com/sdk/gcloud/reference/storage/rsync",
        positionals=(2, 2),
        value_flags=frozenset({"--additional-headers", "--canned-acl", "--predefined-acl", "--content-md5",
                               "--exclude", "--gzip-in-flight", "--decryption-keys", "--encryption-key",
                               "--cache-control", "--content-disposition", "--content-encoding",
                               "--content-language", "--content-type", "--custom-time", "--custom-metadata",
                               "--remove-custom-metadata", "--update-custom-metadata", "--if-generation-match",
                               "--if-metageneration-match"}),
        bool_flags=frozenset({"--checksums-only", "--no-clobber", "--continue-on-error",
                              "--delete-unmatched-destination-objects", "--dry-run", "--gzip-in-flight-all",
                              "--no-ignore-symlinks", "--include-managed-folders", "--preserve-posix", "--recursive",
                              "--skip-if-dest-has-newer-mtime", "--skip-unsupported", "--clear-custom-metadata"}),
    ),
}


def check_command(argv: list[str]) -> tuple[str, ...]:
    """Raises AssertionError naming the problem when `argv` is not a command its reference page allows; returns
    the command path (e.g. ("compute", "tpus", "queued-resources", "create"))."""
    assert argv and argv[0] == "gcloud", f"not a gcloud command: {argv[:3]}"
    path = next((p for p in SYNOPSES if tuple(argv[1:1 + len(p)]) == p), None)
    assert path is not None, f"gcloud {' '.join(argv[1:5])}: not a command in the reference table"
    synopsis = SYNOPSES[path]
    positionals, seen = [], set()
    for arg in argv[1 + len(path):]:
        if not arg.startswith("--"):
            positionals.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        if name in synopsis.value_flags or name in GCLOUD_WIDE_VALUE:
            assert has_value and value, f"{name} takes a value ({synopsis.url})"
        elif name in synopsis.bool_flags or name in GCLOUD_WIDE_BOOL:
            assert not has_value, f"{name} is a boolean flag, given {arg!r} ({synopsis.url})"
        else:
            raise AssertionError(f"{name} is not a documented flag of gcloud {' '.join(path)} ({synopsis.url})")
        seen.add(name)
    low, high = synopsis.positionals
    assert len(positionals) >= low and (high is None or len(positionals) <= high), (
        f"gcloud {' '.join(path)} takes {low}..{high or 'n'} positionals, got {positionals} ({synopsis.url})")
    missing = synopsis.required - seen
    assert not missing, f"gcloud {' '.join(path)} is missing {sorted(missing)} ({synopsis.url})"
    for group in synopsis.exactly_one:
        assert len(group & seen) == 1, f"gcloud {' '.join(path)} needs exactly one of {sorted(group)} ({synopsis.url})"
    for group in synopsis.at_most_one:
        chosen = group & seen
        assert len(chosen) <= 1, f"gcloud {' '.join(path)}: {sorted(chosen)} are exclusive ({synopsis.url})"
    return path
