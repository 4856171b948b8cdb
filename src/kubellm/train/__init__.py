"""Training: ``pretrain`` (a Llama model from scratch) and ``finetune`` (LoRA/QLoRA), one shared loop.

Public entry points: :func:`kubellm.train.pretrain.pretrain`, :func:`kubellm.train.finetune.finetune`,
both returning :class:`kubellm.train.loop.TrainResult`. Modules import their heavy dependencies (torch,
transformers, peft, datasets) inside functions, so importing this package is cheap.
"""
