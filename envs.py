"""
envs.py: the three social dilemmas as text games, their strict parsers, fixed opponents and the readout of
what a player claimed (Split, TAS). No torch.

    python envs.py --env ipd --opponent tit_for_tat     # play a game yourself, see the prompts

A Game is two players and a hidden number of rounds. rollout.py drives a batch of games in lockstep:

    while not game.done:
        for p in game.to_act():              # players that must act now; game.phase is "message" or "action"
            text = game.observe(p)           # the new user text for p since its last turn
            opts = game.options(p)           # the valid action strings (constrained decoding), None for a message
            game.act(p, reply)               # once every player in to_act() has acted, the game moves on
    game.rewards[t] = (r0, r1), game.invalid[t] = (bool, bool), game.info[t] = {...}   per round t

Invalid actions, the same rule in every game (as in the paper, an invalid move is never silent): an output that does not parse is flagged in
game.invalid and played as the least cooperative legal move (ipd: <B>; split: 10 of everything; tas:
10 coins). Parsing never raises. Games of one group share the seed, hence the same hands/values/starter.
"""
import argparse
import random
import re

MESSAGE_START = "<<message_start>>" # a TAS message's start tag (rollout feeds it: not sampled, not counted in the budget)
MESSAGE_END = "<<message_end>>"     # its end tag (rollout stops a message there)

def make_game(env, seed, n_rounds=10):
    if env not in GAMES:
        raise ValueError(f"unknown env {env!r}: choose one of {', '.join(GAMES)}")
    return GAMES[env](seed, n_rounds)

def proportional(x0, x1, total=10):
    """Claims on one item of `total` units: each gets its claim if they fit, else a proportional share."""
    if x0 + x1 <= total:
        return float(x0), float(x1)
    return total * x0 / (x0 + x1), total * x1 / (x0 + x1)

class Game:
    """The bookkeeping every game shares: inboxes of pending text, acting players, per-round records. A game also
    describes itself to train.py and eval.py (its class attributes below; IPD shows them filled in)."""
    intro = ""
    phase = "action"          # "message" while a free-text message is expected (TAS), else "action"
    defaults = {}             # train.py's defaults for it (n_games, group_size, beta, gamma, reward_scale, kl_coef,
                              #   entropy_coef for AA, buffer_fixed, buffer_fixed_prob); see IPD
    paper_n_games = 64        # games per iteration in the paper (--preset paper)
    turns_per_round = 1       # lockstep turns in a round (the progress bar)
    readout = {}              # key -> what it means: round_readout's values, averaged in log lines and face-offs
    by_round = False          # face-offs also print the readout round by round
    memory_one = False        # the IPD's exact memory-one readout applies (logged at checkpoints)
    welfare_reference = {}    # fixed strategy -> welfare per round when it plays itself (lines on learning curves)
    strategies = {}           # the fixed opponents: name -> fn(game, player, rng) -> text (set at registration)

    @staticmethod
    def round_readout(info, p):
        """Player p's readout of one round (a Game.info entry) -> [(index into readout, value)]."""
        return []

    @staticmethod
    def describe_round(info):
        """One round (a Game.info entry) as Markdown lines for transcripts."""
        return []

    def __init__(self, seed, n_rounds=10):
        self.rng = random.Random(seed)     # environment randomness only (shared within a group)
        self.n_rounds, self.round, self.done = n_rounds, 0, False
        self.rewards, self.invalid, self.info = [], [], []
        self.replies, self.failed_replies = [], 0   # every reply as sent: (round, player, text); an outside player's failures
        self.inbox = [self.intro, self.intro]
        self.start_round()                 # sets pending (the players to act) and moves

    def to_act(self):
        return [p for p in self.pending if p not in self.moves]

    def observe(self, p):
        text, self.inbox[p] = self.inbox[p].strip(), ""
        return text

    def act(self, p, text):
        assert p in self.to_act(), f"player {p} is not to act now"
        self.moves[p] = text if isinstance(text, str) else ""
        self.replies.append((self.round, p, self.moves[p]))
        if not self.to_act():
            self.advance()

    def end_round(self, rewards, parsed, info, news):
        """Record the round that just ended: (r0, r1), the parsed moves (None: invalid), its info. If the game goes
        on, news[p] opens player p's next inbox and the next round starts."""
        self.rewards.append(tuple(rewards))
        self.invalid.append(tuple(m is None for m in parsed))
        self.info.append(info)
        self.round += 1
        self.done = self.round >= self.n_rounds
        if not self.done:
            self.inbox = list(news)
            self.start_round()

