"""The cluster/slurm scripts on a real two-node Slurm (tests/fixtures/slurm.py starts it)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_local_cluster_runs_a_job_on_both_nodes(slurm, tmp_path: Path):
    script = tmp_path / "hello.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1\n"
        "srun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'\n"
    )
    job = slurm.sbatch("--output", tmp_path / "hello-%j.out", script)
    record = slurm.wait(job, timeout=60)
    assert record["NodeList"] == "n[1-2]"
    out = (tmp_path / f"hello-{job}.out").read_text()
    assert sorted(out.split("\n")[:2]) == ["task 0 on n1", "task 1 on n2"], out
