"""What a cluster user does, on a two-node Ray cluster started on this machine: submit
``bilevel-ray tune my_problem.py:factory --address auto`` and ``bilevel-ray train ... --workers
2 --address auto`` as Ray jobs with ``--working-dir .``, the results in one ``--out`` that both
nodes see.

The cluster runs in a network namespace of its own that holds only a loopback interface, so
every process binds to 127.0.0.1 and no packet of the test can leave it, and in a process-id
namespace of its own, so that stopping it stops nothing else. Each node has one CPU:
two concurrent trials, and a two-worker group, can only run by using both nodes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SCRIPT = """
set -euo pipefail
ip link set lo up
export PATH="{bin}:$PATH" RAY_TMPDIR="{tmp}/ray" RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN="$(python -c 'import secrets; print(secrets.token_hex(16))')"
export OMP_NUM_THREADS=1
mkdir -p "$RAY_TMPDIR"
trap 'ray stop --force > /dev/null 2>&1 || true' EXIT
ray start --head --node-ip-address=127.0.0.1 --port=26379 --num-cpus=1 \\
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=28265 \\
    --disable-usage-stats --temp-dir="$RAY_TMPDIR" > "{tmp}/head.log" 2>&1
ray start --address=127.0.0.1:26379 --node-ip-address=127.0.0.1 --num-cpus=1 \\
    --disable-usage-stats > "{tmp}/node.log" 2>&1
python -c "{count_nodes}"
cd "{tmp}/project"
ray job submit --address http://127.0.0.1:28265 --working-dir . -- \\
    bilevel-ray tune my_problem.py:factory --address auto --samples 2 --max-steps 30 \\
    --out "{tmp}/shared" --quiet > "{tmp}/tune.log" 2>&1
ray job submit --address http://127.0.0.1:28265 --working-dir . -- \\
    bilevel-ray train my_problem.py:factory --workers 2 --address auto --steps 40 \\
    --out "{tmp}/shared" --name run1 > "{tmp}/train.log" 2>&1
"""


# Its own network (loopback only) and its own process ids: `ray stop` at the end sees, and
# stops, this cluster's processes alone, not another Ray of the test session.
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]
COUNT_NODES = (
    "import ray; ray.init(address='127.0.0.1:26379', "
    "logging_config=ray.LoggingConfig('TEXT', 'ERROR')); "
    "print('nodes', sum(n['Alive'] for n in ray.nodes()))"
)


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.ray
@pytest.mark.skipif(not _namespaces_available(), reason="needs unshare --net (root) and ip")
@pytest.mark.slow
def test_jobs_submitted_to_a_two_node_cluster_tune_and_train_a_users_file():
    # A short folder: Ray's socket paths must stay under the 107-character limit.
    tmp = Path(tempfile.mkdtemp(prefix="br-cluster-", dir="/tmp"))
    try:
        (tmp / "project").mkdir()
        shutil.copy(ROOT / "examples" / "my_problem.py", tmp / "project" / "my_problem.py")
        script = SCRIPT.format(bin=BIN, tmp=tmp, count_nodes=COUNT_NODES)
        run = subprocess.run(
            [*UNSHARE, "bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=600,
        )
        logs = {
            name: (tmp / f"{name}.log").read_text() if (tmp / f"{name}.log").exists() else ""
            for name in ("head", "node", "tune", "train")
        }
        assert run.returncode == 0, (run.stdout, run.stderr, logs)
        assert "nodes 2" in run.stdout
        trials = pq.read_table(tmp / "shared" / "sweep" / "trials.parquet").to_pylist()
        assert [t["status"] for t in trials] == ["completed", "completed"], logs["tune"]
        assert "best config:" in logs["tune"]
        history = pq.read_table(tmp / "shared" / "run1" / "history.parquet")
        assert history.column("step").to_pylist()[-1] == 40, logs["train"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
