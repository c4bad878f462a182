function price(n) { return n * 2; }
