"""beit3.finetune."""
