"""The end-to-end demo behind ``make demo`` (``python -m beit3.demo.run``) and the small real data
sets it and the tests build: scikit-learn's handwritten digits, captions and standard-library text.

- ``digits``: digit images, captions and the text corpus (no download).
- ``data``: the demo's pretraining shards, SentencePiece model and fine-tuning folders.
- ``finetune_data``: the digits as fine-tuning index files for every task.
- ``evaluation``: probes, zero-shot naming and curves on digits never seen in pretraining.
- ``run``: every stage, end to end, on CPU.
"""