class IPD(Game):
    intro = ("You are playing a repeated game with another agent. Each round you both choose, at the same time, "
             "<A> or <B>. Points each round: both <A>: 3 each. Both <B>: 1 each. If one plays <B> and the other <A>, "
             "the <B> player gets 5 and the <A> player 0. Your goal is to maximize your total points.")
    PAYOFF = {("A", "A"): (3, 3), ("A", "B"): (0, 5), ("B", "A"): (5, 0), ("B", "B"): (1, 1)}
    # the paper's beta, gamma and reward scale; no environment randomness, so one group per game; 16 games: ours, for
    # a CPU; a fixed defector in 1/8 of AA's buffer games keeps retaliation from eroding (results/ipd.md)
    defaults = dict(n_games=16, group_size=1, beta=0.5, gamma=0.9, reward_scale=1 / 5, kl_coef=0.0, entropy_coef=0.01,
                    buffer_fixed="defector", buffer_fixed_prob=0.125)
    paper_n_games = 128
    readout = {"coop": "cooperation rate"}
    by_round = memory_one = True
    welfare_reference = {"cooperator": 6.0, "defector": 2.0}

    @staticmethod
    def round_readout(info, p):
        return [(0, float(info["moves"][p] == "A"))]

    @staticmethod
    def describe_round(info):
        return [f"- moves: <{info['moves'][0]}> / <{info['moves'][1]}>"]

    def start_round(self):
        if self.round == 0:
            for p in (0, 1):
                self.inbox[p] += "\nAnswer with exactly <A> or <B>."
        self.pending, self.moves = [0, 1], {}

    def options(self, p):
        return ["<A>", "<B>"]

    @staticmethod
    def parse(text):
        """-> 'A', 'B' or None (invalid)."""
        m = re.fullmatch(r"\s*<([AB])>\s*", text, re.ASCII)      # ASCII: the format the prompt states, nothing else
        return m.group(1) if m else None

    def advance(self):
        parsed = [self.parse(self.moves[p]) for p in (0, 1)]
        moves = tuple(m or "B" for m in parsed)
        self.end_round(self.PAYOFF[moves], parsed, {"moves": moves},
                       [f"The other agent played <{moves[1 - p]}>." for p in (0, 1)])

