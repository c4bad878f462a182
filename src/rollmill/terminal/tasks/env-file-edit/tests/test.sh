#!/bin/bash
# A third of a point per requested edit, and nothing at all if another line was changed.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
python3 - <<'PY'
from pathlib import Path

try:
    lines = [line.strip() for line in Path(".env").read_text().splitlines() if line.strip()]
except (OSError, UnicodeDecodeError):
    raise SystemExit(0)
kept = ["# service settings", "APP_NAME=inventory", "DB_HOST=localhost", "DB_PORT=5432"]
known = ("LOG_LEVEL=", "API_URL=", "LEGACY_MODE=")
others = [line for line in lines if not line.startswith(known)]
if sorted(others) != sorted(kept):
    raise SystemExit(0)
done = [
    [line for line in lines if line.startswith("LOG_LEVEL=")] == ["LOG_LEVEL=debug"],
    [line for line in lines if line.startswith("API_URL=")] == ["API_URL=http://localhost:8000"],
    not any(line.startswith("LEGACY_MODE=") for line in lines),
]
Path("/logs/verifier/reward.txt").write_text(f"{round(sum(done) / 3, 4)}\n")
PY
