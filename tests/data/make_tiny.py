"""Regenerate tests/data/tiny (a small synthetic LC-Rec JSON dataset used by tiny.yaml).

48 items in 4 categories; 40 users whose sequences mostly stay within one category, so a
tiny model can learn something in seconds. Run: python tests/data/make_tiny.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = {
    "Lab Equipment": [
        "Beaker",
        "Pipette",
        "Flask",
        "Burette",
        "Centrifuge Tube",
        "Petri Dish",
        "Test Tube Rack",
        "Graduated Cylinder",
        "Funnel",
        "Crucible",
        "Stir Bar",
        "Wash Bottle",
    ],
    "Safety": [
        "Safety Goggles",
        "Nitrile Gloves",
        "Lab Coat",
        "Face Shield",
        "Ear Plugs",
        "Respirator Mask",
        "First Aid Kit",
        "Eye Wash Station",
        "Fire Blanket",
        "Hard Hat",
        "Safety Vest",
        "Spill Kit",
    ],
    "Electronics": [
        "Multimeter",
        "Soldering Iron",
        "Breadboard",
        "Jumper Wires",
        "Oscilloscope",
        "Power Supply",
        "Resistor Kit",
        "Capacitor Kit",
        "Logic Analyzer",
        "Wire Stripper",
        "Heat Shrink Tubing",
        "LED Assortment",
    ],
    "Measurement": [
        "Digital Caliper",
        "Micrometer",
        "Tape Measure",
        "Thermometer",
        "pH Meter",
        "Hygrometer",
        "Laser Distance Meter",
        "Scale",
        "Stopwatch",
        "Protractor",
        "Level",
        "Anemometer",
    ],
}
BRANDS = ["Acme", "Labco", "Sciplus", "Voltix"]


def main() -> None:
    rng = random.Random(7)
    items: dict[str, dict[str, str]] = {}
    by_category: dict[str, list[str]] = {}
    index = 0
    for c, (category, names) in enumerate(CATEGORIES.items()):
        for name in names:
            item_id = str(index)
            items[item_id] = {
                "title": f"{BRANDS[c]} {name}",
                "description": f"A {name.lower()} for {category.lower()} work.",
                "brand": BRANDS[c],
                "categories": f"Industrial & Scientific,{category}",
            }
            by_category.setdefault(category, []).append(item_id)
            index += 1
    inters: dict[str, list[str]] = {}
    cats = list(by_category)
    for user in range(40):
        home = cats[user % len(cats)]
        length = rng.randint(5, 9)
        seq: list[str] = []
        while len(seq) < length:
            pool = by_category[home] if rng.random() < 0.85 else by_category[rng.choice(cats)]
            pick = rng.choice(pool)
            if pick not in seq:
                seq.append(pick)
        inters[str(user)] = seq
    out = Path(__file__).resolve().parent / "tiny"
    out.mkdir(exist_ok=True)
    (out / "Tiny.item.json").write_text(json.dumps(items, indent=1) + "\n")
    (out / "Tiny.inter.json").write_text(json.dumps(inters) + "\n")


if __name__ == "__main__":
    main()
