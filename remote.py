"""
remote.py: players from outside this process, for eval.py's face-offs: a chat model behind an
OpenAI-compatible endpoint (`api:URL:MODEL`) and a human at the terminal (`human`). Both answer
reply(game, player, text, rng) -> text, as envs.py's fixed strategies do, and rollout.py plays them the same way.
"""
import json
import os
import time
import urllib.request
import weakref

from rollout import SYSTEM

class ApiPolicy:
    """A chat model behind an OpenAI-compatible /chat/completions endpoint (key from $OPENAI_API_KEY).
    Any fault (transport, status, malformed or oversized reply) is retried, then counted in `failures` and
    played as an empty reply: the game scores it as an invalid move. After max_fails failures in a row the
    endpoint is taken as dead and not called again (every later reply fails at once)."""
    def __init__(self, url, model, timeout=30.0, retries=2, max_reply_chars=2000, max_fails=5):
        self.url, self.model_id = url.rstrip("/"), model
        self.timeout, self.retries = min(max(timeout, 0.1), 300.0), min(max(retries, 0), 5)     # sane caps
        self.max_reply_chars, self.max_fails = min(max(max_reply_chars, 16), 100_000), max_fails
        self.name = f"api:{model}"
        self.key = os.environ.get("OPENAI_API_KEY", "")
        self.history = weakref.WeakKeyDictionary()     # game -> {player: messages}: a new game never inherits one
        self.failures, self.calls, self.fails_in_row = 0, 0, 0

    def reply(self, game, p, text, rng):
        msgs = self.history.setdefault(game, {}).setdefault(p, [{"role": "system", "content": SYSTEM}])
        msgs.append({"role": "user", "content": text})
        self.calls += 1
        answer = self.ask(msgs) if self.fails_in_row < self.max_fails else None
        if answer is None:
            self.failures += 1
            self.fails_in_row += 1
            answer = ""
        else:
            self.fails_in_row = 0
        msgs.append({"role": "assistant", "content": answer})
        return answer

    def ask(self, msgs):
        """One reply, or None after the retries. Nothing is printed: the request carries the key."""
        body = json.dumps({"model": self.model_id, "messages": msgs, "temperature": 1.0, "max_tokens": 200}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = "Bearer " + self.key
        limit = 64 * self.max_reply_chars + 65536                       # bytes of JSON read at most
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url + "/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read(limit + 1)
                if len(raw) <= limit:
                    answer = json.loads(raw)["choices"][0]["message"]["content"]
                    if isinstance(answer, str):
                        return answer[:self.max_reply_chars]
            except Exception:   # any fault of the far side: URLError, HTTPException, IncompleteRead, bad JSON...
                pass
            if attempt < self.retries:
                time.sleep(0.2 * (attempt + 1))
        return None

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
