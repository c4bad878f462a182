#!/bin/bash
cd repo
git checkout -q -b feature/login main
echo "login page" > login.txt
git add login.txt
git commit -q -m "Add login page"
