#!/usr/bin/env python3
"""Quality of the flagship's output (out/earnings_qa.parquet, read through `sluice run --format json`).

Prints, over all rows:
  questions    share of generated questions that are questions: they start with an interrogative
               word (or an auxiliary verb) and end with "?";
  grounded     share of answers that contain a number (two characters or more) which occurs in
               their passage;
  dont_know    share of answers that say the passage does not tell;
  both as shares of the answers that are not NULL, with the counts.

Usage: scripts/quality.py [PARQUET] [--sluice PATH]
"""
import json
import re
import subprocess
import sys

INTERROGATIVES = (
    "what", "how", "which", "when", "why", "where", "who", "whom", "whose", "did", "does", "do",
    "is", "are", "was", "were", "will", "would", "can", "could", "has", "have", "had", "by",
    "in", "at", "according",
)
DONT_KNOW = re.compile(r"\b(i don'?t know|not (mentioned|stated|specified|provided|given|disclosed)"
                       r"|does not (say|tell|contain|mention|specify|provide)|no information)\b", re.I)
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def numbers(text):
    """The figures of a text (a single digit is not a figure: "1" occurs in every passage)."""
    return {n.replace(",", "") for n in NUMBER.findall(text or "") if len(n) > 1}


def is_question(q):
    q = (q or "").strip()
    words = q.split()
    return bool(words) and q.endswith("?") and words[0].lower().strip('"') in INTERROGATIVES


def main():
    args = sys.argv[1:]
    sluice = "target/debug/sluice"
    if "--sluice" in args:
        i = args.index("--sluice")
        sluice = args[i + 1]
        del args[i:i + 2]
    path = args[0] if args else "out/earnings_qa.parquet"
    out = subprocess.run(
        [sluice, "run", "-q", "--format", "json", "-c",
         f"CREATE EXTERNAL TABLE qa STORED AS PARQUET LOCATION '{path}'; "
         "SELECT passage, question, answer FROM qa"],
        check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    qs = [r.get("question") for r in rows if r.get("question") is not None]
    answers = [(r.get("answer"), r.get("passage")) for r in rows if r.get("answer") is not None]
    n_q = sum(is_question(q) for q in qs)
    n_grounded = sum(bool(numbers(a) & numbers(p)) for a, p in answers)
    n_dk = sum(bool(DONT_KNOW.search(a)) for a, _ in answers)
    share = lambda n, d: f"{n / d:.2f} ({n}/{d})" if d else "n/a (0/0)"
    print(f"rows {len(rows)}; questions {share(n_q, len(qs))}; "
          f"answers with a number from their passage {share(n_grounded, len(answers))}; "
          f"answers saying the passage does not tell {share(n_dk, len(answers))}; "
          f"NULL answers {len(rows) - len(answers)}")
    for r in rows[:3]:
        print(json.dumps({"question": r.get("question"), "answer": r.get("answer")}))


if __name__ == "__main__":
    main()
