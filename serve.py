"""
serve.py: a policy served as an OpenAI-compatible chat endpoint, so that any OpenAI client, a TextArena-style
harness or another run of this project (`--opponent api:URL:MODEL`) can play against it.

    python eval.py --serve out/ckpt --port 8000          # http://127.0.0.1:8000/v1, the model's name: ckpt
    curl -s http://127.0.0.1:8000/v1/chat/completions -d '{"model": "ckpt", "messages": [{"role": "user", "content": "Hi"}]}'

POST /v1/chat/completions (messages, temperature, max_tokens up to MAX_TOKENS, n = 1) and GET /v1/models. Requests
that arrive together are decoded together: one worker takes every request waiting and model.generate samples
their replies in as few batches as the memory allows, each prompt starting from what the server kept of an earlier
one (a conversation's earlier turn). Anything malformed is a 4xx JSON error and the server goes on.
Only 127.0.0.1 by default; another address needs --host and a --token that clients send as a bearer token.
"""
import hmac
import http.server
import json
import queue
import select
import socket
import sys
import threading
import time

import torch

import devices
import memory
from model import generate
from rollout import Chat

MAX_TOKENS = 512          # a reply's cap, whatever a request asks
MAX_BODY = 1 << 20        # bytes of request body read at most
MAX_BATCH = 64            # requests decoded together at most
MAX_PROMPT = 8192         # a prompt's tokens at most
MAX_KEPT = 256            # prompts kept for their conversations' next turns at most