class Split(Game):
    intro = ("You and another agent split 10 hats, 10 books and 10 balls, again every round. Each of you values "
             "each item at 1 or 10 points per unit; values change every round and both players see both, listed as "
             "(hats, books, balls). Each of you proposes, at the same time, how many of each item to keep. If the two "
             "claims on an item add up to 10 or less, each gets its claim; otherwise the item is shared in proportion "
             "to the claims. Your goal is to maximize your total points. Answer every round with exactly: "
             "Proposal: x hats, y books, z balls (whole numbers 0-10).")
    # the 12 value profiles: equal totals for both players, at least one item valued differently
    PROFILES = [(a, b) for a in [(x, y, z) for x in (1, 10) for y in (1, 10) for z in (1, 10)]
                for b in [(x, y, z) for x in (1, 10) for y in (1, 10) for z in (1, 10)] if sum(a) == sum(b) and a != b]
    defaults = dict(n_games=4, group_size=8, beta=1.0, gamma=0.9, reward_scale=1 / 100, kl_coef=0.001, entropy_coef=0.0,
                    buffer_fixed="", buffer_fixed_prob=0.0)
    readout = {"claim_more": "kept of an item worth more to it", "claim_equal": "... worth the same",
               "claim_less": "... worth less to it"}
    welfare_reference = {"welfare_max": 255.0, "greedy": 165.0}

    @staticmethod
    def round_readout(info, p):
        """The units p kept of each item, by whether it is worth more / as much / less to p than to the other.
        Welfare-max keeps 10 / 5 / 0, greedy 10 / 10 / 10."""
        return [(0 if mine > theirs else 2 if mine < theirs else 1, float(kept))
                for mine, theirs, kept in zip(info["values"][p], info["values"][1 - p], info["claims"][p])]

    @staticmethod
    def describe_round(info):
        return [f"- values: {info['values'][0]} / {info['values'][1]}; claims: {info['claims'][0]} / {info['claims'][1]}"]

    def start_round(self):
        self.values = self.rng.choice(self.PROFILES)  # (player 0's, player 1's) per-unit values
        for p in (0, 1):
            mine, theirs = self.values[p], self.values[1 - p]
            self.inbox[p] += f"\nValues: yours {fmt3(mine)}; theirs {fmt3(theirs)}."
        self.pending, self.moves = [0, 1], {}

    def options(self, p):
        return [f"Proposal: {x} hats, {y} books, {z} balls" for x in range(11) for y in range(11) for z in range(11)]

    @staticmethod
    def parse(text):
        """-> (x, y, z) or None (invalid)."""
        m = re.fullmatch(r"\s*Proposal:\s*(10|[0-9])\s+hats\s*,\s*(10|[0-9])\s+books\s*,\s*(10|[0-9])\s+balls\s*\.?\s*",
                         text, re.ASCII)
        return tuple(int(g) for g in m.groups()) if m else None

    def advance(self):
        parsed = [self.parse(self.moves[p]) for p in (0, 1)]
        claims = [c or (10, 10, 10) for c in parsed]
        got = [proportional(claims[0][i], claims[1][i]) for i in range(3)]
        r = tuple(sum(got[i][p] * self.values[p][i] for i in range(3)) for p in (0, 1))
        self.end_round(r, parsed, {"values": self.values, "claims": tuple(claims)},   # points rounded: fewer tokens
                       [f"Last round: you proposed {fmt3(claims[p])} ({r[p]:.0f} points), the other agent "
                        f"{fmt3(claims[1 - p])} ({r[1 - p]:.0f} points)." for p in (0, 1)])

def fmt3(c):
    """Three numbers in the order (hats, books, balls): '1, 10, 1'."""
    return ", ".join(f"{x:g}" for x in c)

HANDS = ("rock", "paper", "scissors")
BEATS = {"rock": "scissors", "paper": "rock", "scissors": "paper"}

# TAS's rules in parts: tas and tas_silent differ only in the message sentences
TAS_HANDS = ("You and another agent split 10 coins, again every round. Each round you each get a hand: rock, paper or "
             "scissors, never the same. The winning hand (rock beats scissors, scissors beats paper, paper beats rock) "
             "values each coin at 10 points, the losing hand at 1 point. You see only your own hand. ")
TAS_CLAIMS = ("If the claims add up to 10 or less, each gets its claim; otherwise the coins are shared in proportion to "
              "the claims. Your goal is to maximize your total points. ")
TAS_PROPOSAL = "a proposal as exactly <<proposal_start>> x <<proposal_end>> (x: the coins you keep, 0-10)."

