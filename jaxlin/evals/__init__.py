"""Experiments a researcher runs on the library, as functions (benchmarks/ and colab/ call them):
`recall` (MQAR over the token mixers), `liger` (linearize a pretrained Llama, fine-tune, compare),
`timing` (time and compiled memory of the ops against softmax attention vs sequence length)."""
