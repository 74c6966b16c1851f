"""
remote.py: players from outside this process: a chat model behind an OpenAI-compatible endpoint
(`api:URL:MODEL`, an opponent in eval.py's face-offs and in train.py) and a human at the terminal (`human`).
Both answer reply(game, player, text, rng) -> text, as envs.py's fixed strategies do; an API policy also answers
a whole turn's requests at once (replies), concurrently.
"""
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from concurrent.futures import ThreadPoolExecutor

from rollout import SYSTEM

def api_policy(spec, **settings):
    """'api:URL:MODEL' -> ApiPolicy (its settings: ApiPolicy's keywords)."""
    url, _, model_id = spec[4:].rpartition(":")
    if "@" in urllib.parse.urlsplit(url).netloc:                        # refused before anything could echo it
        raise ValueError("an api: URL with credentials (user:password@host) is refused: put the key in "
                         "$OPENAI_API_KEY")
    if not url.startswith("http") or not model_id or re.fullmatch(r"\d+(/.*)?", model_id):  # ':8000/v1' is a port
        raise ValueError(f"bad api policy {spec!r}: use api:http://HOST:PORT/v1:MODEL (the model name is required)")
    return ApiPolicy(url, model_id, **settings)

class ApiPolicy:
    """A chat model behind an OpenAI-compatible /chat/completions endpoint (key from $OPENAI_API_KEY).
    Any fault (transport, status, malformed or oversized reply) is retried, then counted in `failures` and
    played as an empty reply: the game scores it as an invalid move. After max_fails failures in a row the
    endpoint rests for a minute (every reply meanwhile fails at once, uncalled), then is tried again."""
    def __init__(self, url, model, timeout=30.0, retries=2, max_reply_chars=2000, max_fails=5, concurrency=16):
        u = urllib.parse.urlsplit(url.rstrip("/"))      # (api_policy refused a URL with credentials)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("an api: URL must be http://HOST[:PORT]/PATH or https://...")
        self.https, self.host, self.port, self.path = u.scheme == "https", u.hostname, u.port, u.path
        self.model_id = model
        self.timeout, self.retries = min(max(timeout, 0.1), 300.0), min(max(retries, 0), 5)     # sane caps
        self.max_reply_chars, self.max_fails = min(max(max_reply_chars, 16), 100_000), max_fails
        self.name = f"api:{model}"
        self.key = os.environ.get("OPENAI_API_KEY", "")
        local = self.host in ("localhost", "::1") or self.host.startswith("127.")
        if self.key and not self.https and not local:
            print(f"warning: $OPENAI_API_KEY goes to {self.host} over plain http, unencrypted: use https",
                  file=sys.stderr)
        self.history = weakref.WeakKeyDictionary()     # game -> {player: messages}: a new game never inherits one
        self.failures, self.calls, self.fails_in_row, self.dead_since, self.rest = 0, 0, 0, 0.0, 60.0
        self.open, self.stopping = {}, False                       # the connections of requests in flight
        self.concurrency = min(max(concurrency, 1), 256)           # requests in flight at once (replies)

    def reply(self, game, p, text, rng):
        return self.replies([(game, p, text)])[0]

    def replies(self, turns):
        """A turn's requests [(game, player, text)], sent concurrently (at most `concurrency` at once), as one
        round trip instead of one per game. -> the replies, in order."""
        convs = []
        for game, p, text in turns:
            msgs = self.history.setdefault(game, {}).setdefault(p, [{"role": "system", "content": SYSTEM}])
            msgs.append({"role": "user", "content": text})
            convs.append(msgs)
        self.calls += len(turns)
        ask = lambda msgs: self.ask(msgs) if self.alive() else None
        pool = ThreadPoolExecutor(min(self.concurrency, max(len(turns), 1)))
        try:
            answers = list(pool.map(ask, convs))
        except BaseException:                    # Ctrl-C: cut the requests in flight rather than wait them out
            self.stopping = True
            for held in list(self.open.values()):
                cut(held)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return [self.record(game, msgs, a) for (game, _, _), msgs, a in zip(turns, convs, answers)]

    def alive(self):
        """False while the endpoint rests: after max_fails failures in a row it is not called for `rest` seconds,
        then tried again (a long training run outlives an outage)."""
        if self.fails_in_row < self.max_fails:
            return True
        if time.monotonic() - self.dead_since >= self.rest:
            self.fails_in_row = self.max_fails - 1                  # one more try; a failure rests it again
            return True
        return False

    def record(self, game, msgs, answer):
        """A reply into its conversation; a failure (None) is counted, marked on the game and played as ''."""
        if answer is None:
            self.failures += 1
            self.fails_in_row += 1
            if self.fails_in_row == self.max_fails:
                self.dead_since = time.monotonic()
            game.failed_replies += 1
            answer = ""
        else:
            self.fails_in_row = 0
        msgs.append({"role": "assistant", "content": answer})
        return answer

    def ask(self, msgs):
        """One reply, or None after the retries. Each attempt ends by its deadline (timeout seconds from connecting
        to the last byte: a watchdog cuts the connection, so a server that trickles cannot hold a turn), follows no
        redirect (an answer other than 200 is a failure: the key never goes to another host), and prints nothing."""
        body = json.dumps({"model": self.model_id, "messages": msgs, "temperature": 1.0, "max_tokens": 200}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = "Bearer " + self.key
        limit = 64 * self.max_reply_chars + 65536                       # bytes of JSON read at most
        for attempt in range(self.retries + 1):
            if self.stopping:
                return None
            conn = (http.client.HTTPSConnection if self.https else http.client.HTTPConnection)(
                self.host, self.port, timeout=self.timeout)
            held = []                                                   # the socket, once connected
            deadline, watchdog = time.monotonic() + self.timeout, threading.Timer(self.timeout, cut, [held])
            watchdog.start()
            self.open[id(held)] = held                                  # Ctrl-C in replies() cuts it too
            try:
                conn.connect()
                held.append(conn.sock)                                  # the response keeps reading from it
                conn.request("POST", self.path + "/chat/completions", body, headers)
                resp = conn.getresponse()
                raw = resp.read(limit + 1) if resp.status == 200 else b""
                if resp.status == 200 and len(raw) <= limit and time.monotonic() < deadline:
                    answer = json.loads(raw)["choices"][0]["message"]["content"]
                    if isinstance(answer, str):
                        return answer[:self.max_reply_chars]
            except Exception:   # any fault of the far side: OSError, HTTPException, IncompleteRead, bad JSON...
                pass
            finally:
                watchdog.cancel()
                self.open.pop(id(held), None)
                conn.close()
            if attempt < self.retries:
                time.sleep(0.2 * (attempt + 1))
        return None

def cut(held):
    """The deadline passed: shut the connection's socket, which ends a read blocked in another thread."""
    for sock in held:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

class HumanPolicy:
    """You, at the terminal. End of input (Ctrl-D) stops the evaluation with a message."""
    name = "human"

    def reply(self, game, p, text, rng):
        shown = "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in text)   # no terminal escapes
        print(f"\n[game {id(game) % 1000}, you are player {p}] {shown}")
        try:
            return input("> ")
        except EOFError:
            raise SystemExit("input ended (EOF): stopping the games") from None
