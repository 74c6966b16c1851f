"""
serve_throughput.py: eval.py --serve's throughput with N concurrent TAS-length requests against the same N sent one
at a time, measured in one run (results/gpu.md's and timings.md's rule: ratios in one sitting).

    python results/scripts/serve_throughput.py                  # the embedded model, 16 requests, 16-token replies
    python results/scripts/serve_throughput.py --n 16 --max_tokens 16 --repeats 3
    python results/scripts/serve_throughput.py --turns 10 --repeats 1            # 16 conversations, turn by turn
    python results/scripts/serve_throughput.py --turns 10 --repeats 1 --prompt_cache false
    python results/scripts/serve_throughput.py --turns 10 --repeats 0            # the prompts' token counts only

Request i is a TAS conversation as a player sees it after 5 rounds of game i (seed i: its own hands; the game's own
text, honest messages), asking for the next message: the requests share the system prompt and the rules, as a
training run's do. With --turns K, each of the N conversations is instead played turn by turn from its start: K
rounds of N requests (turn t's request is the conversation so far, as a client sends it), one round after another;
the server's kept prompts (serve.PromptCache) then spare each turn the conversation's earlier tokens. Each timed way
starts with the server's kept prompts emptied. The server runs in this process (serve.serve), the clients are threads.
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import envs                      # noqa: E402
import serve                     # noqa: E402
from load import load_model      # noqa: E402

def tas_messages(seed, rounds=5):
    """A TAS player's conversation after `rounds` rounds of two honest players, as chat messages."""
    g, fn = envs.make_game("tas", seed, rounds + 1), envs.GAMES["tas"].strategies["honest"]
    msgs = [{"role": "system", "content": "You are a player in a game. Follow the answer format exactly."}]
    while g.round < rounds or 0 not in g.to_act():
        for p in g.to_act():
            text = g.observe(p)
            reply = fn(g, p, None)
            if p == 0:
                msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
            g.act(p, reply)
    return msgs + [{"role": "user", "content": g.observe(0)}]

def post(port, body, out):
    """One request; its status and completion tokens appended to out."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body)
    r = c.getresponse()
    obj = json.loads(r.read())
    out.append((r.status, obj["usage"]["completion_tokens"] if r.status == 200 else obj))

def send(port, rounds, together):
    """Every round's bodies, one at a time or all at once (threads); the next round after the last reply. -> seconds."""
    out, t0 = [], time.perf_counter()
    for bodies in rounds:
        if together:
            threads = [threading.Thread(target=post, args=(port, body, out)) for body in bodies]
            [t.start() for t in threads]
            [t.join() for t in threads]
        else:
            [post(port, body, out) for body in bodies]
    assert all(s == 200 for s, _ in out), out
    return time.perf_counter() - t0

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="requests (conversations)")
    ap.add_argument("--max_tokens", type=int, default=16, help="each reply's tokens at most (train.py's message budget)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each way (median; 0: count tokens)")
    ap.add_argument("--turns", type=int, default=0, help="play each conversation turn by turn, this many turns (0: once)")
    ap.add_argument("--prompt_cache", default="true", choices=["true", "false"], help="the server keeps prompts")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    srv = serve.serve(model, tok, "smollm2-135m", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port, batcher = srv.server_address[1], srv.RequestHandlerClass.batcher
    if args.prompt_cache == "false":
        batcher.prompts.budget = 0                              # every prompt computed from its first token
    body = lambda m: json.dumps({"model": "smollm2-135m", "messages": m, "max_tokens": args.max_tokens, "temperature": 1.0})
    convs = [tas_messages(i) for i in range(args.n)]
    rounds = [[body(m[:2 + 2 * t]) for m in convs] for t in range(args.turns)] if args.turns else [[body(m) for m in convs]]
    tokens = [[len(serve.parse(b, "smollm2-135m", tok)[0]) for b in r] for r in rounds]
    lengths = tokens[-1]
    print(f"{len(rounds)} round(s) of {args.n} requests, the first of {min(tokens[0])}-{max(tokens[0])} prompt tokens, "
          f"the last of {min(lengths)}-{max(lengths)}, {sum(map(sum, tokens))} in all, up to {args.max_tokens} new; "
          f"prompt cache {args.prompt_cache}; {torch_threads()} threads")
    if args.repeats == 0:                                       # the counts only
        return srv.shutdown()
    post(port, rounds[0][0], [])                                # warm-up
    times = {"one at a time": [], "concurrent": []}
    for _ in range(args.repeats):
        for way, together in (("one at a time", False), ("concurrent", True)):
            batcher.prompts.entries.clear()
            b0, r0 = batcher.batches, batcher.reused
            times[way].append(send(port, rounds, together))
            print(f"  {way} {times[way][-1]:.2f} s in {batcher.batches - b0} model batches, "
                  f"{batcher.reused - r0} prompt tokens reused")
    seq, conc = (statistics.median(times[k]) for k in ("one at a time", "concurrent"))
    n = args.n * len(rounds)
    print(json.dumps({"n": args.n, "turns": args.turns, "max_tokens": args.max_tokens, "prompt_cache": args.prompt_cache,
                      "last_prompt_tokens": [min(lengths), max(lengths)], "one_at_a_time_s": seq, "concurrent_s": conc,
                      "requests_per_s_one": n / seq, "requests_per_s_concurrent": n / conc, "speedup": seq / conc}))
    srv.shutdown()

def torch_threads():
    import torch
    return torch.get_num_threads()

if __name__ == "__main__":
    main()
