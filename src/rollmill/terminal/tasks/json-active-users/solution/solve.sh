#!/bin/bash
python3 - <<'PY'
import json

users = json.load(open("users.json"))
names = sorted(u["name"] for u in users if u["active"])
open("active_users.txt", "w").write("\n".join(names) + "\n")
PY
