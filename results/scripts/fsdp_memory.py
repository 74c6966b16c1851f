"""
fsdp_memory.py: the README's memory arithmetic for full fine-tuning of Qwen2.5-1.5B and -7B at the paper's settings
(--preset paper: TAS, 64 games, 128-token messages, AA with its agent buffer and the KL reference, bf16), per GPU,
on one H100, one H200 and 2/4/8 H100s, with and without --fsdp_offload. The same numbers as
`python train.py --dry_run true ...` prints (memory.table), for the real models' configs (their 152K vocabularies;
the random:qwen2.5-* shapes use the embedded tokenizer's 49K). Conversation lengths are counted with the embedded
tokenizer (Qwen's splits the games' text about as finely). No weights are read.

    python results/scripts/fsdp_memory.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import configurator  # noqa: E402
import load  # noqa: E402
import memory  # noqa: E402
import train  # noqa: E402

GPU = {"H100": 80e9, "H200": 141e9}                   # bytes on the card; a process has somewhat less free
MODELS = {  # Qwen2.5-{1.5B,7B}-Instruct's config.json (Hugging Face)
    "Qwen2.5-1.5B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
SETUPS = [("1 H100", "H100", 1), ("1 H200", "H200", 1), ("2 H100", "H100", 2), ("4 H100", "H100", 4), ("8 H100", "H100", 8)]

def main():
    tok = load.read_tokenizer(load.embedded_dir())
    cfg = configurator.resolve(train.defaults() | {"preset": "paper", "env": "tas", "device": "cuda", "dtype": "bfloat16"})
    tokens = memory.conversation_tokens("tas", tok, cfg["n_rounds"], cfg["max_msg_tokens"])
    print(f"TAS, {cfg['n_games']} games, {cfg['max_msg_tokens']}-token messages: {tokens} tokens per conversation at most; "
          "GiB per GPU at its peak (no: over 95% of the card); sharded, also process 0's peak in host memory (host: a checkpoint gathers the whole state there)\n")
    models = {name: load.config_from_hf(hf) for name, hf in MODELS.items()}
    modes = (("plain", False, False), ("fsdp (host)", True, False), ("offload (host)", True, True))
    print(", ".join(f"{name}: {memory.n_params(c)[0] / 1e9:.2f}B parameters" for name, c in models.items()) + "\n")
    print("| GPUs | " + " | ".join(f"{name.split('-')[1]} {m}" for name in models for m, *_ in modes) + " |")
    print("|---" * (1 + len(models) * len(modes)) + "|")
    for label, card, world in SETUPS:
        cells = []
        for c in models.values():
            for _, fsdp, offload in modes:
                t = memory.table(c, cfg | {"fsdp": fsdp, "fsdp_offload": offload}, 2 * cfg["n_games"] // world, tokens,
                                 world, opponent=True, reference=True)
                dev, host = memory.peak(t), memory.peak(t, 1)
                cells.append(f"{dev / memory.GiB:.0f}" + ("" if dev < 0.95 * GPU[card] else " no")
                             + (f" ({host / memory.GiB:.0f})" if fsdp else ""))
        print(f"| {label} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
