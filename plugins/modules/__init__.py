"""Building blocks shared by every mechanism (import the submodules directly: attention files use
``positional`` while ``decoder_layer`` uses the attention base, so this package re-exports nothing)."""
