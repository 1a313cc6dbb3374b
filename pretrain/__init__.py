"""beit3.pretrain."""
