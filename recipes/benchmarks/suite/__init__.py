"""The efficiency leaderboard: every registered mechanism side by side (``python -m recipes.benchmarks.run``).

Sections (one module each): ``layer`` (one attention layer, forward + backward, time and peak memory vs
sequence length, with the public peers that are installed), ``generation`` (fairseq's generator, time per
token vs position), ``evaluation`` (memory vs sliding-window evaluation, ``eval_speed``), ``quality`` (each
``*_tiny`` preset trained on real data for the same number of tokens) and ``gpu`` (bf16 MFU, CUDA only).
Every case runs in its own process (``isolate``) under a time and memory cap, so one crash or OOM is a
row that says so instead of the end of the run.
"""
