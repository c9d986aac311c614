"""The README's Python example, runnable as is (offline: the embedded SmolLM2 and BBC headlines)."""

import torch

from spalora import MaskSchedule, SpaloraConfig, SpaloraModel, get_spalora_model
from spalora.data import batches, encode_example
from spalora.hub import load_model_and_tokenizer
from spalora.tasks import get_task


def main(steps: int = 12, out_dir: str = "runs/quickstart-adapter") -> list[float]:
    model, tokenizer = load_model_and_tokenizer()  # or any local folder / hub id
    config = SpaloraConfig(
        method="rosa",
        budget="r8",
        rank_fraction=0.5,
        lora_dropout=0.0,
        mask_strategy="fisher",
        warmup_steps=4,
        mask_batches=2,
    )
    model = get_spalora_model(model, config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW(model.parameter_groups(lora_lr=1e-3, sparse_lr=3e-4))
    schedule = MaskSchedule(model)  # warm-up -> Fisher mask -> joint, inside this one run
    examples = [encode_example(tokenizer, ex) for ex in get_task("bbc-topic").train]
    loader = batches(examples, batch_size=4, pad_id=tokenizer.pad_token_id, seed=0)
    losses = []
    model.train()
    for _, batch in zip(range(steps), loader, strict=False):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step(optimizer)
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    base = model.unload()
    reloaded = SpaloraModel.from_pretrained(base, out_dir)  # same outputs as `model`
    reloaded.print_trainable_parameters()
    return losses


if __name__ == "__main__":
    print(main())
