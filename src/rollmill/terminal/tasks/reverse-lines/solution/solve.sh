#!/bin/bash
tac input.txt > reversed.txt