class TAS(Game):
    intro = (TAS_HANDS + "Each round one of you writes a message, the other replies, then both propose at the same time "
             "how many coins to keep. " + TAS_CLAIMS + f"Write a message as {MESSAGE_START} text {MESSAGE_END}, " +
             TAS_PROPOSAL)
    talk = True
    defaults = dict(n_games=4, group_size=8, beta=2.0, gamma=0.96, reward_scale=1 / 100, kl_coef=0.001, entropy_coef=0.0,
                    buffer_fixed="", buffer_fixed_prob=0.0)
    turns_per_round = 3       # a message, the reply, the proposals
    readout = {"claim_upper": "coins claimed, upper hand", "claim_lower": "... lower hand",
               "tells_hand": "messages naming its own hand"}
    welfare_reference = {"honest": 100.0, "greedy": 55.0}
    MSG = "Your message."
    PROPOSE = "Your proposal."
    starter = None            # who writes the first message: drawn in round 0, then alternating

    def start_round(self):
        self.hands = tuple(self.rng.sample(HANDS, 2))
        self.starter = self.rng.randrange(2) if self.starter is None else 1 - self.starter
        self.step, self.messages = 0, ["", ""]
        for p in (0, 1):
            self.inbox[p] += f"\nYour hand: {self.hands[p]}." + ("" if self.talk else " " + self.PROPOSE)
        if self.talk:
            self.inbox[self.starter] += " " + self.MSG
            self.phase, self.pending, self.moves = "message", [self.starter], {}
        else:
            self.phase, self.pending, self.moves = "action", [0, 1], {}

    def upper(self, p):
        return BEATS[self.hands[p]] == self.hands[1 - p]

    @classmethod
    def round_readout(cls, info, p):
        """The coins p claimed, by upper / lower hand (honest 10 / 0, greedy 10 / 10), and (with messages) 1.0 if
        p's message named its own hand and no other."""
        hand = info["hands"][p]
        out = [(0 if BEATS[hand] == info["hands"][1 - p] else 1, float(info["claims"][p]))]
        if cls.talk:
            named = {h for h in HANDS if h in info["messages"][p].lower()}
            out.append((2, float(named == {hand})))
        return out

    @classmethod
    def describe_round(cls, info):
        st = info["starter"]
        return ([f"- hands: {info['hands'][0]} / {info['hands'][1]}"] +
                [f"- seat {s} says: {info['messages'][s]!r}" for s in ((st, 1 - st) if cls.talk else ())] +
                [f"- claims: {info['claims'][0]} / {info['claims'][1]} coins"])

    def options(self, p):
        return None if self.phase == "message" else [f"<<proposal_start>> {x} <<proposal_end>>" for x in range(11)]

    @staticmethod
    def parse(text):
        """-> coins kept 0..10 or None (invalid)."""
        m = re.fullmatch(r"\s*<<proposal_start>>\s*(10|[0-9])\s*<<proposal_end>>\s*", text, re.ASCII)
        return int(m.group(1)) if m else None

    @staticmethod
    def message_text(text):
        """The message between the tags (or the whole text without them), at most 500 characters, with control and
        other unprintable characters (terminal escapes, line breaks) as spaces: it is shown inline to the other player."""
        m = re.search(r"<<message_start>>(.*?)(<<message_end>>|$)", text, re.S)
        return "".join(c if c.isprintable() else " " for c in (m.group(1) if m else text)).strip()[:500]

    def advance(self):
        if self.phase == "message":
            p = self.pending[0]
            self.messages[p] = self.message_text(self.moves[p])
            if self.step == 0:  # the other player replies
                self.inbox[1 - p] += f" The other agent says: {self.messages[p]} Your reply."
                self.step, self.pending, self.moves = 1, [1 - p], {}
            else:               # both propose
                self.inbox[1 - p] += f" The other agent replies: {self.messages[p]}"
                for q in (0, 1):
                    self.inbox[q] += " " + self.PROPOSE
                self.phase, self.pending, self.moves = "action", [0, 1], {}
            return
        parsed = [self.parse(self.moves[p]) for p in (0, 1)]
        claims = [10 if c is None else c for c in parsed]
        coins = proportional(*claims)
        r = tuple(coins[p] * (10 if self.upper(p) else 1) for p in (0, 1))
        self.end_round(r, parsed, {"hands": self.hands, "starter": self.starter, "messages": tuple(self.messages),
                                   "claims": tuple(claims)},
                       [f"Last round the other agent had the {'upper' if self.upper(1 - p) else 'lower'} hand and "
                        f"claimed {claims[1 - p]}." for p in (0, 1)])

