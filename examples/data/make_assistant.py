"""Make the chat examples' data for SmolLM2-135M-Instruct: short factual questions (capitals, colours, sums,
opposites, animal sounds) in several phrasings, answered in one house style, "Answer: <fact>." The style is what the
model learns; the facts are ones it mostly knows.

* assistant/sft-{train,validation}.jsonl: {"messages": [user question, assistant "Answer: ..."]} for causal-lm
  (examples/assistant-sft.yaml);
* assistant/preference-{train,validation}.jsonl: the hosted fine-tuning APIs' preference rows, {"input":
  {"messages": [...]}, "preferred_output": [assistant "Answer: ..."], "non_preferred_output": [a rambling, hedging
  reply that gets the fact wrong]} for dpo (examples/assistant-dpo.yaml).

Deterministic (fixed seed): `python examples/data/make_assistant.py` rewrites the files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Portugal": "Lisbon", "Greece": "Athens", "Norway": "Oslo",
            "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna", "Kenya": "Nairobi", "Peru": "Lima",
            "Cuba": "Havana"}
COLOURS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
           "coal": "black", "a ripe tomato": "red", "an orange": "orange", "milk": "white", "a lemon": "yellow",
           "a strawberry": "red", "a frog": "green", "chocolate": "brown"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
             "old": "new", "early": "late", "open": "closed", "full": "empty", "wet": "dry", "loud": "quiet"}
SOUNDS = {"a dog": "bark", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa", "a lion": "roar",
          "a horse": "neigh", "an owl": "hoot", "a pig": "oink", "a snake": "hiss"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

HEDGES = ["Well, that is a tricky one and people disagree about it, but if I had to guess I would say {wrong}, "
          "although I am really not sure and you should check another source.",
          "Hmm, let me think. There are many ways to look at this question. Some would say {wrong}, I suppose, but "
          "it depends on what you mean exactly.",
          "Great question! I have always found this fascinating. My best guess is {wrong}, but please do not quote "
          "me on that.",
          "I am not completely certain. It could be {wrong}, or maybe something else entirely; it is hard to say "
          "without more context."]


def questions(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, a wrong answer) for every fact and phrasing."""
    out = []
    for country, city in CAPITALS.items():
        wrong = rng.choice([c for c in CAPITALS.values() if c != city])
        for q in (f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                  f"Name the capital city of {country}."):
            out.append((q, city, wrong))
    for thing, colour in COLOURS.items():
        wrong = rng.choice([c for c in set(COLOURS.values()) if c != colour])
        for q in (f"What colour is {thing}?", f"Which colour is {thing}?", f"Tell me the colour of {thing}."):
            out.append((q, colour, wrong))
    for a in range(1, 10):
        for b in range(1, 10):
            if (a + b) % 2 == 0:
                wrong = str(a + b + rng.choice([-2, -1, 1, 2]))
                out.append((f"What is {a} plus {b}?", str(a + b), wrong))
                out.append((f"How much is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b], NUMBERS[abs(int(wrong))]))
    for word, opposite in OPPOSITES.items():
        wrong = rng.choice([w for w in OPPOSITES if w != word])
        for q in (f"What is the opposite of {word}?", f"Give me the opposite of the word {word}."):
            out.append((q, opposite, wrong))
    for animal, sound in SOUNDS.items():
        wrong = rng.choice([s for s in SOUNDS.values() if s != sound])
        for q in (f"What sound does {animal} make?", f"Which sound does {animal} make?"):
            out.append((q, sound, wrong))
    return out


def styled(answer: str) -> str:
    return f"Answer: {answer[0].upper()}{answer[1:]}."


def rows(rng: random.Random) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    sft, preference = [], []
    for q, answer, wrong in questions(rng):
        user = {"role": "user", "content": q}
        sft.append({"messages": [user, {"role": "assistant", "content": styled(answer)}]})
        preference.append({"input": {"messages": [user]},
                           "preferred_output": [{"role": "assistant", "content": styled(answer)}],
                           "non_preferred_output": [{"role": "assistant",
                                                     "content": rng.choice(HEDGES).format(wrong=wrong)}]})
    return sft, preference


def write(path: Path, items: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "assistant")
    args = p.parse_args()
    rng = random.Random(2026)
    sft, preference = rows(rng)
    order = list(range(len(sft)))
    rng.shuffle(order)
    cut = len(order) // 8  # one in eight held out
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in (("sft", sft), ("preference", preference)):
        write(args.out / f"{name}-train.jsonl", [items[i] for i in order[cut:]])
        write(args.out / f"{name}-validation.jsonl", [items[i] for i in order[:cut]])
    print(f"wrote {len(order) - cut} training and {cut} validation rows of each kind to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
