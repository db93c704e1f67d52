"""A model with tied input/output embeddings (SmolLM2, the demo model) under ZeRO-3: the output
embedding stays the input embedding's parameter, trains, and exports as a tied HF model."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow  # a DeepSpeed ZeRO-3 training job (about two minutes)
def test_tied_embeddings_load_train_and_export(tmp_path):
    script = textwrap.dedent(f"""
        import os, torch
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", DS_ACCELERATOR="cpu")
        import torch.distributed as dist
        dist.init_process_group("gloo")
        from pathlib import Path
        from cpi_ray.config.schema import ConsolidateConfig
        from cpi_ray.io.safetensors_io import CheckpointReader, save_sharded
        from cpi_ray.models.loading import unique_state_dict
        from cpi_ray.models.tiny import build_tiny_model
        from cpi_ray.training import zero3
        from cpi_ray.training.engine import build_engine

        m, _ = build_tiny_model(seed=0)
        m.config.tie_word_embeddings = True
        m.tie_weights()
        src, out = "{tmp_path}/src", "{tmp_path}/out"
        os.makedirs(src)
        save_sharded(unique_state_dict(m), src, 100_000)
        m.config.save_pretrained(src)
        zero3.init_distributed(False)
        # The config's precision decides the dtype (DeepSpeed's zero.Init once built fp32
        # runs in bf16 on CPU).
        bf16 = ConsolidateConfig(num_workers=1, batch_size=2, precision="bf16")
        ds16 = zero3.build_ds_config(bf16, 1, False)
        m16, _ = zero3.load_zero3_model(src, ds16, torch.bfloat16)
        assert {{p.dtype for p in m16.parameters()}} == {{torch.bfloat16}}
        del m16
        # No warm-up: the one step below trains at the full rate.
        tc = ConsolidateConfig(num_workers=1, batch_size=2, warmup_ratio=0)
        engine, _, params, _ = build_engine(tc, Path(src), 1)
        assert {{p.dtype for p in engine.module.parameters()}} == {{torch.float32}}
        names = [n for n, _ in params]
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names, names
        ids = torch.randint(5, 90, (2, 12))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        zero3.export_hf_model(engine.module, out, src, 100_000)
        before, after = CheckpointReader(src), CheckpointReader(out)
        assert sorted(after.names()) == sorted(before.names())
        emb = "model.embed_tokens.weight"
        assert not torch.equal(before.read(emb), after.read(emb))
        assert after.read(emb).dtype == torch.float32
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]

    # Loaded here, outside the ZeRO-3 process (whose live DeepSpeed config would make
    # transformers load partitioned placeholders).
    import torch
    from transformers import AutoModelForCausalLM

    from cpi_ray.io.safetensors_io import CheckpointReader

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    emb = CheckpointReader(tmp_path / "out").read("model.embed_tokens.weight")
    assert torch.equal(loaded.model.embed_tokens.weight.detach(), emb)
