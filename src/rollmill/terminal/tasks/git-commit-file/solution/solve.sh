#!/bin/bash
cd repo
echo "first note" > notes.txt
git add notes.txt
git commit -q -m "Add notes"
