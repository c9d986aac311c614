import os

import pytest
import torch

from spalora.tasks import Example

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def assert_saves_reloads_and_merges(model, folder) -> None:
    """A trained adapter on tiny_llama: saved to `folder`, reloaded onto a fresh tiny_llama and
    merged, it computes the same logits."""
    from spalora import SpaloraModel

    model.save_pretrained(folder)
    x = torch.randint(0, 96, (2, 10))
    model.eval()
    with torch.no_grad():
        y = model(input_ids=x).logits
        again = SpaloraModel.from_pretrained(tiny_llama(), folder)
        torch.testing.assert_close(again(input_ids=x).logits, y)
        merged = again.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=x).logits, y, rtol=1e-4, atol=1e-5)


def wide_llama():
    """tiny_llama's shape but 48 wide: a model an adapter saved from tiny_llama does not fit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def word_tokenizer():
    """A 96-word tokenizer matching tiny_llama's vocabulary ("w0" ... "w95")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="w0", eos_token="w1")


WORD_EXAMPLES = [
    Example(f"w{i % 40 + 2} w{i % 7 + 50}", f"w{i % 7 + 60}") for i in range(64)
]  # a learnable toy task: the completion depends on the prompt's second word


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}
