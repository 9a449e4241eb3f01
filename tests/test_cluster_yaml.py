"""cluster.yaml, the Ray cluster launcher config: valid for the Ray that is installed (its JSON
schema and its own offline checks), for the cloud config and for the commented on-premise
variant, and saying what the project needs (a GPU worker type, the project installed on every
node, the dashboard on localhost, token auth, commands that exist). No cluster, no network."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
BEGIN, END = "# --- begin cluster-onprem.yaml ---", "# --- end cluster-onprem.yaml ---"
UNPACK = "rm -rf ~/bilevel_ray && mkdir ~/bilevel_ray && tar -xf ~/bilevel_ray.tar -C ~/bilevel_ray"


def _onprem_text() -> str:
    """The commented on-premise block, uncommented the way its instructions say."""
    lines = CLUSTER_YAML.read_text().splitlines()
    assert lines.count(BEGIN) == 1 and lines.count(END) == 1, "on-premise block markers"
    body = lines[lines.index(BEGIN) + 1 : lines.index(END)]
    out = []
    for line in body:
        assert line == "#" or line.startswith("# "), f"not a commented YAML line: {line!r}"
        out.append(line[2:])
    return "\n".join(out)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    path = importlib.resources.files("ray.autoscaler").joinpath("ray-schema.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cloud() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def onprem() -> dict[str, Any]:
    return yaml.safe_load(_onprem_text())


@pytest.fixture(scope="module")
def ray_checks():
    """Ray's own preparation and validation, as ``ray up`` runs them before it contacts the
    provider: defaults merged from the provider's defaults.yaml, the schema, the head type among
    the node types, the sum of min_workers within max_workers. Private API: skipped if moved."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as err:  # pragma: no cover - depends on Ray's internals
        pytest.skip(f"Ray's config validation is not importable here: {err}")

    def check(config: dict[str, Any]) -> dict[str, Any]:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
        return prepared

    return check


@pytest.mark.parametrize("which", ["cloud", "onprem"])
def test_valid_against_rays_schema(which, schema, request):
    jsonschema.validate(request.getfixturevalue(which), schema)


