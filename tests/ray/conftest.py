"""A real local Ray cluster for the tests in this folder, started once and stopped at the end.

2 CPUs, no dashboard, a 300 MB object store, on 127.0.0.1. The test process is its first driver (the in-process
tests reuse the connection); subprocess drivers and Dagster Pipes drivers join it by its GCS address.
``ray.shutdown()`` in the process that started the cluster stops its processes, so nothing is left behind.
"""

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory):
    from idistill_core.data.builtin import write_builtin

    folder = tmp_path_factory.mktemp("ray-pool")
    write_builtin(folder, pool_size=120, seed=0, dev_size=6, test_size=4)
    return folder


@pytest.fixture(scope="session")
def reference(pool_dir, tmp_path_factory):
    """The local backend's vectors for the tiny pool: ``{sample_id: (D,) float32}`` (read back from LanceDB)."""
    from idistill_core.pipeline.embeddings import embed_pool
    from tests.ray.driver import COMMIT_EVERY, EMBED, open_table, tiny_pool

    loaded, examples = tiny_pool(pool_dir)
    store = open_table(tmp_path_factory.mktemp("local-store"), loaded)
    embed_pool(loaded.model, loaded.tokenizer, examples, store, EMBED, commit_every=COMMIT_EVERY)
    ids = store.sample_ids()
    return dict(zip(ids, store.read(ids)))
