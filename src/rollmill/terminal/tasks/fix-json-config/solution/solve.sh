#!/bin/bash
# Drop the trailing commas before a closing bracket or brace, then set retries.
python3 - <<'PY'
import json
import re

text = open("settings.json").read()
data = json.loads(re.sub(r",(\s*[\]}])", r"\1", text))
data["retries"] = 5
json.dump(data, open("settings.json", "w"), indent=2)
PY
