"""featurize.scheduler: features computed by a dask LocalCluster of two worker processes on 127.0.0.1."""

import numpy as np
import pytest
from distributed import Client, LocalCluster
from test_featurize import PARAMS, make_tree, read_all, run_stage, write_png, write_studies

from pipeline import distributed as distributed_stage
from pipeline import featurize
from pipeline.distributed import SchedulerError, worker_stats

STUDIES = 6


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", protocol="tcp://",
        dashboard_address="127.0.0.1:0", worker_dashboard_address=None,
    ) as cluster:
        yield cluster


def _tree(tmp_path):
    tree = make_tree(tmp_path)
    studies = {}
    for index in range(STUDIES):
        pair = [f"CXR{10 + index}_IM-{index:04d}-{view}001" for view in (1, 2)]
        for view, image_id in enumerate(pair):
            write_png(tree / "images" / f"{image_id}.png", 50 + 2 * index + view)
        studies[f"CXR{10 + index}_IM-{index:04d}"] = pair
    write_studies(tree, studies)
    return tree


def test_cluster_matches_local_run(tmp_path, cluster):
    tree = _tree(tmp_path)
    address = cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    params = PARAMS.model_copy(update={"scheduler": address, "task_batches": 1})
    paths = (tree / "studies.parquet", tree / "images", tree / "manifest.json")

    first = featurize.run(params, *paths, tree / "dask.h5", tree / "dask-cache")
    second = featurize.run(params, *paths, tree / "again.h5", tree / "another-cache")
    local, _ = run_stage(tree, "local.h5", cache="local-cache")

    assert first.computed == second.computed == 2 * STUDIES
    with Client(address) as client:
        stats = client.run(worker_stats)
    assert sum(worker["shards"] for worker in stats.values()) == 2 * STUDIES  # 2 runs of 6 one-batch tasks
    for worker, counts in stats.items():
        assert counts["models_built"] == (1 if counts["shards"] else 0), worker

    cluster_data, _ = read_all(tree / "dask.h5")
    local_data, _ = read_all(local)
    for name, values in local_data.items():
        np.testing.assert_array_equal(cluster_data[name], values, err_msg=name)


def test_unreachable_scheduler_named(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed_stage, "CONNECT_TIMEOUT_S", 2)
    tree = make_tree(tmp_path)
    params = PARAMS.model_copy(update={"scheduler": "tcp://127.0.0.1:9"})
    with pytest.raises(SchedulerError, match="tcp://127.0.0.1:9"):
        featurize.run(params, tree / "studies.parquet", tree / "images", tree / "manifest.json", tree / "x.h5", tree / "cache")
