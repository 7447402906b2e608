"""Data: from text or the challenge's shards to training tokens and counted validation bytes.

One idea per module; nothing is re-exported here, so import from the module itself
(``from pgolf.data.dataset import Dataset``, ``from pgolf.data import shards``).

- ``dataset``: the data stage: `Dataset`, `DataLedger`, `TokenStream`, `DistributedTokenLoader`,
  `load_dataset`, `find_tokenizer` and the cached embedded-corpus dataset.
- ``shards``: the challenge's token shard format (and its byte sidecar), read and written exactly.
- ``tokenizer``: SentencePiece tokenizers, trained with the challenge's settings and loaded with clear errors.
- ``corpus``: the embedded corpus, English text from the standard library so pgolf runs offline.
- ``textdata``: documents to a challenge-layout dataset (tokenizer, shards, byte sidecar) and text transforms.
- ``bpb``: bits per byte, with bytes counted exactly as the challenge counts them.
- ``fineweb``: fetching the challenge's cached FineWeb export, checked and resumable.
"""
