import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Test-only: Ray Train's controller notices that a run ended at its next poll of the workers, every 2 s by default
# (inherited by the local clusters the tests start and by their CLI subprocesses).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path} (expected ../shared/data beside the project root)")
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one end-to-end test module (real Ray Train + DeepSpeed workers)."""
    import ray

    from raydistill.config import load_config
    from raydistill.train import launcher

    launcher.init_ray(load_config(None, ["teacher.name=tiny-gpt2", "ray.dashboard=false"]))
    yield
    ray.shutdown()


@pytest.fixture
def s3_server(monkeypatch):
    """An in-process S3 stand-in (moto's server) with a bucket ``bucket``; yields the query string that points
    pyarrow's ``s3://`` URIs at it."""
    pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[test]')")
    pytest.importorskip("flask", reason="moto's server mode needs flask (pip install 'moto[server]')")
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
        pafs.FileSystem.from_uri(f"s3://bucket?{query}")[0].create_dir("bucket")
        yield query
    finally:
        server.stop()


@pytest.fixture
def cache_dir(tmp_path_factory):
    """One cache per test session: tokenizers, packed data and pretrained teachers are reused."""
    return str(tmp_path_factory.getbasetemp() / "raydistill-cache")


# Two cores shared by Ray workers and the test process: torch's default thread pool oversubscribes them
# and makes tiny-model tests 10x slower.
import torch  # noqa: E402

torch.set_num_threads(1)
