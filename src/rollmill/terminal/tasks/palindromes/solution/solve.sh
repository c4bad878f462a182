#!/bin/bash
while read -r word; do
  [ "$word" = "$(echo "$word" | rev)" ] && echo "$word"
done < words.txt > palindromes.txt