@pytest.mark.parametrize("which", ["cloud", "onprem"])
def test_accepted_by_rays_own_validation(which, ray_checks, request):
    prepared = ray_checks(request.getfixturevalue(which))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_the_validation_bites(cloud, schema, ray_checks):
    unknown_key = {**copy.deepcopy(cloud), "max_wrokers": 3}
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        jsonschema.validate(unknown_key, schema)
    no_resources = copy.deepcopy(cloud)
    del no_resources["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(no_resources, schema)
    bad_type = copy.deepcopy(cloud)
    bad_type["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_type, schema)
    wrong_head = {**copy.deepcopy(cloud), "head_node_type": "no_such_type"}
    with pytest.raises(ValueError, match="head_node_type"):
        ray_checks(wrong_head)


def test_node_types_and_autoscaling_bounds(cloud):
    assert cloud["provider"]["type"] == "aws"
    types = cloud["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert cloud["head_node_type"] in types
    assert types["head"]["resources"] == {"CPU": 0}  # no trials on the head
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"], name
        assert types[name]["max_workers"] <= cloud["max_workers"], name
        assert types[name]["node_config"]["ImageId"], name
    assert sum(types[n].get("min_workers", 0) for n in types) <= cloud["max_workers"]
    assert types["cpu_worker"]["min_workers"] >= 1  # a sweep sizes itself from CPUs at start
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert types["gpu_worker"]["min_workers"] == 0  # GPUs only on demand
    assert cloud["idle_timeout_minutes"] > 0


TARBALL = "~/.cache/bilevel_ray-checkout.tar"  # built on your machine, as the header says


@pytest.mark.parametrize("which", ["cloud", "onprem"])
def test_every_node_installs_this_checkout(which, request):
    config = request.getfixturevalue(which)
    # Only files are mounted: no folder of the checkout (which would carry untracked files).
    assert config["file_mounts"]["~/bilevel_ray.tar"] == TARBALL
    assert "." not in config["file_mounts"].values()
    assert all(not Path(v).expanduser().is_dir() for v in config["file_mounts"].values())
    unpack = config["setup_commands"][0]
    assert unpack == UNPACK, "unpacked first, into an emptied ~/bilevel_ray"
    install = [c for c in config["setup_commands"] if "pip install" in c]
    assert len(install) == 1, install
    assert "-e ~/bilevel_ray" in install[0]
    assert re.search(r'"ray\[default\]==\d+\.\d+\.\d+"', install[0]), "Ray pinned on nodes"
    # Per-node-type setup commands would replace the shared ones: none here.
    for name, node_type in config.get("available_node_types", {}).items():
        assert "worker_setup_commands" not in node_type, name


def test_head_gets_boto3_for_the_autoscaler(cloud):
    assert any("boto3" in c for c in cloud["head_setup_commands"])


@pytest.mark.parametrize("which", ["cloud", "onprem"])
def test_dashboard_only_on_localhost_and_token_auth_on(which, request):
    config = request.getfixturevalue(which)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in json.dumps(config)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])


def test_onprem_variant_matches_the_cloud_setup(cloud, onprem):
    assert onprem["provider"]["type"] == "local"
    assert onprem["provider"]["head_ip"] and onprem["provider"]["worker_ips"]
    assert onprem["auth"]["ssh_user"]
    for key in ("file_mounts", "setup_commands"):
        assert onprem[key] == cloud[key], key


@pytest.mark.parametrize("which", ["cloud", "onprem"])
def test_ray_start_options_exist(which, request):
    from ray.scripts.scripts import cli

    known = {opt for param in cli.commands["start"].params for opt in param.opts}
    config = request.getfixturevalue(which)
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    starts = [c[c.index("ray start") :] for c in commands if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        for token in shlex.split(command)[2:]:
            if token.startswith("--"):
                assert token.split("=")[0] in known, token


def test_documented_commands_exist():
    """The commands in the header comment: Ray subcommands and options, and bilevel-ray flags."""
    from ray.scripts.scripts import cli

    from bilevel_ray.cli import parser as _parser

    text = CLUSTER_YAML.read_text()
    header = text[: text.index("\ncluster_name:")]
    used = set(re.findall(r"^#\s+(?:RAY_AUTH_MODE=token )?ray ([a-z-]+)", header, re.M))
    assert {"up", "exec", "dashboard", "job", "rsync-down", "down", "get-auth-token"} <= used
    assert used <= set(cli.commands), used - set(cli.commands)
    submit = re.search(r"ray job submit (.*?) -- ", header)
    assert submit is not None
    assert shlex.split(submit.group(1)) == [
        "--address",
        "http://127.0.0.1:8265",
        "--working-dir",
        ".",
    ]
    submit_opts = {o for p in cli.commands["job"].commands["submit"].params for o in p.opts}
    assert {"--address", "--working-dir"} <= submit_opts
    runs = re.findall(r"^#\s+(bilevel-ray .*)$", header, re.M)
    assert runs, "the job's bilevel-ray command"
    for run in runs:
        args = _parser().parse_args(shlex.split(run)[1:])  # raises on an unknown flag
        assert args.address == "auto", run


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("tar") is None, reason="no git")
def test_the_shipped_checkout_holds_tracked_files_only(tmp_path, cloud):
    """The header's build command, run in a repository with an edited tracked file, an untracked
    file and an ignored one, then the nodes' unpack command: tracked files only, edits included."""
    text = CLUSTER_YAML.read_text()
    header = text[: text.index("\ncluster_name:")]
    (build,) = re.findall(r"^#\s+(.*git ls-files.*)$", header, re.M)
    assert TARBALL in build
    repo, home = tmp_path / "repo", tmp_path / "home"
    (repo / "pkg").mkdir(parents=True)
    home.mkdir()
    (repo / "pkg" / "code.py").write_text("v = 1\n")
    (repo / ".gitignore").write_text("runs/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    (repo / "pkg" / "code.py").write_text("v = 2\n")  # an uncommitted edit: shipped
    (repo / "scratch.py").write_text("secret = 1\n")  # untracked, not ignored: not shipped
    (repo / "runs").mkdir()
    (repo / "runs" / "big.bin").write_bytes(b"0" * 10)  # ignored: not shipped
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    subprocess.run(["bash", "-c", build], cwd=repo, env=env, check=True)
    # On a node: the mount puts the tarball at ~/bilevel_ray.tar; a stale file is removed.
    node = tmp_path / "node"
    (node / "bilevel_ray").mkdir(parents=True)
    (node / "bilevel_ray" / "stale.py").write_text("")
    shutil.copy(Path(TARBALL.replace("~", str(home))), node / "bilevel_ray.tar")
    assert cloud["setup_commands"][0] == UNPACK
    subprocess.run(["bash", "-c", UNPACK], env={**env, "HOME": str(node)}, check=True)
    shipped = sorted(
        str(p.relative_to(node / "bilevel_ray")) for p in (node / "bilevel_ray").rglob("*")
    )
    assert shipped == [".gitignore", "pkg", "pkg/code.py"]
    assert (node / "bilevel_ray" / "pkg" / "code.py").read_text() == "v = 2\n"
