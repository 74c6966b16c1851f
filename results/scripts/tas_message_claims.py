"""Do a TAS policy's messages announce its claims? Reads transcripts written by eval.py --transcript.

    python eval.py --env tas --a runs/tas_aa/ckpt --n_games 8 --transcript 8 --transcript_file tr.md
    python results/scripts/tas_message_claims.py tr.md [more.md ...]

For every message that starts with a whole number (after spaces), compare that number with the coins the
speaker claims in the same round. Prints per file: how many messages start with a number, how often that
number equals the speaker's claim, how often it equals the partner's claim, the chance of "equals the own
claim" if numbers and claims were drawn independently from the same file's frequencies, and the share of rounds in
which the two claims are equal (where they are, a number that matches one claim matches both)."""
import ast
import re
import sys
from collections import Counter

SAYS = re.compile(r"^- seat (\d) says: (.*)$")
CLAIMS = re.compile(r"^- claims: (\d+) / (\d+) coins$")
LEADING = re.compile(r"\s*(\d+)")

def rounds(path):
    """-> list of (messages {seat: text}, claims (c0, c1)), one per round of every game in the file."""
    out, said = [], {}
    for line in open(path):
        line = line.rstrip("\n")
        if m := SAYS.match(line):
            said[int(m.group(1))] = ast.literal_eval(m.group(2))        # eval.py writes the message's repr
        elif m := CLAIMS.match(line):
            out.append((said, (int(m.group(1)), int(m.group(2)))))
            said = {}
    return out

def agreement(path):
    pairs = []                                                          # (number said, own claim, partner's claim)
    rs = rounds(path)
    n_msg = sum(len(said) for said, _ in rs)
    for said, claims in rs:
        for seat, text in said.items():
            if m := LEADING.match(text):
                pairs.append((int(m.group(1)), claims[seat], claims[1 - seat]))
    same = sum(c0 == c1 for _, (c0, c1) in rs) / max(len(rs), 1)
    if not pairs:
        return dict(rounds=len(rs), messages=n_msg, numbered=0, same=same)
    said_n, own = Counter(p[0] for p in pairs), Counter(p[1] for p in pairs)
    chance = sum(said_n[v] * own[v] for v in said_n) / len(pairs) ** 2
    return dict(rounds=len(rs), messages=n_msg, numbered=len(pairs), same=same,
                own=sum(p[0] == p[1] for p in pairs) / len(pairs),
                partner=sum(p[0] == p[2] for p in pairs) / len(pairs), chance=chance)

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| transcript | rounds | messages | start with a number | = own claim | = partner's claim | chance (own) "
          "| rounds with equal claims |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        try:
            a = agreement(path)
        except (OSError, ValueError, SyntaxError) as e:
            sys.exit(f"error: {path}: {type(e).__name__}: {e}")
        if not a["numbered"]:
            print(f"| {path} | {a['rounds']} | {a['messages']} | 0 | - | - | - | {a['same']:.2f} |")
            continue
        print(f"| {path} | {a['rounds']} | {a['messages']} | {a['numbered']} ({a['numbered'] / a['messages']:.0%}) | "
              f"{a['own']:.2f} | {a['partner']:.2f} | {a['chance']:.2f} | {a['same']:.2f} |")
