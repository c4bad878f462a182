"""Print the N most frequent words of a text file.

Usage: python3 wordfreq.py FILE N

Words are maximal runs of letters a-z, compared case-insensitively (printed in lowercase).
Prints N lines `WORD COUNT`, most frequent first; words with the same count are printed in
alphabetical order.
"""

import re
import sys


def top_words(text, n):
    counts = {}
    for word in re.findall(r"[a-z]+", text):
        counts[word] += 1
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    return ranked[:n]


def main():
    path, n = sys.argv[1], sys.argv[2]
    with open(path) as f:
        for word, count in top_words(f.read(), n):
            print(word, count)


if __name__ == "__main__":
    main()
