"""Train the shipped demo model (configs/demo.yaml) for a fixed wall-clock budget, then export it.

    python scripts/train_demo.py SECONDS OUT_DIR [key=value ...]

Also writes OUT_DIR/ship/ (config.json, model-0000N-of-0000M.safetensors in <= 12 MB shards, tokenizer.json): the
files that go into v4jax/assets/demo/.

Uses the BPE tokenizer shipped in v4jax/assets/demo/ (trained by v4jax.tokenizer.train_bpe_tokenizer on the
standard library .py files, 4096 tokens), a constant learning rate after warm-up (the run length is set by time,
not steps), and writes OUT_DIR/final-hf; copy its config.json and model*.safetensors into v4jax/assets/demo/.
"""
import os
import shutil
import sys
import time

from v4jax.xla_flags import apply_defaults

apply_defaults()                     # before JAX starts: Triton GEMM autotuning off (see v4jax/xla_flags.py)
from v4jax import train as T  # noqa: E402
from v4jax.checkpoint import save  # noqa: E402

budget, out = float(sys.argv[1]), sys.argv[2]
raw = T.load_config("configs/demo.yaml", [f"out_dir={out}", "data.tokenizer=v4jax/assets/demo/tokenizer.json",
                                          "optimizer.schedule=constant", "optimizer.warmup=100", "steps=100000",
                                          "checkpoint_interval=0", "eval_interval=0", "log_interval=50",
                                          *sys.argv[3:]])
t0 = time.time()
tr = T.Trainer(raw)
while time.time() - t0 < budget:
    tr.run(steps=tr.step + 50)
    sys.stdout.flush()
path = tr.export(os.path.join(out, "final-hf"))
ship = os.path.join(out, "ship")
save(tr.cfg, tr.params(), ship, format="hf", max_shard_bytes=12 << 20)
shutil.copy("v4jax/assets/demo/tokenizer.json", os.path.join(ship, "tokenizer.json"))
print(f"trained {tr.step} steps ({tr.tokens_seen:,} tokens) in {time.time() - t0:.0f} s; exported {path} and {ship}",
      flush=True)
if os.environ.get("DEMO_EVAL", "1") == "1":
    print(f"eval {tr.evaluate()}")
tr.close()
