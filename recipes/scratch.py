"""Pre-train a small BERT (~10M parameters) from scratch with MLM on WikiText-2 raw.

The seed's setup: 3 layers, hidden 256, 4 heads, FFN 1024, 512 positions, dropout 0.1; the
bert-base-uncased tokenizer; 128-token blocks; dynamic 15% masking (80/10/10); AdamW lr 5e-4,
6% linear warmup then linear decay, grad clip 1.0; 3 epochs, batch 8 train / 16 eval.

One change from the seed, in the initialisation (the seed's recipe does not fix it): weights drawn
with std 0.05 instead of BERT-base's 0.02, and position embeddings started as sinusoids. With BERT's
init the model stays on a unigram-level plateau for the whole run (README, Results). The trained model
is the same plain BertForMaskedLM.

    accelerate launch trainer/run.py recipes/scratch.py
    make scratch        # same, with the offline data in ../shared/data on machines without the Hub
"""

from trainer.config import Config, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig

config = Config(
    name="scratch",
    model=ModelConfig(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=1024,
                      max_position_embeddings=512, dropout=0.1, init_std=0.05, sinusoidal_position_init=True),
    data=DataConfig(dataset="wikitext", dataset_config="wikitext-2-raw-v1", tokenizer="bert-base-uncased",
                    block_size=128, mlm_probability=0.15),
    optim=OptimConfig(lr=5e-4, weight_decay=0.01, schedule="linear", warmup_ratio=0.06, grad_clip=1.0),
    train=TrainConfig(epochs=3, batch_size=8, eval_batch_size=16, seed=42, eval_every=500, log_every=50,
                      save_every=1000),
    log=LogConfig(project="bert-mlm", tags=["scratch"]),
)