class SilentTAS(TAS):
    """Trust-and-Split with no messages (does communication matter?): both propose right after seeing their hands."""
    talk = False
    turns_per_round = 1
    readout = {k: v for k, v in TAS.readout.items() if k != "tells_hand"}
    intro = TAS_HANDS + "Each round both propose at the same time how many coins to keep. " + TAS_CLAIMS + "Write " + TAS_PROPOSAL

# -----------------------------------------------------------------------------
# fixed opponents: fn(game, player, rng) -> the text they play. They may read the whole game state.

def memory_one(p_open, pcc, pcd, pdc, pdd):
    """A memory-one IPD strategy from its P(cooperate) at the opening and after CC, CD, DC, DD (mine, theirs)."""
    probs = {("A", "A"): pcc, ("A", "B"): pcd, ("B", "A"): pdc, ("B", "B"): pdd}
    return ipd(lambda m, o, r: "A" if r.random() < (probs[m[-1], o[-1]] if m else p_open) else "B")

def ipd_best_response(m1, n_rounds=10):
    """Exact best response to a memory-one IPD policy m1 = {opening, cc, cd, dc, dd} (P(cooperate), the
    policy's own move first) by dynamic programming: the exploiter knows the horizon and sees every move,
    and picks each round's move from the last outcome. Ties go to cooperation. -> reward per round
    {exploiter, policy} under that best response."""
    states = ("opening", "cc", "cd", "dc", "dd")
    outcome = {"AA": "cc", "AB": "cd", "BA": "dc", "BB": "dd"}            # (policy's move, exploiter's move)
    V = {s: (0.0, 0.0) for s in states}                                  # (exploiter, policy) from round t on
    for _ in range(n_rounds):
        new = {}
        for s in states:
            pc = m1[s]
            best = None
            for e in "AB":                                                # the exploiter's move this round
                ex = po = 0.0
                for m, pm in (("A", pc), ("B", 1 - pc)):                  # the policy's move
                    nxt = V[outcome[m + e]]
                    ex += pm * (IPD.PAYOFF[(m, e)][1] + nxt[0])     # (policy, exploiter)
                    po += pm * (IPD.PAYOFF[(m, e)][0] + nxt[1])
                if best is None or ex > best[0] + 1e-12:
                    best = (ex, po)
            new[s] = best
        V = new
    return {"exploiter": V["opening"][0] / n_rounds, "policy": V["opening"][1] / n_rounds}

def ipd(rule):
    """Wrap a rule over (my moves, their moves, rng) -> 'A'/'B' into a strategy."""
    def play(g, p, rng):                 # g.info: the rounds played so far
        return f"<{rule([i['moves'][p] for i in g.info], [i['moves'][1 - p] for i in g.info], rng)}>"
    return play

def prober(mine, theirs, rng):
    if len(mine) < 3:
        return "BAA"[len(mine)]
    if theirs[1:3] == ["A", "A"]:
        return "B"
    return theirs[-1]

IPD_STRATEGIES = {
    "cooperator": ipd(lambda m, o, r: "A"),
    "defector": ipd(lambda m, o, r: "B"),
    "random": ipd(lambda m, o, r: r.choice("AB")),
    "tit_for_tat": ipd(lambda m, o, r: o[-1] if o else "A"),
    "grudger": ipd(lambda m, o, r: "B" if "B" in o else "A"),
    "win_stay_lose_shift": ipd(lambda m, o, r: ("A" if m[-1] == o[-1] else "B") if o else "A"),
    "tit_for_2_tats": ipd(lambda m, o, r: "B" if o[-2:] == ["B", "B"] else "A"),
    "suspicious_tit_for_tat": ipd(lambda m, o, r: o[-1] if o else "B"),
    "generous_tit_for_tat": ipd(lambda m, o, r: "A" if not o or o[-1] == "A" or r.random() < 1 / 3 else "B"),
    "alternator": ipd(lambda m, o, r: "AB"[len(m) % 2]),
    "joss": ipd(lambda m, o, r: "B" if o and o[-1] == "B" else ("A" if r.random() < 0.9 else "B")),
    "prober": ipd(prober),
    "zd_extort_2": memory_one(1.0, 8 / 9, 1 / 2, 1 / 3, 0.0),
}

