"""Train the shipped demo model (configs/demo.yaml) for a fixed wall-clock budget, then export it.

    python scripts/train_demo.py SECONDS OUT_DIR [key=value ...]

Uses the BPE tokenizer shipped in v4jax/assets/demo/ (trained by v4jax.tokenizer.train_bpe_tokenizer on the
standard library .py files, 4096 tokens), a constant learning rate after warm-up (the run length is set by time,
not steps), and writes OUT_DIR/final-hf; copy its config.json and model*.safetensors into v4jax/assets/demo/.
"""
import os
import sys
import time

from v4jax import train as T

budget, out = float(sys.argv[1]), sys.argv[2]
raw = T.load_config("configs/demo.yaml", [f"out_dir={out}", "data.tokenizer=v4jax/assets/demo/tokenizer.json",
                                          "optimizer.schedule=constant", "optimizer.warmup=100", "steps=100000",
                                          "checkpoint_interval=0", "eval_interval=500", "log_interval=50",
                                          *sys.argv[3:]])
t0 = time.time()
tr = T.Trainer(raw)
while time.time() - t0 < budget:
    tr.run(steps=tr.step + 50)
path = tr.export(os.path.join(out, "final-hf"))
ev = tr.evaluate()
print(f"trained {tr.step} steps ({tr.tokens_seen:,} tokens) in {time.time() - t0:.0f} s; eval {ev}; exported {path}")
tr.close()
