"""Training the shipped default model (dsv3/default_model), apart from the inference package: not
installed by setup.py; run from the repository root, `python -m training.train --out DIR`.

corpus.py: the standard-library corpus, its split and tokenizer; model.py: TrainableTransformer
(the differentiable model, Hugging Face names) and PRESETS; train.py: the training loop and its
command line; export.py: the trained weights as DeepSeek-V3 bf16 / FP8 checkpoints with metrics.
"""
