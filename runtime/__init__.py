"""The training runtime shared by every trainer (pretraining, VQ-KD tokenizer training, fine-tuning):
process group and device, DeepSpeed engine building, the run's checkpoints with verified markers,
the divergence guard, the hang watchdog, preemption, fault injection and telemetry.

Layers import downward only: ``model`` <- ``data_pipeline`` <- ``runtime`` <- ``pretrain``, ``finetune``.
"""
