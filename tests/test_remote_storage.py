"""Runs kept in S3: a real S3-compatible server (moto's server mode) on loopback, reached through
pyarrow's S3 filesystem exactly as a bucket would be."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cpi_ray.config.load import load_config
from cpi_ray.io.remote import RunStore, StorageError, join_uri

pytest.importorskip("moto")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_uri():
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="cpi")
    yield f"s3://cpi/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stage(payloads: dict[str, bytes]):
    """A stage writing the given files: the protocol without training anything."""
    from cpi_ray.run.stage import Stage

    class Writer(Stage):
        name = "regions"
        folder = "regions"

        def config_slice(self, cfg):
            return {k: v.hex() for k, v in payloads.items()}

        def run(self, ctx):
            outs = []
            for name, data in payloads.items():
                p = ctx.path("regions", name)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                outs.append(p)
            return outs

    return Writer()


def _ctx(cfg, run_dir):
    from cpi_ray.run.stage import RunContext

    return RunContext(cfg=cfg, run_dir=run_dir, base_model_dir=run_dir, base_model_id="b")


def _cfg(*extra):
    return load_config(ROOT / "jobs" / "configs" / "smoke.yaml", list(extra))


def test_push_pull_round_trip_record_last_and_stale_files_removed(s3_uri, tmp_path):
    store = RunStore(join_uri(s3_uri, "unit"))
    cfg = _cfg()
    a = _ctx(cfg, tmp_path / "a")
    _stage({"x.bin": b"abc", "sub/y.bin": b"0123"}).execute(a)
    assert store.push(a.run_dir, "regions") == 3  # two outputs, then the record
    assert store.push(a.run_dir, "regions") == 0  # unchanged: nothing goes up

    b = _ctx(cfg, tmp_path / "b")
    assert store.pull(b.run_dir, ["probes", "regions"]) == ["regions"]
    assert (b.run_dir / "regions" / "sub" / "y.bin").read_bytes() == b"0123"
    rec, ran = _stage({"x.bin": b"abc", "sub/y.bin": b"0123"}).execute(b)
    assert not ran, "a pulled stage must count as done"

    # Redone with other outputs: the changed file goes up, the dropped one leaves the store.
    _stage({"x.bin": b"abd"}).execute(a)
    assert store.push(a.run_dir, "regions") == 2
    with pytest.raises(FileNotFoundError):
        store.fs.open_input_stream(store._key("regions/sub/y.bin"))
    c = _ctx(cfg, tmp_path / "c")
    store.pull(c.run_dir, ["regions"])
    assert (c.run_dir / "regions" / "x.bin").read_bytes() == b"abd"
    assert not (c.run_dir / "regions" / "sub").exists()


def test_interrupted_upload_leaves_no_record_in_the_store(s3_uri, tmp_path, monkeypatch):
    store = RunStore(join_uri(s3_uri, "interrupted"))
    a = _ctx(_cfg(), tmp_path / "a")
    _stage({"x.bin": b"1", "y.bin": b"2"}).execute(a)
    store.push(a.run_dir, "regions")
    _stage({"x.bin": b"3", "y.bin": b"4"}).execute(a)
    real, calls = RunStore._upload, []

    def failing(self, src, rel):
        calls.append(rel)
        if len(calls) == 2:
            raise OSError("connection reset")
        real(self, src, rel)

    monkeypatch.setattr(RunStore, "_upload", failing)
    with pytest.raises(OSError):
        store.push(a.run_dir, "regions")
    assert store.read_record("regions") is None, "the old record must leave before new files go up"
    assert store.pull(tmp_path / "b", ["regions"]) == []


def test_unreachable_store_and_bad_uris_are_named(tmp_path):
    from cpi_ray.config.load import ConfigError

    with pytest.raises(ConfigError, match="storage.path"):
        _cfg("storage.path=ftp://host/runs")
    with pytest.raises(ConfigError, match="no bucket"):
        _cfg("storage.path=s3://")
    store = RunStore("s3://cpi/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    with pytest.raises(StorageError, match="not reachable"):
        store.check()


@pytest.mark.slow
def test_pipeline_written_to_s3_then_resumed_from_it_elsewhere(ray_session, s3_uri, tmp_path):
    """A run on machine A writes its stages to the bucket; a fresh working copy (machine B)
    resumes from the bucket: finished stages are restored and skipped, the next one runs and
    lands in the bucket too."""
    from cpi_ray.pipeline.runner import resolve_run_dir, run_pipeline

    common = [
        f"storage.path={s3_uri}",
        "storage.run_name=resume",
        "probe.steps=20",
        f"model.cache_dir={tmp_path / 'models'}",
    ]
    cfg_a = _cfg(*common, f"storage.local_path={tmp_path / 'a'}", "stages=[probe, regions, groups]")
    run_a = resolve_run_dir(cfg_a, None)
    assert run_a == (tmp_path / "a" / "resume").resolve()
    first = run_pipeline(cfg_a, run_a)
    assert [o.status for o in first.outcomes] == ["ran"] * 3

    store = RunStore(join_uri(s3_uri, "resume"))
    for folder in ("probes", "regions", "groups"):
        rec = store.read_record(folder)
        assert rec == json.loads((run_a / folder / "stage.json").read_text())
    with store.fs.open_input_stream(store._key("config.yaml")) as f:
        assert b"run_name: resume" in f.read()

    cfg_b = _cfg(*common, f"storage.local_path={tmp_path / 'b'}", "stages=[probe, regions, groups, fuse]")
    run_b = resolve_run_dir(cfg_b, None)
    second = run_pipeline(cfg_b, run_b)
    assert [o.status for o in second.outcomes] == ["skipped (up to date)"] * 3 + ["ran"]
    for t in ("reverse", "upper", "digits"):
        for f in (run_a / "probes" / t).glob("*.safetensors"):
            assert (run_b / "probes" / t / f.name).read_bytes() == f.read_bytes()
    fused = store.read_record("fused")
    assert fused is not None and fused == json.loads((run_b / "fused" / "stage.json").read_text())
    assert any(
        o["path"].startswith("fused/") and o["path"].endswith(".safetensors") for o in fused["outputs"]
    )


def test_store_lease_refuses_a_live_holder_takes_over_a_lapsed_one_and_stops_a_job_that_lost_it(
    s3_uri, tmp_path, caplog
):
    import time

    from cpi_ray.io.lease import STORE_LEASE_NAME, RunBusyError, StoreLease

    store = RunStore(join_uri(s3_uri, "leased"))
    ttl = 3.0
    a = StoreLease(store, ttl_s=ttl, settle_s=0.1).acquire()
    holder = json.loads(store.read_text(STORE_LEASE_NAME))
    assert holder["token"] == a.record["token"] and holder["pid"] == os.getpid()
    with pytest.raises(RunBusyError, match=f"in use by pid {os.getpid()} on"):
        StoreLease(store, ttl_s=ttl, settle_s=0.1).acquire()
    # The holder's renewals keep the lease alive past its ttl. Waiting for a renewal later than
    # one ttl after the first, rather than a fixed time, keeps this true on a loaded machine.
    first, deadline = holder["renewed"], time.time() + 60
    while json.loads(store.read_text(STORE_LEASE_NAME))["renewed"] < first + ttl:
        assert time.time() < deadline, "the lease was not renewed"
        time.sleep(0.1)
    with pytest.raises(RunBusyError, match="in use by"):
        StoreLease(store, ttl_s=ttl, settle_s=0.1).acquire()
    a.check()
    a.release()
    assert store.read_text(STORE_LEASE_NAME) is None

    # A job that died without releasing: its lease lapses and is taken over, with a warning.
    dead = {"host": "gone", "pid": 1, "started": "then", "token": "dead", "renewed": time.time() - 60}
    store.write_text(STORE_LEASE_NAME, json.dumps(dead))
    with caplog.at_level("WARNING", logger="cpi_ray"):
        b = StoreLease(store, ttl_s=10, settle_s=0.1).acquire()
    assert "taking over the lease of pid 1 on gone" in caplog.text
    # Another job overwrote the lease (a race the settle time did not catch): b stops before its
    # next upload, and its release leaves the other job's lease in place.
    rival = {**dead, "host": "rival", "token": "rival", "renewed": time.time()}
    store.write_text(STORE_LEASE_NAME, json.dumps(rival))
    with pytest.raises(RunBusyError, match="lost its lease to pid 1 on rival"):
        b.check()
    b.release()
    assert json.loads(store.read_text(STORE_LEASE_NAME))["token"] == "rival"


def test_a_run_whose_store_lease_is_held_writes_nothing_to_the_store(s3_uri, tmp_path):
    import time

    from cpi_ray.io.lease import STORE_LEASE_NAME, RunBusyError
    from cpi_ray.pipeline.runner import resolve_run_dir, run_pipeline

    store = RunStore(join_uri(s3_uri, "busy"))
    other = {"host": "node-7", "pid": 42, "started": "now", "token": "other", "renewed": time.time()}
    store.write_text(STORE_LEASE_NAME, json.dumps(other))
    cfg = _cfg(
        f"storage.path={s3_uri}",
        "storage.run_name=busy",
        f"storage.local_path={tmp_path / 'work'}",
        f"model.cache_dir={tmp_path / 'models'}",
    )
    with pytest.raises(RunBusyError, match="in use by pid 42 on node-7"):
        run_pipeline(cfg, resolve_run_dir(cfg, None))
    assert store.read_text("config.yaml") is None
    assert json.loads(store.read_text(STORE_LEASE_NAME))["token"] == "other"
