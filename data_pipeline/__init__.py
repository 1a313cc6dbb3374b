"""beit3.data_pipeline."""
