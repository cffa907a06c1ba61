"""A LanceDB folder on an object store (issue 24): the embedding store and the coefficient table on ``s3://``,
against a local S3-compatible server (moto's, on 127.0.0.1; skipped when ``moto[server]`` is not installed)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3_uri(monkeypatch):
    """``s3://idistill/lancedb`` on a fresh moto server; the ``AWS_*`` variables lance reads point at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        client.create_bucket(Bucket="idistill")
        yield "s3://idistill/lancedb", client
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_embedding_store_and_coefficients_work_on_an_s3_uri(s3_uri, tmp_path):
    from idistill_core.pipeline.propagation import CoefficientTable, build_coefficients
    from idistill_core.steps.propagate import KernelRidge, PropagateConfig
    from idistill_core.store.lance import EmbeddingStore, StoreIdentity

    uri, client = s3_uri
    rng = np.random.default_rng(0)
    ids = [f"s{i:03d}" for i in range(80)]
    vectors = rng.normal(size=(80, 8)).astype(np.float32)
    store = EmbeddingStore.open(uri, "emb", StoreIdentity("m", "r", 8))
    assert store.insert_missing(ids[:50], vectors[:50], commit_mb=0.001) == 50  # several commits
    first = store.version
    assert store.insert_missing(ids, vectors) == 30  # insert-if-missing on the object store
    np.testing.assert_allclose(store.read(ids[::-1]), vectors[::-1].astype(np.float16).astype(np.float32))
    assert store.at_version(first).count() == 50  # time travel
    store.optimize()
    assert store.count() == 80 and sorted(store.sample_ids()) == ids
    # nothing was written to a local folder named after the URI
    assert not (tmp_path / "s3:").exists() and not __import__("pathlib").Path("s3:").exists()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="idistill")["Contents"]]
    assert any(k.startswith("lancedb/emb.lance/") for k in keys)

    table, report = build_coefficients(store, ids, ids[:10], PropagateConfig(), chunk_rows=32)
    assert report.rows == 80 and report.rows_computed == 80
    reopened = CoefficientTable.open(uri, table.name, report.version)
    got_ids, matrix = reopened.matrix()
    expected = KernelRidge.fit(store.read(ids[:10])).coefficients(store.read(got_ids)).numpy()
    np.testing.assert_allclose(matrix, expected, rtol=1e-6, atol=1e-7)
    _, again = build_coefficients(store, ids, ids[:10], PropagateConfig(), chunk_rows=32)
    assert again.rows_computed == 0  # reused on the object store too
