"""The benchmark suite (``python -m recipes.benchmarks.run``): one harness for every benchmark.

Sections (one module each): ``layer`` (one attention layer, forward + backward, time and peak memory vs
sequence length, with the public peers that are installed), ``generation`` (fairseq's generator, time per
token vs position), ``mechanisms`` (each mechanism against its own alternative: adaptive span's trimming,
compressive vs XL memory, linear decoding and backward, reversible depth), ``training`` (``fairseq-train``
tokens/s: ours vs fairseq's ``transformer_lm``, Transformer-XL's memory), ``evaluation`` (memory vs
sliding-window ``fairseq-eval-lm``), ``quality`` (each ``*_tiny`` preset trained on real data for the same
number of tokens) and ``gpu`` (bf16 MFU, CUDA only). Every layer, generation and mechanism case runs in its
own process (``isolate``) under a time and memory cap, so one crash or OOM is a row that says so instead
of the end of the run; peak memory is measured by ``recipes.benchmarks.memory`` everywhere.
"""
