#!/bin/bash
grep -c 'ERROR' app.log > error_count.txt
