"""The numbers every Pythia run shares (reference/pythia-neox.md §1-§5), each written once.

Every other module imports these instead of writing the literal: a study that overrides one (a tiny
CPU study's global batch, say) does so through the recipe, never by editing a copy.
"""

#: Length of the original schedule: ``train-iters`` = ``lr-decay-iters`` of every Pythia config.
TRAIN_ITERS = 143_000
#: Sequences per optimizer step (data-parallel ranks × micro batch × gradient accumulation).
GLOBAL_BATCH = 1024
#: Tokens per training sequence (each sample is SEQ_LENGTH + 1 tokens: inputs and shifted labels).
SEQ_LENGTH = 2048
#: GPT-NeoX's default ``seed``: initialisation, and the index maps that fix the data order.
SEED = 1234
#: GPT-NeoX v1.0 over-samples each weighted dataset by this factor (``data_utils.py``:
#: ``num_samples = ceil(train_iters · batch · weight · 1.005)``).
NUM_SAMPLES_MARGIN = 1.005
#: The end-of-document token of the 20B tokenizer (``<|endoftext|>``), appended by ``--append-eod``.
EOD_TOKEN = 0
#: Hugging Face repository of the main suite.
ORG = "EleutherAI"
#: The forms the Pile is published in: raw (tokenized documents, ordered by GPT-NeoX's index maps) and
#: preshuffled (EleutherAI's stream of 2049-token training items, already in training order).
DATA_FORMATS = ("raw", "preshuffled")
#: Precisions GPT-NeoX v1.0 trains in (DeepSpeed's fp16 block, bf16, or neither).
PRECISIONS = ("fp16", "bf16", "fp32")
