from stats import mean, median

assert median([7]) == 7
assert median([5, 3, 9, 1, 7]) == 5
assert median([1, 2, 3, 4, 5, 6]) == 3.5
assert median([2, 2, 4, 4]) == 3
assert mean([2, 4]) == 3