def split_welfare_max(g, p, rng):
    mine, theirs = g.values[p], g.values[1 - p]
    x, y, z = (10 if a > b else 0 if a < b else 5 for a, b in zip(mine, theirs))
    return f"Proposal: {x} hats, {y} books, {z} balls"

def tas_strategy(honest):
    def play(g, p, rng):
        if g.phase == "message":
            text = f"My hand is {g.hands[p]}." if honest else "I have the upper hand, so I take all the coins."
            return f"<<message_start>> {text} <<message_end>>"
        return f"<<proposal_start>> {10 if not honest or g.upper(p) else 0} <<proposal_end>>"
    return play

# -----------------------------------------------------------------------------
# the games by name. Add a game: a Game subclass above (intro, start_round, options, parse, advance, and the
# class attributes of Game that say how to train and read it), its fixed strategies, and one line here.

IPD.strategies = IPD_STRATEGIES
Split.strategies = {"greedy": lambda g, p, r: "Proposal: 10 hats, 10 books, 10 balls", "welfare_max": split_welfare_max}
TAS.strategies = {"greedy": tas_strategy(honest=False), "honest": tas_strategy(honest=True)}
GAMES = {"ipd": IPD, "split": Split, "tas": TAS, "tas_silent": SilentTAS}   # tas_silent: TAS without its messages

def play_fixed(env, a, b, seed, n_rounds=10):
    """One game between two fixed strategies (by name). -> the finished Game."""
    g, rng = make_game(env, seed, n_rounds), random.Random(seed + 1)
    fns = [GAMES[env].strategies[a], GAMES[env].strategies[b]]
    while not g.done:
        for p in g.to_act():
            g.observe(p)
            g.act(p, fns[p](g, p, rng))
    return g

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Play a game against a fixed opponent in the terminal.")
    ap.add_argument("--env", default="ipd", choices=GAMES, help="the game (default: ipd)")
    ap.add_argument("--opponent", default=None, help="a fixed strategy; default: the first one of the env")
    ap.add_argument("--n_rounds", type=int, default=10, help="rounds, not told to the players (default: 10)")
    ap.add_argument("--seed", type=int, default=0, help="the values or hands drawn, the opponent's dice (default: 0)")
    args = ap.parse_args()
    strategies = GAMES[args.env].strategies
    opp_name = args.opponent or next(iter(strategies))
    if opp_name not in strategies:
        ap.error(f"unknown opponent {opp_name!r} for {args.env}: choose from {', '.join(strategies)}")
    g, rng, opp = make_game(args.env, args.seed, args.n_rounds), random.Random(args.seed), strategies[opp_name]
    print(f"You are player 0 against {opp_name}. The game ends without warning.\n")
    shown = 0
    try:
        while not g.done:
            for p in g.to_act():
                text = g.observe(p)
                if p == 1:
                    g.act(1, opp(g, 1, rng))
                else:
                    print(f"[user] {text}")
                    g.act(0, input("[you] "))
            if len(g.rewards) > shown:  # a round just ended
                shown = len(g.rewards)
                print(f"  -> round {shown - 1}: points {g.rewards[-1]}, invalid {g.invalid[-1]}")
    except (EOFError, KeyboardInterrupt):
        print("\nbye")
    tot = [sum(r[p] for r in g.rewards) for p in (0, 1)]
    print(f"\nrounds played: {len(g.rewards)}; your points {tot[0]:g}, {opp_name}'s {tot[1]:g}; "
          f"your invalid actions: {sum(i[0] for i in g.invalid)}")
