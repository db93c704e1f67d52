"""`cpi-ray plan`: parameter counts and memory per worker against arithmetic done by hand, and the
command itself (no Ray, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpi_ray.cli import main
from cpi_ray.config.load import ConfigError, load_config
from cpi_ray.pipeline.plan import (
    GIB,
    activation_bytes,
    build_plan,
    model_facts,
    train_state_bytes,
    worker_resources,
)

REPO = Path(__file__).resolve().parents[1]
LLAMA7B = str(REPO / "jobs/configs/llama7b.yaml")

# Llama-2-7B by hand: per layer q, k, v, o (4 h^2) + gate, up, down (3 h i) + two RMSNorms (2 h);
# untied embeddings and lm_head (V h each); the final norm (h).
H7, I7, L7, V7 = 4096, 11008, 32, 32000
LAYER7 = 4 * H7 * H7 + 3 * H7 * I7 + 2 * H7
P7 = L7 * LAYER7 + 2 * V7 * H7 + H7


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Planning must never reach a model hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _cfg(tmp_path, overrides=(), path=LLAMA7B):
    return load_config(path, [f"model.cache_dir={tmp_path / 'models'}", *overrides])


def test_llama7b_parameter_count_from_architecture(tmp_path):
    assert P7 == 6_738_415_616  # the published count
    f = model_facts(_cfg(tmp_path))
    assert f.num_parameters == P7
    assert (f.num_layers, f.hidden_size, f.intermediate_size, f.vocab_size) == (L7, H7, I7, V7)
    assert f.largest_unit == LAYER7 and f.largest_unit_name == "one decoder layer"
    assert f.source == "model.architecture"


def test_tiny_model_count_matches_the_real_model_and_hand_arithmetic(tmp_path):
    from cpi_ray.models.tiny import build_tiny_model

    cfg = _cfg(tmp_path, path=str(REPO / "jobs/configs/smoke.yaml"))
    f = model_facts(cfg)
    t = cfg.model.tiny
    model, tok = build_tiny_model(**t.model_dump())
    assert f.num_parameters == sum(p.numel() for p in model.parameters())
    h, i, V = t.hidden_size, t.intermediate_size, len(tok)
    kv = h // t.num_attention_heads * t.num_key_value_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert f.num_parameters == t.num_hidden_layers * layer + 2 * V * h + h
    assert f.kv_dim == kv


def test_demo_model_planned_before_it_is_materialized(tmp_path):
    # SmolLM2-135M: GQA with 3 of 9 heads for k and v, embeddings tied to the lm_head.
    cfg = _cfg(tmp_path, path=str(REPO / "jobs/configs/demo.yaml"))
    assert not (tmp_path / "models").exists()
    f = model_facts(cfg)
    h, i, L, V, kv = 576, 1536, 30, 49152, 192
    assert f.num_parameters == L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + V * h + h
    assert f.num_parameters == 134_515_008
    assert f.largest_unit == V * h  # the embedding outweighs a layer here
    assert not (tmp_path / "models").exists()


def test_probe_memory_on_the_engine(tmp_path):
    """The 7B probe on one GPU: ZeRO-3 with the optimizer offloaded keeps bf16 weights and
    gradients (4 B/param) on the GPU, the gathered layers and the activations; the fp32 master and
    AdamW moments (12 B/param) are in host memory."""
    cfg = _cfg(tmp_path)  # bf16, one worker, micro-batch 32/16 = 2, 1024 tokens, offload
    probe = build_plan(cfg).stages[0]
    assert probe.name == "probe" and "ZeRO-3" in probe.engine
    mem = dict(probe.memory)
    act = L7 * 2 * 1024 * (10 * H7 + 4 * I7) * 2 + 2 * 1024 * V7 * (2 + 8)
    states = next(b for k, b in mem.items() if k.startswith("weights + gradients ("))
    assert states == 4 * P7
    assert [b for k, b in mem.items() if k.startswith("activations")] == [act]
    assert probe.memory_per_worker == 4 * P7 + 2 * LAYER7 * 2 + act
    assert 36 * GIB < probe.memory_per_worker < 38 * GIB  # one 80 GB GPU
    host = next(n for n in probe.notes if n.startswith("offload_optimizer cpu"))
    assert f"{12 * P7 / GIB:.2f} GiB" in host

    # fp32 on two workers without offload: 16 B/param sharded over the two ranks.
    fp32 = build_plan(
        _cfg(
            tmp_path,
            ["model.dtype=float32", "probe.precision=fp32", "probe.num_workers=2", "probe.deepspeed={}"],
        )
    ).stages[0]
    static = sum(b for k, b in fp32.memory if not k.startswith("activations"))
    assert static == 16 * P7 // 2 + 2 * LAYER7 * 4
    assert fp32.units == 4 * 2  # four tasks' trainers at once, two workers each


def test_a_70b_probe_fits_an_8_gpu_node(tmp_path):
    """Llama-2-70B: a probe over the 8 GPUs of one node, ZeRO-3 with the optimizer in host memory,
    micro-batch 1 x 1024 tokens with gradient checkpointing, per rank under 80 GiB."""
    H, FF, L, V, KV = 8192, 28672, 80, 32000, 1024
    layer = 2 * H * H + 2 * H * KV + 3 * H * FF + 2 * H
    P = L * layer + 2 * V * H + H
    arch = (
        "model.architecture={model_type: llama, hidden_size: 8192, intermediate_size: 28672, "
        "num_hidden_layers: 80, num_attention_heads: 64, num_key_value_heads: 8, vocab_size: 32000, "
        "tie_word_embeddings: false}"
    )
    cfg = _cfg(
        tmp_path,
        [
            "model.source=meta-llama/Llama-2-70b-hf",
            arch,
            "probe.num_workers=8",
            "probe.grad_accum=32",
            "probe.gradient_checkpointing=true",
        ],
    )
    probe = build_plan(cfg).stages[0]
    assert model_facts(cfg).num_parameters == P
    mem = dict(probe.memory)
    assert next(b for k, b in mem.items() if k.startswith("weights + gradients (")) == 4 * P // 8
    assert probe.memory_per_worker < 80 * GIB, probe.memory_per_worker / GIB
    assert not any("80 GiB" in n for n in probe.notes)


def test_epi_statistics_halve_with_two_ranks(tmp_path):
    """EPI keeps a moving average and a mask per element in each rank's ZeRO-3 partition."""
    per_rank = {}
    for n in (1, 2):
        cfg = _cfg(
            tmp_path, ["baselines.modes=[full_mtl, epi]", f"consolidate.num_workers={n}", "epi.ratio=5"]
        )
        base = next(s for s in build_plan(cfg).stages if s.name == "baselines")
        mem = dict(base.memory)
        per_rank[n] = [b for k, b in mem.items() if k.startswith("epi:")]
    P = model_facts(cfg).num_parameters
    assert per_rank[1] == [5 * P, int(12 * 0.05 * P)]
    assert per_rank[2] == [5 * P // 2, int(12 * 0.05 * P / 2)]


def test_zero3_partition_arithmetic(tmp_path):
    cfg = _cfg(tmp_path)
    cons = next(s for s in build_plan(cfg).stages if s.name == "consolidate")
    mem = dict(cons.memory)
    states = next(b for k, b in mem.items() if k.startswith("weights + gradients"))
    assert states == 16 * P7 // 8  # 16 B/param over 8 ranks
    gathered = next(b for k, b in mem.items() if k.startswith("gathered"))
    assert gathered == 2 * LAYER7 * 2  # current + prefetched layer, bf16
    act = L7 * 4 * 1024 * (10 * H7 + 4 * I7) * 2 + 4 * 1024 * V7 * 10
    assert cons.memory_per_worker == states + gathered + act

    # Twice the ranks, half the partition; nothing else moves.
    cons16 = next(
        s
        for s in build_plan(_cfg(tmp_path, ["consolidate.num_workers=16"])).stages
        if s.name == "consolidate"
    )
    assert cons.memory_per_worker - cons16.memory_per_worker == 16 * P7 // 8 - 16 * P7 // 16


def test_train_state_bytes_by_zero_stage():
    P, N = 1000, 4
    # bf16: 2 (weights) + 2 (grads) + 12 (fp32 master, m, v); fp32: 4 + 4 + 8.
    assert train_state_bytes(P, "bf16", 0, N) == {"weights": 2000, "gradients": 2000, "optimizer": 12000}
    assert train_state_bytes(P, "bf16", 1, N) == {"weights": 2000, "gradients": 2000, "optimizer": 3000}
    assert train_state_bytes(P, "bf16", 2, N) == {"weights": 2000, "gradients": 500, "optimizer": 3000}
    assert train_state_bytes(P, "fp32", 3, N) == {"weights": 1000, "gradients": 1000, "optimizer": 2000}
    assert sum(train_state_bytes(P, "fp32", 3, N).values()) == 16 * P / N


def test_activation_estimate_needs_the_shape():
    from cpi_ray.pipeline.plan import ModelFacts

    assert activation_bytes(ModelFacts("m", "hint", 10**9), 4, 512, 2) is None
    f = ModelFacts("m", "x", 1, num_layers=2, hidden_size=8, intermediate_size=16, vocab_size=10)
    assert activation_bytes(f, 3, 5, 4) == 2 * 15 * (80 + 64) * 4 + 15 * 10 * 12
    # Recomputed: each layer's input (15 tokens x hidden 8), one layer's full set, the logits.
    assert activation_bytes(f, 3, 5, 4, recompute=True) == 2 * 15 * 8 * 4 + 15 * (80 + 64) * 4 + 15 * 10 * 12


def test_streaming_stages_do_not_grow_with_the_model(tmp_path):
    small = {s.name: s for s in build_plan(_cfg(tmp_path, path=str(REPO / "jobs/configs/smoke.yaml"))).stages}
    big = {s.name: s for s in build_plan(_cfg(tmp_path)).stages}
    assert big["fuse"].memory_per_worker == 512 * 2**20  # fuse.chunk_mib is the actor's budget
    assert small["regions"].memory_per_worker == big["regions"].memory_per_worker
    # ... but the driver's packed masks do: one bit per parameter per task.
    assert dict(big["regions"].driver_memory)["bit-packed masks (4 task(s) x P/8 bytes)"] == 4 * P7 // 8
    assert big["regions"].units == 32 and big["fuse"].units == 16


def test_worker_resources_carry_custom_resources(tmp_path):
    cfg = _cfg(tmp_path)
    assert worker_resources(cfg, "probe") == {"CPU": 8, "GPU": 1, "probe_gpu": 1}
    assert worker_resources(cfg, "consolidate") == {"CPU": 10, "GPU": 1, "zero3_gpu": 1}
    assert worker_resources(cfg, "regions") == {"CPU": 1, "cpu_stream": 1}
    assert worker_resources(cfg, "fuse") == {"CPU": 1, "cpu_stream": 1}
    assert worker_resources(cfg, "evaluate") == {"CPU": 4, "GPU": 1, "probe_gpu": 1}
    assert worker_resources(cfg, "groups") == {}
    total = build_plan(cfg).total_resources()
    assert total["consolidate"] == {"CPU": 80, "GPU": 8, "zero3_gpu": 8}
    assert total["probe"] == {"CPU": 32, "GPU": 4, "probe_gpu": 4}


@pytest.mark.parametrize("bad", ["probe.custom_resources={GPU: 1}", "fuse.custom_resources={cpu_stream: -1}"])
def test_custom_resources_are_validated(tmp_path, bad):
    with pytest.raises(ConfigError, match="custom_resources"):
        _cfg(tmp_path, [bad])


def test_plan_command_prints_the_7b_plan(tmp_path, capsys):
    import ray

    connected = ray.is_initialized()  # an earlier test's Ray may be up; plan must not start one
    assert main(["plan", "--config", LLAMA7B, "--set", f"model.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "6.74 B parameters" in out and "from model.architecture" in out
    assert "2 B/param = 16 / 8 ranks" in out
    for stage in ("probe", "regions", "groups", "fuse", "consolidate", "evaluate"):
        assert f"\n{stage}: " in out
    assert "zero3_gpu=1" in out and "probe_gpu=1" in out
    assert ray.is_initialized() == connected

    assert (
        main(
            [
                "plan",
                "--config",
                LLAMA7B,
                "--json",
                "--stages",
                "consolidate",
                "--set",
                f"model.cache_dir={tmp_path}",
                "--set",
                "consolidate.num_workers=16",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["stages"]] == ["consolidate"]
    assert data["model"]["num_parameters"] == P7
    assert data["stages"][0]["memory"][0][1] == P7  # 16 B/param / 16 ranks


def test_plan_command_for_the_demo(tmp_path, capsys):
    demo = str(REPO / "jobs/configs/demo.yaml")
    assert main(["plan", "--config", demo, "--set", f"model.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "134.52 M parameters" in out and "16 / 2 ranks" in out


def test_hub_model_without_hints_is_a_config_error(tmp_path, capsys):
    args = [
        "plan",
        "--config",
        LLAMA7B,
        "--set",
        f"model.cache_dir={tmp_path}",
        "--set",
        "model.architecture=null",
    ]
    assert main(args) == 2
    assert "model.architecture" in capsys.readouterr().err
    # A bare parameter count is enough for the static part; activations are then unknown.
    assert main([*args, "--set", "model.num_parameters=7000000000"]) == 0
    out = capsys.readouterr().out
    assert "7.00 B parameters" in out and "activations unknown" in out


def test_a_downloaded_hub_model_is_read_from_the_cache(tmp_path, tiny_model_dir):
    import shutil

    cached = tmp_path / "meta-llama--Llama-2-7b-hf"
    shutil.copytree(tiny_model_dir, cached)
    f = model_facts(load_config(LLAMA7B, [f"model.cache_dir={tmp_path}"]))
    assert f.source.endswith("config.json") and f.num_parameters < 10**6


def test_disk_figures_by_hand_for_the_7b_config(tmp_path):
    """Probes at 2 B/param (bf16) each, two DeepSpeed checkpoints (12 B/param) per trainer while
    it runs (the config checkpoints every 50 steps); masks P/8; the fused model; every
    consolidation stage with its mask, and final/; a Fisher (fp32) only when the core score
    reads it."""
    n, w, mask = 4, 2, -(-P7 // 8)
    cfg = _cfg(tmp_path, ["baselines.modes=[full_mtl,multistage]", "baselines.multistage_num_groups=3"])
    disk = {s.name: s.disk for s in build_plan(cfg, "llama7b").stages}
    assert disk["probe"].kept_bytes == n * P7 * w
    assert disk["probe"].peak_bytes == n * P7 * w + n * 2 * 12 * P7
    assert disk["regions"].kept_bytes == n * mask
    assert disk["fuse"].kept_bytes == P7 * w
    assert disk["consolidate"].kept_bytes == n * (P7 * w + mask) + P7 * w  # grouping unknown: n stages
    assert disk["baselines"].kept_bytes == 2 * P7 * w and disk["baselines"].peak_bytes == 5 * P7 * w
    fisher = {s.name: s.disk for s in build_plan(_cfg(tmp_path, ["regions.score=delta_fisher"])).stages}
    assert fisher["probe"].kept_bytes == n * P7 * w + n * P7 * 4
    a, b, c, d = (t.name for t in cfg.tasks)
    given = _cfg(tmp_path, ["groups.order=given", f"groups.given=[[{a},{b}],[{c},{d}]]"])
    cons = {s.name: s.disk for s in build_plan(given).stages}["consolidate"]
    assert cons.kept_bytes == 2 * (P7 * w + mask) + P7 * w


def test_disk_estimate_of_a_model_matches_a_saved_one(tmp_path, tiny_model_dir):
    """The per-model bytes the plan counts are the weights the run's models actually hold."""
    cfg = _cfg(tmp_path, path=str(REPO / "jobs/configs/smoke.yaml"))
    fused = {s.name: s.disk for s in build_plan(cfg).stages}["fuse"].kept_bytes
    weights = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert abs(weights - fused) < 0.02 * fused + 64 * 1024  # safetensors headers


def test_free_space_check_names_need_free_and_place(tmp_path):
    from cpi_ray.pipeline.plan import DiskSpaceError, check_free_space

    cfg = _cfg(tmp_path)
    plan = build_plan(cfg)
    run = tmp_path / "run"
    disk = {s.name: s.disk for s in plan.stages}
    need_all = sum(d.kept_bytes for d in disk.values()) + max(
        d.peak_bytes - d.kept_bytes for d in disk.values()
    )
    needed, free = check_free_space(plan, run, ["probe", "regions", "fuse"], free=10**15)
    assert needed == sum(disk[s].kept_bytes for s in ("probe", "regions", "fuse")) + (
        disk["probe"].peak_bytes - disk["probe"].kept_bytes
    )
    assert check_free_space(plan, run, list(cfg.stages), free=10**15)[0] == need_all
    with pytest.raises(
        DiskSpaceError, match=rf"disk: fuse, consolidate need about .* in {run} .*; 1.0 MiB free"
    ):
        check_free_space(plan, run, ["fuse", "consolidate"], free=2**20)
    # What a stage folder already holds is not needed again (a resumed run).
    (run / "fused").mkdir(parents=True)
    (run / "fused" / "w.bin").write_bytes(b"x" * 1000)
    assert check_free_space(plan, run, ["fuse"], free=10**15)[0] == disk["fuse"].kept_bytes - 1000


def test_a_stage_checks_disk_only_when_it_has_work(tmp_path):
    from cpi_ray.run.stage import RunContext, Stage

    class Writer(Stage):
        name = "fuse"

        def config_slice(self, cfg):
            return {}

        def run(self, ctx):
            out = ctx.path("fused", "w.bin")
            out.write_bytes(b"1")
            return [out]

    cfg = load_config(str(REPO / "jobs/configs/smoke.yaml"), [])
    ctx = RunContext(cfg=cfg, run_dir=tmp_path, base_model_dir=tmp_path, base_model_id="b")
    calls = []
    assert Writer().execute(ctx, before_run=lambda: calls.append(1))[1]
    assert not Writer().execute(ctx, before_run=lambda: calls.append(2))[1]
    assert calls == [1]


def test_check_stops_a_run_that_cannot_fit(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    code = main(
        ["check", "--config", str(REPO / "jobs/configs/smoke.yaml"), "--run-dir", str(tmp_path / "r")]
    )
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk: probe, regions") and "0.0 MiB free" in err[0]
