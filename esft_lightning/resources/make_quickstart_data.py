"""Writes the quickstart's small task (smart-home intents, ESFT chat format) and general (plain text) data.

Run from the repo root: `python esft_lightning/resources/make_quickstart_data.py`. Deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "quickstart"
DEVICES = ["lights", "heater", "fan", "air conditioner", "washing machine", "oven", "radio", "blinds"]
ROOMS = ["kitchen", "bedroom", "living room", "office", "garage", "bathroom"]
TIMES = ["now", "in ten minutes", "at seven", "tonight", "after lunch", "tomorrow morning"]
ACTIONS = {"turn on": "Device-On", "turn off": "Device-Off", "check": "Device-Query"}
PHRASES = ["Please {a} the {d} in the {r} {t}", "Could you {a} the {r} {d} {t}?", "{a} the {d} in the {r}, {t}"]
SUBJECTS = ["The river", "A small robot", "The old library", "Our garden", "The night train", "A curious cat"]
VERBS = ["wanders past", "hums beside", "waits near", "glows above", "rests under", "drifts toward"]
OBJECTS = ["the quiet hills", "a row of lamps", "the harbour", "an open window", "the market square"]


def task_record(rng: random.Random) -> dict:
    action, device, room, time = rng.choice(list(ACTIONS)), rng.choice(DEVICES), rng.choice(ROOMS), rng.choice(TIMES)
    text = rng.choice(PHRASES).format(a=action, d=device, r=room, t=time)
    answer = {"intent": ACTIONS[action], "slots": {"device": device, "room": room, "time": time}}
    prompt = f"Find the intent of this request and answer in JSON: {text}\nAnswer:"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": json.dumps(answer)}]}


def general_record(rng: random.Random) -> dict:
    sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(2, 5))]
    return {"text": " ".join(sentences)}


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make, n in (("task", task_record, 600), ("general", general_record, 600)):
        with (OUT / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                f.write(json.dumps(make(rng)) + "\n")


if __name__ == "__main__":
    main()
