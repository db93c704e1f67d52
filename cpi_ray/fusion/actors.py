"""The fusion actor: a thin Ray shell around `ShardFuser`, importable without torch."""

from __future__ import annotations

import ray

from cpi_ray.fusion.worker import FuseSettings, ShardFuser, ShardJob, peak_rss_bytes


@ray.remote
class FuseActor:
    """Owns the output shards it is handed, one call per shard."""

    def __init__(self, settings: FuseSettings, out_dir: str):
        self._fuser = ShardFuser(settings)
        self._out_dir = out_dir

    def fuse(self, job: ShardJob) -> dict:
        return self._fuser.fuse_shard(job, self._out_dir)

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def close(self) -> None:
        self._fuser.close()
