"""
serve_throughput.py: eval.py --serve's throughput with N concurrent TAS-length requests against the same N sent one
at a time, measured in one run (results/gpu.md's and timings.md's rule: ratios in one sitting).

    python results/scripts/serve_throughput.py                  # the embedded model, 16 requests, 16-token replies
    python results/scripts/serve_throughput.py --n 16 --max_tokens 16 --repeats 3

Request i is a TAS conversation as a player sees it after 5 rounds of game i (seed i: its own hands; the game's own
text, honest messages), asking for the next message: the requests share the system prompt and the rules, as a
training run's do. The server runs in this process (serve.serve), the clients are threads.
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
    out.append((r.status, json.loads(r.read())["usage"]["completion_tokens"]))

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="requests")
    ap.add_argument("--max_tokens", type=int, default=16, help="each reply's tokens at most (train.py's message budget)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each way (median)")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    srv = serve.serve(model, tok, "smollm2-135m", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port, convs = srv.server_address[1], [tas_messages(i) for i in range(args.n)]
    bodies = [json.dumps({"model": "smollm2-135m", "messages": m, "max_tokens": args.max_tokens, "temperature": 1.0})
              for m in convs]
    lengths = [len(serve.parse(b, "smollm2-135m", tok)[0]) for b in bodies]
    print(f"{args.n} requests of {min(lengths)}-{max(lengths)} prompt tokens, up to {args.max_tokens} new; "
          f"{torch_threads()} threads")
    post(port, bodies[0], [])                                   # warm-up
    times = {"one at a time": [], "concurrent": []}
    for _ in range(args.repeats):
        out, t0 = [], time.perf_counter()
        for body in bodies:
            post(port, body, out)
        times["one at a time"].append(time.perf_counter() - t0)
        b0, out, t0 = srv.RequestHandlerClass.batcher.batches, [], time.perf_counter()
        threads = [threading.Thread(target=post, args=(port, body, out)) for body in bodies]
        [t.start() for t in threads]
        [t.join() for t in threads]
        times["concurrent"].append(time.perf_counter() - t0)
        assert all(s == 200 for s, _ in out), out
        print(f"  one at a time {times['one at a time'][-1]:.2f} s; concurrent {times['concurrent'][-1]:.2f} s in "
              f"{srv.RequestHandlerClass.batcher.batches - b0} model batches")
    seq, conc = (statistics.median(times[k]) for k in ("one at a time", "concurrent"))
    print(json.dumps({"n": args.n, "max_tokens": args.max_tokens, "prompt_tokens": [min(lengths), max(lengths)],
                      "one_at_a_time_s": seq, "concurrent_s": conc, "requests_per_s_one": args.n / seq,
                      "requests_per_s_concurrent": args.n / conc, "speedup": seq / conc}))
    srv.shutdown()

def torch_threads():
    import torch
    return torch.get_num_threads()

if __name__ == "__main__":
    main()
