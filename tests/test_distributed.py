"""Two CPU processes (gloo) against one: the same global batch gives the same adapter.

One spawn of two ranks runs every distributed scenario in turn (DDP with RoSA's mask across
ranks, DDP with our method's truncation, a resumed DDP run, FSDP2, and `spalora train` itself);
each test then compares what the ranks wrote with a one-process run in this process.

The ranks set the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...) and let `train()`
open the process group itself, as under `torchrun` or `accelerate launch`.

Tolerance: 2 processes x batch 4 x grad_accum A and 1 process x batch 4 x grad_accum 2A see the
same micro-batches from the same parameters, but may add their contributions in a different
order (DDP sums the ranks' gradients in the all-reduce where one process accumulates micro-batch
gradients in turn; the Fisher statistics and input sums of squares are summed over ranks). So they
agree to float32 rounding, which a dozen Adam steps (updates divided by sqrt(v) + eps) may
amplify: we allow ATOL = 1e-5 on the adapter values and the logged losses, while the masks and
truncated sizes must match exactly. Observed here: 0 (bit for bit) with A = 1, where for two
ranks DDP's g0/2 + g1/2 is exactly the one-process accumulation; 1.3e-7 with A = 2.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spalora import SpaloraConfig, SpaloraLinear, SpaloraModel, get_spalora_model
from spalora.data import batches
from spalora.train import TrainConfig, train

from .conftest import WORD_EXAMPLES, tiny_llama, word_tokenizer

WORLD = 2
ATOL = 1e-5
ROSA = dict(method="rosa", r=2, density=0.05, warmup_steps=2, mask_batches=4, lora_dropout=0.0)
OURS = dict(
    method="spalora",
    budget="r4",
    lora_alpha=12.0,
    lora_dropout=0.0,
    warmup_steps=2,
    mask_batches=4,
    irls_every=2,
    truncate_at=6,
)


def train_tiny(adapter: dict, steps: int, grad_accum: int, **kw) -> tuple[SpaloraModel, dict]:
    """Train the tiny Llama; batch 4 per process (the global batch is 4 * grad_accum * world)."""
    model = get_spalora_model(tiny_llama(), SpaloraConfig(**adapter))
    cfg = TrainConfig(
        steps=steps,
        batch_size=4,
        grad_accum=grad_accum,
        lora_lr=1e-2,
        sparse_lr=1e-2,
        lr_warmup_steps=2,
        progress=False,
        seed=3,
        **kw,
    )
    return model, train(model, word_tokenizer(), WORD_EXAMPLES, cfg)


def run(adapter: dict, steps: int, grad_accum: int, **kw) -> tuple[dict, dict]:
    model, out = train_tiny(adapter, steps, grad_accum, **kw)
    return model.adapter_state_dict(), out


def run_fsdp(adapter: dict, steps: int) -> tuple[dict, dict]:
    """A run under FSDP, with what it did to the model: sharded base, W0 + S out of place."""
    from torch.distributed.tensor import DTensor

    model, out = train_tiny(adapter, steps, 1, distributed="fsdp")
    layers = model.adapter_layers().values()
    w = next(iter(layers)).base_layer.weight
    out["fsdp"] = {
        "sharded": isinstance(w, DTensor) and w.to_local().shape[0] * WORLD == w.shape[0],
        "adapters_whole": not any(isinstance(p, DTensor) for p in model.lora_parameters()),
        "in_weight": any(lay.sparse_in_weight for lay in layers),
    }
    return model.adapter_state_dict(), out


def _save(out_dir: Path, name: str, rank: int, result: tuple[dict, dict]) -> None:
    state, out = result
    torch.save({"state": state, "out": out}, out_dir / f"{name}-rank{rank}.pt")


def _worker(rank: int, port: int, out_dir: str, model_dir: str, data: str) -> None:
    """One rank: the environment torchrun would set, then every scenario in turn."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    _save(out, "rosa", rank, run(ROSA, steps=10, grad_accum=1))
    _save(out, "rosa-accum", rank, run(ROSA, steps=10, grad_accum=2))  # DDP's no_sync too
    assert dist.is_initialized() and dist.get_world_size() == WORLD  # train() opened the group
    _save(out, "ours", rank, run(OURS, steps=12, grad_accum=1))
    _save(out, "fsdp-rosa", rank, run_fsdp(ROSA, steps=10))
    _save(out, "fsdp-ours", rank, run_fsdp(OURS, steps=12))

    # Resume: a run with checkpoints, then a second one from its step-8 checkpoint (dropout on:
    # each rank must get back its own RNG stream).
    drop = ROSA | {"lora_dropout": 0.1}
    ck = dict(checkpoint_every=4, keep_last=5)
    _save(out, "full", rank, run(drop, 12, 1, checkpoint_dir=str(out / "ck-full"), **ck))
    if rank == 0:
        shutil.copytree(out / "ck-full" / "checkpoint-8", out / "ck-cut" / "checkpoint-8")
    dist.barrier()
    cut = run(drop, 12, 1, checkpoint_dir=str(out / "ck-cut"), resume=True, **ck)
    _save(out, "resumed", rank, cut)

    # The command line, as torchrun would start it on every rank (rank 0 writes the files);
    # under FSDP, so that validation and test generation run on the sharded model too.
    from spalora.cli import main

    main(
        ["train", "--model", model_dir, "--task", "file", "--data", data, "--output-dir"]
        + [str(out / "cli"), "--method", "rosa", "--r", "2", "--density", "0.05"]
        + ["--warmup-steps", "2", "--mask-batches", "2", "--steps", "6", "--batch-size", "4"]
        + ["--eval-every", "3", "--val-limit", "4", "--eval-limit", "4", "--no-progress"]
        + ["--checkpoint-every", "3", "--distributed", "fsdp"]
    )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run every scenario on 2 spawned CPU ranks once; their results lie in the folder."""
    out = tmp_path_factory.mktemp("ranks")
    model_dir = out / "tiny"
    tiny_llama().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    data = out / "data.jsonl"
    with open(data, "w") as fh:
        for ex in WORD_EXAMPLES:
            fh.write(json.dumps({"prompt": ex.prompt, "completion": ex.target}) + "\n")
    mp.spawn(
        _worker, args=(_free_port(), str(out), str(model_dir), str(data)), nprocs=WORLD, join=True
    )
    return out


def _load(folder: Path, name: str) -> list[dict]:
    return [torch.load(folder / f"{name}-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diffs = []
    for key in a:
        assert a[key].shape == b[key].shape, key
        if a[key].dtype.is_floating_point:
            diffs.append(float((a[key] - b[key]).abs().max()) if a[key].numel() else 0.0)
        else:  # mask indices: exactly the same
            assert torch.equal(a[key], b[key]), key
    return max(diffs)


def _compare_with_one_process(
    folder: Path, name: str, adapter: dict, steps: int, grad_accum: int = 1
) -> float:
    ranks = _load(folder, name)
    for other in ranks[1:]:  # the ranks hold one and the same adapter, bit for bit
        assert _max_diff(ranks[0]["state"], other["state"]) == 0.0
        assert other["out"]["history"] == ranks[0]["out"]["history"]
    one_state, one_out = run(adapter, steps=steps, grad_accum=grad_accum * WORLD)
    two_out = ranks[0]["out"]
    assert two_out["world_size"] == WORLD and one_out["world_size"] == 1
    assert two_out["distributed"] == ("fsdp" if name.startswith("fsdp") else "ddp")
    assert two_out["mask_step"] == one_out["mask_step"]
    phases = [h["phase"] for h in two_out["history"]]
    assert phases == [h["phase"] for h in one_out["history"]]
    losses = torch.tensor([h["loss"] for h in two_out["history"]])
    torch.testing.assert_close(
        losses, torch.tensor([h["loss"] for h in one_out["history"]]), rtol=0, atol=ATOL
    )
    diff = _max_diff(ranks[0]["state"], one_state)
    print(f"\n{name}: max |2 processes - 1 process| over the adapter = {diff:.3e}")
    assert diff <= ATOL
    return diff


def test_ranks_share_the_one_process_stream():
    """Rank r keeps micro-batch g when g % world == r: together, one process's stream."""
    encoded = [{"input_ids": [i, i + 1], "labels": [-100, i + 1]} for i in range(10)]
    one = batches(encoded, 2, 0, seed=5, skip=2)
    ranks = [batches(encoded, 2, 0, seed=5, skip=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # across an epoch boundary
        for r in range(2):
            assert torch.equal(next(ranks[r])["input_ids"], next(one)["input_ids"])


def test_rosa_mask_across_ranks_equals_one_process(two_ranks):
    _compare_with_one_process(two_ranks, "rosa", ROSA, steps=10)


def test_accumulation_across_ranks_equals_one_process(two_ranks):
    """2 x (4 x 2 micro-batches) against 1 x (4 x 4): sums in another order, same result."""
    _compare_with_one_process(two_ranks, "rosa-accum", ROSA, steps=10, grad_accum=2)


def test_truncation_across_ranks_equals_one_process(two_ranks):
    _compare_with_one_process(two_ranks, "ours", OURS, steps=12)
    out = _load(two_ranks, "ours")[0]["out"]
    assert [h["phase"] for h in out["history"]][-1] == "joint"  # truncated, DDP re-wrapped


def test_fsdp_equals_one_process(two_ranks):
    _compare_with_one_process(two_ranks, "fsdp-rosa", ROSA, steps=10)
    _compare_with_one_process(two_ranks, "fsdp-ours", OURS, steps=12)
    for name in ("fsdp-rosa", "fsdp-ours"):
        facts = _load(two_ranks, name)[0]["out"]["fsdp"]
        assert facts == {"sharded": True, "adapters_whole": True, "in_weight": False}


def test_sparse_in_weight_switch_gives_the_same_layer_out_of_place():
    """Off (as under FSDP), W0 + S is built per call: same outputs and gradients, W0 untouched."""
    results = []
    for in_weight in (True, False):
        torch.manual_seed(1)
        base = torch.nn.Linear(12, 10)
        layer = SpaloraLinear(base, r=2, nnz=15)
        layer.sparse_in_weight = in_weight
        layer.set_mask(torch.randperm(120, generator=torch.Generator().manual_seed(2))[:15])
        with torch.no_grad():
            layer.sparse_values.normal_(generator=torch.Generator().manual_seed(3))
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(4))
        w0 = base.weight.detach().clone()
        x = torch.randn(3, 12, generator=torch.Generator().manual_seed(5), requires_grad=True)
        y = layer(x)
        assert torch.equal(base.weight, w0) != in_weight  # written in place only when on
        y.square().sum().backward()
        grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.sparse_values.grad]
        results.append([y.detach(), *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_resumed_two_process_run_is_bitwise_equal(two_ranks):
    full, resumed = _load(two_ranks, "full"), _load(two_ranks, "resumed")
    for r in range(WORLD):
        assert resumed[r]["out"]["resumed_from"] == 8
        assert resumed[r]["out"]["history"] == full[r]["out"]["history"]
        assert _max_diff(resumed[r]["state"], full[r]["state"]) == 0.0


def test_cli_under_two_ranks_writes_once(two_ranks):
    run_dir = two_ranks / "cli"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["steps_run"] == 6
    assert metrics["distributed"] == "fsdp"
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(6))  # one writer, no duplicate
    assert sum("validation" in r for r in rows) == 1  # at step 3 (not at the last step)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("checkpoint-*"))] == [
        "checkpoint-3",
        "checkpoint-6",
    ]


def test_resolve_device_prefers_a_gpu_in_one_process_and_refuses_a_missing_one(monkeypatch):
    import torch

    from spalora.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)  # one process, a GPU: use it
    assert resolve_device("cpu") == torch.device("cpu")
