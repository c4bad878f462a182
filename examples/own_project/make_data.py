"""Write data/units.parquet: chat-format prompts (a system and a user message), the answer, and an
extra `unit` column the reward reads. Run from the repository root:
python examples/own_project/make_data.py"""

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CONVERSIONS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("h", "min", 60), ("min", "s", 60)]


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        source, target, factor = rng.choice(CONVERSIONS)
        amount = rng.randint(2, 9)
        out.append({"prompt": [{"role": "system", "content": "You convert units. Answer with the number and its unit."},
                               {"role": "user", "content": f"How many {target} are in {amount} {source}?"}],
                    "answer": str(amount * factor), "unit": target})
    return out


if __name__ == "__main__":
    path = Path(__file__).parent / "data" / "units.parquet"
    pq.write_table(pa.Table.from_pylist(rows(300)), path)
    print(f"wrote {path}")
