#!/bin/bash
sort -n -u numbers.txt > sorted.txt
