"""Ray workers read their own window of the pool (issue 24): the driver writes the rows to compute once to a Lance
table and ships each task only ``(table, first row, rows)``, never token ids through the object store."""

import dataclasses

import numpy as np

from tests.ray.driver import COMMIT_EVERY, EMBED, open_table, ray_backend, tiny_pool
from tests.ray.test_ray_backend import assert_same_vectors, table_vectors


def test_workers_read_their_pool_window_and_tasks_carry_no_token_ids(ray_cluster, pool_dir, reference, tmp_path, monkeypatch):
    import lancedb
    import ray.data

    from idistill_core.backends import ModelSource
    from idistill_core.backends import ray as ray_backend_module
    from idistill_core.pipeline.embeddings import embed_pool

    shipped = []
    real = ray.data.from_arrow

    def spy(tables, *args, **kwargs):
        shipped.extend(tables)
        return real(tables, *args, **kwargs)

    monkeypatch.setattr(ray.data, "from_arrow", spy)
    windows = tmp_path / "windows"
    written = []
    real_pool_table = ray_backend_module.pool_table

    def watched(examples, ids, pool_uri, *args, **kwargs):
        with real_pool_table(examples, ids, pool_uri, *args, **kwargs) as (uri, name):
            written.append((uri, name, lancedb.connect(uri).open_table(name).count_rows(), len(ids)))
            yield uri, name

    monkeypatch.setattr(ray_backend_module, "pool_table", __import__("contextlib").contextmanager(watched))
    loaded, examples = tiny_pool(pool_dir)
    store = open_table(tmp_path / "store", loaded)
    backend = dataclasses.replace(ray_backend(ray_cluster, 1), pool_uri=str(windows))
    report = embed_pool(loaded.model, loaded.tokenizer, examples, store, EMBED, commit_every=COMMIT_EVERY,
                        backend=backend, source=ModelSource.of(loaded))
    assert report.computed == len(reference)
    assert_same_vectors(table_vectors(store), reference)
    # every task is a window of the job's pool table: four small columns, no token ids
    assert shipped and all(t.column_names == ["uri", "table", "offset", "count"] for t in shipped)
    assert sum(t.column("count")[0].as_py() for t in shipped) == len(reference)
    assert max(t.nbytes for t in shipped) < 512
    offsets = sorted(t.column("offset")[0].as_py() for t in shipped)
    assert offsets == sorted(set(offsets)) and offsets[0] == 0
    # the table held exactly the rows to compute, and is gone after the job
    (uri, name, rows, ids), = written
    assert uri == str(windows) and rows == ids == len(reference)
    assert name not in lancedb.connect(str(windows)).list_tables().tables
    assert np.isfinite(np.stack(list(table_vectors(store).values()))).all()
