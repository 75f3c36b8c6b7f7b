"""What the stages share (no stage imports another stage; each imports what it needs from here):
``io`` (atomic writes, JSON, torch files), ``coco`` (the one COCO reader and validator),
``datasets`` (``CocoDetection``), ``synthetic`` (the synthetic data set), ``cocoeval`` and
``metrics`` (COCO AR/AP), ``proposal_cache`` (sharded Parquet), ``training`` (the one training
loop), ``inference`` (sharding, trained weights, timed forwards), ``variants`` (the model
variants and their labels), ``detection`` (detector settings, cached proposals per image),
``detector_training`` (training a detector, shared by ``train_detector`` and ``finetune``),
``anchor_stats`` (the statistics of ``visualize``) and ``plots`` (matplotlib figures)."""
