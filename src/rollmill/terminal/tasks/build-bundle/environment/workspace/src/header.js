// header: shop bundle
