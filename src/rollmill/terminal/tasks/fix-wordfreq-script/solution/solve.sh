#!/bin/bash
python3 - <<'PY'
from pathlib import Path

path = Path("wordfreq.py")
text = path.read_text()
for old, new in [
    ('re.findall(r"[a-z]+", text)', 're.findall(r"[a-z]+", text.lower())'),
    ("counts[word] += 1", "counts[word] = counts.get(word, 0) + 1"),
    ("key=lambda item: item[1], reverse=True", "key=lambda item: (-item[1], item[0])"),
    ("sys.argv[1], sys.argv[2]", "sys.argv[1], int(sys.argv[2])"),
]:
    assert old in text, old
    text = text.replace(old, new)
path.write_text(text)
PY
