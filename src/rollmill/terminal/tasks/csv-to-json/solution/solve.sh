#!/bin/bash
python3 - <<'PY'
import csv
import json

rows = list(csv.DictReader(open("people.csv", newline="")))
people = [{"name": r["name"], "age": int(r["age"]), "city": r["city"]} for r in rows]
json.dump(people, open("people.json", "w"), indent=2)
PY