def shared(a, b):
    """How many tokens two id lists begin with in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

class PromptCache:
    """The keys and values of recent prompts, so that the next turn of a conversation (a client sends the whole of it
    again) computes only its new tokens. Least recently used out first: MAX_KEPT prompts, `budget` tokens in all."""
    def __init__(self, budget):
        self.entries, self.budget = [], budget            # [(ids, k, v)], the most recently used last

    def find(self, ids):
        """-> the (k, v) of the longest beginning ids has in common with a kept prompt (one token at least left to
        compute), or None."""
        best = max(self.entries, key=lambda e: shared(e[0], ids), default=None)
        if best is None or (n := min(shared(best[0], ids), len(ids) - 1)) == 0:
            return None
        self.entries.remove(best)
        self.entries.append(best)
        return best[1][:, :, :n], best[2][:, :, :n]

    def add(self, ids, kv):
        if len(ids) > self.budget:                        # it would push out everything else, itself too
            return
        self.entries = [e for e in self.entries if shared(e[0], ids) < len(e[0])]   # a prompt this one continues goes
        self.entries.append((ids, *kv))
        while len(self.entries) > MAX_KEPT or sum(len(e[0]) for e in self.entries) > self.budget:
            self.entries.pop(0)

class Batcher:
    """One worker thread that owns the model: it takes every request waiting (after a first one, `wait` seconds for
    more) and decodes them in as few batches per temperature as the memory budget allows, each prompt from what the
    PromptCache kept of its beginning.
    `batches` counts model batches, `served` requests, `reused` prompt tokens taken from the PromptCache, `dropped`
    requests whose client hung up before their batch."""
    def __init__(self, model, tok, wait=0.05, seed=0):
        self.model, self.tok, self.eot, self.wait = model, tok, Chat(tok).eot, wait
        self.todo, self.batches, self.served, self.reused, self.dropped = queue.Queue(), 0, 0, 0, 0
        slot = memory.kv_bytes(model.cfg, 1, 1)                # a batch's KV cache may take half of what is free
        self.budget = int(0.5 * memory.free_bytes(next(model.parameters()).device) / slot)   # (tokens x rows)
        self.prompts = PromptCache(self.budget // 2)                  # and the kept prompts a quarter
        self.gen = torch.Generator().manual_seed(seed)
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, ids, max_tokens, temperature, gone=lambda: False):
        """-> (reply text, completion tokens, finish reason), once the worker decoded it. gone() says the client closed
        its connection (its own deadline passed, say); checked when the worker gathers a batch: then it is not decoded."""
        job = dict(ids=ids, max_tokens=max_tokens, temperature=temperature, gone=gone, done=threading.Event())
        self.todo.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["out"]

    def run(self):
        while True:
            jobs = [self.todo.get()]
            end = time.monotonic() + self.wait
            while len(jobs) < MAX_BATCH and (left := end - time.monotonic()) > 0:
                try:
                    jobs.append(self.todo.get(timeout=left))
                except queue.Empty:
                    break
            for j in [j for j in jobs if j["gone"]()]:                    # nobody waits for these any more
                j["error"], self.dropped = ConnectionAbortedError("the client hung up"), self.dropped + 1
                j["done"].set()
                jobs.remove(j)
            for t in sorted({j["temperature"] for j in jobs}):
                same = [j for j in jobs if j["temperature"] == t]           # as many as the memory budget holds
                slots = [self.slots(j) for j in same]
                for batch in devices.micro_batches(range(len(same)), slots, self.budget):
                    self.decode([same[i] for i in batch], t)

    def slots(self, job):
        """A request's KV cache slots at most: its prompt and reply in the batch (rows starting from kept prompts of
        other lengths: up to twice the prompt), and the copy of its prompt kept for the PromptCache."""
        return 3 * len(job["ids"]) + job["max_tokens"]

    def decode(self, jobs, temperature):
        try:
            if self.slots(jobs[0]) > self.budget:
                raise MemoryError("this request alone does not fit the memory free for a batch")
            past = [self.prompts.find(j["ids"]) for j in jobs]
            outs, kept = generate(self.model, [j["ids"] for j in jobs], [j["max_tokens"] for j in jobs], temperature,
                                  stop_ids=(self.eot,), generator=self.gen, past=past)   # a row ends at its own end
            self.batches += 1
            self.reused += sum(p[0].size(2) for p in past if p is not None)
            for j, kv in zip(jobs, kept):
                self.prompts.add(j["ids"], kv)
            for j, out in zip(jobs, outs):
                stop = self.eot in out
                text = self.tok.decode([x for x in out if x != self.eot], skip_special_tokens=True)
                j["out"] = (text, len(out), "stop" if stop else "length")
        except Exception as e:              # a failed batch fails its requests, not the server
            for j in jobs:
                j["error"] = e
        self.served += len(jobs)
        for j in jobs:
            j["done"].set()

def hung_up(sock):
    """Whether the client closed its end: the socket reads as ended (a pipelined next request is not an end)."""
    try:
        return bool(select.select([sock], [], [], 0)[0]) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True

class BadRequest(Exception):
    """BadRequest(status, message): a 4xx answer."""

def parse(body, name, tok):
    """A chat completion request -> (prompt ids, max_tokens, temperature), or BadRequest."""
    try:
        req = json.loads(body)
    except ValueError:
        raise BadRequest(400, "the body is not JSON") from None
    if not isinstance(req, dict):
        raise BadRequest(400, "the body must be a JSON object")
    if req.get("model") != name:
        raise BadRequest(404, f"model {str(req.get('model'))[:100]!r} not found: this server has {name!r}")
    msgs = req.get("messages")
    if (not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and m.get("role") in
            ("system", "user", "assistant") and isinstance(m.get("content"), str) for m in msgs)):
        raise BadRequest(400, "messages must be a non-empty list of {role: system|user|assistant, content: string}")
    if req.get("n", 1) != 1:
        raise BadRequest(400, "only n = 1 is served")
    temperature, max_tokens = req.get("temperature", 1.0), req.get("max_tokens", 256)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise BadRequest(400, "temperature must be a number from 0 to 2")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(400, "max_tokens must be a positive integer")
    ids = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                  add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if len(ids) > MAX_PROMPT:
        raise BadRequest(413, f"the prompt has {len(ids)} tokens; this server takes {MAX_PROMPT} at most")
    return ids, min(max_tokens, MAX_TOKENS), float(temperature)

def handler(batcher, name, token):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):                 # quiet: a request's text is not the terminal's business
            pass

        def reply(self, status, obj):
            data = json.dumps(obj).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):   # the client hung up while its reply was decoded
                self.close_connection = True

        def error(self, status, message):
            self.close_connection = True           # a body may be left unread: no reuse of this connection
            self.reply(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def authorized(self):
            sent = self.headers.get("Authorization", "")
            if token and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                self.error(401, "a bearer token is required")
                return False
            return True

        def do_GET(self):
            if self.authorized():
                if self.path.rstrip("/") != "/v1/models":
                    return self.error(404, f"no such path {self.path[:100]!r}: try /v1/chat/completions, /v1/models")
                self.reply(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "nanoaa"}]})

        def do_POST(self):
            if not self.authorized():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.error(404, f"no such path {self.path[:100]!r}: try /v1/chat/completions, /v1/models")
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.error(411, "a Content-Length is required")
            if not 0 <= size <= MAX_BODY:
                for done in range(0, min(size, 16 * MAX_BODY), 1 << 16):   # read it away (up to a bound), so that a
                    self.rfile.read(min(1 << 16, size - done))              # client still sending reads the answer
                return self.error(413, f"the body is over {MAX_BODY} bytes")
            try:
                ids, max_tokens, temperature = parse(self.rfile.read(size), name, batcher.tok)
                text, n, finish = batcher.submit(ids, max_tokens, temperature, lambda: hung_up(self.connection))
            except BadRequest as e:
                return self.error(*e.args)
            except MemoryError as e:
                return self.error(413, str(e))
            except ConnectionAbortedError:          # nobody to answer
                self.close_connection = True
                return
            except Exception as e:                  # the model failed: say so, serve the next request
                return self.error(500, f"generation failed ({type(e).__name__})")
            self.reply(200, {"id": f"chatcmpl-{batcher.served}", "object": "chat.completion", "created": int(time.time()),
                             "model": name, "choices": [{"index": 0, "finish_reason": finish,
                                                         "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}})

        def refuse(self):
            self.error(405, f"method {self.command} is not served: GET /v1/models, POST /v1/chat/completions")
        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = refuse
    Handler.batcher = batcher                      # for a look at its counts
    return Handler

def serve(model, tok, name, host="127.0.0.1", port=8000, token=""):
    """Serve until Ctrl-C. Another host than this machine's loopback needs a token. -> the server (not started)."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        sys.exit(f"error: --host {host} lets other machines in: give --token SECRET too (clients send it as their key)")
    try:
        return http.server.ThreadingHTTPServer((host, port), handler(Batcher(model.eval(), tok), name, token))
    except OSError as e:
        sys.exit(f"error: cannot listen on {host}:{port} ({e.strerror or e}): pick another --port")
