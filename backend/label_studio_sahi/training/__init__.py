"""Fine-tuning support: what a training job learns from and how it is scored.

``dataset`` turns a Label Studio export into labelled tasks, a stable train / held-out
split and slice windows with their boxes; ``evaluate`` scores a model on the held-out
tasks (COCO mAP via pycocotools, classification accuracy).
"""
