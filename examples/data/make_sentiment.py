"""Make the demo's labelled sentiment data: short and long reviews of films, restaurants, hotels, gadgets, apps and
books, written from templates with negation, contrast ("..., but ...") and neutral detail so that the length varies
(about 7 to 60 tokens) and a model has to read more than one word to get the label right.

Deterministic (fixed seed): `python examples/data/make_sentiment.py` rewrites examples/data/sentiment/{train,
validation}.jsonl byte for byte. Rows are {"text": ..., "label": "negative" | "positive"}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DOMAINS: dict[str, dict[str, list[str]]] = {
    "film": {
        "subject": ["the film", "this movie", "the sequel", "the documentary", "the thriller", "this comedy",
                    "the animated feature", "the remake"],
        "aspect": ["the acting", "the script", "the soundtrack", "the ending", "the cinematography", "the pacing",
                   "the dialogue", "the lead performance", "the special effects", "the plot"],
        "detail": ["we watched it on a rainy Sunday afternoon", "it runs for just over two hours",
                   "I saw it at the late showing with a few friends", "it was released last spring",
                   "my sister had recommended it for weeks", "the cinema was almost empty"],
    },
    "restaurant": {
        "subject": ["the restaurant", "this bistro", "the new pizza place", "the cafe on the corner",
                    "the sushi bar", "this diner", "the tasting menu", "the food truck"],
        "aspect": ["the service", "the pasta", "the dessert", "the wine list", "the portions", "the staff",
                   "the atmosphere", "the coffee", "the prices", "the soup"],
        "detail": ["we booked a table for six on a Friday night", "it opened only a month ago",
                   "we went there for my father's birthday", "the menu changes every season",
                   "we sat on the terrace by the river", "I ordered the chef's special"],
    },
    "hotel": {
        "subject": ["the hotel", "this resort", "the guest house", "the hostel", "our room", "the spa hotel"],
        "aspect": ["the breakfast", "the bed", "the reception staff", "the view", "the bathroom", "the location",
                   "the pool", "the wifi", "the cleaning", "the check-in"],
        "detail": ["we stayed four nights in early October", "it is a short walk from the station",
                   "we booked it through a travel agent", "it was our first trip abroad with the kids",
                   "the building dates from the eighteen hundreds", "we arrived late after a long flight"],
    },
    "gadget": {
        "subject": ["the phone", "this laptop", "the headphones", "the smartwatch", "the vacuum cleaner",
                    "this camera", "the coffee machine", "the e-reader", "the speaker"],
        "aspect": ["the battery", "the screen", "the sound", "the build quality", "the charger", "the keyboard",
                   "the setup", "the manual", "the price", "the customer support"],
        "detail": ["I bought it during the winter sale", "it replaced a model I had used for five years",
                   "I use it every day on my commute", "it arrived two days after I ordered it",
                   "I compared it with three other brands first", "it was a present from my colleagues"],
    },
    "app": {
        "subject": ["the app", "this game", "the new update", "the budgeting tool", "the music service",
                    "the photo editor", "this language course"],
        "aspect": ["the interface", "the notifications", "the subscription", "the offline mode", "the search",
                   "the tutorials", "the sync", "the loading times", "the design", "the support team"],
        "detail": ["I have used it for about three months", "I installed it on both my phone and tablet",
                   "a friend showed it to me at work", "I switched from a competitor last year",
                   "I mostly use it in the evenings", "the latest version came out last week"],
    },
    "book": {
        "subject": ["the novel", "this book", "the biography", "the cookbook", "the sequel", "the short story "
                    "collection", "the textbook"],
        "aspect": ["the writing", "the characters", "the translation", "the recipes", "the ending",
                   "the illustrations", "the research", "the first chapter", "the humour", "the structure"],
        "detail": ["I read it on holiday in the mountains", "our book club picked it for this month",
                   "it is the author's third book", "I listened to the audio version as well",
                   "it was on the bestseller list for months", "I finished it in a single weekend"],
    },
}

POSITIVE = ["excellent", "wonderful", "great", "fantastic", "delightful", "superb", "brilliant", "lovely",
            "impressive", "charming", "outstanding", "enjoyable", "reliable", "friendly", "gorgeous", "solid"]
NEGATIVE = ["terrible", "awful", "disappointing", "dreadful", "poor", "mediocre", "boring", "sloppy", "rude",
            "unreliable", "bland", "frustrating", "cheap", "noisy", "clumsy", "broken"]
INTENSIFIERS = ["", "", "", "really ", "truly ", "absolutely ", "quite ", "genuinely ", "surprisingly "]
POS_VERDICTS = ["I would recommend it to anyone", "we will definitely come back", "worth every penny",
                "I loved every minute of it", "it exceeded my expectations", "five stars from me",
                "I am very happy with it", "it made my week"]
NEG_VERDICTS = ["I would not recommend it", "we will not be coming back", "a complete waste of money",
                "I regret it", "it fell far short of my expectations", "one star is generous",
                "I am returning it", "avoid it if you can"]
NEG_OF_POS = ["not {p}", "far from {p}", "anything but {p}", "hardly {p}"]  # negated praise reads negative
NEG_OF_NEG = ["not {n} at all", "far from {n}", "never {n}"]  # negated criticism reads positive


def _adj(rng: random.Random, positive: bool) -> str:
    """An adjective phrase of the given polarity, sometimes built by negating the opposite polarity."""
    if rng.random() < 0.2:
        if positive:
            return rng.choice(NEG_OF_NEG).format(n=rng.choice(NEGATIVE))
        return rng.choice(NEG_OF_POS).format(p=rng.choice(POSITIVE))
    return rng.choice(INTENSIFIERS) + rng.choice(POSITIVE if positive else NEGATIVE)


def _sentence(rng: random.Random, positive: bool) -> str:
    d = DOMAINS[rng.choice(sorted(DOMAINS))]
    subject, aspect = rng.choice(d["subject"]), rng.choice(d["aspect"])
    verdict = rng.choice(POS_VERDICTS if positive else NEG_VERDICTS)
    kind = rng.randrange(7)
    if kind == 0:  # short
        text = f"{subject.capitalize()} was {_adj(rng, positive)}."
    elif kind == 1:
        text = f"{aspect.capitalize()} was {_adj(rng, positive)}, {verdict}."
    elif kind == 2:  # contrast: the clause after "but" decides
        text = (f"{aspect.capitalize()} was {_adj(rng, not positive)}, but {rng.choice(d['aspect'])} was "
                f"{_adj(rng, positive)} and overall {subject} was {_adj(rng, positive)}.")
    elif kind == 3:  # long, with neutral detail
        text = (f"{rng.choice(d['detail']).capitalize()}, and {subject} was {_adj(rng, positive)}. "
                f"{aspect.capitalize()} was {_adj(rng, positive)} too; {verdict}.")
    elif kind == 4:
        text = f"{verdict.capitalize()}: {aspect} was {_adj(rng, positive)}."
    elif kind == 5:  # long story with two details
        a, b = rng.sample(d["detail"], 2)
        text = (f"{a.capitalize()}. {b.capitalize()}. Honestly, {subject} was {_adj(rng, positive)}, "
                f"{aspect} was {_adj(rng, positive)}, and {rng.choice(d['aspect'])} was {_adj(rng, positive)}. "
                f"{verdict.capitalize()}.")
    else:
        text = f"I thought {subject} would be {_adj(rng, not positive)}, yet it was {_adj(rng, positive)}."
    return text


def make(n_train: int, n_val: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Balanced, de-duplicated rows; validation never repeats a training sentence."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n_train + n_val:
        positive = len(rows) % 2 == 0
        text = _sentence(rng, positive)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": "positive" if positive else "negative"})
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sentiment")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--validation", type=int, default=800)
    p.add_argument("--seed", type=int, default=20240601)
    args = p.parse_args()
    train, val = make(args.train, args.validation, args.seed)
    write(args.out / "train.jsonl", train)
    write(args.out / "validation.jsonl", val)
    print(f"wrote {len(train)} training and {len(val)} validation rows to {args.out}")


if __name__ == "__main__":
    main()
