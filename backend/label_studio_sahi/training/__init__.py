"""Labels in, a better version out, or none: the rq job (``job``: gather, train, judge,
publish), what it trains and holds out (``dataset``), the training loops (``finetune``), and
held-out scores (``evaluate``: COCO mAP, the bootstrap and sign tests, accuracy)."""
