"""A tiny random-weight Llama model, its tokenizer and a LoRA adapter, built on this machine.

vLLM's CPU backend needs head_dim >= 32 (hidden 128 / 4 heads). Built once per test session; the
real node's tests and `make demo` bake it into an image.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_WORDS = [
    "the",
    "a",
    "model",
    "serves",
    "tokens",
    "quickly",
    "slowly",
    "engine",
    "vllm",
    "request",
    "answer",
    "stream",
    "batch",
    "adapter",
    "cat",
    "dog",
    "runs",
    "jumps",
    "over",
    "under",
    "green",
    "blue",
    "red",
    "small",
    "large",
    "fast",
    "kernel",
    "cache",
    "memory",
    "prompt",
]


def _sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(count)]


def build_tokenizer(target: Path) -> None:
    """A byte-level BPE tokenizer (vocabulary 384) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_sentences(3000), trainer)
    # transformers' constructors are untyped.
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(target))


def build_model(target: Path) -> None:
    """Random Llama weights in bf16 safetensors plus the tokenizer (under 1 MB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=384,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[no-untyped-call,arg-type]
    model.save_pretrained(str(target), safe_serialization=True)
    build_tokenizer(target)


def build_adapter(model_dir: Path, target: Path, seed: int = 1, rank: int = 8) -> None:
    """A peft LoRA adapter (rank `rank` on q_proj, v_proj) with non-zero weights, so its output differs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    # init_lora_weights=False draws both LoRA matrices at random; the default (B=0) changes nothing.
    config = LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(target))


def vllm_cpu_env(cache: Path, runtime_src: Path) -> dict[str, str]:
    """Environment for vLLM on CPU, offline, with every cache and temporary file under `cache`
    (shared by the runtime tests and bench/runtime_overhead.py)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OPTION_", "HF_MODEL"))}
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        HF_HOME=str(cache / "hf"),
        TRITON_CACHE_DIR=str(cache / "triton"),
        XDG_CACHE_HOME=str(cache / "xdg"),
        TMPDIR=str(cache),
        # djl_python sits next to lmi_runtime; an editable install made before it existed lacks it.
        PYTHONPATH=os.pathsep.join(filter(None, [str(runtime_src), os.environ.get("PYTHONPATH")])),
    )
    return env
