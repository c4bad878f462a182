console.log(price(21));
