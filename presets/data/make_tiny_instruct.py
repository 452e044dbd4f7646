"""Writes tiny-instruct.jsonl, the small instruction dataset the offline demo trains on.

Hand-written task templates with deterministic fill-ins: short, regular answers that a
few-million-parameter model can learn in a couple of minutes on a CPU, so the demo's loss
visibly falls. Conversations use the OpenAI `messages` format; some have a system turn and some
have two user/assistant rounds, so masking and templates are exercised on every shape.

    python presets/data/make_tiny_instruct.py   # rewrites presets/data/tiny-instruct.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Chile": "Santiago",
    "Greece": "Athens",
    "Cuba": "Havana",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Germany": "Berlin",
    "India": "New Delhi",
}
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "happy": "sad",
    "full": "empty",
    "hard": "soft",
    "old": "new",
    "wet": "dry",
    "near": "far",
    "high": "low",
    "loud": "quiet",
    "rich": "poor",
    "strong": "weak",
    "thick": "thin",
}
COLOURS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
    "ash": "grey",
}
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "table",
    "garden",
    "window",
    "silver",
    "planet",
    "candle",
    "forest",
    "bridge",
    "rocket",
    "pencil",
    "castle",
    "mirror",
    "tiger",
    "ocean",
    "violin",
    "lemon",
]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You answer questions briefly and correctly.",
]


def task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = sorted((rng.randint(0, 20), rng.randint(0, 20)), reverse=True)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if kind == 2:
        country = rng.choice(list(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if kind == 3:
        word = rng.choice(list(OPPOSITES))
        return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."
    if kind == 4:
        thing = rng.choice(list(COLOURS))
        return f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLOURS[thing]}."
    if kind == 5:
        word = rng.choice(WORDS)
        return f"Spell the word {word} backwards.", f"{word} backwards is {word[::-1]}."
    word = rng.choice(WORDS)
    return f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(2 if rng.random() < 0.2 else 1):
        question, answer = task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(1234)
    out = Path(__file__).with_name("tiny-instruct.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for _ in range(600):
            f.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
